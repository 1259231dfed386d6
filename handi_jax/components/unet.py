"""The UNet: randomly initialised from config.model.unet, loaded from a diffusers directory, or restored from the
latest checkpoint of a training workdir; always checked against the config. A trained UNet also records the size
it was trained at (train_state.TrainingSize): a checkpoint in its "data" item, a diffusers UNet directory written by
--mode=export in TRAINING_SIZE_FILE beside its config.json."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from handi_jax import fileio
from handi_jax.components import common, train_state
from handi_jax.convert import core
from handi_jax.convert import unet as convert_unet
from handi_jax.models import unet3d

TRAINING_SIZE_FILE = "training_size.json"


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


def _locate(source: str | os.PathLike, what: str) -> tuple[bool, fileio.Path]:
  """(is a training workdir, its path) or (False, the diffusers UNet directory) of a non-empty `source`."""
  path = fileio.as_path(source)
  if (path / "checkpoints").is_dir():
    return True, path
  if (path / "unet").is_dir():
    path = path / "unet"
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{what}: {path} is neither a training workdir (with checkpoints/), a pipeline "
                            "directory (with unet/) nor a diffusers UNet directory (with config.json)")
  return False, path


def load_unet(config, source: str | os.PathLike | None, what: str = "the UNet") -> unet3d.UNet3DConditionModel:
  """The UNet in `source`: a training workdir (its latest checkpoint), a pipeline directory (its unet/) or a
  diffusers UNet directory; empty `source` means a random initialisation. Checked against config.model.unet."""
  if not source:
    logging.warning("%s: no pretrained weights given, randomly initialised from config.model.unet", what)
    return build_unet(config)
  is_workdir, path = _locate(source, what)
  if is_workdir:
    logging.info("%s: latest training checkpoint in %s", what, path)
    return restore_unet(config, path)
  logging.info("%s: %s", what, path)
  try:
    return convert_unet.load_pretrained(path, expected_config=config.model.unet, attention=config.model.attention,
                                        remat=config.model.remat, rngs=unet_rngs(config),
                                        **common.model_dtypes(config))
  except core.CheckpointMismatchError as e:
    raise core.CheckpointMismatchError(f"{what} at {path}: {e}") from e


def _fresh_dropout_streams(abstract_rng_state, config, device) -> nnx.State:
  """Concrete dropout streams for a UNet restored from a checkpoint, which holds weights only: counts 0, every
  stream keyed as unet_rngs(config)'s dropout stream (training reseeds it each step; eval mode never draws)."""
  key = jax.random.fold_in(common.component_key(config, "unet"), 1)
  fresh = lambda x: key if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.zeros(x.shape, x.dtype)
  return jax.device_put(jax.tree.map(fresh, abstract_rng_state), device)


def restore_unet(config, workdir, step: int | None = None) -> unet3d.UNet3DConditionModel:
  """The UNet of the latest (or given) training checkpoint in `workdir`, in eval mode, on this process's first
  device: its weights only (the AdamW moments, two thirds of the arrays, stay on disk)."""
  manager = train_state.checkpoint_manager(config, workdir)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no training checkpoint under {manager.directory}; "
                            "train first (--mode=train) or point config.model.pretrained at weights")
  graphdef, params, frozen_params, rng_state = train_state.split_unet(abstract_unet(config), config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params, frozen_params = train_state.restore_weights(manager, step, common.with_shardings((params, frozen_params),
                                                                                           device))
  unet = nnx.merge(graphdef, params, frozen_params, _fresh_dropout_streams(rng_state, config, device))
  unet.eval()
  return unet


def training_size(config, source: str | os.PathLike | None,
                  what: str = "the UNet") -> train_state.TrainingSize | None:
  """The size the UNet `load_unet(config, source)` loads was trained at, where it records one (see the module
  docstring); None for a random UNet and for checkpoints and directories that record none."""
  if not source:
    return None
  is_workdir, path = _locate(source, what)
  if is_workdir:
    manager = train_state.checkpoint_manager(config, path)
    step = manager.latest_step()
    return None if step is None else train_state.recorded_training_size(manager, step)
  record = path / TRAINING_SIZE_FILE
  return train_state.TrainingSize(**json.loads(record.read_text())) if record.is_file() else None


def write_training_size(unet_dir: fileio.Path, size: train_state.TrainingSize) -> None:
  """Record `size` beside the config.json of a diffusers UNet directory (diffusers ignores the file)."""
  fileio.write_json(unet_dir / TRAINING_SIZE_FILE, dataclasses.asdict(size))
