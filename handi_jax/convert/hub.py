"""Pretrained weights by Hugging Face repo id: `org/name` or `org/name@revision` -> a local snapshot directory.

`config.model.pretrained`, `config.generate.stage1_pretrained` / `stage2_pretrained` and `python -m
handi_jax.convert import` take either a path or a repo id; `resolve` is the one rule for all of them:

- an existing path, or a path on another filesystem (`gs://...`), is used as it is;
- otherwise a repo id (namespace/name, with an optional @branch, tag or commit) is fetched with
  `huggingface_hub.snapshot_download` into the Hugging Face cache (HF_HOME / HF_HUB_CACHE; with HF_HUB_OFFLINE=1
  only the cache is read), downloading only the files the pipeline parts need: configs, tokenizer and scheduler
  files, and per model folder its safetensors weights, or its PyTorch .bin weights when it has no safetensors;
- anything else is one error naming the field.

A process resolves each id once (functools.cache): every model it loads comes from the same commit.
"""

import fnmatch
import functools
import os
import pathlib

from absl import logging

from handi_jax.convert import core

# What a pipeline repo's users read: the models with weights, the folders copied whole, the index.
PIPELINE_MODELS = ("unet", "vae", "text_encoder")
PIPELINE_FILES = ("tokenizer", "scheduler")
# A UNet source: a pipeline repo's unet/, or a repo that is a diffusers UNet itself ("" = the repo's root).
UNET_MODELS = ("unet", "")
MODEL_CONFIG_FILES = ("config.json", "training_size.json")  # training_size.json: see components.unet


def _in(folder: str, name: str) -> str:
  return f"{folder}/{name}" if folder else name


def weight_patterns(folder: str, extension: str) -> list[str]:
  """Patterns of a model folder's weights in one format (the names core.read_state_dict reads): the single file,
  or its shards and their index. Variants such as `*.fp16.safetensors` are not read, so not fetched."""
  stems = [name.removesuffix("." + extension) for name in core.WEIGHT_FILES if name.endswith("." + extension)]
  return [_in(folder, pattern) for stem in stems
          for pattern in (f"{stem}.{extension}", f"{stem}-*-of-*.{extension}", f"{stem}.{extension}.index.json")]


def allow_patterns(models: tuple[str, ...], files: tuple[str, ...], extension: str = "safetensors") -> list[str]:
  """snapshot_download's allow_patterns: the models' configs and weights in `extension`, the `files` folders
  whole, and model_index.json."""
  patterns = ["model_index.json"] + [f"{folder}/*" for folder in files]
  for folder in models:
    patterns += [_in(folder, name) for name in MODEL_CONFIG_FILES] + weight_patterns(folder, extension)
  return patterns


def parse_repo_id(source: str) -> tuple[str, str | None] | None:
  """(repo id, revision or None) if `source` reads as `namespace/name[@revision]`, else None."""
  from huggingface_hub.utils import HFValidationError, validate_repo_id

  repo_id, _, revision = source.partition("@")
  if repo_id.count("/") != 1 or (not revision and "@" in source):
    return None
  try:
    validate_repo_id(repo_id)
  except HFValidationError:
    return None
  return repo_id, revision or None


def resolve(source: str | os.PathLike, what: str, models: tuple[str, ...] = PIPELINE_MODELS,
            files: tuple[str, ...] = PIPELINE_FILES) -> str:
  """The local directory `source` names ("" stays ""): see the module docstring. `what` names the field in errors;
  `models` and `files` are the parts fetched for a repo id (default: a whole pipeline)."""
  source = os.fspath(source)
  if not source or "://" in source or os.path.exists(source):
    return source
  parsed = parse_repo_id(source)
  if parsed is None:
    raise FileNotFoundError(f"{what}={source!r} is neither an existing path nor a Hugging Face repo id: give a "
                            "directory, or a repo id as namespace/name or namespace/name@revision")
  from huggingface_hub import constants, errors

  try:
    folder = _snapshot(*parsed, models, files, constants.HF_HUB_CACHE)
  except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
    offline = " (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise FileNotFoundError(f"{what}={source!r} is not a local path, and the Hugging Face repo could not be "
                            f"fetched into the cache {constants.HF_HUB_CACHE}{offline}: {reason}") from e
  logging.info("%s=%s: Hugging Face snapshot %s", what, source, folder)
  return folder


@functools.cache
def _snapshot(repo_id: str, revision: str | None, models: tuple[str, ...], files: tuple[str, ...],
              cache_dir: str) -> str:
  """Two passes: configs and safetensors; then the .bin weights of the model folders without safetensors, from
  the same commit (the snapshot folder's name)."""
  import huggingface_hub

  def download(revision, patterns):
    return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                             cache_dir=cache_dir)

  folder = pathlib.Path(download(revision, allow_patterns(models, files)))
  present = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
  without_safetensors = [
      model for model in models if _in(model, "config.json") in present
      and not any(fnmatch.filter(present, pattern) for pattern in weight_patterns(model, "safetensors"))]
  if without_safetensors:
    download(folder.name, [p for model in without_safetensors for p in weight_patterns(model, "bin")])
  return str(folder)


def pretrained_pipeline(config) -> str:
  """The local directory of config.model.pretrained ("" when empty)."""
  return resolve(config.model.pretrained, "config.model.pretrained")


def stage_unet(config, stage: int) -> str:
  """The local path of config.generate.stage<stage>_pretrained ("" when empty): a training workdir, a UNet or
  pipeline directory, or a repo id (only its UNet is fetched)."""
  field = f"stage{stage}_pretrained"
  return resolve(config.generate[field], f"config.generate.{field}", UNET_MODELS, files=())
