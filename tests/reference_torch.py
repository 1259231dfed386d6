"""PyTorch references for the tests and benchmarks: diffusers/transformers models with every parameter random,
and the original release's HANDI UNet forward rebuilt around diffusers' UNet3DConditionModel
(reference_spec.md section 1.3)."""

import diffusers
import numpy as np
import torch

from handi_jax.convert import unet as convert_unet
from handi_jax.convert import vae as convert_vae


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


def to_torch_video(x):  # (B, F, h, w, C) -> (B, C, F, h, w)
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 4, 1, 2, 3))))


def diffusers_vae(config, seed=0):
  """A diffusers AutoencoderKL with every parameter random (norm scales and biases too)."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**convert_vae.config_to_diffusers(config)).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if param.ndim == 1:
        param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(param))
  return model
