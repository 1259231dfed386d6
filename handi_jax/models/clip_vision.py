"""The CLIP vision tower and the two-tower CLIPModel (transformers architecture) in Flax NNX, for evaluation.

Attribute paths equal transformers' CLIPModel state-dict names (`vision_model.encoder.layers.0.self_attn.q_proj`,
`vision_model.pre_layrnorm` (sic), `visual_projection`, `text_projection`, `logit_scale`), so
`handi_jax.convert.clip` imports a transformers CLIPModel directory with one rule table. The text tower is
handi_jax.models.clip_text's; the vision encoder is its CLIPEncoder without the causal mask.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from handi_jax.models import clip_text
from handi_jax.models.layers import KERNEL_INIT, LayerOptions, layer_norm

_CLASS_INIT = nnx.initializers.normal(0.02)


class CLIPVisionEmbeddings(nnx.Module):
  """Patches (a stride-p convolution without bias) + a learned class token + learned positions."""

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.patch_size, self.image_size = config.patch_size, config.image_size
    width = config.hidden_size
    self.class_embedding = nnx.Param(_CLASS_INIT(rngs.params(), (width,), opts.param_dtype))
    self.patch_embedding = nnx.Conv(
        config.num_channels, width, kernel_size=(self.patch_size,) * 2, strides=(self.patch_size,) * 2,
        padding="VALID", use_bias=False, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    num_positions = (config.image_size // config.patch_size) ** 2 + 1
    self.position_embedding = nnx.Embed(num_positions, width, dtype=opts.dtype, param_dtype=opts.param_dtype,
                                        rngs=rngs)

  def __call__(self, pixels):
    patches = self.patch_embedding(pixels)
    batch = patches.shape[0]
    patches = patches.reshape(batch, -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding.value.astype(patches.dtype), (batch, 1, patches.shape[-1]))
    tokens = jnp.concatenate([cls, patches], axis=1)
    return tokens + self.position_embedding(jnp.arange(tokens.shape[1]))[None]


class CLIPVisionTransformer(nnx.Module):
  """pixels (B, S, S, C) normalised as CLIPImageProcessor does -> pooled class token (B, hidden_size)."""

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.embeddings = CLIPVisionEmbeddings(config, opts, rngs)
    self.pre_layrnorm = layer_norm(config.hidden_size, opts, rngs, config.layer_norm_eps)
    self.encoder = clip_text.CLIPEncoder(config, opts, rngs, causal=False)
    self.post_layernorm = layer_norm(config.hidden_size, opts, rngs, config.layer_norm_eps)

  def __call__(self, pixels):
    size = self.embeddings.image_size
    if pixels.ndim != 4 or pixels.shape[1:3] != (size, size):
      raise ValueError(f"CLIP vision input: expected (batch, {size}, {size}, channels) normalised pixels, got "
                       f"{pixels.shape}; resize and normalise frames with evaluation.extractors.clip_preprocess")
    hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
    return self.post_layernorm(hidden[:, 0])


def _projection(in_features: int, out_features: int, opts: LayerOptions, rngs: nnx.Rngs) -> nnx.Linear:
  """Without bias or logical axis names: the evaluation CLIP is never sharded."""
  return nnx.Linear(in_features, out_features, use_bias=False, dtype=opts.dtype, param_dtype=opts.param_dtype,
                    kernel_init=KERNEL_INIT, rngs=rngs)


class CLIPModel(nnx.Module):
  """`config` has `text` (config.model.text_encoder fields, eos_token_id among them), `vision` (hidden_size,
  intermediate_size, num_hidden_layers, num_attention_heads, image_size, patch_size, num_channels,
  layer_norm_eps, hidden_act) and `projection_dim`.

  `image_embeds(pixels)` and `text_embeds(input_ids)` are transformers' get_image_features /
  get_text_features: projected, not normalised.
  """

  def __init__(self, config: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = ml_collections.FrozenConfigDict(config)
    opts = LayerOptions(dtype, param_dtype)
    self.text_model = clip_text.CLIPTextTransformer(self.config.text, opts, rngs)
    self.vision_model = CLIPVisionTransformer(self.config.vision, opts, rngs)
    self.visual_projection = _projection(self.config.vision.hidden_size, self.config.projection_dim, opts, rngs)
    self.text_projection = _projection(self.config.text.hidden_size, self.config.projection_dim, opts, rngs)
    self.logit_scale = nnx.Param(jnp.asarray(2.6592, param_dtype))  # transformers' logit_scale_init_value

  def image_embeds(self, pixels: jax.Array) -> jax.Array:
    return self.visual_projection(self.vision_model(pixels))

  def text_embeds(self, input_ids: jax.Array) -> jax.Array:
    hidden = self.text_model(input_ids)
    # The pooled token: the first end-of-text token (transformers' rule since its PR #24773); checkpoints whose
    # config still says eos_token_id = 2 pool at the largest id, which is the end token in CLIP's vocabulary.
    if self.config.text.eos_token_id == 2:
      position = jnp.argmax(input_ids, axis=-1)
    else:
      position = jnp.argmax(input_ids == self.config.text.eos_token_id, axis=-1)
    return self.text_projection(hidden[jnp.arange(hidden.shape[0]), position])
