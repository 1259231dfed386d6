"""The train state, its optimizer, its layout on a mesh and its checkpoints.

The UNet is trained (all of it, or the release's subset: config.train.trainable); the optimizer is AdamW
with warm-up and global-norm clipping from config.train. Checkpoints are orbax directories
`<workdir>/checkpoints/<step>/` holding the state and, in the JSON item "data", the input position and the clip
size trained at (TrainingSize); a checkpoint written on one mesh restores onto another.
"""

import dataclasses
import functools
import os

import flax
import jax
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from handi_jax import fileio, sharding
from handi_jax.components import common

# The release trains modules whose names contain one of these (H:train.py:232-252): 643.8M of 1.41B.
RELEASE_TRAINABLE = ("attn1", ".attentions", "attn2", "conv_in", "temp_conv", "motion")


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds. The UNet's non-parameter state (dropout RNG) is reseeded every step instead."""

  step: jax.Array
  params: nnx.State         # trainable UNet parameters
  frozen_params: nnx.State  # UNet parameters outside config.train.trainable
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class TrainingSize:
  """The clip size a UNet was trained at (config.data): recorded with every checkpoint and export, so that
  generation defaults to it."""

  height: int
  width: int
  num_frames: int

  @classmethod
  def of_config(cls, config) -> "TrainingSize":
    return cls(int(config.data.height), int(config.data.width), int(config.data.num_frames))

  @property
  def area(self) -> int:
    return self.height * self.width

  def __str__(self) -> str:
    return f"{self.height} x {self.width} px, {self.num_frames} frames"


def trainable_filter(config):
  """nnx filter selecting the UNet parameters the optimizer updates."""
  if config.train.trainable == "all":
    return nnx.Param
  if config.train.trainable != "release":
    raise ValueError(f"config.train.trainable must be 'all' or 'release', got {config.train.trainable!r}")

  def release_subset(path, value):
    name = "." + ".".join(str(p) for p in path)
    return isinstance(value, nnx.Param) and any(part in name for part in RELEASE_TRAINABLE)

  return release_subset


def make_optimizer(config) -> optax.GradientTransformation:
  train = config.train
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, train.learning_rate, max(train.warmup_steps, 1)),
       optax.constant_schedule(train.learning_rate)], [max(train.warmup_steps, 1)])
  return optax.chain(
      optax.clip_by_global_norm(train.grad_clip_norm),
      optax.adamw(schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                  weight_decay=train.weight_decay))


def split_unet(unet, config):
  """(graphdef, trainable params, frozen params, other state such as the dropout RNG)."""
  return nnx.split(unet, trainable_filter(config), nnx.Param, ...)


def initial_state(config, params: nnx.State, frozen_params: nnx.State) -> TrainState:
  return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, frozen_params=frozen_params,
                    opt_state=make_optimizer(config).init(params))


def state_shardings(abstract_state: TrainState, mesh, rules, min_size: int = 0) -> TrainState:
  """Parameters by their logical axes (under min_size elements: replicated, config.sharding_min_size); AdamW
  moments mirror the parameters; scalars are replicated."""
  param_sh = sharding.param_shardings(abstract_state.params, mesh, rules, min_size)
  params_def = jax.tree.structure(abstract_state.params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def is_moment(node):
    return isinstance(node, nnx.State) and jax.tree.structure(node) == params_def

  opt_sh = jax.tree.map(lambda node: param_sh if is_moment(node) else replicated, abstract_state.opt_state,
                        is_leaf=is_moment)
  return TrainState(step=replicated, params=param_sh,
                    frozen_params=sharding.param_shardings(abstract_state.frozen_params, mesh, rules, min_size),
                    opt_state=opt_sh)


def abstract_train_state(config, mesh, unet) -> tuple[TrainState, TrainState]:
  """(the train state of `unet` as shapes with shardings, the shardings) on `mesh`; `unet` may be abstract."""
  _, params, frozen_params, _ = split_unet(unet, config)
  shapes = jax.eval_shape(functools.partial(initial_state, config), params, frozen_params)
  shardings = state_shardings(shapes, mesh, config.sharding_rules, config.sharding_min_size)
  return common.with_shardings(shapes, shardings), shardings


def create_train_state(config, mesh, unet) -> tuple[TrainState, nnx.GraphDef, nnx.State, TrainState]:
  """(sharded train state, the UNet's graphdef, its RNG state, the state's shardings) from a built UNet.

  The UNet is built (or loaded) on one device and then placed shard by shard: the full-size model (5.7 GB in
  fp32) fits one H100 or v5p chip, and eager init avoids compiling an init graph of ~1500 random arrays.
  The optimizer state is created under jit directly in its sharded layout.
  """
  graphdef, params, frozen_params, rng_state = split_unet(unet, config)
  _, state_sh = abstract_train_state(config, mesh, unet)
  params, frozen_params = jax.device_put((params, frozen_params), (state_sh.params, state_sh.frozen_params))
  state = jax.jit(functools.partial(initial_state, config), out_shardings=state_sh)(params, frozen_params)
  rng_state = jax.device_put(rng_state, NamedSharding(mesh, PartitionSpec()))  # placed: no implicit transfer
  return state, graphdef, rng_state, state_sh


# Orbax writes arrays through TensorStore, whose own drivers reach a local disk, gs:// and s3:// (not tf.io.gfile's
# other schemes).
CHECKPOINT_SCHEMES = ("gs", "s3")


def checkpoint_directory(workdir) -> fileio.Path:
  """<workdir>/checkpoints, absolute; a ValueError naming the fix for a filesystem orbax cannot store arrays on."""
  if fileio.is_local(workdir):
    return fileio.as_path(os.path.abspath(workdir)) / "checkpoints"
  if os.fspath(workdir).split("://", 1)[0] not in CHECKPOINT_SCHEMES:
    raise ValueError(f"training checkpoints cannot go under {workdir}: orbax stores them on a local disk, gs:// or "
                     "s3:// only; use such a workdir (the other outputs may be anywhere tf.io.gfile reads)")
  return fileio.as_path(workdir) / "checkpoints"


def checkpoint_manager(config, workdir) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True)
  return ocp.CheckpointManager(checkpoint_directory(workdir), options=options,
                               item_names=("state", "data"))


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: TrainState, data_state: dict,
                    training_size: TrainingSize | None = None) -> bool:
  """Save `state`, the input pipeline's state and the size trained at (None: no record, as checkpoints written
  before it was recorded) as checkpoint `step`, asynchronously (the caller decides when). True when a save
  started."""
  data = dict(data_state, training_size=dataclasses.asdict(training_size)) if training_size else data_state
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data)), force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, target: TrainState) -> tuple[TrainState, dict]:
  """(state, input pipeline state) of checkpoint `step`, laid out as `target` (arrays or abstract_train_state):
  each host reads the slices its devices need, so a checkpoint written on one mesh restores onto another."""
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                           data=ocp.args.JsonRestore()))
  return restored.state, restored.data


def recorded_training_size(manager: ocp.CheckpointManager, step: int) -> TrainingSize | None:
  """The size checkpoint `step` was trained at; None when it records none (written before the record existed)."""
  recorded = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data.get("training_size")
  return TrainingSize(**recorded) if recorded else None


def restore_weights(manager: ocp.CheckpointManager, step: int, target: tuple[nnx.State, nnx.State]):
  """(params, frozen_params) of checkpoint `step` laid out as `target` (abstract, with shardings), without the
  AdamW moments and the step."""
  target = dict(params=target[0], frozen_params=target[1])
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      target, ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
  return restored.state["params"], restored.state["frozen_params"]
