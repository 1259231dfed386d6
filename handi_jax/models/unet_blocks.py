"""Building blocks of the ModelScope 3D UNet, channels-last, attribute names = diffusers state-dict names.

Spatial layers see frames as batch: (N, h, w, C) with N = batch * frames, frames inner (the order of torch's
`repeat_interleave`). Temporal layers reshape to (batch, frames, h, w, C); their GroupNorms then take statistics
across frames as well, as torch's GroupNorm on the 5-D tensor does. The resnet, attention and resampling blocks
are the ones the VAE is built from too (shared_blocks.py).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from handi_jax.models.layers import LayerOptions, group_norm, layer_norm, linear, temporal_conv
from handi_jax.models.shared_blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D


def sinusoidal_embedding(values: jax.Array, dim: int) -> jax.Array:
  """[cos | sin] of values * 10000^(-k / (dim/2)), k < dim/2: diffusers Timesteps(dim, flip_sin_to_cos=True, 0)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(values, jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def frames_major(x: jax.Array, num_frames: int) -> jax.Array:
  """(N, h, w, C) -> (batch, frames, h, w, C)."""
  return x.reshape((-1, num_frames) + x.shape[1:])


class TimestepEmbedding(nnx.Module):
  """linear_1 -> SiLU -> linear_2, with the optional `cond_proj` (no bias) added to the input first."""

  def __init__(self, in_features: int, time_features: int, cond_features: int | None, opts: LayerOptions,
               rngs: nnx.Rngs):
    self.linear_1 = linear(in_features, time_features, ("embed", "mlp"), opts, rngs)
    self.linear_2 = linear(time_features, time_features, ("mlp", "embed"), opts, rngs)
    self.cond_proj = (None if cond_features is None else
                      linear(cond_features, in_features, ("embed", "mlp"), opts, rngs, use_bias=False))

  def __call__(self, sample: jax.Array, condition: jax.Array | None = None) -> jax.Array:
    if condition is not None:
      sample = sample + self.cond_proj(condition)
    return self.linear_2(nnx.silu(self.linear_1(sample)))


class TemporalConvLayer(nnx.Module):
  """Four (GN, SiLU, [Dropout], Conv3d over frames) stages plus identity; conv4 starts at zero (identity layer).

  The list indices reproduce torch's nn.Sequential keys: conv1.0 = GN, conv1.2 = Conv3d, conv{2,3,4}.3 = Conv3d.
  The GNs have torch's default eps 1e-5 whatever norm_eps says: neither diffusers nor the release passes it.
  `groups` is the config's temporal_norm_num_groups. Dropout is deterministic until `model.train()`.
  """

  def __init__(self, features: int, groups: int, dropout: float, opts: LayerOptions, rngs: nnx.Rngs):
    def stage(with_dropout: bool, zero_init: bool = False):
      layers = [group_norm(features, groups, 1e-5, opts, rngs), nnx.silu]
      if with_dropout:
        layers.append(nnx.Dropout(dropout, deterministic=True, rngs=rngs))
      return nnx.List(layers + [temporal_conv(features, opts, rngs, zero_init=zero_init)])

    self.conv1 = stage(with_dropout=False)
    self.conv2 = stage(with_dropout=True)
    self.conv3 = stage(with_dropout=True)
    self.conv4 = stage(with_dropout=True, zero_init=True)

  def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
    identity = frames_major(x, num_frames)
    h = identity
    for stage in (self.conv1, self.conv2, self.conv3, self.conv4):
      for layer in stage:
        h = layer(h)
    return (identity + h).reshape(x.shape)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU as torch writes it, x (1 + erf(x / sqrt 2)) / 2. jax.nn.gelu's erfc form gives the same values but
  costs XLA:CPU exponentials and selects: the demo's feed-forward fwd + bwd 3.4 instead of 5.6 ms CPU."""
  return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


class GEGLU(nnx.Module):
  """proj -> [hidden, gate] halves -> hidden * GELU(gate), exact (erf) GELU."""

  def __init__(self, in_features: int, out_features: int, opts: LayerOptions, rngs: nnx.Rngs):
    self.proj = linear(in_features, 2 * out_features, ("embed", "mlp"), opts, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
    return hidden * gelu(gate)


class FeedForward(nnx.Module):
  """net.0 = GEGLU(dim -> 4 dim), net.1 = dropout (rate 0 in this model), net.2 = Linear(4 dim -> dim)."""

  def __init__(self, features: int, opts: LayerOptions, rngs: nnx.Rngs, mult: int = 4):
    self.net = nnx.List([GEGLU(features, mult * features, opts, rngs), nnx.Dropout(0.0),
                         linear(mult * features, features, ("mlp", "embed"), opts, rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  """x + attn1(LN x); x + attn2(LN x, context); x + FF(LN x). attn2 is self-attention when context_features is
  None (the temporal transformers' double_self_attention)."""

  def __init__(self, features: int, heads: int, head_dim: int, context_features: int | None, implementation: str,
               opts: LayerOptions, rngs: nnx.Rngs):
    self.norm1 = layer_norm(features, opts, rngs)
    self.attn1 = Attention(features, None, heads, head_dim, implementation, opts, rngs)
    self.norm2 = layer_norm(features, opts, rngs)
    self.attn2 = Attention(features, context_features, heads, head_dim, implementation, opts, rngs)
    self.norm3 = layer_norm(features, opts, rngs)
    self.ff = FeedForward(features, opts, rngs)

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """Per-frame spatial transformer with text cross-attention: GN(eps 1e-6) -> proj_in -> block -> proj_out, + x."""

  def __init__(self, heads: int, head_dim: int, features: int, context_features: int, groups: int,
               opts: LayerOptions, rngs: nnx.Rngs):
    inner = heads * head_dim
    self.norm = group_norm(features, groups, 1e-6, opts, rngs)
    self.proj_in = linear(features, inner, ("embed", "mlp"), opts, rngs)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(inner, heads, head_dim, context_features, opts.attention, opts, rngs)])
    self.proj_out = linear(inner, features, ("mlp", "embed"), opts, rngs)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    n, height, width, channels = x.shape
    h = self.proj_in(self.norm(x).reshape(n, height * width, channels))
    for block in self.transformer_blocks:
      h = block(h, context)
    return x + self.proj_out(h).reshape(x.shape)


class TransformerTemporalModel(nnx.Module):
  """Self-attention over frames at every pixel (no positional encoding): GN across frames -> proj_in -> block
  (attn1 and attn2 both self-attention, always plain XLA attention) -> proj_out, + x."""

  def __init__(self, heads: int, head_dim: int, features: int, groups: int, opts: LayerOptions, rngs: nnx.Rngs):
    inner = heads * head_dim
    self.norm = group_norm(features, groups, 1e-6, opts, rngs)
    self.proj_in = linear(features, inner, ("embed", "mlp"), opts, rngs)
    self.transformer_blocks = nnx.List([BasicTransformerBlock(inner, heads, head_dim, None, "xla", opts, rngs)])
    self.proj_out = linear(inner, features, ("mlp", "embed"), opts, rngs)

  def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
    h = self.norm(frames_major(x, num_frames))                 # (B, T, h, w, C)
    batch, frames, height, width, channels = h.shape
    h = h.transpose(0, 2, 3, 1, 4).reshape(batch * height * width, frames, channels)
    h = self.proj_in(h)
    for block in self.transformer_blocks:
      h = block(h)
    h = self.proj_out(h).reshape(batch, height, width, frames, channels).transpose(0, 3, 1, 2, 4)
    return x + h.reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Shape of one UNet block; `head_dim` is the config's attention_head_dim (heads = channels // head_dim);
  `groups` / `eps` are norm_num_groups / norm_eps, `temporal_groups` the temporal convs' temporal_norm_num_groups."""

  in_features: int
  out_features: int
  time_features: int
  num_layers: int
  groups: int
  eps: float
  temporal_groups: int
  head_dim: int
  context_features: int
  dropout: float = 0.1  # temporal convs


class _Block3D(nnx.Module):
  """The layers every UNet block is made of (names as in diffusers): resnet -> temporal conv, followed in a
  cross-attention block by a spatial (text cross-attention) and a temporal transformer. Subclasses set
  `cross_attention`; the transformer lists are None in plain blocks. `num_attentions` transformer pairs, default
  one per layer."""

  cross_attention: bool

  def __init__(self, spec: BlockSpec, resnet_inputs: list[int], out_features: int, opts: LayerOptions,
               rngs: nnx.Rngs, num_attentions: int | None = None):
    self.resnets = nnx.List([ResnetBlock2D(c, out_features, spec.time_features, spec.groups, spec.eps, opts, rngs)
                             for c in resnet_inputs])
    self.temp_convs = nnx.List([TemporalConvLayer(out_features, spec.temporal_groups, spec.dropout, opts, rngs)
                                for _ in resnet_inputs])
    if self.cross_attention:
      heads, count = out_features // spec.head_dim, num_attentions or len(resnet_inputs)
      self.attentions = nnx.List([
          Transformer2DModel(heads, spec.head_dim, out_features, spec.context_features, spec.groups, opts, rngs)
          for _ in range(count)])
      self.temp_attentions = nnx.List([
          TransformerTemporalModel(heads, spec.head_dim, out_features, spec.groups, opts, rngs) for _ in range(count)])
    else:
      self.attentions = self.temp_attentions = None

  def _layer(self, i: int, x, temb, context, num_frames: int):
    """resnet -> temporal conv [-> spatial transformer -> temporal transformer]."""
    x = self.temp_convs[i](self.resnets[i](x, temb), num_frames)
    if self.attentions is not None:
      x = self.attentions[i](x, context)
      x = self.temp_attentions[i](x, num_frames)
    return x


class DownBlock3D(_Block3D):
  """Layers at one resolution, then an optional stride-2 conv; every layer output and the downsampled output are
  skip connections."""

  cross_attention = False

  def __init__(self, spec: BlockSpec, add_downsample: bool, opts: LayerOptions, rngs: nnx.Rngs):
    inputs = [spec.in_features] + [spec.out_features] * (spec.num_layers - 1)
    super().__init__(spec, inputs, spec.out_features, opts, rngs)
    self.downsamplers = nnx.List([Downsample2D(spec.out_features, opts, rngs)]) if add_downsample else None

  def __call__(self, x, temb, context, num_frames: int):
    skips = []
    for i in range(len(self.resnets)):
      x = self._layer(i, x, temb, context, num_frames)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, tuple(skips)


class CrossAttnDownBlock3D(DownBlock3D):
  """DownBlock3D with a spatial and a temporal transformer after each layer."""

  cross_attention = True


class UNetMidBlock3DCrossAttn(_Block3D):
  """resnet0 -> temp_conv0 -> [attn -> temp_attn -> resnet1 -> temp_conv1]."""

  cross_attention = True

  def __init__(self, spec: BlockSpec, opts: LayerOptions, rngs: nnx.Rngs):
    super().__init__(spec, [spec.in_features] * 2, spec.in_features, opts, rngs, num_attentions=1)

  def __call__(self, x, temb, context, num_frames: int):
    x = self.temp_convs[0](self.resnets[0](x, temb), num_frames)
    x = self.attentions[0](x, context)
    x = self.temp_attentions[0](x, num_frames)
    return self.temp_convs[1](self.resnets[1](x, temb), num_frames)


class UpBlock3D(_Block3D):
  """Layers that each first concatenate the last skip ([x, skip]), then an optional upsampling."""

  cross_attention = False

  def __init__(self, spec: BlockSpec, prev_out_features: int, add_upsample: bool, opts: LayerOptions,
               rngs: nnx.Rngs):
    n, out = spec.num_layers, spec.out_features
    inputs = [(prev_out_features if i == 0 else out) + (spec.in_features if i == n - 1 else out) for i in range(n)]
    super().__init__(spec, inputs, out, opts, rngs)
    self.upsamplers = nnx.List([Upsample2D(out, opts, rngs)]) if add_upsample else None

  def __call__(self, x, skips, temb, context, num_frames: int, upsample_size: tuple[int, int] | None):
    skips = list(skips)
    for i in range(len(self.resnets)):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = self._layer(i, x, temb, context, num_frames)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, upsample_size)
    return x


class CrossAttnUpBlock3D(UpBlock3D):
  """UpBlock3D with a spatial and a temporal transformer after each layer."""

  cross_attention = True
