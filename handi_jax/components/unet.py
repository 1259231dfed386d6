"""The UNet: randomly initialised from config.model.unet, loaded from a diffusers directory, or restored from the
latest checkpoint of a training workdir; always checked against the config."""

import os
import pathlib

import jax
from absl import logging
from flax import nnx

from handi_jax.components import common, train_state
from handi_jax.convert import core
from handi_jax.convert import unet as convert_unet
from handi_jax.models import unet3d


def unet_rngs(config) -> nnx.Rngs:
  """Parameter and dropout streams of the UNet (the dropout stream is reseeded each training step)."""
  key = common.component_key(config, "unet")
  return nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1))


def build_unet(config, rngs: nnx.Rngs | None = None) -> unet3d.UNet3DConditionModel:
  """A UNet of config.model.unet, randomly initialised (from `unet_rngs(config)` unless `rngs` is given)."""
  return unet3d.UNet3DConditionModel(config.model.unet, attention=config.model.attention, remat=config.model.remat,
                                     rngs=rngs or unet_rngs(config), **common.model_dtypes(config))


def abstract_unet(config) -> unet3d.UNet3DConditionModel:
  """build_unet(config) as shapes and dtypes, without initialising any weight."""
  return nnx.eval_shape(lambda: build_unet(config))


def load_unet(config, source: str | os.PathLike | None, what: str = "the UNet") -> unet3d.UNet3DConditionModel:
  """The UNet in `source`: a training workdir (its latest checkpoint), a pipeline directory (its unet/) or a
  diffusers UNet directory; empty `source` means a random initialisation. Checked against config.model.unet."""
  if not source:
    logging.warning("%s: no pretrained weights given, randomly initialised from config.model.unet", what)
    return build_unet(config)
  path = pathlib.Path(source)
  if (path / "checkpoints").is_dir():
    logging.info("%s: latest training checkpoint in %s", what, path)
    return restore_unet(config, path)
  if (path / "unet").is_dir():
    path = path / "unet"
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{what}: {path} is neither a training workdir (with checkpoints/), a pipeline "
                            "directory (with unet/) nor a diffusers UNet directory (with config.json)")
  logging.info("%s: %s", what, path)
  try:
    return convert_unet.load_pretrained(path, expected_config=config.model.unet, attention=config.model.attention,
                                        remat=config.model.remat, rngs=unet_rngs(config),
                                        **common.model_dtypes(config))
  except core.CheckpointMismatchError as e:
    raise core.CheckpointMismatchError(f"{what} at {path}: {e}") from e


def restore_unet(config, workdir, step: int | None = None) -> unet3d.UNet3DConditionModel:
  """The UNet of the latest (or given) training checkpoint in `workdir`, in eval mode, on this process's first
  device: its weights only (the AdamW moments, two thirds of the arrays, stay on disk)."""
  manager = train_state.checkpoint_manager(config, workdir)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no training checkpoint under {pathlib.Path(workdir) / 'checkpoints'}; "
                            "train first (--mode=train) or point config.model.pretrained at weights")
  graphdef, params, frozen_params, rng_state = train_state.split_unet(abstract_unet(config), config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params, frozen_params = train_state.restore_weights(manager, step, common.with_shardings((params, frozen_params),
                                                                                           device))
  unet = nnx.merge(graphdef, params, frozen_params, rng_state)
  unet.eval()
  return unet
