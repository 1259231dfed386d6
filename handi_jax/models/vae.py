"""SD-style AutoencoderKL in Flax NNX, channels-last, with the diffusers module names.

Attribute paths equal the diffusers state-dict names (`encoder.down_blocks.0.resnets.1.conv2`,
`decoder.mid_block.attentions.0.to_out.0`, `quant_conv`, ...), so `handi_jax.convert.vae` maps checkpoints
with one rule table. The resnet, attention and resampling blocks are the UNet's (shared_blocks.py), configured
as diffusers configures them in its VAE. `encode_video` / `decode_video` are pure helpers for latent videos, usable
inside `jax.jit` and `jax.grad` (the stage losses decode predicted clean latents in-graph).
"""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from handi_jax import chunking
from handi_jax.models.layers import LayerOptions, conv, group_norm
from handi_jax.models.shared_blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D

# diffusers builds every VAE GroupNorm (resnets, mid-block attention, conv_norm_out) with eps 1e-6.
_NORM_EPS = 1e-6


def _resnets(in_channels, out_channels, num_layers, groups, opts, rngs) -> nnx.List:
  """`num_layers` resnets without time embedding, the first one changing the width."""
  return nnx.List([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, _NORM_EPS,
                                 opts, rngs) for i in range(num_layers)])


class DownEncoderBlock2D(nnx.Module):

  def __init__(self, in_channels, out_channels, num_layers, groups, add_downsample, opts, rngs):
    self.resnets = _resnets(in_channels, out_channels, num_layers, groups, opts, rngs)
    # padding=0: diffusers' VAE pads only the bottom and right edge.
    self.downsamplers = nnx.List([Downsample2D(out_channels, opts, rngs, padding=0)]) if add_downsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x


class UpDecoderBlock2D(nnx.Module):

  def __init__(self, in_channels, out_channels, num_layers, groups, add_upsample, opts, rngs):
    self.resnets = _resnets(in_channels, out_channels, num_layers, groups, opts, rngs)
    self.upsamplers = nnx.List([Upsample2D(out_channels, opts, rngs)]) if add_upsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class UNetMidBlock2D(nnx.Module):
  """resnet, attention (one head as wide as the channels over all pixels, residual), resnet at the lowest
  resolution."""

  def __init__(self, channels, groups, opts, rngs):
    self.resnets = _resnets(channels, channels, 2, groups, opts, rngs)
    self.attentions = nnx.List([
        Attention(channels, None, 1, channels, "xla", opts, rngs, bias=True, norm_num_groups=groups, eps=_NORM_EPS,
                  residual_connection=True)])

  def __call__(self, x):
    x = self.resnets[0](x)
    x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):

  def __init__(self, config, opts, rngs):
    channels, groups = tuple(config.block_out_channels), config.norm_num_groups
    self.conv_in = conv(config.in_channels, channels[0], opts, rngs)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                           add_downsample=i < len(channels) - 1, opts=opts, rngs=rngs)
        for i in range(len(channels))])
    self.mid_block = UNetMidBlock2D(channels[-1], groups, opts, rngs)
    self.conv_norm_out = group_norm(channels[-1], groups, _NORM_EPS, opts, rngs)
    self.conv_out = conv(channels[-1], 2 * config.latent_channels, opts, rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):

  def __init__(self, config, opts, rngs):
    reversed_channels, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
    self.conv_in = conv(config.latent_channels, reversed_channels[0], opts, rngs)
    self.mid_block = UNetMidBlock2D(reversed_channels[0], groups, opts, rngs)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(reversed_channels[max(i - 1, 0)], reversed_channels[i], config.layers_per_block + 1,
                         groups, add_upsample=i < len(reversed_channels) - 1, opts=opts, rngs=rngs)
        for i in range(len(reversed_channels))])
    self.conv_norm_out = group_norm(reversed_channels[-1], groups, _NORM_EPS, opts, rngs)
    self.conv_out = conv(reversed_channels[-1], config.out_channels, opts, rngs)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """`config` is config.model.vae (diffusers field names). Images (N, H, W, 3) in [-1, 1]."""

  def __init__(self, config: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = ml_collections.FrozenConfigDict(config)
    opts = LayerOptions(dtype, param_dtype)
    latent = self.config.latent_channels
    self.encoder = Encoder(self.config, opts, rngs)
    self.decoder = Decoder(self.config, opts, rngs)
    self.quant_conv = conv(2 * latent, 2 * latent, opts, rngs, kernel=1)
    self.post_quant_conv = conv(latent, latent, opts, rngs, kernel=1)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(N, H, W, 3) -> posterior mean and log-variance, each (N, H/8, W/8, latent_channels), unscaled."""
    moments = self.quant_conv(self.encoder(images))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: jax.Array) -> jax.Array:
    """(N, h, w, latent_channels) unscaled latents -> (N, 8h, 8w, 3) images in about [-1, 1]."""
    return self.decoder(self.post_quant_conv(latents))


def _per_image(fn: Callable[[jax.Array], jax.Array]):
  """An image function (N, ...) as a function of (B, c, ...) video chunks."""

  def per_chunk(clips):
    out = fn(clips.reshape(-1, *clips.shape[2:]))
    return out.reshape(*clips.shape[:2], *out.shape[1:])

  return per_chunk


def encode_video(vae: AutoencoderKL, frames: jax.Array, key: jax.Array | None = None,
                 chunk_size: int | None = None) -> jax.Array:
  """(B, F, H, W, 3) in [-1, 1] -> scaled latents (B, F, H/8, W/8, C): the posterior mean, or with `key` a sample.

  Latents are multiplied by config.scaling_factor (0.18215 for SD 1.5), the scale the UNet works in.
  `chunk_size` frames of each clip are encoded per call (None: all frames at once).
  """
  _check_video(frames, 3, "frames")
  graphdef, state = nnx.split(vae)

  def moments(images):
    mean, logvar = nnx.merge(graphdef, state).encode(images)
    return jnp.concatenate([mean, logvar], axis=-1)

  mean, logvar = jnp.split(chunking.map_frame_chunks(_per_image(moments), chunk_size, frames), 2, axis=-1)
  latents = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
  return latents * vae.config.scaling_factor


def decode_video(vae: AutoencoderKL, latents: jax.Array, chunk_size: int | None = None,
                 remat: bool = False) -> jax.Array:
  """Scaled latents (B, F, h, w, C) -> frames (B, F, 8h, 8w, 3) in about [-1, 1].

  Decodes `chunk_size` frames of each clip per call (config.model.frame_chunk; None: all at once); the
  result equals decoding all frames at once. `remat=True` recomputes each chunk's activations in the backward pass
  instead of storing them (what an in-graph loss through the decoder wants).
  """
  _check_video(latents, vae.config.latent_channels, "latents")
  graphdef, state = nnx.split(vae)
  scale = 1.0 / vae.config.scaling_factor
  decode = _per_image(lambda z: nnx.merge(graphdef, state).decode(z * scale))
  return chunking.map_frame_chunks(decode, chunk_size, latents, remat=remat)


def _check_video(video: jax.Array, channels: int, what: str) -> None:
  if video.ndim != 5 or video.shape[-1] != channels:
    raise ValueError(f"{what}: expected a channels-last video (B, F, H, W, {channels}), got shape {video.shape}")


# block_mean_weights: a group's two constant channels (+K, -K) set its GroupNorm spread, so the norm passes the
# signal up to a relative O(s^2 / K^2) (< 1e-4 for images in [-1, 1]); SiLU(s + _SILU_SHIFT) = s + _SILU_SHIFT to 1e-7.
_CONSTANT = 100.0
_SILU_SHIFT = 20.0
# Scaled latent = _LATENT_GAIN x the block's mean value in [-1, 1]: roughly the unit spread the noise schedule expects.
_LATENT_GAIN = 3.0
# 3x3 spatial taps: a 2x2 box mean on the stride-2 conv (taps 0 and 1: never the bottom/right padding); nearest x2
# then [1, 2, 1] / 4 per axis is bilinear x2; the identity carries the constants through both.
_BOX_TAPS = np.pad(np.full((2, 2), 0.25, np.float32), ((0, 1), (0, 1)))
_TENT_TAPS = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0
_IDENTITY_TAPS = np.pad(np.ones((1, 1), np.float32), 1)


def block_mean_weights(vae: AutoencoderKL) -> AutoencoderKL:
  """Set `vae`'s weights (in place; it may be abstract, from nnx.eval_shape) to a fixed, not learned,
  autoencoder: latent channel c of a pixel block is the block's mean of image channel c (times _LATENT_GAIN /
  scaling_factor; other latent channels 0), and the decoder upsamples the block means bilinearly (x2 per level;
  zero padding darkens the outermost pixels).

  The VAE of the demo and of tests without pretrained weights: a random VAE decodes anything into noise, so a
  video generated through it cannot show what the UNet learned. Every resnet and attention adds zero (their
  output layers are zero), which leaves linear down/up-sampling convs between conv_in and the final GroupNorm +
  SiLU. Each signal s travels in its own norm group as (s, -s, K, -K): that group's mean is 0 and its spread is
  fixed by K, so the norm's affine and a shifted SiLU pass s on.
  """
  _check_block_mean_config(vae.config)
  # Built in numpy: eager jnp updates would compile op by op.
  kernels = {**_boundary_kernels(vae.config), **_resampling_kernels(vae), **_shortcut_kernels(vae)}
  _set_weights(vae, kernels)
  return vae


def _check_block_mean_config(config) -> None:
  """Raise a ValueError unless every image channel gets a norm group of at least 4 channels in every block."""
  groups, image = config.norm_num_groups, config.in_channels
  if config.out_channels != image or config.latent_channels < image or min(config.block_out_channels) // groups < 4 \
     or groups < image:
    raise ValueError(
        f"block_mean_weights needs out_channels == in_channels <= latent_channels and, in every block, at least "
        f"4 channels a norm group and in_channels groups; got {dict(config)}: use pretrained VAE weights instead")


def _slot(width: int, groups: int, signal: int, role: int) -> int:
  """The channel of `signal`'s `role` (0: s, 1: -s, 2: +K, 3: -K) in a `width`-channel layer: its own norm group."""
  return (width // groups) * signal + role


def _entry_conv(inputs: int, width: int, weight: float, groups: int, signals: int) -> tuple[np.ndarray, np.ndarray]:
  """conv_in's kernel and bias, centre tap: signal -> weight * (s, -s); bias -> (+K, -K)."""
  kernel = np.zeros((3, 3, inputs, width), np.float32)
  bias = np.zeros((width,), np.float32)
  for signal in range(signals):
    kernel[1, 1, signal, [_slot(width, groups, signal, 0), _slot(width, groups, signal, 1)]] = weight, -weight
    bias[[_slot(width, groups, signal, 2), _slot(width, groups, signal, 3)]] = _CONSTANT, -_CONSTANT
  return kernel, bias


def _norm_out_affine(width: int, groups: int, signals: int) -> tuple[np.ndarray, np.ndarray]:
  """conv_norm_out's scale and bias: undo the constant spread on s and shift it into SiLU's linear part."""
  scale = np.zeros((width,), np.float32)
  bias = np.zeros((width,), np.float32)
  for signal in range(signals):
    scale[_slot(width, groups, signal, 0)] = _CONSTANT * (2.0 / (width // groups)) ** 0.5
    bias[_slot(width, groups, signal, 0)] = _SILU_SHIFT
  return scale, bias


def _exit_conv(width: int, outputs: int, weight: float, groups: int, signals: int) -> tuple[np.ndarray, np.ndarray]:
  """conv_out's kernel and bias, centre tap: SiLU(s + shift) -> weight * s."""
  kernel = np.zeros((3, 3, width, outputs), np.float32)
  bias = np.zeros((outputs,), np.float32)
  for signal in range(signals):
    kernel[1, 1, _slot(width, groups, signal, 0), signal] = weight
    bias[signal] = -weight * _SILU_SHIFT
  return kernel, bias


def _resampling_kernel(width: int, taps: np.ndarray, groups: int, signals: int) -> np.ndarray:
  """A resampling conv's kernel: `taps` on the signal slots (s, -s), the identity on the constants."""
  kernel = np.zeros((3, 3, width, width), np.float32)
  for signal in range(signals):
    for role in range(4):
      index = _slot(width, groups, signal, role)
      kernel[:, :, index, index] = taps if role < 2 else _IDENTITY_TAPS
  return kernel


def _shortcut_kernel(width_in: int, width_out: int, groups: int, signals: int) -> np.ndarray:
  """A 1x1 conv_shortcut kernel carrying every (signal, role) slot over to the new width."""
  kernel = np.zeros((1, 1, width_in, width_out), np.float32)
  for signal in range(signals):
    for role in range(4):
      kernel[0, 0, _slot(width_in, groups, signal, role), _slot(width_out, groups, signal, role)] = 1.0
  return kernel


def _boundary_kernels(config) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
  """(weight, bias) by module path of the layers outside the blocks: conv_in, conv_norm_out, conv_out, quant convs."""
  channels, groups, image = tuple(config.block_out_channels), config.norm_num_groups, config.in_channels
  latent, gain = config.latent_channels, _LATENT_GAIN / config.scaling_factor
  encoder_out, encoder_bias = _exit_conv(channels[-1], 2 * latent, gain, groups, image)
  encoder_bias[latent:] = -30.0  # log-variance: a posterior sample is the mean
  return {
      "encoder.conv_in": _entry_conv(image, channels[0], 1.0, groups, image),
      "decoder.conv_in": _entry_conv(latent, channels[-1], 1.0 / gain, groups, image),
      "encoder.conv_norm_out": _norm_out_affine(channels[-1], groups, image),
      "decoder.conv_norm_out": _norm_out_affine(channels[0], groups, image),
      "encoder.conv_out": (encoder_out, encoder_bias),
      "decoder.conv_out": _exit_conv(channels[0], image, 1.0, groups, image),
      "quant_conv": (np.eye(2 * latent, dtype=np.float32)[None, None], None),
      "post_quant_conv": (np.eye(latent, dtype=np.float32)[None, None], None),
  }


def _resampling_kernels(vae: AutoencoderKL) -> dict[str, tuple[np.ndarray, None]]:
  """(weight, no bias) by module path of the box-mean downsamplers and the bilinear upsamplers."""
  config = vae.config
  channels, groups, image = tuple(config.block_out_channels), config.norm_num_groups, config.in_channels
  kernels = {}
  for i, block in enumerate(vae.encoder.down_blocks):
    if block.downsamplers is not None:
      kernels[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (
          _resampling_kernel(channels[i], _BOX_TAPS, groups, image), None)
  for i, block in enumerate(vae.decoder.up_blocks):
    if block.upsamplers is not None:
      kernels[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (
          _resampling_kernel(channels[::-1][i], _TENT_TAPS, groups, image), None)
  return kernels


def _shortcut_kernels(vae: AutoencoderKL) -> dict[str, tuple[np.ndarray, None]]:
  """(weight, no bias) by module path of the resnets' 1x1 shortcuts, where the width changes."""
  groups, image = vae.config.norm_num_groups, vae.config.in_channels
  kernels = {}
  for path, module in nnx.iter_graph(vae):
    if isinstance(module, ResnetBlock2D) and module.conv_shortcut is not None:
      width_in, width_out = module.conv_shortcut.kernel.value.shape[2:]
      kernels[_dotted(path) + ".conv_shortcut"] = (_shortcut_kernel(width_in, width_out, groups, image), None)
  return kernels


def _set_weights(vae: AutoencoderKL, kernels: Mapping[str, tuple]) -> None:
  """Every conv, linear and norm of `vae` to its (weight or scale, bias) in `kernels`; zero where absent or None."""
  # Zero everywhere else: resnets (conv2 = 0) and attention (to_out = 0) add nothing to their residuals.
  for path, module in nnx.iter_graph(vae):
    if isinstance(module, (nnx.Conv, nnx.Linear, nnx.GroupNorm)):
      weight, bias = kernels.get(_dotted(path), (None, None))
      scale = module.scale if isinstance(module, nnx.GroupNorm) else module.kernel
      for variable, value in ((scale, weight), (module.bias, bias)):
        variable.value = jnp.asarray(np.zeros(variable.value.shape) if value is None else value, variable.value.dtype)


def _dotted(path) -> str:
  """A graph path as the dotted module name (`encoder.down_blocks.0.resnets.1`)."""
  return ".".join(str(p) for p in path)
