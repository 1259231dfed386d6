"""BLIP's captioning model (transformers BlipForConditionalGeneration architecture) in Flax NNX, for the BLIP score.

The score captions generated frames (see handi_jax.evaluation.blip), so the model is BLIP's ViT and its image-
grounded text decoder: a BERT whose layers add cross-attention to the image tokens, then a masked-LM head read as
next-token logits. Attribute paths equal transformers' state-dict names (`vision_model.encoder.layers.0.self_attn.qkv`,
`text_decoder.bert.encoder.layer.0.crossattention.self.key`, `text_decoder.cls.predictions.decoder`), so
`handi_jax.convert.blip` imports a transformers directory with one rule table.

Decoding runs the decoder on a fixed-length token buffer many times for the same images: the cross-attention keys
and values of the image tokens are computed once (`cross_attention_states`), and the beams of one image share them
(`text_decoder(token_ids, states, length)` takes `beams * images` rows, image-major).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from handi_jax.models.layers import LayerOptions, layer_norm, linear

_ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False)}
_EMBED_INIT = nnx.initializers.normal(0.02)


def activation(name: str, field: str):
  """The function a config's activation name stands for; `field` names that setting in the error."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"{field}={name!r} is not supported; the checkpoints here use one of {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def masked_attention(query, key, value, mask=None):
  """softmax(q k^T / sqrt(d)) v for q (N, Lq, H, d), k and v (N, Lk, H, d); `mask` (N or 1, 1, Lq or 1, Lk) is True
  where a key may be seen. Logits and softmax in float32, as transformers computes them."""
  logits = jnp.einsum("nqhd,nkhd->nhqk", query, key, preferred_element_type=jnp.float32) * query.shape[-1] ** -0.5
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum("nhqk,nkhd->nqhd", weights, value)


def _split_heads(x, heads: int):
  return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def _check_heads(width: int, heads: int, where: str) -> None:
  if width % heads:
    raise ValueError(f"{where}: hidden_size {width} is not divisible by num_attention_heads {heads}")


# ---------------------------------------------------------------------------------------------------
# Vision: a ViT with a fused qkv projection; the decoder reads every token after the final LayerNorm.


class BlipVisionEmbeddings(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    width, patch = config.hidden_size, config.patch_size
    self.image_size = config.image_size
    self.class_embedding = nnx.Param(_EMBED_INIT(rngs.params(), (1, 1, width), opts.param_dtype))
    self.patch_embedding = nnx.Conv(3, width, kernel_size=(patch, patch), strides=(patch, patch), padding="VALID",
                                    dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
    num_positions = (config.image_size // patch) ** 2 + 1
    self.position_embedding = nnx.Param(_EMBED_INIT(rngs.params(), (1, num_positions, width), opts.param_dtype))

  def __call__(self, pixels):
    patches = self.patch_embedding(pixels)
    patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding.value.astype(patches.dtype), (patches.shape[0], 1, patches.shape[-1]))
    return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.value.astype(patches.dtype)


class BlipAttention(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    width, self.num_heads = config.hidden_size, config.num_attention_heads
    _check_heads(width, self.num_heads, "BLIP vision_config")
    self.qkv = linear(width, 3 * width, ("embed", "heads"), opts, rngs)
    self.projection = linear(width, width, ("heads", "embed"), opts, rngs)

  def __call__(self, x):
    batch, length, width = x.shape
    # The fused projection's outputs are [queries | keys | values], each split into heads.
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, width // self.num_heads)
    out = masked_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return self.projection(out.reshape(batch, length, width))


class BlipMLP(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.activation = activation(config.hidden_act, "BLIP vision_config.hidden_act")
    self.fc1 = linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), opts, rngs)
    self.fc2 = linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), opts, rngs)

  def __call__(self, x):
    return self.fc2(self.activation(self.fc1(x)))


class BlipEncoderLayer(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.self_attn = BlipAttention(config, opts, rngs)
    self.layer_norm1 = layer_norm(config.hidden_size, opts, rngs, config.layer_norm_eps)
    self.mlp = BlipMLP(config, opts, rngs)
    self.layer_norm2 = layer_norm(config.hidden_size, opts, rngs, config.layer_norm_eps)

  def __call__(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class BlipEncoder(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.layers = nnx.List([BlipEncoderLayer(config, opts, rngs) for _ in range(config.num_hidden_layers)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class BlipVisionModel(nnx.Module):
  """pixels (B, S, S, 3), normalised as BLIP's processor does -> image tokens (B, 1 + (S / patch)^2, width)."""

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.embeddings = BlipVisionEmbeddings(config, opts, rngs)
    self.encoder = BlipEncoder(config, opts, rngs)
    self.post_layernorm = layer_norm(config.hidden_size, opts, rngs, config.layer_norm_eps)

  def __call__(self, pixels):
    size = self.embeddings.image_size
    if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
      raise ValueError(f"BLIP vision input: expected (batch, {size}, {size}, 3) normalised pixels, got {pixels.shape}; "
                       "prepare frames with handi_jax.evaluation.blip.preprocess")
    return self.post_layernorm(self.encoder(self.embeddings(pixels)))


# ---------------------------------------------------------------------------------------------------
# Text decoder: BERT (post-norm) with causal self-attention and cross-attention to the image tokens.


class BlipTextEmbeddings(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.word_embeddings = nnx.Embed(config.vocab_size, config.hidden_size, dtype=opts.dtype,
                                     param_dtype=opts.param_dtype, embedding_init=_EMBED_INIT, rngs=rngs)
    self.position_embeddings = nnx.Embed(config.max_position_embeddings, config.hidden_size, dtype=opts.dtype,
                                         param_dtype=opts.param_dtype, embedding_init=_EMBED_INIT, rngs=rngs)
    self.LayerNorm = layer_norm(config.hidden_size, opts, rngs, config.layer_norm_eps)

  def __call__(self, token_ids):
    positions = jnp.arange(token_ids.shape[-1])
    return self.LayerNorm(self.word_embeddings(token_ids) + self.position_embeddings(positions)[None])


class BlipTextSelfAttention(nnx.Module):
  """Causal self-attention, or (`cross`) attention from the text to precomputed image keys and values."""

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs, cross: bool):
    width, self.num_heads = config.hidden_size, config.num_attention_heads
    _check_heads(width, self.num_heads, "BLIP text_config")
    source_width = config.encoder_hidden_size if cross else width
    self.query = linear(width, width, ("embed", "heads"), opts, rngs)
    self.key = linear(source_width, width, ("embed", "heads"), opts, rngs)
    self.value = linear(source_width, width, ("embed", "heads"), opts, rngs)

  def keys_values(self, states):
    return _split_heads(self.key(states), self.num_heads), _split_heads(self.value(states), self.num_heads)

  def __call__(self, x, keys_values=None):
    rows, length, width = x.shape
    query = _split_heads(self.query(x), self.num_heads)
    if keys_values is None:
      key, value = self.keys_values(x)
      causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
      return masked_attention(query, key, value, causal).reshape(rows, length, width)
    key, value = keys_values
    # The beams of one image ask the same keys: fold them into the query axis rather than repeat the image tokens.
    images = key.shape[0]
    query = query.reshape(images, (rows // images) * length, *query.shape[2:])
    return masked_attention(query, key, value).reshape(rows, length, width)


class BlipTextOutput(nnx.Module):
  """Projection, residual, then LayerNorm (BERT is post-norm): after each attention and after the MLP."""

  def __init__(self, config, in_features: int, opts: LayerOptions, rngs: nnx.Rngs):
    self.dense = linear(in_features, config.hidden_size, ("mlp", "embed"), opts, rngs)
    self.LayerNorm = layer_norm(config.hidden_size, opts, rngs, config.layer_norm_eps)

  def __call__(self, x, residual):
    return self.LayerNorm(self.dense(x) + residual)


class BlipTextAttention(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs, cross: bool = False):
    self.self = BlipTextSelfAttention(config, opts, rngs, cross)
    self.output = BlipTextOutput(config, config.hidden_size, opts, rngs)

  def __call__(self, x, keys_values=None):
    return self.output(self.self(x, keys_values), x)


class BlipTextIntermediate(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.activation = activation(config.hidden_act, "BLIP text_config.hidden_act")
    self.dense = linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), opts, rngs)

  def __call__(self, x):
    return self.activation(self.dense(x))


class BlipTextLayer(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.attention = BlipTextAttention(config, opts, rngs)
    self.crossattention = BlipTextAttention(config, opts, rngs, cross=True)
    self.intermediate = BlipTextIntermediate(config, opts, rngs)
    self.output = BlipTextOutput(config, config.intermediate_size, opts, rngs)

  def __call__(self, x, image_keys_values):
    x = self.crossattention(self.attention(x), image_keys_values)
    return self.output(self.intermediate(x), x)


class BlipTextEncoder(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.layer = nnx.List([BlipTextLayer(config, opts, rngs) for _ in range(config.num_hidden_layers)])

  def __call__(self, x, image_states):
    for layer, keys_values in zip(self.layer, image_states, strict=True):
      x = layer(x, keys_values)
    return x


class BlipTextModel(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.embeddings = BlipTextEmbeddings(config, opts, rngs)
    self.encoder = BlipTextEncoder(config, opts, rngs)

  def __call__(self, token_ids, image_states):
    return self.encoder(self.embeddings(token_ids), image_states)


class BlipTextPredictionHeadTransform(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.activation = activation(config.hidden_act, "BLIP text_config.hidden_act")
    self.dense = linear(config.hidden_size, config.hidden_size, ("embed", "mlp"), opts, rngs)
    self.LayerNorm = layer_norm(config.hidden_size, opts, rngs, config.layer_norm_eps)

  def __call__(self, x):
    return self.LayerNorm(self.activation(self.dense(x)))


class BlipTextLMPredictionHead(nnx.Module):
  """transformers ties `decoder` to the word embeddings; the converter fills it from them when a checkpoint keeps
  only one copy, so it stays a plain layer here."""

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.transform = BlipTextPredictionHeadTransform(config, opts, rngs)
    self.decoder = linear(config.hidden_size, config.vocab_size, ("embed", "vocab"), opts, rngs)

  def __call__(self, x):
    return self.decoder(self.transform(x))


class BlipTextOnlyMLMHead(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.predictions = BlipTextLMPredictionHead(config, opts, rngs)

  def __call__(self, x):
    return self.predictions(x)


class BlipTextLMHeadModel(nnx.Module):
  """token ids (rows, L), the image states of `cross_attention_states` and a length n <= L -> the logits (rows,
  vocab), float32, of the token after the first n. Rows are `beams * images`, image-major. Self-attention is causal,
  so the tokens past n (a buffer's padding) change nothing."""

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.bert = BlipTextModel(config, opts, rngs)
    self.cls = BlipTextOnlyMLMHead(config, opts, rngs)

  def cross_attention_states(self, image_embeds) -> tuple:
    """Per layer, the (keys, values) of the image tokens, each (images, tokens, heads, head_dim)."""
    return tuple(layer.crossattention.self.keys_values(image_embeds) for layer in self.bert.encoder.layer)

  def __call__(self, token_ids, image_states, length):
    last = jax.lax.dynamic_index_in_dim(self.bert(token_ids, image_states), length - 1, axis=1, keepdims=False)
    return self.cls(last).astype(jnp.float32)


class BlipForConditionalGeneration(nnx.Module):
  """`config` has `vision` (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, image_size,
  patch_size, hidden_act, layer_norm_eps) and `text` (vocab_size, hidden_size, encoder_hidden_size,
  intermediate_size, num_hidden_layers, num_attention_heads, max_position_embeddings, hidden_act, layer_norm_eps,
  bos_token_id, sep_token_id, pad_token_id), transformers' field names.

  Captioning calls the parts: `vision_model` (the image tokens), `text_decoder.cross_attention_states` (once per
  image), then `text_decoder` on the growing token buffer; together they are transformers' forward logits.
  """

  def __init__(self, config: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = ml_collections.FrozenConfigDict(config)
    opts = LayerOptions(dtype, param_dtype)
    self.vision_model = BlipVisionModel(self.config.vision, opts, rngs)
    self.text_decoder = BlipTextLMHeadModel(self.config.text, opts, rngs)
