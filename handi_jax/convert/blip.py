"""transformers BlipForConditionalGeneration directories -> handi_jax.models.blip.BlipForConditionalGeneration.

The BLIP score's captioner: `Salesforce/blip-image-captioning-large` (BLIP_large) or `-base` (BLIP_base) saved with
save_pretrained. The rules beyond the defaults are the ViT's class and position embeddings (parameters kept as
they are) and the embedding tables. transformers ties the LM head's `decoder` to the word embeddings and to
`cls.predictions.bias`; a checkpoint may store only one copy, so the missing one is filled from its twin.
"""

import os

import jax.numpy as jnp
from flax import nnx

from handi_jax import fileio
from handi_jax.convert import core
from handi_jax.models.blip import BlipForConditionalGeneration

RULES = (
    core.Rule("vision_model.embeddings.{name}_embedding", "vision_model.embeddings.{name}_embedding"),
    core.Rule("{m}_embeddings.weight", "{m}_embeddings.embedding", ndim=2),
) + core.DEFAULT_RULES
BUFFERS = ("text_decoder.bert.embeddings.position_ids",)
ARCHITECTURE = "BlipForConditionalGeneration"
_HEAD = "text_decoder.cls.predictions."
_WORD_EMBEDDINGS = "text_decoder.bert.embeddings.word_embeddings.weight"

# transformers BlipVisionConfig / BlipTextConfig defaults for fields config.json leaves out.
_VISION_FIELDS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=384, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5)
_TEXT_FIELDS = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=8, max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12,
                    bos_token_id=30522, sep_token_id=102, pad_token_id=0)


def config_from_transformers(hf_config: dict, where: str = "config.json") -> dict:
  """A transformers BlipForConditionalGeneration config.json -> the `config` of the JAX model."""
  if hf_config.get("model_type") != "blip" or "vision_config" not in hf_config or "text_config" not in hf_config:
    raise ValueError(f"{where}: not a transformers BLIP config (model_type 'blip' with text_config and "
                     "vision_config); the BLIP score needs a captioning model, e.g. "
                     "Salesforce/blip-image-captioning-large")
  architectures = hf_config.get("architectures") or [ARCHITECTURE]
  if ARCHITECTURE not in architectures:
    raise ValueError(f"{where}: a {', '.join(architectures)} checkpoint; the BLIP score captions frames, so it needs "
                     f"a {ARCHITECTURE} (Salesforce/blip-image-captioning-large or -base)")
  vision = {name: (hf_config["vision_config"] or {}).get(name, default) for name, default in _VISION_FIELDS.items()}
  text = {name: (hf_config["text_config"] or {}).get(name, default) for name, default in _TEXT_FIELDS.items()}
  # transformers sets it from the vision width whatever the file says.
  text["encoder_hidden_size"] = vision["hidden_size"]
  return dict(vision=vision, text=text)


def flax_params(state_dict) -> dict:
  """A transformers BlipForConditionalGeneration state dict (numpy arrays) -> {nnx path: array} of the JAX model."""
  state_dict = {k: v for k, v in state_dict.items() if k not in BUFFERS}
  head_bias = state_dict.pop(_HEAD + "bias", None)
  if head_bias is not None:
    state_dict.setdefault(_HEAD + "decoder.bias", head_bias)
  if _WORD_EMBEDDINGS in state_dict:
    state_dict.setdefault(_HEAD + "decoder.weight", state_dict[_WORD_EMBEDDINGS])
  return core.to_flax(state_dict, RULES)


def from_state_dict(config: dict, state_dict, *, what: str = "BLIP captioner",
                    dtype=jnp.float32) -> BlipForConditionalGeneration:
  """The JAX model holding a transformers BlipForConditionalGeneration state dict (numpy arrays)."""
  return core.build_with_params(lambda: BlipForConditionalGeneration(config, dtype=dtype, rngs=nnx.Rngs(0)),
                                flax_params(state_dict), what)


def load_pretrained(directory: str | os.PathLike, *, dtype=jnp.float32) -> BlipForConditionalGeneration:
  """The captioner saved in `directory` by transformers (config.json + model.safetensors, or pytorch_model.bin
  through torch)."""
  directory = fileio.as_path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"BLIP captioner directory {directory} does not exist: expected a transformers "
                            f"{ARCHITECTURE} folder (config.json + model.safetensors + tokenizer files)")
  config = config_from_transformers(core.read_config(directory), str(directory / "config.json"))
  return from_state_dict(config, core.read_state_dict(directory), what=f"BLIP captioner {directory}", dtype=dtype)
