"""SD-style AutoencoderKL in Flax NNX, channels-last, with the diffusers module names.

Attribute paths equal the diffusers state-dict names (`encoder.down_blocks.0.resnets.1.conv2`,
`decoder.mid_block.attentions.0.to_out.0`, `quant_conv`, ...), so `handi_jax.convert.vae` maps checkpoints
with one rule table. `encode_video` / `decode_video` are pure helpers for latent videos, usable inside
`jax.jit` and `jax.grad` (the stage losses decode predicted clean latents in-graph).
"""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from handi_jax import chunking

# diffusers builds every VAE GroupNorm (resnets, mid-block attention, conv_norm_out) with eps 1e-6.
_NORM_EPS = 1e-6
# torch's default Conv/Linear init (kaiming_uniform with a = sqrt(5)): U(+-1/sqrt(fan_in)).
_TORCH_DEFAULT_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _conv(in_channels, out_channels, kernel_size, *, rngs, dtype, param_dtype, stride=1, padding="SAME"):
  return nnx.Conv(
      in_channels, out_channels, (kernel_size, kernel_size), strides=stride, padding=padding,
      dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(_TORCH_DEFAULT_INIT, (None, None, "conv_in", "conv_out")),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("conv_out",)), rngs=rngs)


def _group_norm(channels, groups, *, rngs, dtype, param_dtype):
  return nnx.GroupNorm(
      channels, num_groups=groups, epsilon=_NORM_EPS, dtype=dtype, param_dtype=param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones, ("norm",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("norm",)), rngs=rngs)


def _linear(in_features, out_features, names, *, rngs, dtype, param_dtype):
  return nnx.Linear(
      in_features, out_features, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(_TORCH_DEFAULT_INIT, names),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, (names[1],)), rngs=rngs)


class ResnetBlock2D(nnx.Module):
  """norm-SiLU-conv twice plus a (1x1-projected when the width changes) shortcut; no time embedding."""

  def __init__(self, in_channels, out_channels, groups, **kw):
    self.norm1 = _group_norm(in_channels, groups, **kw)
    self.conv1 = _conv(in_channels, out_channels, 3, **kw)
    self.norm2 = _group_norm(out_channels, groups, **kw)
    self.conv2 = _conv(out_channels, out_channels, 3, **kw)
    self.conv_shortcut = _conv(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None

  def __call__(self, x):
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Attention(nnx.Module):
  """The mid-block self-attention over all pixels: one head as wide as the channels, residual."""

  def __init__(self, channels, groups, **kw):
    self.group_norm = _group_norm(channels, groups, **kw)
    self.to_q = _linear(channels, channels, ("embed", "heads"), **kw)
    self.to_k = _linear(channels, channels, ("embed", "heads"), **kw)
    self.to_v = _linear(channels, channels, ("embed", "heads"), **kw)
    self.to_out = nnx.List([_linear(channels, channels, ("heads", "embed"), **kw)])

  def __call__(self, x):
    n, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(n, h * w, c)
    q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
    # diffusers upcasts these softmax logits to float32 (upcast_softmax=True).
    logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = self.to_out[0](jnp.einsum("nqk,nkc->nqc", weights, v))
    return x + out.reshape(n, h, w, c)


class Downsample2D(nnx.Module):
  """Stride-2 3x3 conv after zero-padding only the bottom and right edge, as diffusers' VAE does."""

  def __init__(self, channels, **kw):
    self.conv = _conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), **kw)

  def __call__(self, x):
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour x2 then a 3x3 conv."""

  def __init__(self, channels, **kw):
    self.conv = _conv(channels, channels, 3, **kw)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock2D(nnx.Module):

  def __init__(self, in_channels, out_channels, num_layers, groups, add_downsample, **kw):
    self.resnets = nnx.List([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, **kw)
                             for i in range(num_layers)])
    self.downsamplers = nnx.List([Downsample2D(out_channels, **kw)]) if add_downsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x


class UpDecoderBlock2D(nnx.Module):

  def __init__(self, in_channels, out_channels, num_layers, groups, add_upsample, **kw):
    self.resnets = nnx.List([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, **kw)
                             for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class UNetMidBlock2D(nnx.Module):
  """resnet, attention, resnet at the lowest resolution."""

  def __init__(self, channels, groups, **kw):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, **kw) for _ in range(2)])
    self.attentions = nnx.List([Attention(channels, groups, **kw)])

  def __call__(self, x):
    x = self.resnets[0](x)
    x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):

  def __init__(self, config, **kw):
    channels, groups = tuple(config.block_out_channels), config.norm_num_groups
    self.conv_in = _conv(config.in_channels, channels[0], 3, **kw)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                           add_downsample=i < len(channels) - 1, **kw)
        for i in range(len(channels))])
    self.mid_block = UNetMidBlock2D(channels[-1], groups, **kw)
    self.conv_norm_out = _group_norm(channels[-1], groups, **kw)
    self.conv_out = _conv(channels[-1], 2 * config.latent_channels, 3, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):

  def __init__(self, config, **kw):
    reversed_channels, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
    self.conv_in = _conv(config.latent_channels, reversed_channels[0], 3, **kw)
    self.mid_block = UNetMidBlock2D(reversed_channels[0], groups, **kw)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(reversed_channels[max(i - 1, 0)], reversed_channels[i], config.layers_per_block + 1,
                         groups, add_upsample=i < len(reversed_channels) - 1, **kw)
        for i in range(len(reversed_channels))])
    self.conv_norm_out = _group_norm(reversed_channels[-1], groups, **kw)
    self.conv_out = _conv(reversed_channels[-1], config.out_channels, 3, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """`config` is config.model.vae (diffusers field names). Images (N, H, W, 3) in [-1, 1]."""

  def __init__(self, config: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = ml_collections.FrozenConfigDict(config)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    latent = self.config.latent_channels
    self.encoder = Encoder(self.config, **kw)
    self.decoder = Decoder(self.config, **kw)
    self.quant_conv = _conv(2 * latent, 2 * latent, 1, **kw)
    self.post_quant_conv = _conv(latent, latent, 1, **kw)

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
  config = vae.config
  channels, groups = tuple(config.block_out_channels), config.norm_num_groups
  image = config.in_channels
  if config.out_channels != image or config.latent_channels < image or min(channels) // groups < 4 \
     or groups < image:
    raise ValueError(
        f"block_mean_weights needs out_channels == in_channels <= latent_channels and, in every block, at least "
        f"4 channels a norm group and in_channels groups; got {dict(config)}: use pretrained VAE weights instead")
  kernels = {}  # module path -> (kernel or norm scale, bias); built in numpy: eager jnp updates compile op by op

  def slot(width, signal, role):  # role 0: s, 1: -s, 2: +K, 3: -K in signal's norm group
    return (width // groups) * signal + role

  def mapping(width_in, width_out):  # a 1x1 kernel carrying every (signal, role) slot over
    kernel = np.zeros((1, 1, width_in, width_out), np.float32)
    for signal in range(image):
      for role in range(4):
        kernel[0, 0, slot(width_in, signal, role), slot(width_out, signal, role)] = 1.0
    return kernel

  def entry(inputs, width, weight):  # conv_in, centre tap: signal -> (s, -s); bias -> (+K, -K)
    kernel = np.zeros((3, 3, inputs, width), np.float32)
    bias = np.zeros((width,), np.float32)
    for signal in range(image):
      kernel[1, 1, signal, [slot(width, signal, 0), slot(width, signal, 1)]] = weight, -weight
      bias[[slot(width, signal, 2), slot(width, signal, 3)]] = _CONSTANT, -_CONSTANT
    return kernel, bias

  def resampling(width, taps):  # per-slot spatial taps for the signals, identity for the constants
    kernel = np.zeros((3, 3, width, width), np.float32)
    for signal in range(image):
      for role in range(4):
        index = slot(width, signal, role)
        kernel[:, :, index, index] = taps if role < 2 else identity
    return kernel

  def norm_out(width):  # GroupNorm affine that undoes the constant spread on s and shifts it into SiLU's linear part
    scale = np.zeros((width,), np.float32)
    bias = np.zeros((width,), np.float32)
    for signal in range(image):
      scale[slot(width, signal, 0)] = _CONSTANT * (2.0 / (width // groups)) ** 0.5
      bias[slot(width, signal, 0)] = _SILU_SHIFT
    return scale, bias

  def exit_(width, outputs, weight):  # conv_out, centre tap: SiLU(s + shift) -> weight * s
    kernel = np.zeros((3, 3, width, outputs), np.float32)
    bias = np.zeros((outputs,), np.float32)
    for signal in range(image):
      kernel[1, 1, slot(width, signal, 0), signal] = weight
      bias[signal] = -weight * _SILU_SHIFT
    return kernel, bias

  # 2x2 box mean on the stride-2 conv (taps 0 and 1: never the bottom/right padding); nearest x2 then
  # [1, 2, 1] / 4 per axis is bilinear x2.
  identity = np.zeros((3, 3), np.float32)
  identity[1, 1] = 1.0
  box = np.zeros((3, 3), np.float32)
  box[:2, :2] = 0.25
  tent = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0
  gain = _LATENT_GAIN / config.scaling_factor
  kernels["encoder.conv_in"] = entry(image, channels[0], 1.0)
  kernels["decoder.conv_in"] = entry(config.latent_channels, channels[-1], 1.0 / gain)
  kernels["encoder.conv_norm_out"] = norm_out(channels[-1])
  kernels["decoder.conv_norm_out"] = norm_out(channels[0])
  encoder_out, encoder_bias = exit_(channels[-1], 2 * config.latent_channels, gain)
  encoder_bias[config.latent_channels:] = -30.0  # log-variance: a posterior sample is the mean
  kernels["encoder.conv_out"] = (encoder_out, encoder_bias)
  kernels["decoder.conv_out"] = exit_(channels[0], image, 1.0)
  kernels["quant_conv"] = (np.eye(2 * config.latent_channels, dtype=np.float32)[None, None], None)
  kernels["post_quant_conv"] = (np.eye(config.latent_channels, dtype=np.float32)[None, None], None)
  for i, block in enumerate(vae.encoder.down_blocks):
    if block.downsamplers is not None:
      kernels[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (resampling(channels[i], box), None)
  for i, block in enumerate(vae.decoder.up_blocks):
    if block.upsamplers is not None:
      kernels[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (resampling(channels[::-1][i], tent), None)
  for path, module in nnx.iter_graph(vae):
    if isinstance(module, ResnetBlock2D) and module.conv_shortcut is not None:
      kernels[".".join(str(p) for p in path) + ".conv_shortcut"] = (
          mapping(*module.conv_shortcut.kernel.value.shape[2:]), None)

  # Everything else is zero: resnets (conv2 = 0) and attention (to_out = 0) add nothing to their residuals.
  for path, module in nnx.iter_graph(vae):
    if isinstance(module, (nnx.Conv, nnx.Linear, nnx.GroupNorm)):
      name = ".".join(str(p) for p in path)
      weight, bias = kernels.get(name, (None, None))
      scale = module.scale if isinstance(module, nnx.GroupNorm) else module.kernel
      for variable, value in ((scale, weight), (module.bias, bias)):
        variable.value = jnp.asarray(np.zeros(variable.value.shape) if value is None else value, variable.value.dtype)
  return vae
