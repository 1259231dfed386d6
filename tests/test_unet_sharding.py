"""The UNet's logical axis names under the configs' sharding rules: the specs on an 8-device fsdp mesh, the
per-device bytes of parameters + AdamW state for the hardware variants, and a sharded forward pass."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from configs import common
from handi_jax import sharding
from handi_jax.models.unet3d import UNet3DConditionModel
from tests.helpers import BATCH, TOLERANCE, handi_forward, unet_inputs

P = PartitionSpec


@pytest.fixture(scope="module")
def full_size_params():
  config = common.get_config(2, "paper")
  abstract = nnx.eval_shape(lambda: UNet3DConditionModel(config.model.unet, rngs=nnx.Rngs(0)))
  return nnx.state(abstract, nnx.Param)


def flat(tree):
  return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(tree)}


def test_full_size_specs_on_the_h100x8_mesh(full_size_params):
  config = common.get_config(2, "paper,h100x8")
  mesh = sharding.make_mesh(config)  # data 1, fsdp 8 over the 8 simulated CPU devices
  specs = {k: s.spec for k, s in flat(sharding.param_shardings(full_size_params, mesh,
                                                               config.sharding_rules)).items()}
  block = "down_blocks.1.attentions.0.transformer_blocks.0"
  expected = {
      "conv_in.kernel": P(None, None, None, "fsdp"),                 # (3, 3, 4, 320): conv_out -> fsdp
      "conv_out.kernel": P(None, None, None, None),                  # 4 output channels: not divisible by 8
      "conv_out.bias": P(None),
      "down_blocks.0.temp_convs.0.conv1.2.kernel": P(None, None, None, None, "fsdp"),
      "down_blocks.0.temp_convs.0.conv1.0.scale": P(None),           # norms replicated
      f"{block}.attn1.to_q.kernel": P("fsdp", "tensor"),             # (embed, heads)
      f"{block}.attn2.to_k.kernel": P("fsdp", "tensor"),             # 1024-d text -> heads
      f"{block}.attn1.to_out.0.kernel": P("tensor", "fsdp"),         # (heads, embed)
      f"{block}.ff.net.0.proj.kernel": P("fsdp", "tensor"),          # (embed, mlp)
      f"{block}.ff.net.2.kernel": P("tensor", "fsdp"),               # (mlp, embed)
      f"{block}.ff.net.2.bias": P("fsdp"),
      "time_embedding.linear_1.kernel": P("fsdp", "tensor"),
  }
  for key, spec in expected.items():
    assert specs[key] == spec, key
  values = flat(full_size_params)
  unsharded_large = [k for k, spec in specs.items() if values[k].value.size >= 100_000 and "fsdp" not in spec]
  assert unsharded_large == []  # every large parameter is split over fsdp


@pytest.mark.parametrize("variant, mesh_shape, hbm_gib", [("h100x8", (1, 8, 1), 80), ("tpu_v5p_64", (2, 16, 1), 95)])
def test_full_size_params_and_adamw_state_fit_per_device(full_size_params, variant, mesh_shape, hbm_gib):
  config = common.get_config(2, f"paper,{variant}")
  assert sharding.mesh_shape(config.mesh, 0, config.num_devices_expected).values() == mesh_shape
  mesh = AbstractMesh(mesh_shape, sharding.MESH_AXES)  # the target's mesh without its devices
  values = flat(full_size_params)
  total = sum(v.value.size for v in values.values())
  per_device = 0
  for variable in values.values():
    axes = variable.get_metadata()["sharding_names"]
    spec = sharding.logical_to_spec(axes, config.sharding_rules, variable.value.shape, mesh)
    per_device += int(np.prod(NamedSharding(mesh, spec).shard_shape(variable.value.shape)))
  fsdp = mesh_shape[1]
  bytes_per_device = 3 * 4 * per_device  # fp32 params + AdamW mu and nu
  print(f"{variant}: {total:,} params; per device {per_device:,} params, params + AdamW "
        f"{bytes_per_device / 2**30:.2f} GiB of {hbm_gib} GiB (ideal {3 * 4 * total / fsdp / 2**30:.2f})")
  assert per_device < 1.01 * total / fsdp
  assert bytes_per_device < 0.05 * hbm_gib * 2**30  # leaves the rest for activations


def shard_like_h100x8(module):
  config = common.get_config(2, "h100x8")
  mesh = sharding.make_mesh(config)  # data 1, fsdp 8
  state = nnx.state(module)
  return nnx.merge(nnx.graphdef(module), jax.device_put(state, sharding.param_shardings(state, mesh,
                                                                                         config.sharding_rules)))


@nnx.jit
def _down_block_forward(block, x, temb, context):
  return block(x, temb, context, num_frames=4)


def test_sharded_unet_block_forward_equals_unsharded(handi_pair):  # noqa: F811
  """First down block (resnet, temporal conv, spatial and temporal transformers, downsampler) on fsdp-8."""
  _, model = handi_pair
  block = model.down_blocks[0]
  sharded = shard_like_h100x8(block)
  kernel = sharded.resnets[0].conv1.kernel.value
  assert kernel.sharding.spec == P(None, None, None, "fsdp") and len(kernel.addressable_shards) == 8
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (BATCH * 4, 6, 11, 16))
  temb = jax.random.normal(keys[1], (BATCH * 4, 64))
  context = jax.random.normal(keys[2], (BATCH * 4, 77, 24))
  expected, expected_skips = _down_block_forward(block, x, temb, context)
  ours, skips = _down_block_forward(sharded, x, temb, context)
  scale = float(np.abs(np.asarray(expected)).max())
  np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=0, atol=1e-5 * scale)
  for a, b in zip(skips, expected_skips, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)


@pytest.mark.slow
def test_sharded_unet_forward_equals_unsharded(handi_pair, handi_outputs):  # noqa: F811
  _, model = handi_pair
  sharded_model = shard_like_h100x8(model)
  x = unet_inputs()
  ours = handi_forward(sharded_model, x["sample"], x["timesteps"], x["text"], x["condition"], x["mask"],
                        x["motion"])
  unsharded, reference = handi_outputs
  np.testing.assert_allclose(np.asarray(ours), unsharded, rtol=0, atol=TOLERANCE * np.abs(reference).max())
