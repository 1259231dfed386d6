"""UNet parity with diffusers 0.42.1 (stock path) and with the release's forward pass written in PyTorch from
reference_spec.md section 1.3 (HANDI path), fp32 on CPU, also through export and the PyTorch loaders; the
forced-size upsampling index rule."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from handi_jax.convert import core
from handi_jax.convert import unet as convert_unet
from handi_jax.models import layers, shared_blocks, unet_blocks
from handi_jax.models.unet3d import UNet3DConditionModel
from tests.helpers import (
  BATCH,
  FRAMES,
  HEIGHT,
  TOLERANCE,
  WIDTH,
  handi_forward,
  jax_unet,
  relative_error,
  tiny_unet_config,
  unet_inputs,
)
from tests.reference_torch import HandiReference, to_torch_video, torch_unet


def test_handi_path_matches_the_release_forward_in_torch(handi_outputs):
  ours, theirs = handi_outputs
  assert ours.shape == (BATCH, FRAMES, HEIGHT, WIDTH, 4)
  error = relative_error(ours, theirs)
  print(f"HANDI path: max |jax - torch| = {np.abs(ours - theirs).max():.3g}, relative {error:.3g}")
  assert error < TOLERANCE
  assert np.abs(theirs).max() > 0.1  # a live output, not a zeroed network


def stock_outputs(model, reference, seed=1):
  """(ours, diffusers') on the stock path: no mask, no context frame, no motion, 4 frames."""
  x = unet_inputs(seed=seed)
  video = np.concatenate([x["condition"], x["sample"]], axis=1)
  ours = nnx.jit(lambda m, *a: m.forward_frames(*a))(model, video, x["timesteps"], x["text"])
  with torch.no_grad():
    theirs = reference(to_torch_video(video), torch.from_numpy(x["timesteps"]),
                       torch.from_numpy(x["text"])).sample.permute(0, 2, 3, 4, 1).numpy()
  return np.asarray(ours), theirs


def handi_outputs_of(model, reference, seed=0):
  """(ours, the release forward's) on the mask + motion + context-frame path."""
  x = unet_inputs(seed=seed)
  ours = handi_forward(model, x["sample"], x["timesteps"], x["text"], x["condition"], x["mask"], x["motion"])
  with torch.no_grad():
    theirs = reference(to_torch_video(x["sample"]), torch.from_numpy(x["timesteps"]), torch.from_numpy(x["text"]),
                       to_torch_video(x["condition"]), torch.from_numpy(x["mask"]).permute(0, 3, 1, 2)[:, :, None],
                       torch.from_numpy(x["motion"]))
  return np.asarray(ours), theirs.permute(0, 2, 3, 4, 1).numpy()


def test_stock_path_matches_diffusers_unet3d():
  """No mask, no context frame, no motion: forward_frames is diffusers' UNet3DConditionModel.forward."""
  config = tiny_unet_config(mask_channels=0, motion_strength=False)
  reference = torch_unet(config, seed=3)
  ours, theirs = stock_outputs(jax_unet(config, {k: v.numpy() for k, v in reference.state_dict().items()}), reference)
  error = relative_error(ours, theirs)
  print(f"stock path: max |jax - torch| = {np.abs(ours - theirs).max():.3g}, relative {error:.3g}")
  assert error < TOLERANCE


def test_diffusers_export_matches_diffusers_from_pretrained(tmp_path):
  """4 GroupNorm groups and norm_eps 1e-2: diffusers gives the temporal norms norm_num_groups groups but torch's
  default eps 1e-5. Imported from diffusers, exported in its keys, loaded by its own loader: same outputs."""
  config = tiny_unet_config(norm_eps=1e-2, mask_channels=0, motion_strength=False)
  torch_unet(config, seed=4).save_pretrained(tmp_path / "in")
  model = convert_unet.load_pretrained(tmp_path / "in", handi_extension=False)
  convert_unet.save_pretrained(model, tmp_path / "out", key_format="diffusers")
  ours, theirs = stock_outputs(model, diffusers.UNet3DConditionModel.from_pretrained(tmp_path / "out").eval())
  error = relative_error(ours, theirs)
  print(f"diffusers export, 4 groups: max |jax - torch| = {np.abs(ours - theirs).max():.3g}, relative {error:.3g}")
  assert error < TOLERANCE


def test_original_export_matches_the_release_class(tmp_path):
  """4 GroupNorm groups and norm_eps 1e-2 in the release's class, which builds transformer_in and the temporal
  convs with 32 groups (eps 1e-5) anyway: imported from its keys, exported back and loaded into it, same outputs."""
  config = tiny_unet_config(block_out_channels=(32, 64), norm_eps=1e-2, temporal_norm_num_groups=32)
  core.write_model_dir(tmp_path / "in", convert_unet.to_pretrained_config(config, "original"),
                       HandiReference(torch_unet(config, seed=5)).state_dict_numpy(), convert_unet.WEIGHTS_NAME)
  model = convert_unet.load_pretrained(tmp_path / "in")
  assert model.config["norm_num_groups"] == 4 and model.config["temporal_norm_num_groups"] == 32
  convert_unet.save_pretrained(model, tmp_path / "out", key_format="original")
  reference = HandiReference(torch_unet(config, seed=6))
  reference.load_state_dict_numpy(core.read_state_dict(tmp_path / "out"))
  ours, theirs = handi_outputs_of(model, reference)
  error = relative_error(ours, theirs)
  print(f"original export, 4 groups: max |jax - torch| = {np.abs(ours - theirs).max():.3g}, relative {error:.3g}")
  assert error < TOLERANCE


@pytest.mark.parametrize("sizes", [(3, 6), (6, 11), (11, 22), (22, 43), (43, 85), (24, 48), (5, 9), (17, 33)])
def test_nearest_upsampling_indices_follow_torch(sizes):
  in_size, out_size = sizes
  source = torch.arange(in_size, dtype=torch.float32)[None, None, :, None].expand(1, 1, in_size, 1)
  expected = torch.nn.functional.interpolate(source, size=(out_size, 1), mode="nearest")[0, 0, :, 0]
  np.testing.assert_array_equal(shared_blocks.nearest_indices(in_size, out_size), expected.numpy().astype(np.int64))


def test_half_pixel_resize_would_differ_from_torch():
  """Why the indices are gathered explicitly: jax.image.resize('nearest') picks other source pixels at 43 -> 85."""
  source = jnp.arange(43, dtype=jnp.float32)
  resized = np.asarray(jax.image.resize(source, (85,), "nearest")).astype(np.int64)
  assert (resized != shared_blocks.nearest_indices(43, 85)).any()


def test_temporal_dropout_only_in_train_mode():
  opts = layers.LayerOptions()
  layer = unet_blocks.TemporalConvLayer(8, 4, 0.1, opts, nnx.Rngs(0, dropout=1))
  kernel = layer.conv4[3].kernel  # starts at zero (an identity layer), which would hide the dropout
  kernel.value = jax.random.normal(jax.random.key(0), kernel.value.shape)
  x = jax.random.normal(jax.random.key(1), (2 * 3, 4, 5, 8))
  first = layer(x, num_frames=3)
  np.testing.assert_array_equal(layer(x, num_frames=3), first)
  layer.train()
  assert np.abs(np.asarray(layer(x, num_frames=3) - first)).max() > 1e-3
  layer.eval()
  np.testing.assert_array_equal(layer(x, num_frames=3), first)


def test_unet_train_and_eval_switch_every_temporal_dropout(handi_pair):
  _, model = handi_pair
  dropouts = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Dropout) and m.rate > 0]
  assert len(dropouts) == 3 * 8 and all(d.deterministic for d in dropouts)  # 8 temporal conv layers
  model.train()
  assert not any(d.deterministic for d in dropouts)
  model.eval()
  assert all(d.deterministic for d in dropouts)


def test_bad_inputs_name_the_argument(handi_pair):
  _, model = handi_pair
  x = unet_inputs()
  with pytest.raises(ValueError, match="condition_latent has shape"):
    model(x["sample"], x["timesteps"], x["text"], x["condition"][:, :, :5])
  with pytest.raises(ValueError, match=r"mask has shape \(1, 6, 11, 2\)"):
    model(x["sample"], x["timesteps"], x["text"], x["condition"], mask=np.zeros((1, 6, 11, 2), np.float32))
  stock = UNet3DConditionModel(tiny_unet_config(mask_channels=0, motion_strength=False), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no time_embedding.cond_proj"):
    stock(x["sample"], x["timesteps"], x["text"], x["condition"], motion=x["motion"])


@pytest.mark.slow
def test_four_level_demo_widths_match_the_release_forward_at_an_odd_latent_size():
  """The demo model's widths on four levels at 24 x 43 latents: 43 -> 22 -> 11 -> 6 down, 6 -> 11 -> 22 -> 43 up."""
  from configs.common import unet_config

  config = dict(unet_config(full_size=False).to_dict(), block_out_channels=(32, 64, 64, 64))
  reference = HandiReference(torch_unet(config, seed=7))
  model = jax_unet(config, reference.state_dict_numpy())
  rng = np.random.default_rng(2)
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  sample, condition, text = f32(1, 2, 24, 43, 4), f32(1, 1, 24, 43, 4), f32(1, 77, config["cross_attention_dim"])
  mask, timesteps, motion = (rng.random((1, 24, 43, 1)) > 0.5).astype(np.float32), np.array([421]), np.array([5.0])
  ours = handi_forward(model, sample, timesteps, text, condition, mask, motion)
  with torch.no_grad():
    theirs = reference(to_torch_video(sample), torch.from_numpy(timesteps), torch.from_numpy(text),
                       to_torch_video(condition), torch.from_numpy(mask).permute(0, 3, 1, 2)[:, :, None],
                       torch.from_numpy(motion)).permute(0, 2, 3, 4, 1).numpy()
  error = relative_error(ours, theirs)
  print(f"demo config 24x43: max |jax - torch| = {np.abs(np.asarray(ours) - theirs).max():.3g}, relative {error:.3g}")
  assert error < TOLERANCE
