"""Attention kernels: xla against a numpy reference, the TPU splash kernel (Pallas interpreter) with padded
sequences and inside shard_map on a CPU mesh, the kernel compiled for a TPU topology, and the errors on backends
where a kernel cannot run."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from handi_jax import sharding
from handi_jax.models import attention
from handi_jax.models.unet3d import UNet3DConditionModel
from tests.conftest import REPO_ROOT
from tests.helpers import tiny_unet_config, unet_inputs

P = PartitionSpec


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


@pytest.mark.parametrize("mesh_shape, batch, heads, spec", [
    ((2, 2, 2), 8, 4, P(("data", "fsdp"), None, "tensor", None)),
    ((2, 2, 2), 6, 4, P(("data",), None, "tensor", None)),    # batch * frames = 2 * 3: fsdp does not divide 6 / 2
    ((1, 4, 2), 6, 3, P(None, None, None, None)),             # neither axis divides: the work is replicated
    ((1, 2, 1), 6, 4, P(("fsdp",), None, None, None)),
])
def test_splash_shard_spec_splits_batch_and_heads_where_the_axes_divide(mesh_shape, batch, heads, spec):
  mesh = AbstractMesh(mesh_shape, sharding.MESH_AXES)
  assert attention._shard_spec(mesh, batch=batch, heads=heads) == spec


def test_splash_attention_in_shard_map_matches_xla_values_and_gradients():
  """Spatial cross-attention shapes (batch 2 x 3 frames, 100 queries, 77 text tokens) on a data 2 x fsdp 2 x
  tensor 2 mesh of the 8 CPU devices (tests/conftest.py): the kernel runs per shard in the Pallas interpreter,
  forward and backward."""
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((6, length, 4, 8)), jnp.float32) for length in (100, 77, 77))
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def value_and_grads(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cotangent)

  splash = lambda q, k, v: attention.splash_attention(q, k, v, interpret=True)
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(splash)(q, k, v)
    out, grads = jax.jit(lambda: value_and_grads(splash))()
  shard_maps = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "shard_map"]
  assert len(shard_maps) == 1 and shard_maps[0].params["out_specs"] == (P("data", None, "tensor", None),)
  expected_out, expected_grads = jax.jit(lambda: value_and_grads(attention.xla_attention))()
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected_out), atol=2e-6)
  for name, grad, expected in zip("qkv", grads, expected_grads, strict=True):
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), atol=2e-5, err_msg=f"d{name}")


def test_tpu_flash_on_a_cpu_mesh_or_under_the_legacy_mesh_context_says_what_to_do():
  mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1], axis_types=(AxisType.Auto,) * 3)
  expected = "attention='tpu_flash' needs a TPU; on cpu use --config.model.attention=xla"
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=expected):
    attention.check_implementation("tpu_flash")
  q, k, v = qkv()
  with mesh, pytest.raises(ValueError, match="takes its mesh from `with jax.set_mesh\\(mesh\\):`"):
    attention.splash_attention(q, k, v, interpret=True)


# Run in a child process: libtpu's compiler targets a TPU topology while the devices here stay CPU. It compiles the
# splash kernel's forward and backward alone, and lowers (with --compile-unet: also compiles) a train-step-like
# gradient through the tiny UNet.
_TOPOLOGY_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from configs import common
from handi_jax import sharding
from handi_jax.models import attention
from handi_jax.models.unet3d import UNet3DConditionModel
from tests.helpers import tiny_unet_config, unet_inputs

topology, mesh_shape = sys.argv[1], tuple(map(int, sys.argv[2].split(",")))
devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
mesh = jax.make_mesh(mesh_shape, sharding.MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * 3)
abstract = lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))
result = {"default_backend": jax.default_backend(), "target_without_mesh": attention.target_platform()}

q, kv = jnp.zeros((8, 200, 4, 64), jnp.bfloat16), jnp.zeros((8, 77, 4, 64), jnp.bfloat16)
spec = P(("data", "fsdp"), None, "tensor")
attention_loss = lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, "tpu_flash").astype(jnp.float32) ** 2)

model = nnx.eval_shape(lambda: UNet3DConditionModel(tiny_unet_config(), attention="tpu_flash", rngs=nnx.Rngs(0)))
graphdef, params, rest = nnx.split(model, nnx.Param, ...)
shardings = sharding.param_shardings(params, mesh, common.get_config(2).sharding_rules)
params = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.value.shape, v.value.dtype, sharding=s)),
                      params, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
inputs = {k: abstract(a, P("data") if a.shape[0] == 2 else P()) for k, a in unet_inputs().items()}

def unet_loss(params, x):
  out = nnx.merge(graphdef, params, rest)(x["sample"], x["timesteps"], x["text"], x["condition"], mask=x["mask"],
                                          motion=x["motion"])
  return jnp.mean(out.astype(jnp.float32) ** 2)

with jax.set_mesh(mesh):
  result["target_with_mesh"] = attention.target_platform()
  attention_step = jax.jit(jax.value_and_grad(attention_loss, argnums=(0, 1, 2))).lower(
      abstract(q, spec), abstract(kv, spec), abstract(kv, spec))
  unet_step = jax.jit(jax.value_and_grad(unet_loss)).lower(params, inputs)
count = lambda compiled: compiled.as_text().count('custom_call_target="tpu_custom_call"')
result["attention_kernels"] = count(attention_step.compile())
result["unet_lowered_kernels"] = unet_step.as_text().count("tpu_custom_call")
if "--compile-unet" in sys.argv:
  result["unet_kernels"] = count(unet_step.compile())
print(json.dumps(result))
"""


def _compile_for_topology(*args: str) -> dict:
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip('libtpu is not installed (pip install "jax[tpu]==0.7.1" adds the TPU compiler)')
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT), TPU_WORKER_HOSTNAMES="localhost",
             ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env.pop("TPU_ACCELERATOR_TYPE", None)  # with it, libtpu aborts compile-only processes
  done = subprocess.run([sys.executable, "-c", _TOPOLOGY_SCRIPT, *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  # Compile-only: the devices here are CPU; the kernel is chosen from the mesh's TPU devices.
  assert (result["default_backend"], result["target_without_mesh"], result["target_with_mesh"]) == ("cpu", "cpu", "tpu")
  assert result["attention_kernels"] == 3  # forward, dq and dkv kernels, in Mosaic IR that this libtpu accepts
  assert result["unet_lowered_kernels"] > 0
  return result


def test_tpu_flash_compiles_for_a_tpu_topology():
  """The splash kernel in shard_map over a v5e 2x4 mesh (data 2, fsdp 2, tensor 2), forward and backward, compiled
  by libtpu; a gradient through the tiny UNet with tpu_flash lowers on that mesh."""
  _compile_for_topology("v5e:2x4", "2,2,2")


@pytest.mark.slow
def test_tiny_unet_train_step_with_tpu_flash_compiles_for_a_tpu_topology():
  """Loss and gradient through the tiny UNet compiled for v5e 2x2 (data 2, tensor 2); minutes on 2 CPU cores."""
  result = _compile_for_topology("v5e:2x2", "2,1,2", "--compile-unet")
  assert result["unet_kernels"] > 0
