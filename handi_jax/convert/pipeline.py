"""Diffusers pipeline directories: the one weight format handi-jax reads (`config.model.pretrained`) and writes.

A pipeline directory is what diffusers' `DiffusionPipeline.save_pretrained` writes:

    model_index.json
    unet/          config.json + diffusion_pytorch_model.safetensors (or .bin)   diffusers / original HANDI keys
    vae/           config.json + diffusion_pytorch_model.safetensors (or .bin)   diffusers AutoencoderKL
    text_encoder/  config.json + model.safetensors (or pytorch_model.bin)        transformers CLIPTextModel
    tokenizer/     CLIPTokenizer files                                            copied through
    scheduler/     scheduler_config.json                                          copied through

`normalize_pipeline` rewrites any such directory (legacy .bin weights, a stock UNet that lacks the HANDI
parameters) as one in safetensors that handi-jax, diffusers and the release all load; `write_pipeline` writes
NNX models as one. Every output is filled in a temporary folder and renamed into place when complete.
"""

import json
import logging
import os
import pathlib
import shutil

import numpy as np

from handi_jax import fileio
from handi_jax.convert import clip_text, core, hub, unet, vae

MODELS = ("vae", "text_encoder", "unet")  # small ones first: a bad directory fails fast
COPIED = ("tokenizer", "scheduler")
EXPECTED_LAYOUT = ("unet/, vae/, text_encoder/ (model folders with config.json and weights), tokenizer/ and "
                   "scheduler/, as diffusers' DiffusionPipeline.save_pretrained writes them")
# model_index.json for a pipeline written without one to copy (random init): ModelScope's text-to-video layout.
MODEL_INDEX = {"_class_name": "TextToVideoSDPipeline", "_diffusers_version": "0.42.1",
               "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "UNet3DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
CONVERTERS = {"unet": unet, "vae": vae, "text_encoder": clip_text}

log = logging.getLogger(__name__)


def unet_key_format(config, requested: str = "auto") -> str:
  """auto: the original release's keys for a HANDI UNet (mask conv_in2 + motion), else stock diffusers keys."""
  if requested != "auto":
    return requested
  return "original" if config["mask_channels"] and config["motion_strength"] else "diffusers"


def check_pipeline_dir(directory: pathlib.Path, kind: str, required: tuple[str, ...] = MODELS + COPIED) -> None:
  """Raise naming what is missing unless `directory` holds the `required` sub-folders."""
  if not directory.is_dir():
    raise FileNotFoundError(f"{kind} directory {directory} does not exist; expected {EXPECTED_LAYOUT}")
  missing = [name for name in required if not (directory / name).is_dir()]
  if missing:
    found = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(f"{kind} directory {directory} lacks {', '.join(m + '/' for m in missing)}; expected "
                            f"{EXPECTED_LAYOUT}. Found: {', '.join(found) or 'nothing'}")


def write_pipeline(models: dict, destination: str | os.PathLike, *, copy_from: pathlib.Path | None = None,
                   unet_format: str = "auto", extra_files=None) -> pathlib.Path:
  """NNX models {unet, vae, text_encoder} -> a pipeline directory, written atomically.

  tokenizer/, scheduler/ and model_index.json come from `copy_from`; `extra_files(tmp)` may write what it lacks.
  """
  destination = fileio.as_path(destination)
  with fileio.atomic_directory(destination) as tmp:
    for name in MODELS:
      options = {"key_format": unet_key_format(models[name].config, unet_format)} if name == "unet" else {}
      CONVERTERS[name].save_pretrained(models[name], tmp / name, **options)
    if copy_from is not None:
      for name in COPIED:
        if (copy_from / name).is_dir():
          with fileio.local_copy(copy_from / name) as local:
            shutil.copytree(local, tmp / name)
      if (copy_from / "model_index.json").is_file():
        (tmp / "model_index.json").write_bytes((copy_from / "model_index.json").read_bytes())
    if extra_files is not None:
      extra_files(tmp)
    if not (tmp / "model_index.json").is_file():
      (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
  return destination


def normalize_pipeline(source: str | os.PathLike, destination: str | os.PathLike, *,
                       init_missing_handi_params: bool = False, stock_unet: bool = False,
                       unet_format: str = "auto") -> pathlib.Path:
  """Any PyTorch pipeline directory -> one in safetensors that `config.model.pretrained` reads.

  Every model goes through its converter (so a checkpoint that does not match its config fails here, naming
  the keys); `init_missing_handi_params` starts a stock UNet's HANDI parameters (see convert.unet).
  """
  source = fileio.as_path(hub.resolve(source, "the source pipeline"))
  check_pipeline_dir(source, "pipeline")
  models = {}
  for name in MODELS:
    log.info("reading %s from %s", name, source / name)
    options = dict(init_missing_handi_params=init_missing_handi_params,
                   handi_extension=not stock_unet) if name == "unet" else {}
    models[name] = CONVERTERS[name].load_pretrained(source / name, **options)
  return write_pipeline(models, destination, copy_from=source, unet_format=unet_format)


def describe_directory(directory: str | os.PathLike) -> str:
  """What a pipeline directory holds: per model its config and parameter count."""
  directory = fileio.as_path(directory)
  check_pipeline_dir(directory, "pipeline", MODELS)
  lines = [f"{directory}: pipeline directory"]
  for name in MODELS:
    config = core.read_config(directory / name)
    weights = next((directory / name / w for w in core.WEIGHT_FILES if (directory / name / w).is_file()), None)
    header = core.read_safetensors_header(weights) if weights and weights.suffix == ".safetensors" else {}
    count = sum(int(np.prod(v["shape"])) for v in header.values())
    dtypes = sorted({v["dtype"] for v in header.values()})
    summary = {k: v for k, v in config.items() if not k.startswith("_")}
    lines.append(f"  {name}: {len(header)} tensors, {count:,} parameters, dtypes {dtypes or ['(not safetensors)']}")
    lines.append(f"    config {json.dumps(summary, sort_keys=True)}")
  for name in COPIED:
    if (directory / name).is_dir():
      lines.append(f"  {name}: {', '.join(sorted(p.name for p in (directory / name).iterdir()))}")
  return "\n".join(lines)
