"""`--mode=export`: a run's models -> a diffusers pipeline directory `<workdir>/export/` that PyTorch loads.

UNet: the latest training checkpoint in the workdir, else config.model.pretrained's, else the random
initialisation training starts from (handi_jax.components decides, as for training and generation). VAE and
text encoder: config.model.pretrained's, else the random ones training used. Tokenizer and scheduler: copied
from config.model.pretrained, else the demo tokenizer and the config's DPM-Solver++ settings. The UNet is
written in the release's keys when it is a HANDI UNet (conv_in2 + motion), else in stock diffusers keys.

The size the UNet was trained at, where its source records one, goes with it: `unet/training_size.json`
(height, width, frames: generation from the export defaults to it), and as diffusers' `sample_size`, the latent
side of a square of the same area (diffusers' video pipelines default to `sample_size` x the VAE's factor).
"""

import json
import math
import os
import pathlib

from absl import logging

from handi_jax import fileio, tokenizers
from handi_jax.components import frozen
from handi_jax.components import unet as unet_lib
from handi_jax.convert import hub, pipeline
from handi_jax.media import files as media_files


def scheduler_config(config) -> dict:
  """The inference scheduler (DPM-Solver++ 2M) of config.diffusion / config.sampling as diffusers JSON."""
  diffusion, sampling = config.diffusion, config.sampling
  return {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.42.1",
          "num_train_timesteps": diffusion.num_train_timesteps, "beta_schedule": diffusion.beta_schedule,
          "beta_start": diffusion.beta_start, "beta_end": diffusion.beta_end,
          "prediction_type": diffusion.prediction_type, "rescale_betas_zero_snr": diffusion.rescale_zero_terminal_snr,
          "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
          "lower_order_final": sampling.lower_order_final, "timestep_spacing": sampling.timestep_spacing,
          "steps_offset": sampling.steps_offset}


def export_from_config(config, workdir: str | os.PathLike) -> fileio.Path:
  """Write `workdir/export/` (see the module docstring; local or remote, handi_jax.fileio) and print what it holds."""
  workdir = fileio.as_path(workdir)
  pretrained = fileio.as_path(hub.pretrained_pipeline(config)) if config.model.pretrained else None
  if pretrained is not None:
    pipeline.check_pipeline_dir(pretrained, "config.model.pretrained pipeline")
  source = workdir if (workdir / "checkpoints").is_dir() else pretrained
  training_size = unet_lib.training_size(config, source, "the UNet to export")
  if training_size is not None:
    config = config.copy_and_resolve_references()
    config.model.unet.sample_size = round(math.sqrt(training_size.area) / media_files.VAE_FACTOR)
  unet = unet_lib.load_unet(config, source, "the UNet to export")
  vae, text_encoder, _ = frozen.load_vae_and_text_encoder(config)

  def extra_files(tmp: pathlib.Path):
    if training_size is not None:
      unet_lib.write_training_size(tmp / "unet", training_size)
    if not (tmp / "tokenizer").is_dir():
      tokenizers.write_demo_tokenizer_files(tmp / "tokenizer")
    if not (tmp / "scheduler").is_dir():
      (tmp / "scheduler").mkdir()
      (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(config), indent=2))

  destination = pipeline.write_pipeline(dict(unet=unet, vae=vae, text_encoder=text_encoder), workdir / "export",
                                        copy_from=pretrained, extra_files=extra_files)
  logging.info("exported to %s:\n%s", destination, pipeline.describe_directory(destination))
  trained_at = f", its UNet trained at {training_size}" if training_size else ""
  print(f"exported to {destination} (a diffusers pipeline directory{trained_at}; `python -m handi_jax.convert "
        "inspect` describes it)")
  return destination
