"""Whole-pipeline conversion: `python -m handi_jax.convert {import,export,inspect} ...`.

A PyTorch pipeline directory is what diffusers' `DiffusionPipeline.save_pretrained` writes:

    model_index.json
    unet/          config.json + diffusion_pytorch_model.safetensors (or .bin)   diffusers / original HANDI keys
    vae/           config.json + diffusion_pytorch_model.safetensors (or .bin)   diffusers AutoencoderKL
    text_encoder/  config.json + model.safetensors (or pytorch_model.bin)        transformers CLIPTextModel
    tokenizer/     CLIPTokenizer files                                            copied through
    scheduler/     scheduler_config.json                                          copied through

`import` turns it into a handi-jax checkpoint directory with the same layout, where each model folder holds

    params.safetensors   the flat NNX parameters: keys are NNX paths ("decoder.conv_in.kernel"), arrays in
                         Flax layouts (HWIO kernels), the dtype they were stored in
    model_config.json    the model's config.model.<component> fields

plus `handi_jax_pipeline.json` (format name and version, components) and the copied tokenizer/, scheduler/
and model_index.json. Loading it needs neither torch nor the PyTorch naming rules. `export` goes back to a
pipeline directory that diffusers/transformers `from_pretrained` load. Every output is written into a
temporary folder and renamed into place when complete.
"""

import argparse
import json
import logging
import os
import pathlib
import shutil
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

from handi_jax.convert import core

FORMAT = "handi-jax-nnx"
FORMAT_VERSION = 1
MANIFEST = "handi_jax_pipeline.json"
PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "model_config.json"
MODELS = ("vae", "text_encoder", "unet")  # small ones first: a bad directory fails fast
COPIED = ("tokenizer", "scheduler")
EXPECTED_LAYOUT = ("unet/, vae/, text_encoder/ (model folders with config.json and weights), tokenizer/ and "
                   "scheduler/, as diffusers' DiffusionPipeline.save_pretrained writes them")
# model_index.json for a pipeline exported without one to copy (random init): ModelScope's text-to-video layout.
MODEL_INDEX = {"_class_name": "TextToVideoSDPipeline", "_diffusers_version": "0.42.1",
               "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "UNet3DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}

log = logging.getLogger(__name__)


def _model_class(name: str):
  """The NNX class of a pipeline component (imported on use: the UNet module is large)."""
  if name == "unet":
    from handi_jax.models.unet3d import UNet3DConditionModel

    return UNet3DConditionModel
  if name == "vae":
    from handi_jax.models.vae import AutoencoderKL

    return AutoencoderKL
  from handi_jax.models.clip_text import CLIPTextModel

  return CLIPTextModel


def _config_dict(model) -> dict:
  config = model.config
  return config.as_configdict().to_dict() if hasattr(config, "as_configdict") else dict(config)


def unet_key_format(config: dict, requested: str = "auto") -> str:
  """auto: the original release's keys for a HANDI UNet (mask conv_in2 + motion), else stock diffusers keys."""
  if requested != "auto":
    return requested
  return "original" if config.get("mask_channels") and config.get("motion_strength") else "diffusers"


# ---------------------------------------------------------------------------------------------------
# One component.

def save_jax_component(model: nnx.Module, directory: pathlib.Path) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  core.write_safetensors(directory / PARAMS_FILE, core.flat_params(model))
  (directory / CONFIG_FILE).write_text(json.dumps(_config_dict(model), indent=2, sort_keys=True) + "\n")


def load_jax_component(name: str, directory: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None) -> nnx.Module:
  """A model saved by `save_jax_component`; param_dtype None keeps the stored dtype."""
  directory = pathlib.Path(directory)
  for file in (CONFIG_FILE, PARAMS_FILE):
    if not (directory / file).is_file():
      raise FileNotFoundError(f"{directory / file} not found: a handi-jax checkpoint's {name}/ folder holds "
                              f"{CONFIG_FILE} and {PARAMS_FILE} (written by `python -m handi_jax.convert import`)")
  config = json.loads((directory / CONFIG_FILE).read_text())
  params = core.read_safetensors(directory / PARAMS_FILE)
  if param_dtype is None:
    param_dtype = next(iter(params.values())).dtype if params else jnp.float32
  cls = _model_class(name)
  return core.build_with_params(lambda: cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
                                params, f"{name} from {directory}")


def load_torch_component(name: str, directory: pathlib.Path, *, init_missing_handi_params=False,
                         stock_unet=False, dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Module:
  if name == "unet":
    return _model_class("unet").from_pretrained(directory, init_missing_handi_params=init_missing_handi_params,
                                                handi_extension=not stock_unet, dtype=dtype, param_dtype=param_dtype)
  return _model_class(name).from_pretrained(directory, dtype=dtype, param_dtype=param_dtype)


def save_torch_component(name: str, model: nnx.Module, directory: pathlib.Path, unet_format: str = "auto") -> None:
  if name == "unet":
    model.save_pretrained(directory, key_format=unet_key_format(_config_dict(model), unet_format))
  else:
    model.save_pretrained(directory)


# ---------------------------------------------------------------------------------------------------
# Whole pipelines.

def _check_pipeline_dir(directory: pathlib.Path, kind: str, required: tuple[str, ...]) -> None:
  if not directory.is_dir():
    raise FileNotFoundError(f"{kind} directory {directory} does not exist; expected {EXPECTED_LAYOUT}")
  missing = [name for name in required if not (directory / name).is_dir()]
  if missing:
    found = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(f"{kind} directory {directory} lacks {', '.join(m + '/' for m in missing)}; expected "
                            f"{EXPECTED_LAYOUT}. Found: {', '.join(found) or 'nothing'}")


def _copy_through(source: pathlib.Path, destination: pathlib.Path) -> list[str]:
  copied = []
  for name in COPIED:
    if (source / name).is_dir():
      shutil.copytree(source / name, destination / name)
      copied.append(name)
  if (source / "model_index.json").is_file():
    shutil.copy2(source / "model_index.json", destination / "model_index.json")
  return copied


def import_pipeline(source: str | os.PathLike, destination: str | os.PathLike, *,
                    init_missing_handi_params: bool = False, stock_unet: bool = False) -> pathlib.Path:
  """PyTorch pipeline directory -> handi-jax checkpoint directory (see the module docstring)."""
  source, destination = pathlib.Path(source), pathlib.Path(destination)
  _check_pipeline_dir(source, "pipeline", MODELS + COPIED)
  with core.atomic_directory(destination) as tmp:
    components = {}
    for name in MODELS:
      log.info("import %s from %s", name, source / name)
      model = load_torch_component(name, source / name, init_missing_handi_params=init_missing_handi_params,
                                   stock_unet=stock_unet)
      save_jax_component(model, tmp / name)
      components[name] = type(model).__name__
      del model
    copied = _copy_through(source, tmp)
    (tmp / MANIFEST).write_text(json.dumps(dict(format=FORMAT, version=FORMAT_VERSION, components=components,
                                                copied=copied, source=str(source.resolve())), indent=2) + "\n")
  return destination


def _read_manifest(directory: pathlib.Path) -> dict:
  file = directory / MANIFEST
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: {directory} is not a handi-jax checkpoint directory (make one with "
                            "`python -m handi_jax.convert import PIPELINE_DIR CHECKPOINT_DIR`)")
  manifest = json.loads(file.read_text())
  if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
    raise ValueError(f"{file}: format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
                     f"handi-jax reads {FORMAT!r} version {FORMAT_VERSION}")
  return manifest


def write_pipeline(models: dict, destination: str | os.PathLike, *, copy_from: pathlib.Path | None = None,
                   unet_format: str = "auto", extra_files=None) -> pathlib.Path:
  """NNX models {unet, vae, text_encoder} -> a PyTorch pipeline directory, written atomically.

  tokenizer/, scheduler/ and model_index.json come from `copy_from`; `extra_files(tmp)` may write what it lacks.
  """
  destination = pathlib.Path(destination)
  with core.atomic_directory(destination) as tmp:
    for name in MODELS:
      save_torch_component(name, models[name], tmp / name, unet_format)
    if copy_from is not None:
      _copy_through(copy_from, tmp)
    if extra_files is not None:
      extra_files(tmp)
    if not (tmp / "model_index.json").is_file():
      (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
  return destination


def export_pipeline(source: str | os.PathLike, destination: str | os.PathLike, *,
                    unet_format: str = "auto") -> pathlib.Path:
  """handi-jax checkpoint directory -> PyTorch pipeline directory."""
  source = pathlib.Path(source)
  _check_pipeline_dir(source, "handi-jax checkpoint", ())
  _read_manifest(source)
  _check_pipeline_dir(source, "handi-jax checkpoint", MODELS)
  models = {name: load_jax_component(name, source / name) for name in MODELS}
  return write_pipeline(models, destination, copy_from=source, unet_format=unet_format)


def describe_directory(directory: str | os.PathLike) -> str:
  """What a pipeline or handi-jax checkpoint directory holds: per model its config and parameter count."""
  directory = pathlib.Path(directory)
  jax_side = (directory / MANIFEST).is_file()
  _check_pipeline_dir(directory, "handi-jax checkpoint" if jax_side else "pipeline", MODELS)
  lines = [f"{directory}: {'handi-jax checkpoint' if jax_side else 'PyTorch pipeline'}"]
  for name in MODELS:
    if jax_side:
      config = json.loads((directory / name / CONFIG_FILE).read_text())
      header = json.loads(_safetensors_header(directory / name / PARAMS_FILE))
    else:
      config = core.read_config(directory / name)
      weights = next((directory / name / w for w in core.WEIGHT_FILES if (directory / name / w).is_file()), None)
      header = json.loads(_safetensors_header(weights)) if weights and weights.suffix == ".safetensors" else {}
    header.pop("__metadata__", None)
    count = sum(int(np.prod(v["shape"])) for v in header.values())
    dtypes = sorted({v["dtype"] for v in header.values()})
    summary = {k: v for k, v in config.items() if not k.startswith("_")}
    lines.append(f"  {name}: {len(header)} tensors, {count:,} parameters, dtypes {dtypes or ['(not safetensors)']}")
    lines.append(f"    config {json.dumps(summary, sort_keys=True)}")
  for name in COPIED:
    if (directory / name).is_dir():
      lines.append(f"  {name}: {', '.join(sorted(p.name for p in (directory / name).iterdir()))}")
  return "\n".join(lines)


def _safetensors_header(path: pathlib.Path) -> bytes:
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    return f.read(size)


# ---------------------------------------------------------------------------------------------------
# --mode=export of handi_jax.main.

def _scheduler_config(config) -> dict:
  """The inference scheduler (DPM-Solver++ 2M) of config.diffusion / config.sampling as diffusers JSON."""
  diffusion, sampling = config.diffusion, config.sampling
  return {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.42.1",
          "num_train_timesteps": diffusion.num_train_timesteps, "beta_schedule": diffusion.beta_schedule,
          "beta_start": diffusion.beta_start, "beta_end": diffusion.beta_end,
          "prediction_type": diffusion.prediction_type, "rescale_betas_zero_snr": diffusion.rescale_zero_terminal_snr,
          "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
          "lower_order_final": sampling.lower_order_final, "timestep_spacing": sampling.timestep_spacing,
          "steps_offset": sampling.steps_offset}


def export_from_config(config, workdir: str | os.PathLike) -> pathlib.Path:
  """Export the models of a run to `workdir/export/` as a diffusers pipeline directory.

  UNet: the latest training checkpoint in `workdir`, else config.model.pretrained's unet/, else the random init
  training starts from. VAE and text encoder (frozen in training): config.model.pretrained's, else the random
  ones training used. Tokenizer and scheduler: copied from config.model.pretrained, else the demo tokenizer and
  the config's DPM-Solver++ settings.
  """
  from handi_jax import train

  workdir = pathlib.Path(workdir)
  pretrained = pathlib.Path(config.model.pretrained) if config.model.pretrained else None
  if pretrained is not None:
    _check_pipeline_dir(pretrained, "config.model.pretrained pipeline", MODELS + COPIED)
  if (workdir / "checkpoints").is_dir():
    log.info("UNet: latest training checkpoint in %s", workdir)
    unet = train.restore_unet(config, workdir)
  elif pretrained is not None:
    log.warning("no training checkpoint in %s: exporting the pretrained UNet of %s", workdir, pretrained)
    unet = _model_class("unet").from_pretrained(pretrained / "unet", dtype=jnp.dtype(config.model.dtype),
                                                param_dtype=jnp.dtype(config.model.param_dtype))
  else:
    log.warning("no training checkpoint in %s and no config.model.pretrained: exporting the random init", workdir)
    unet = train.build_unet(config, train.initial_unet_rngs(config))
  frozen_config = config.copy_and_resolve_references()
  frozen_config.loss.eta_hand = 0.0  # no landmark network needed here
  frozen, _ = train.load_frozen_models(frozen_config)
  models = dict(unet=unet, vae=nnx.merge(frozen.vae_graphdef, frozen.vae),
                text_encoder=nnx.merge(frozen.text_graphdef, frozen.text_encoder))

  def demo_files(tmp: pathlib.Path):
    if not (tmp / "tokenizer").is_dir():
      from handi_jax.models import tokenizers

      tokenizers.write_demo_tokenizer_files(tmp / "tokenizer")
    if not (tmp / "scheduler").is_dir():
      (tmp / "scheduler").mkdir()
      (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(_scheduler_config(config), indent=2))

  destination = write_pipeline(models, workdir / "export", copy_from=pretrained, extra_files=demo_files)
  log.info("exported to %s", destination)
  print(describe_directory(destination))
  return destination


# ---------------------------------------------------------------------------------------------------
# Command line.

def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m handi_jax.convert", description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help="PyTorch pipeline directory -> handi-jax checkpoint directory")
  imp.add_argument("source", help="diffusers pipeline directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
  imp.add_argument("destination", help="handi-jax checkpoint directory to write")
  imp.add_argument("--init_missing_handi_params", action="store_true",
                   help="a stock diffusers UNet (e.g. ModelScope): start the HANDI mask/motion parameters as the "
                        "stock model (conv_in2 from conv_in, zeros elsewhere)")
  imp.add_argument("--stock_unet", action="store_true", help="build the stock diffusers UNet (no HANDI extension)")
  exp = commands.add_parser("export", help="handi-jax checkpoint directory -> PyTorch pipeline directory")
  exp.add_argument("source", help="handi-jax checkpoint directory (from `import`)")
  exp.add_argument("destination", help="diffusers pipeline directory to write")
  exp.add_argument("--unet_format", choices=("auto", "original", "diffusers"), default="auto",
                   help="UNet keys: original (the HANDI release, keeps conv_in2/motion), diffusers (stock), "
                        "auto (original for a HANDI UNet, else diffusers)")
  ins = commands.add_parser("inspect", help="summarise a pipeline or handi-jax checkpoint directory")
  ins.add_argument("directory")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    if args.command == "import":
      import_pipeline(args.source, args.destination, init_missing_handi_params=args.init_missing_handi_params,
                      stock_unet=args.stock_unet)
      print(describe_directory(args.destination))
    elif args.command == "export":
      export_pipeline(args.source, args.destination, unet_format=args.unet_format)
      print(describe_directory(args.destination))
    else:
      print(describe_directory(args.directory))
  except (FileNotFoundError, ValueError) as e:  # CheckpointMismatchError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
