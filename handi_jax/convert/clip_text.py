"""transformers CLIPTextModel directories <-> handi_jax.models.clip_text.CLIPTextModel.

One rule table: embedding tables keep their layout (`weight` <-> `embedding`), everything else follows the
shared rules. Released checkpoints (SD 1.5, ModelScope) and transformers 4 name the weights
`text_model.embeddings...`; transformers 5 saves them without the `text_model.` prefix and loads both. Import
accepts both, export writes the prefixed names, which every transformers version loads. Older checkpoints also
store the `position_ids` buffer; it carries no weights and is dropped.
"""

import os

import jax.numpy as jnp
from flax import nnx

from handi_jax import fileio
from handi_jax.convert import core
from handi_jax.models.clip_text import CLIPTextModel

RULES = (core.Rule("{m}_embedding.weight", "{m}_embedding.embedding"),) + core.DEFAULT_RULES
WEIGHTS_NAME = "model.safetensors"
PREFIX = "text_model."
BUFFERS = ("text_model.embeddings.position_ids",)
# The transformers release this export format was validated against (what `transformers_version` records).
TRANSFORMERS_VERSION = "5.23.0"

# config.model.text_encoder field -> transformers CLIPTextConfig default when config.json leaves it out.
_FIELDS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
               num_attention_heads=8, max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="quick_gelu",
               bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
# The fields that change the computation (the token ids only matter to the tokenizer).
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "max_position_embeddings", "layer_norm_eps", "hidden_act")


def config_from_transformers(hf_config: dict, where: str = "config.json") -> dict:
  """transformers CLIPTextModel config.json (or a CLIPModel one with text_config) -> config.model.text_encoder."""
  if hf_config.get("model_type") == "clip" and "text_config" in hf_config:
    hf_config = hf_config["text_config"]
  architectures = hf_config.get("architectures") or ["CLIPTextModel"]
  if not set(architectures) & {"CLIPTextModel", "CLIPTextModelWithProjection", "CLIPModel"}:
    raise ValueError(f"{where}: architectures {architectures} is not a CLIP text encoder (expected CLIPTextModel)")
  return {name: hf_config.get(name, default) for name, default in _FIELDS.items()}


def config_to_transformers(config) -> dict:
  """config.model.text_encoder fields -> a config.json transformers' CLIPTextModel.from_pretrained accepts."""
  return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "dtype": "float32",
          "transformers_version": TRANSFORMERS_VERSION, **{name: config[name] for name in _FIELDS}}


def load_pretrained(directory: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                      expected_config=None) -> CLIPTextModel:
  """The text encoder in `directory`; with `expected_config` (config.model.text_encoder) the architecture must agree."""
  directory = fileio.as_path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"text encoder directory {directory} does not exist: expected a transformers "
                            "CLIPTextModel folder with config.json and model.safetensors (or pytorch_model.bin)")
  config = config_from_transformers(core.read_config(directory), str(directory / "config.json"))
  if expected_config is not None:
    core.check_config_matches(config, expected_config, ARCHITECTURE_FIELDS, "the text encoder", str(directory))
  state_dict = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in core.read_state_dict(directory).items()}
  state_dict = {k: v for k, v in state_dict.items() if k not in BUFFERS}
  params = core.to_flax(state_dict, RULES)
  return core.build_with_params(
      lambda: CLIPTextModel(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)), params,
      f"text encoder {directory}")


def save_pretrained(model: CLIPTextModel, directory: str | os.PathLike) -> None:
  state_dict = core.to_torch(core.flat_params(model), RULES)
  with fileio.atomic_directory(directory) as tmp:
    core.write_model_dir(tmp, config_to_transformers(model.config), state_dict, WEIGHTS_NAME)
