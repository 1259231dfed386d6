"""EgoVLP's text tower in Flax NNX: DistilBERT, its first ([CLS]) token, ReLU, then a linear projection.

The BLIP score compares a frame's BLIP caption with the action description in this embedding space (see
handi_jax.evaluation.blip). Attribute paths equal EgoVLP's state-dict names (`text_model.transformer.layer.0.
attention.q_lin`, `text_model.embeddings.LayerNorm`) except the projection: EgoVLP's `txt_proj` is
Sequential(ReLU, Linear), saved as `txt_proj.1.*`, here a plain `txt_proj` layer after a ReLU in `__call__`.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from handi_jax.models.blip import activation, masked_attention
from handi_jax.models.layers import LayerOptions, layer_norm, linear

_EMBED_INIT = nnx.initializers.normal(0.02)
_LAYER_NORM_EPS = 1e-12  # fixed in DistilBERT's code, not in its config


class Embeddings(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.word_embeddings = nnx.Embed(config.vocab_size, config.dim, dtype=opts.dtype, param_dtype=opts.param_dtype,
                                     embedding_init=_EMBED_INIT, rngs=rngs)
    self.position_embeddings = nnx.Embed(config.max_position_embeddings, config.dim, dtype=opts.dtype,
                                         param_dtype=opts.param_dtype, embedding_init=_EMBED_INIT, rngs=rngs)
    self.LayerNorm = layer_norm(config.dim, opts, rngs, _LAYER_NORM_EPS)

  def __call__(self, token_ids):
    positions = jnp.arange(token_ids.shape[-1])
    return self.LayerNorm(self.word_embeddings(token_ids) + self.position_embeddings(positions)[None])


class MultiHeadSelfAttention(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    width, self.num_heads = config.dim, config.n_heads
    if width % self.num_heads:
      raise ValueError(f"DistilBERT config: dim {width} is not divisible by n_heads {self.num_heads}")
    self.q_lin = linear(width, width, ("embed", "heads"), opts, rngs)
    self.k_lin = linear(width, width, ("embed", "heads"), opts, rngs)
    self.v_lin = linear(width, width, ("embed", "heads"), opts, rngs)
    self.out_lin = linear(width, width, ("heads", "embed"), opts, rngs)

  def __call__(self, x, key_mask):
    rows, length, width = x.shape

    def heads(projection):
      return projection(x).reshape(rows, length, self.num_heads, width // self.num_heads)

    out = masked_attention(heads(self.q_lin), heads(self.k_lin), heads(self.v_lin), key_mask[:, None, None, :])
    return self.out_lin(out.reshape(rows, length, width))


class FFN(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.activation = activation(config.activation, "DistilBERT config.activation")
    self.lin1 = linear(config.dim, config.hidden_dim, ("embed", "mlp"), opts, rngs)
    self.lin2 = linear(config.hidden_dim, config.dim, ("mlp", "embed"), opts, rngs)

  def __call__(self, x):
    return self.lin2(self.activation(self.lin1(x)))


class TransformerBlock(nnx.Module):
  """Post-norm block, as BERT."""

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.attention = MultiHeadSelfAttention(config, opts, rngs)
    self.sa_layer_norm = layer_norm(config.dim, opts, rngs, _LAYER_NORM_EPS)
    self.ffn = FFN(config, opts, rngs)
    self.output_layer_norm = layer_norm(config.dim, opts, rngs, _LAYER_NORM_EPS)

  def __call__(self, x, key_mask):
    x = self.sa_layer_norm(self.attention(x, key_mask) + x)
    return self.output_layer_norm(self.ffn(x) + x)


class Transformer(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.layer = nnx.List([TransformerBlock(config, opts, rngs) for _ in range(config.n_layers)])

  def __call__(self, x, key_mask):
    for block in self.layer:
      x = block(x, key_mask)
    return x


class DistilBertModel(nnx.Module):

  def __init__(self, config, opts: LayerOptions, rngs: nnx.Rngs):
    self.embeddings = Embeddings(config, opts, rngs)
    self.transformer = Transformer(config, opts, rngs)

  def __call__(self, token_ids, key_mask):
    return self.transformer(self.embeddings(token_ids), key_mask)


class EgoVlpTextEncoder(nnx.Module):
  """`config` has `text_model` (a transformers DistilBERT config: vocab_size, dim, n_layers, n_heads, hidden_dim,
  max_position_embeddings, activation) and `projection_dim` (256 in EgoVLP).

  `encoder(token_ids, attention_mask)` with (B, L) ids and a mask (1 = token, 0 = padding) -> (B, projection_dim)
  float32, not normalised: EgoVLP's `compute_text`.
  """

  def __init__(self, config: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = ml_collections.FrozenConfigDict(config)
    opts = LayerOptions(dtype, param_dtype)
    self.text_model = DistilBertModel(self.config.text_model, opts, rngs)
    self.txt_proj = linear(self.config.text_model.dim, self.config.projection_dim, ("embed", "mlp"), opts, rngs)

  def __call__(self, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    hidden = self.text_model(token_ids, attention_mask.astype(bool))
    return self.txt_proj(jax.nn.relu(hidden[:, 0])).astype(jnp.float32)
