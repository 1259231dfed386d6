"""Attention kernels: xla against a numpy reference, the TPU splash kernel (Pallas interpreter) with padded
sequences, and the errors on backends where a kernel cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from handi_jax.models import attention
from handi_jax.models.unet3d import UNet3DConditionModel
from tests.helpers import tiny_unet_config, unet_inputs


def reference_attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v per batch and head, in float64."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("nhqk,nkhd->nqhd", weights, v)


def qkv(q_len=100, kv_len=77, heads=2, head_dim=8, dtype=jnp.float32):
  rng = np.random.default_rng(0)
  make = lambda length: jnp.asarray(rng.standard_normal((2, length, heads, head_dim)), dtype)
  return make(q_len), make(kv_len), make(kv_len)


def test_xla_attention_matches_the_reference():
  q, k, v = qkv()
  out = attention.dot_product_attention(q, k, v, "xla")
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v), atol=2e-6)


def test_xla_attention_in_bfloat16_keeps_float32_softmax():
  q, k, v = qkv(dtype=jnp.bfloat16)
  out = attention.dot_product_attention(q, k, v, "xla")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), reference_attention(q, k, v), atol=3e-2)


def test_tpu_splash_kernel_in_the_pallas_interpreter_masks_padding():
  """100 queries and 77 keys are padded to 128; padded keys must get no weight."""
  q, k, v = qkv()
  out = attention.splash_attention(q, k, v, interpret=True)
  assert out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v), atol=2e-6)


@pytest.mark.parametrize("implementation, device", [("cudnn", "a CUDA GPU"), ("tpu_flash", "a TPU")])
def test_kernels_on_the_wrong_backend_say_what_to_use(implementation, device):
  q, k, v = qkv()
  backend = jax.default_backend()
  expected = f"attention='{implementation}' needs {device}; on {backend} use --config.model.attention=xla"
  with pytest.raises(ValueError, match=expected):
    attention.dot_product_attention(q, k, v, implementation)
  with pytest.raises(ValueError, match="not known; valid settings: xla, cudnn, tpu_flash"):
    attention.check_implementation("flash")


def test_unet_with_an_unavailable_kernel_fails_when_traced_with_the_hint():
  model = UNet3DConditionModel(tiny_unet_config(), attention="cudnn", rngs=nnx.Rngs(0))
  x = unet_inputs()
  with pytest.raises(ValueError, match="--config.model.attention=xla"):
    jax.eval_shape(lambda: model(x["sample"], x["timesteps"], x["text"], x["condition"], mask=x["mask"]))
