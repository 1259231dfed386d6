"""The blocks diffusers shares between its UNet and its VAE (resnet.py, attention_processor.py, downsampling.py,
upsampling.py), channels-last, attribute names = diffusers state-dict names."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from handi_jax.models import attention as attention_lib
from handi_jax.models.layers import LayerOptions, conv, group_norm, linear


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output index of torch `interpolate(mode='nearest')`: floor(i * in/out) in float32.

  jax.image.resize uses half-pixel centres, which picks other pixels for non-x2 ratios (22 -> 43, 43 -> 85).
  """
  if out_size == in_size:
    return np.arange(out_size)
  if out_size == 2 * in_size:
    return np.arange(out_size) // 2
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, in_size - 1)


class ResnetBlock2D(nnx.Module):
  """GN -> SiLU -> conv1 (+ time projection) -> GN -> SiLU -> conv2, plus a (1x1-projected) shortcut.

  `time_features=None` (the VAE's, diffusers' temb_channels=None): no `time_emb_proj`, called without `temb`.
  """

  def __init__(self, in_features: int, out_features: int, time_features: int | None, groups: int, eps: float,
               opts: LayerOptions, rngs: nnx.Rngs):
    self.norm1 = group_norm(in_features, groups, eps, opts, rngs)
    self.conv1 = conv(in_features, out_features, opts, rngs)
    self.time_emb_proj = (None if time_features is None else
                          linear(time_features, out_features, ("embed", "mlp"), opts, rngs))
    self.norm2 = group_norm(out_features, groups, eps, opts, rngs)
    self.conv2 = conv(out_features, out_features, opts, rngs)
    self.conv_shortcut = conv(in_features, out_features, opts, rngs, kernel=1) if in_features != out_features else None

  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    if self.time_emb_proj is not None:
      h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
    h = self.conv2(nnx.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Attention(nnx.Module):
  """Multi-head attention, `to_out.0` with bias; `context=None` is self-attention.

  The UNet's transformers use it as is on tokens (N, L, C): q/k/v without bias. The VAE's mid block uses it on
  pixels (N, H, W, C) as diffusers configures it there: one head as wide as the channels, q/k/v with `bias`, a
  GroupNorm (`norm_num_groups`, `eps`) first and the input added back (`residual_connection`).
  """

  def __init__(self, query_features: int, context_features: int | None, heads: int, head_dim: int,
               implementation: str, opts: LayerOptions, rngs: nnx.Rngs, *, bias: bool = False,
               norm_num_groups: int | None = None, eps: float = 1e-5, residual_connection: bool = False):
    inner = heads * head_dim
    context_features = context_features or query_features
    self.heads, self.head_dim, self.implementation = heads, head_dim, implementation
    self.residual_connection = residual_connection
    self.group_norm = (None if norm_num_groups is None else
                       group_norm(query_features, norm_num_groups, eps, opts, rngs))
    self.to_q = linear(query_features, inner, ("embed", "heads"), opts, rngs, use_bias=bias)
    self.to_k = linear(context_features, inner, ("embed", "heads"), opts, rngs, use_bias=bias)
    self.to_v = linear(context_features, inner, ("embed", "heads"), opts, rngs, use_bias=bias)
    self.to_out = nnx.List([linear(inner, query_features, ("heads", "embed"), opts, rngs)])

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    h = x if self.group_norm is None else self.group_norm(x)
    tokens = h.reshape(h.shape[0], -1, h.shape[-1])  # pixels (N, H, W, C) attend to each other as (N, HW, C)
    context = tokens if context is None else context
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.head_dim))
    out = attention_lib.dot_product_attention(split(self.to_q(tokens)), split(self.to_k(context)),
                                              split(self.to_v(context)), self.implementation)
    out = self.to_out[0](out.reshape(out.shape[:2] + (-1,))).reshape(x.shape)
    return x + out if self.residual_connection else out


class Downsample2D(nnx.Module):
  """3x3 conv, stride 2, with diffusers' `padding`: 1 pads every edge by one, (h, w) -> (ceil(h/2), ceil(w/2)) (the
  UNet); 0 pads only the bottom and right edge by one (the VAE; diffusers pads by hand before an unpadded conv)."""

  def __init__(self, features: int, opts: LayerOptions, rngs: nnx.Rngs, padding: int = 1):
    self.conv = conv(features, features, opts, rngs, stride=2, padding=((padding, 1), (padding, 1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest upsampling to `size` (torch's index rule; None: x2) followed by a 3x3 conv."""

  def __init__(self, features: int, opts: LayerOptions, rngs: nnx.Rngs):
    self.conv = conv(features, features, opts, rngs)

  def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    height, width = size or (2 * x.shape[1], 2 * x.shape[2])
    x = jnp.take(x, nearest_indices(x.shape[1], height), axis=1)
    x = jnp.take(x, nearest_indices(x.shape[2], width), axis=2)
    return self.conv(x)
