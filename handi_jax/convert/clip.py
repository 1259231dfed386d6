"""transformers CLIPModel directories -> handi_jax.models.clip_vision.CLIPModel (the evaluation CLIP).

The text tower shares handi_jax.convert.clip_text's field names and defaults; the extra rules are the class
token and logit scale (kept as they are) and the patch convolution, whose `weight` is 4-D (a kernel, not an
embedding table). transformers saves `position_ids` buffers in older checkpoints; they carry no weights.
"""

import os

import jax.numpy as jnp
from flax import nnx

from handi_jax import fileio
from handi_jax.convert import clip_text as convert_clip_text
from handi_jax.convert import core
from handi_jax.models.clip_vision import CLIPModel

RULES = (
    core.Rule("{m}.class_embedding", "{m}.class_embedding"),
    core.Rule("logit_scale", "logit_scale"),
    core.Rule("{m}_embedding.weight", "{m}_embedding.embedding", ndim=2),
) + core.DEFAULT_RULES
BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# transformers CLIPVisionConfig defaults for fields config.json leaves out.
_VISION_FIELDS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_PROJECTION_DIM = 512


def config_from_transformers(hf_config: dict, where: str = "config.json") -> dict:
  """A transformers CLIPModel config.json -> the `config` of handi_jax.models.clip_vision.CLIPModel."""
  if hf_config.get("model_type") != "clip" or "vision_config" not in hf_config:
    raise ValueError(f"{where}: not a transformers CLIPModel config (model_type 'clip' with text_config and "
                     "vision_config); evaluation needs the two-tower CLIPModel, e.g. openai/clip-vit-base-patch32")
  vision = hf_config["vision_config"] or {}
  return dict(text=convert_clip_text.config_from_transformers(hf_config, where),
              vision={name: vision.get(name, default) for name, default in _VISION_FIELDS.items()},
              projection_dim=hf_config.get("projection_dim", _PROJECTION_DIM))


def from_state_dict(config: dict, state_dict, *, what: str = "CLIP model", dtype=jnp.float32) -> CLIPModel:
  """A CLIPModel holding a transformers CLIPModel state dict (numpy arrays)."""
  state_dict = {k: v for k, v in state_dict.items() if k not in BUFFERS}
  params = core.to_flax(state_dict, RULES)
  return core.build_with_params(lambda: CLIPModel(config, dtype=dtype, rngs=nnx.Rngs(0)), params, what)


def load_pretrained(directory: str | os.PathLike, *, dtype=jnp.float32) -> CLIPModel:
  """The CLIPModel saved in `directory` by transformers (config.json + model.safetensors or pytorch_model.bin)."""
  directory = fileio.as_path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"CLIP directory {directory} does not exist: set config.evaluate.clip to a "
                            "transformers CLIPModel folder (config.json + model.safetensors), or leave it empty")
  config = config_from_transformers(core.read_config(directory), str(directory / "config.json"))
  return from_state_dict(config, core.read_state_dict(directory), what=f"CLIP model {directory}", dtype=dtype)
