"""EgoVLP's video tower (Lin et al. 2022): the Frozen-in-Time SpaceTimeTransformer and its `vid_proj`, in Flax NNX.

A ViT whose patch tokens carry a spatial position (shared by every frame) plus a temporal one (shared by every
patch of a frame). Each block runs divided attention: temporal (a patch position across frames) on norm3, then
spatial (the patches of one frame) on norm1 of that result; the class token attends to every token, and every
group of patches also sees the class token. Unlike TimeSformer, the spatial residual adds to the block's input,
not to the temporal residual; that is the release's 'frozen-in-time' attention style.

Attribute paths equal the release's FrozenInTime state-dict names without the text tower (`video_model.cls_token`,
`video_model.blocks.3.timeattn.qkv`, `video_model.norm`, `vid_proj.0`), so handi_jax.convert.egovlp maps
egovlp.pth with one rule table. Videos are channels-last (B, F, S, S, 3), normalised as the scorer does
(handi_jax.evaluation.egovlp); F may be fewer than `num_frames` (the first F temporal positions are used).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

# The release's ViT-B/16 at 224 px with its 256-d projection; num_frames is the checkpoint's temporal_embed length.
RELEASE_CONFIG = dict(image_size=224, patch_size=16, num_channels=3, embed_dim=768, depth=12, num_heads=12,
                      mlp_hidden_dim=3072, num_frames=4, projection_dim=256, layer_norm_eps=1e-6)
_TOKEN_INIT = nnx.initializers.normal(0.02)


def _layer_norm(features: int, eps: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance, as torch computes it.
  return nnx.LayerNorm(features, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)


def _softmax_attention(queries, keys, values):
  """(B, G, L, H, d) queries against (B, G, M, H, d) keys/values of the same group; logits and softmax in float32."""
  logits = jnp.einsum("bglhd,bgmhd->bghlm", queries, keys, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
  return jnp.einsum("bghlm,bgmhd->bglhd", weights, values)


class DividedAttention(nnx.Module):
  """One fused qkv projection; attention either within each frame ("space") or along each patch position across
  frames ("time"). The class token queries all tokens at once, and every group's patches also attend to it."""

  def __init__(self, dim: int, num_heads: int, dtype, param_dtype, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"EgoVLP: embed_dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, num_frames: int, over: str):
    batch, length, dim = x.shape
    head_dim = dim // self.num_heads
    patches_per_frame = (length - 1) // num_frames
    # The fused projection's output is [q | k | v], each split head-major.
    q, k, v = jnp.moveaxis(self.qkv(x).reshape(batch, length, 3, self.num_heads, head_dim), 2, 0)
    q = q * head_dim ** -0.5
    cls_out = _softmax_attention(q[:, None, :1], k[:, None], v[:, None])[:, 0]

    def grouped(tokens):  # (B, F*N, H, d) -> (B, groups, sequence, H, d)
      tokens = tokens.reshape(batch, num_frames, patches_per_frame, self.num_heads, head_dim)
      return tokens if over == "space" else tokens.swapaxes(1, 2)

    q_groups, k_groups, v_groups = grouped(q[:, 1:]), grouped(k[:, 1:]), grouped(v[:, 1:])
    groups = q_groups.shape[1]
    cls_key = jnp.broadcast_to(k[:, None, :1], (batch, groups, 1, self.num_heads, head_dim))
    cls_value = jnp.broadcast_to(v[:, None, :1], cls_key.shape)
    out = _softmax_attention(q_groups, jnp.concatenate([cls_key, k_groups], axis=2),
                             jnp.concatenate([cls_value, v_groups], axis=2))
    if over == "time":
      out = out.swapaxes(1, 2)
    out = jnp.concatenate([cls_out, out.reshape(batch, length - 1, self.num_heads, head_dim)], axis=1)
    return self.proj(out.reshape(batch, length, dim))


class Mlp(nnx.Module):

  def __init__(self, dim: int, hidden_dim: int, dtype, param_dtype, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, hidden_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden_dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # torch nn.GELU: the exact (erf) form


class SpaceTimeBlock(nnx.Module):

  def __init__(self, config, dtype, param_dtype, rngs: nnx.Rngs):
    dim, eps = config.embed_dim, config.layer_norm_eps
    self.norm1 = _layer_norm(dim, eps, dtype, param_dtype, rngs)
    self.attn = DividedAttention(dim, config.num_heads, dtype, param_dtype, rngs)
    self.timeattn = DividedAttention(dim, config.num_heads, dtype, param_dtype, rngs)
    self.norm2 = _layer_norm(dim, eps, dtype, param_dtype, rngs)
    self.mlp = Mlp(dim, config.mlp_hidden_dim, dtype, param_dtype, rngs)
    self.norm3 = _layer_norm(dim, eps, dtype, param_dtype, rngs)

  def __call__(self, x, num_frames: int):
    after_time = x + self.timeattn(self.norm3(x), num_frames, over="time")
    x = x + self.attn(self.norm1(after_time), num_frames, over="space")
    return x + self.mlp(self.norm2(x))


class VideoPatchEmbed(nnx.Module):
  """Each frame cut into patch_size squares by a strided convolution (with bias)."""

  def __init__(self, config, dtype, param_dtype, rngs: nnx.Rngs):
    patch = (config.patch_size,) * 2
    self.proj = nnx.Conv(config.num_channels, config.embed_dim, kernel_size=patch, strides=patch, padding="VALID",
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, videos):
    batch, frames = videos.shape[:2]
    patches = self.proj(videos.reshape((batch * frames,) + videos.shape[2:]))
    return patches.reshape(batch, frames, -1, patches.shape[-1])  # row-major patches, as torch flattens them


class SpaceTimeTransformer(nnx.Module):
  """videos (B, F, S, S, C) -> the final-normed class token (B, embed_dim); the release's head is an identity."""

  def __init__(self, config, dtype, param_dtype, rngs: nnx.Rngs):
    self.image_size, self.num_frames = config.image_size, config.num_frames
    dim = config.embed_dim
    patches_per_frame = (config.image_size // config.patch_size) ** 2
    self.patch_embed = VideoPatchEmbed(config, dtype, param_dtype, rngs)
    # Torch's shapes, leading 1 included, so the checkpoint's arrays load as they are.
    self.cls_token = nnx.Param(_TOKEN_INIT(rngs.params(), (1, 1, dim), param_dtype))
    self.pos_embed = nnx.Param(_TOKEN_INIT(rngs.params(), (1, patches_per_frame + 1, dim), param_dtype))
    self.temporal_embed = nnx.Param(jnp.zeros((1, config.num_frames, dim), param_dtype))
    self.blocks = nnx.List([SpaceTimeBlock(config, dtype, param_dtype, rngs) for _ in range(config.depth)])
    self.norm = _layer_norm(dim, config.layer_norm_eps, dtype, param_dtype, rngs)

  def __call__(self, videos):
    size = self.image_size
    if videos.ndim != 5 or videos.shape[2:4] != (size, size) or not 1 <= videos.shape[1] <= self.num_frames:
      raise ValueError(f"EgoVLP video input: expected (batch, 1..{self.num_frames} frames, {size}, {size}, channels) "
                       f"normalised pixels, got {videos.shape}; prepare frames with "
                       "handi_jax.evaluation.egovlp.EgoVlpScorer.preprocess")
    batch, frames = videos.shape[:2]
    patches = self.patch_embed(videos)
    positions = self.pos_embed.value[0, 1:][None] + self.temporal_embed.value[0, :frames, None]
    patches = (patches + positions.astype(patches.dtype)).reshape(batch, -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.cls_token.value + self.pos_embed.value[:, :1], (batch, 1, patches.shape[-1]))
    x = jnp.concatenate([cls.astype(patches.dtype), patches], axis=1)
    for block in self.blocks:
      x = block(x, frames)
    return self.norm(x)[:, 0]


class EgoVLPVideoModel(nnx.Module):
  """`config`: RELEASE_CONFIG's fields. `model(videos)` is the release's compute_video: the projected video
  embedding (B, projection_dim), not normalised."""

  def __init__(self, config: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = ml_collections.FrozenConfigDict(config)
    self.video_model = SpaceTimeTransformer(self.config, dtype, param_dtype, rngs)
    self.vid_proj = nnx.List([nnx.Linear(self.config.embed_dim, self.config.projection_dim, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)])

  def __call__(self, videos: jax.Array) -> jax.Array:
    return self.vid_proj[0](self.video_model(videos))
