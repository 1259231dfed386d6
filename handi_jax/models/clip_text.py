"""The CLIP text encoder (transformers CLIPTextModel architecture) in Flax NNX.

Attribute paths equal the transformers state-dict names (`text_model.encoder.layers.3.self_attn.q_proj`,
`text_model.final_layer_norm`, ...), so `handi_jax.convert.clip_text` maps checkpoints with one rule table.
Width, depth, heads and activation come from config.model.text_encoder: 23 x 1024 (OpenCLIP-H, exact GELU)
for ModelScope / HANDI, 12 x 768 (quick GELU) for SD 1.5.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from handi_jax.models.layers import LayerOptions, layer_norm, linear

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
_EMBED_INIT = nnx.initializers.normal(0.02)


class CLIPTextEmbeddings(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.token_embedding = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=opts.dtype, param_dtype=opts.param_dtype,
        embedding_init=nnx.with_partitioning(_EMBED_INIT, ("vocab", "embed")), rngs=rngs)
    self.position_embedding = nnx.Embed(
        config.max_position_embeddings, config.hidden_size, dtype=opts.dtype, param_dtype=opts.param_dtype,
        embedding_init=nnx.with_partitioning(_EMBED_INIT, (None, "embed")), rngs=rngs)

  def __call__(self, input_ids):
    positions = jnp.arange(input_ids.shape[-1])
    return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):
  """Multi-head self-attention; `causal` (the text tower): each token sees itself and the tokens before it."""

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs, causal: bool = True):
    self.causal = causal
    width, self.num_heads = config.hidden_size, config.num_attention_heads
    if width % self.num_heads:
      raise ValueError(f"config.model.text_encoder: hidden_size {width} is not divisible by "
                       f"num_attention_heads {self.num_heads}; pick a head count that divides the width")
    self.q_proj = linear(width, width, ("embed", "heads"), opts, rngs)
    self.k_proj = linear(width, width, ("embed", "heads"), opts, rngs)
    self.v_proj = linear(width, width, ("embed", "heads"), opts, rngs)
    self.out_proj = linear(width, width, ("heads", "embed"), opts, rngs)

  def __call__(self, x):
    batch, length, width = x.shape
    head_dim = width // self.num_heads

    def heads(projection):
      return projection(x).reshape(batch, length, self.num_heads, head_dim)

    q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
    # Logits and softmax in float32, as transformers does, whatever the compute dtype.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
    if self.causal:
      logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
    return self.out_proj(out)


class CLIPMLP(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    if config.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"config.model.text_encoder.hidden_act={config.hidden_act!r} is not supported; "
                       f"use one of {sorted(_ACTIVATIONS)}")
    self.activation = config.hidden_act
    self.fc1 = linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), opts, rngs)
    self.fc2 = linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), opts, rngs)

  def __call__(self, x):
    return self.fc2(_ACTIVATIONS[self.activation](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-norm transformer block (causal in the text tower, not in the vision tower)."""

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs, causal: bool = True):
    self.self_attn = CLIPAttention(config, opts, rngs, causal)
    self.layer_norm1 = layer_norm(config.hidden_size, opts, rngs, config.layer_norm_eps)
    self.mlp = CLIPMLP(config, opts, rngs)
    self.layer_norm2 = layer_norm(config.hidden_size, opts, rngs, config.layer_norm_eps)

  def __call__(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs, causal: bool = True):
    self.layers = nnx.List([CLIPEncoderLayer(config, opts, rngs, causal) for _ in range(config.num_hidden_layers)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class CLIPTextTransformer(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.embeddings = CLIPTextEmbeddings(config, opts, rngs)
    self.encoder = CLIPEncoder(config, opts, rngs)
    self.final_layer_norm = layer_norm(config.hidden_size, opts, rngs, config.layer_norm_eps)

  def __call__(self, input_ids):
    return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))


class CLIPTextModel(nnx.Module):
  """`config` is config.model.text_encoder (transformers field names).

  `text_encoder(input_ids)` with int ids (B, L), L <= max_position_embeddings, returns the last hidden state
  after the final LayerNorm, (B, L, hidden_size): the text conditioning of the UNet.
  """

  def __init__(self, config: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = ml_collections.FrozenConfigDict(config)
    self.text_model = CLIPTextTransformer(self.config, LayerOptions(dtype, param_dtype), rngs)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
      raise ValueError(f"input_ids: expected (batch, length <= {self.config.max_position_embeddings}) token ids, "
                       f"got shape {input_ids.shape}; tokenize prompts with clip_text.tokenize")
    return self.text_model(input_ids)
