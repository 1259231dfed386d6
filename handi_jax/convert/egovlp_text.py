"""EgoVLP checkpoints -> handi_jax.models.egovlp_text.EgoVlpTextEncoder (the text tower of the BLIP score).

A text-tower directory holds DistilBERT's config.json and tokenizer files (`distilbert-base-uncased`, which EgoVLP
fine-tunes) and the weights: either an EgoVLP checkpoint, `egovlp.pth` (Ego4D) or `epic_mir_plus.pth`
(EpicKitchens), read through torch, or its text tower as `model.safetensors`, read without torch. To write the
latter once: `core.write_safetensors(directory / "model.safetensors", read_checkpoint(directory / "egovlp.pth"))`.

The checkpoint is read as handi_jax.convert.egovlp reads it for the EgoVLP score (weights-only torch loading, the
trainer's pickled config as inert stand-ins); that score keeps the video tower, this one the text tower.
"""

import os
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from handi_jax import fileio
from handi_jax.convert import core
from handi_jax.convert import egovlp as convert_egovlp
from handi_jax.models.egovlp_text import EgoVlpTextEncoder

RULES = (
    core.Rule("txt_proj.1.weight", "txt_proj.kernel", layout="kernel"),
    core.Rule("txt_proj.1.bias", "txt_proj.bias"),
    core.Rule("{m}_embeddings.weight", "{m}_embeddings.embedding", ndim=2),
) + core.DEFAULT_RULES
TOWER_PREFIXES = ("text_model.", "txt_proj.")
BUFFERS = ("text_model.embeddings.position_ids",)
WEIGHTS = "model.safetensors"

# transformers DistilBertConfig defaults for fields config.json leaves out.
_DISTILBERT_FIELDS = dict(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
                          max_position_embeddings=512, activation="gelu")


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The text tower (`text_model.*`, `txt_proj.1.*`) of an EgoVLP checkpoint (.pth) or of a safetensors file, with
  the `module.` prefix of data-parallel training removed."""
  state = {k.removeprefix("module."): v for k, v in convert_egovlp.read_checkpoint(path).items()}
  tower = {k: v for k, v in state.items() if k.startswith(TOWER_PREFIXES) and k not in BUFFERS}
  if "txt_proj.1.weight" not in tower:
    raise core.CheckpointMismatchError(f"{path}: no EgoVLP text tower (txt_proj.1.weight missing among "
                                       f"{len(state)} tensors); expected egovlp.pth or epic_mir_plus.pth")
  return tower


def config_from_transformers(hf_config: dict, where: str = "config.json") -> dict:
  """A DistilBERT config.json -> the `text_model` part of the encoder's config."""
  if hf_config.get("model_type") != "distilbert":
    raise ValueError(f"{where}: model_type {hf_config.get('model_type')!r}, expected 'distilbert': the text-tower "
                     "directory holds distilbert-base-uncased's config.json and tokenizer files")
  return {name: hf_config.get(name, default) for name, default in _DISTILBERT_FIELDS.items()}


def _weights_file(directory: pathlib.Path) -> pathlib.Path:
  if (directory / WEIGHTS).is_file():
    return directory / WEIGHTS
  checkpoints = sorted(directory.glob("*.pth"))
  if len(checkpoints) != 1:
    raise FileNotFoundError(f"{directory}: expected {WEIGHTS} or exactly one EgoVLP checkpoint (*.pth: egovlp.pth "
                            f"for Ego4D, epic_mir_plus.pth for EpicKitchens), found {[p.name for p in checkpoints]}")
  return checkpoints[0]


def from_state_dict(text_model_config: dict, state_dict, *, what: str = "EgoVLP text tower",
                    dtype=jnp.float32) -> EgoVlpTextEncoder:
  """The encoder holding an EgoVLP text tower (numpy arrays, EgoVLP's names); the projection width is the one
  stored."""
  config = dict(text_model=text_model_config, projection_dim=int(np.shape(state_dict["txt_proj.1.weight"])[0]))
  params = core.to_flax(state_dict, RULES)
  return core.build_with_params(lambda: EgoVlpTextEncoder(config, dtype=dtype, rngs=nnx.Rngs(0)), params, what)


def load_pretrained(directory: str | os.PathLike, *, dtype=jnp.float32) -> EgoVlpTextEncoder:
  directory = fileio.as_path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"EgoVLP text-tower directory {directory} does not exist: expected DistilBERT's "
                            "config.json and tokenizer files with egovlp.pth / epic_mir_plus.pth or model.safetensors")
  config = config_from_transformers(core.read_config(directory), str(directory / "config.json"))
  weights = _weights_file(directory)
  return from_state_dict(config, read_checkpoint(weights), what=f"EgoVLP text tower {weights}", dtype=dtype)
