"""Precision and memory options: fp32 master weights with bf16 compute, and per-block rematerialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from handi_jax.models.unet3d import UNet3DConditionModel
from tests.helpers import tiny_unet_config, unet_inputs


def loss_fn(model, x):
  eps = model(x["sample"], x["timesteps"], x["text"], x["condition"], mask=x["mask"], motion=x["motion"])
  return jnp.mean(eps ** 2)


def count_remat_blocks(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in ("checkpoint", "remat2")  # jax.checkpoint's primitive (named remat2 in 0.7)
    for sub in jax.core.jaxprs_in_params(eqn.params):
      count += count_remat_blocks(sub)
  return count


def test_bf16_compute_keeps_fp32_master_weights():
  model = nnx.eval_shape(lambda: UNet3DConditionModel(tiny_unet_config(), dtype=jnp.bfloat16, param_dtype=jnp.float32,
                                                      rngs=nnx.Rngs(0)))
  dtypes = {v.value.dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  x = unet_inputs()
  jaxpr = jax.make_jaxpr(lambda m: m(x["sample"], x["timesteps"], x["text"], x["condition"], mask=x["mask"]))(model)
  # Every matmul and conv reads bf16 operands (attention logits accumulate into float32 on purpose).
  operand_dtypes = {v.aval.dtype for eqn in jaxpr.jaxpr.eqns
                    if eqn.primitive.name in ("dot_general", "conv_general_dilated") for v in eqn.invars}
  assert operand_dtypes == {jnp.dtype(jnp.bfloat16)}
  assert jaxpr.out_avals[0].dtype == jnp.float32  # eps is returned in float32 for the loss


@pytest.mark.parametrize("remat, blocks", [("none", 0), ("full", 6), ("dots_saveable", 6)])
def test_remat_wraps_every_block(remat, blocks):
  """transformer_in, 2 down blocks, the mid block and 2 up blocks are each one rematerialised region."""
  model = nnx.eval_shape(lambda: UNet3DConditionModel(tiny_unet_config(), remat=remat, rngs=nnx.Rngs(0)))
  x = unet_inputs()
  jaxpr = jax.make_jaxpr(lambda m: loss_fn(m, x))(model)  # the remat regions are what grad differentiates
  assert count_remat_blocks(jaxpr.jaxpr) == blocks


def test_unknown_options_are_named():
  with pytest.raises(ValueError, match="remat='some'; valid: none, full, dots_saveable"):
    UNet3DConditionModel(tiny_unet_config(), remat="some", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="attention='flash'"):
    UNet3DConditionModel(tiny_unet_config(), attention="flash", rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_remat_policies_give_the_same_gradients():
  x = unet_inputs()
  grads = {}
  for remat in ("none", "full", "dots_saveable"):
    model = UNet3DConditionModel(tiny_unet_config(), remat=remat, rngs=nnx.Rngs(0))
    grads[remat] = jax.tree.leaves(nnx.jit(nnx.grad(loss_fn))(model, x))
  for remat in ("full", "dots_saveable"):
    for a, b in zip(grads[remat], grads["none"], strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
