"""diffusers AutoencoderKL directories <-> handi_jax.models.vae.AutoencoderKL.

The module names already match, so the shared rules (weight -> kernel / scale, OIHW -> HWIO) are the whole
table. Older checkpoints name the mid-block attention query/key/value/proj_attn; those are renamed on import
as diffusers does, and export writes the current names.
"""

import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from handi_jax import fileio
from handi_jax.convert import core
from handi_jax.models.vae import AutoencoderKL

RULES = core.DEFAULT_RULES
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# The diffusers release this export format was validated against (what `_diffusers_version` records).
DIFFUSERS_VERSION = "0.42.1"

# config.model.vae field -> diffusers default when config.json leaves it out.
_FIELDS = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(64,), layers_per_block=1,
               norm_num_groups=32, scaling_factor=0.18215, sample_size=32)
# diffusers options this implementation covers only at these values (the SD 1.x / 2.x VAE).
_FIXED = dict(act_fn="silu", use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
              shift_factor=None, latents_mean=None, latents_std=None)
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def config_from_diffusers(hf_config: dict, where: str = "config.json") -> dict:
  """diffusers AutoencoderKL config.json -> config.model.vae fields; unsupported options raise."""
  config = {name: hf_config.get(name, default) for name, default in _FIELDS.items()}
  config["block_out_channels"] = tuple(config["block_out_channels"])
  if isinstance(config["sample_size"], list):
    config["sample_size"] = tuple(config["sample_size"])
  for name, supported in _FIXED.items():
    if hf_config.get(name, supported) != supported:
      raise ValueError(f"{where}: {name}={hf_config[name]!r} is not supported by handi_jax's AutoencoderKL "
                       f"(expected {supported!r}, the SD 1.x VAE)")
  blocks = len(config["block_out_channels"])
  for name, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    found = list(hf_config.get(name, [block] * blocks))
    if found != [block] * blocks:
      raise ValueError(f"{where}: {name} must be {blocks} x {block!r} (one per block_out_channels entry), "
                       f"found {found}")
  return config


def config_to_diffusers(config) -> dict:
  """config.model.vae fields -> a config.json diffusers' AutoencoderKL.from_pretrained accepts."""
  fields = {name: config[name] for name in _FIELDS}
  fields["block_out_channels"] = list(fields["block_out_channels"])
  blocks = len(fields["block_out_channels"])
  return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **fields, **_FIXED,
          "down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks,
          "force_upcast": True}


def rename_legacy_keys(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`...attentions.0.query.weight` -> `...attentions.0.to_q.weight` (and key, value, proj_attn)."""
  pattern = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
  renamed = {}
  for key, value in state_dict.items():
    found = pattern.match(key)
    if found:
      key = f"{found[1]}.{_LEGACY_ATTENTION[found[2]]}.{found[3]}"
    renamed[key] = value
  return renamed


def load_pretrained(directory: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   expected_config=None) -> AutoencoderKL:
  """The VAE in `directory`; with `expected_config` (config.model.vae) its architecture fields must agree."""
  directory = fileio.as_path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"VAE directory {directory} does not exist: expected a diffusers AutoencoderKL "
                            "folder with config.json and diffusion_pytorch_model.safetensors (or .bin)")
  config = config_from_diffusers(core.read_config(directory), str(directory / "config.json"))
  if expected_config is not None:
    core.check_config_matches(config, expected_config, [f for f in _FIELDS if f != "sample_size"], "the VAE",
                              str(directory))
  params = core.to_flax(rename_legacy_keys(core.read_state_dict(directory)), RULES)
  return core.build_with_params(
      lambda: AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)), params,
      f"VAE {directory}")


def save_pretrained(model: AutoencoderKL, directory: str | os.PathLike) -> None:
  state_dict = core.to_torch(core.flat_params(model), RULES)
  with fileio.atomic_directory(directory) as tmp:
    core.write_model_dir(tmp, config_to_diffusers(model.config), state_dict, WEIGHTS_NAME)
