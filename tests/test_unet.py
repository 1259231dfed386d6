"""UNet parity with diffusers 0.42.1 (stock path) and with the release's forward pass written in PyTorch from
reference_spec.md section 1.3 (HANDI path), fp32 on CPU; the forced-size upsampling index rule."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from handi_jax.convert import core
from handi_jax.convert import unet as convert_unet
from handi_jax.models import unet_blocks
from handi_jax.models.unet3d import UNet3DConditionModel

# diffusers' tiny-config rules: norm_num_groups divides every channel count, and its `attention_head_dim` is the
# per-head width (heads = channels // 8 here); transformer_in is always 8 heads of that width.
TINY = dict(in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8,
            cross_attention_dim=24, norm_num_groups=4, norm_eps=1e-5, transformer_in_heads=8, mask_channels=1,
            motion_strength=True, sample_size=8)
BATCH, FRAMES, HEIGHT, WIDTH = 2, 3, 6, 11   # 11 -> 6 -> 11: forced-size (non-x2) upsampling
TOLERANCE = 5e-5  # relative to the output's max |value|: float32 round-off through ~200 ops


def tiny_config(**overrides):
  return {**TINY, **overrides}


def torch_unet(config, seed=0):
  """diffusers UNet3DConditionModel for `config`, every parameter random (none left at zero or one)."""
  torch.manual_seed(seed)
  down, up = convert_unet.block_types(len(config["block_out_channels"]))
  model = diffusers.UNet3DConditionModel(
      sample_size=config["sample_size"], in_channels=config["in_channels"], out_channels=config["out_channels"],
      down_block_types=down, up_block_types=up, block_out_channels=config["block_out_channels"],
      layers_per_block=config["layers_per_block"], norm_num_groups=config["norm_num_groups"],
      norm_eps=config["norm_eps"], cross_attention_dim=config["cross_attention_dim"],
      attention_head_dim=config["attention_head_dim"],
      time_cond_proj_dim=config["block_out_channels"][0] if config["motion_strength"] else None)
  randomize(model, seed)
  return model.eval()


def randomize(module, seed):
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if p.ndim > 1:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      else:
        p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)


class HandiReference(torch.nn.Module):
  """The release's UNet forward (reference_spec.md 1.3) around a diffusers UNet3DConditionModel built with
  time_cond_proj_dim = block_out_channels[0]: context frame prepended and dropped, [mask, latents] -> conv_in2,
  motion strength -> the timestep sinusoid -> time_embedding.cond_proj."""

  def __init__(self, unet, seed=1):
    super().__init__()
    self.unet = unet
    c0, out = unet.config.block_out_channels[0], unet.config.out_channels
    self.conv_in2 = torch.nn.Conv2d(1 + out, c0, 3, padding=1)
    self.motion_embedding = torch.nn.Sequential(torch.nn.Linear(c0, 4 * c0), torch.nn.SiLU(),
                                                torch.nn.Linear(4 * c0, 4 * c0))
    randomize(self.conv_in2, seed)
    randomize(self.motion_embedding, seed + 1)

  def state_dict_numpy(self):
    state = {k: v for k, v in self.unet.state_dict().items()}
    state.update({f"conv_in2.{k}": v for k, v in self.conv_in2.state_dict().items()})
    state.update({f"motion_embedding.{k}": v for k, v in self.motion_embedding.state_dict().items()})
    return {k: v.detach().numpy() for k, v in state.items()}

  def forward(self, sample, timestep, encoder_hidden_states, condition_latent, mask=None, motion=None):
    u = self.unet
    x = torch.cat([condition_latent, sample], dim=2)
    batch, _, frames, height, width = x.shape
    forward_size = any(s % 2 ** u.num_upsamplers for s in (height, width))
    t_emb = u.time_proj(timestep.expand(batch))
    condition = u.time_proj(motion) if motion is not None else None  # motion_proj: the same Timesteps
    emb = u.time_embedding(t_emb, condition).repeat_interleave(frames, dim=0)
    context = encoder_hidden_states.repeat_interleave(frames, dim=0)
    if mask is not None:
      x = torch.cat([mask.repeat(batch // mask.shape[0], 1, frames, 1, 1), x], dim=1)
    x = x.permute(0, 2, 1, 3, 4).reshape(batch * frames, -1, height, width)
    x = (self.conv_in2 if mask is not None else u.conv_in)(x)
    x = u.transformer_in(x, num_frames=frames, return_dict=False)[0]
    skips = (x,)
    for block in u.down_blocks:
      if getattr(block, "has_cross_attention", False):
        x, res = block(hidden_states=x, temb=emb, encoder_hidden_states=context, num_frames=frames)
      else:
        x, res = block(hidden_states=x, temb=emb, num_frames=frames)
      skips += res
    x = u.mid_block(x, emb, encoder_hidden_states=context, num_frames=frames)
    for i, block in enumerate(u.up_blocks):
      res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
      size = skips[-1].shape[2:] if i < len(u.up_blocks) - 1 and forward_size else None
      kwargs = dict(encoder_hidden_states=context) if getattr(block, "has_cross_attention", False) else {}
      x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, upsample_size=size, num_frames=frames,
                **kwargs)
    x = u.conv_out(u.conv_act(u.conv_norm_out(x)))
    return x.reshape(batch, frames, -1, height, width).permute(0, 2, 1, 3, 4)[:, :, 1:]


def jax_unet(config, torch_state):
  model = UNet3DConditionModel(config, rngs=nnx.Rngs(0))
  core.load_flat_params(model, core.to_flax(torch_state, convert_unet.UNET_RULES), "tiny UNet")
  return model


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return dict(sample=f32(BATCH, FRAMES, HEIGHT, WIDTH, 4), condition=f32(BATCH, 1, HEIGHT, WIDTH, 4),
              text=f32(BATCH, 77, TINY["cross_attention_dim"]), timesteps=np.array([999, 37], np.int64),
              mask=(rng.random((1, HEIGHT, WIDTH, 1)) > 0.5).astype(np.float32), motion=np.array([3.0], np.float32))


def to_torch_video(x):  # (B, F, h, w, C) -> (B, C, F, h, w)
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 4, 1, 2, 3))))


def relative_error(ours, reference):
  ours, reference = np.asarray(ours), np.asarray(reference)
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


@nnx.jit
def _handi_forward(model, sample, timesteps, text, condition, mask, motion):
  return model(sample, timesteps, text, condition, mask=mask, motion=motion)


@pytest.fixture(scope="module")
def handi_pair():
  reference = HandiReference(torch_unet(tiny_config()))
  model = jax_unet(tiny_config(), reference.state_dict_numpy())
  return reference, model


@pytest.fixture(scope="module")
def handi_outputs(handi_pair):
  """(ours, reference) on the mask + motion + context-frame path; shared with the sharding test."""
  reference, model = handi_pair
  x = inputs()
  ours = _handi_forward(model, x["sample"], x["timesteps"], x["text"], x["condition"], x["mask"], x["motion"])
  with torch.no_grad():
    theirs = reference(to_torch_video(x["sample"]), torch.from_numpy(x["timesteps"]),
                       torch.from_numpy(x["text"]), to_torch_video(x["condition"]),
                       torch.from_numpy(x["mask"]).permute(0, 3, 1, 2)[:, :, None], torch.from_numpy(x["motion"]))
  return np.asarray(ours), theirs.permute(0, 2, 3, 4, 1).numpy()


def test_handi_path_matches_the_release_forward_in_torch(handi_outputs):
  ours, theirs = handi_outputs
  assert ours.shape == (BATCH, FRAMES, HEIGHT, WIDTH, 4)
  error = relative_error(ours, theirs)
  print(f"HANDI path: max |jax - torch| = {np.abs(ours - theirs).max():.3g}, relative {error:.3g}")
  assert error < TOLERANCE
  assert np.abs(theirs).max() > 0.1  # a live output, not a zeroed network


def test_stock_path_matches_diffusers_unet3d():
  """No mask, no context frame, no motion: forward_frames is diffusers' UNet3DConditionModel.forward."""
  config = tiny_config(mask_channels=0, motion_strength=False)
  reference = torch_unet(config, seed=3)
  model = jax_unet(config, {k: v.numpy() for k, v in reference.state_dict().items()})
  x = inputs(seed=1)
  video = np.concatenate([x["condition"], x["sample"]], axis=1)  # 4 frames
  ours = nnx.jit(lambda m, *a: m.forward_frames(*a))(model, video, x["timesteps"], x["text"])
  with torch.no_grad():
    theirs = reference(to_torch_video(video), torch.from_numpy(x["timesteps"]),
                       torch.from_numpy(x["text"])).sample.permute(0, 2, 3, 4, 1).numpy()
  error = relative_error(ours, theirs)
  print(f"stock path: max |jax - torch| = {np.abs(np.asarray(ours) - theirs).max():.3g}, relative {error:.3g}")
  assert error < TOLERANCE


@pytest.mark.parametrize("sizes", [(3, 6), (6, 11), (11, 22), (22, 43), (43, 85), (24, 48), (5, 9), (17, 33)])
def test_nearest_upsampling_indices_follow_torch(sizes):
  in_size, out_size = sizes
  source = torch.arange(in_size, dtype=torch.float32)[None, None, :, None].expand(1, 1, in_size, 1)
  expected = torch.nn.functional.interpolate(source, size=(out_size, 1), mode="nearest")[0, 0, :, 0]
  np.testing.assert_array_equal(unet_blocks.nearest_indices(in_size, out_size), expected.numpy().astype(np.int64))


def test_half_pixel_resize_would_differ_from_torch():
  """Why the indices are gathered explicitly: jax.image.resize('nearest') picks other source pixels at 43 -> 85."""
  source = jnp.arange(43, dtype=jnp.float32)
  resized = np.asarray(jax.image.resize(source, (85,), "nearest")).astype(np.int64)
  assert (resized != unet_blocks.nearest_indices(43, 85)).any()


def test_temporal_dropout_only_in_train_mode():
  opts = unet_blocks.LayerOptions()
  layer = unet_blocks.TemporalConvLayer(8, 4, 1e-5, 0.1, opts, nnx.Rngs(0, dropout=1))
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
  x = inputs()
  with pytest.raises(ValueError, match="condition_latent has shape"):
    model(x["sample"], x["timesteps"], x["text"], x["condition"][:, :, :5])
  with pytest.raises(ValueError, match=r"mask has shape \(1, 6, 11, 2\)"):
    model(x["sample"], x["timesteps"], x["text"], x["condition"], mask=np.zeros((1, 6, 11, 2), np.float32))
  stock = UNet3DConditionModel(tiny_config(mask_channels=0, motion_strength=False), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no time_embedding.cond_proj"):
    stock(x["sample"], x["timesteps"], x["text"], x["condition"], motion=x["motion"])


@pytest.mark.slow
def test_demo_config_matches_the_release_forward_at_an_odd_latent_size():
  """The demo model (4 levels) at 24 x 43 latents: 43 -> 22 -> 11 -> 6 down, 6 -> 11 -> 22 -> 43 up."""
  from configs.common import unet_config

  config = unet_config(full_size=False).to_dict()
  reference = HandiReference(torch_unet(config, seed=7))
  model = jax_unet(config, reference.state_dict_numpy())
  rng = np.random.default_rng(2)
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  sample, condition, text = f32(1, 2, 24, 43, 4), f32(1, 1, 24, 43, 4), f32(1, 77, config["cross_attention_dim"])
  mask, timesteps, motion = (rng.random((1, 24, 43, 1)) > 0.5).astype(np.float32), np.array([421]), np.array([5.0])
  ours = _handi_forward(model, sample, timesteps, text, condition, mask, motion)
  with torch.no_grad():
    theirs = reference(to_torch_video(sample), torch.from_numpy(timesteps), torch.from_numpy(text),
                       to_torch_video(condition), torch.from_numpy(mask).permute(0, 3, 1, 2)[:, :, None],
                       torch.from_numpy(motion)).permute(0, 2, 3, 4, 1).numpy()
  error = relative_error(ours, theirs)
  print(f"demo config 24x43: max |jax - torch| = {np.abs(np.asarray(ours) - theirs).max():.3g}, relative {error:.3g}")
  assert error < TOLERANCE
