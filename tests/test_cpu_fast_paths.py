"""The CPU forms of the UNet's temporal convolution, attention and GELU (what XLA:CPU runs fastest) give the values
and gradients of the forms every other platform compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from handi_jax.models import attention, layers, unet_blocks


def _values_and_grads(fn, *args):
  return jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32))), argnums=tuple(range(len(args))))(
      *args)


def _assert_close(a, b, tolerance):
  """Each leaf within `tolerance` of the other's largest magnitude (bfloat16 rounds each differently near 0)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    np.testing.assert_allclose(x, y, rtol=0, atol=tolerance * max(1.0, np.abs(y).max()))


@pytest.mark.parametrize("key_length", [9, 64])   # temporal (broadcast products) and spatial (dots) forms
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_cpu_attention_equals_plain_attention(key_length, dtype, tolerance):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, length, 3, 8)) * 2, dtype) for length in (7, key_length, key_length))
  assert attention.target_platform() == "cpu"
  # against the plain form in float32 on the same values: in bfloat16 the two forms round at different places
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  _assert_close(_values_and_grads(attention._cpu_attention, q, k, v),
                _values_and_grads(attention._plain_attention, *f32), tolerance)


def test_temporal_conv_on_cpu_equals_the_convolution():
  conv = layers.temporal_conv(6, layers.LayerOptions(), nnx.Rngs(0))
  conv.bias.value = jnp.arange(6, dtype=jnp.float32)  # zero-initialised: make the bias count
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 3, 4, 6)), jnp.float32)

  graphdef, params = nnx.split(conv)

  def run(call):
    return _values_and_grads(lambda params, x: call(nnx.merge(graphdef, params), x), params, x)

  _assert_close(run(layers.TemporalConv.__call__), run(nnx.Conv.__call__), 2e-5)


def test_gelu_is_the_exact_gelu():
  x = jnp.linspace(-6, 6, 101)
  _assert_close(_values_and_grads(unet_blocks.gelu, x), _values_and_grads(lambda x: jax.nn.gelu(x, False), x), 1e-6)
