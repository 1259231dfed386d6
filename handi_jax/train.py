"""Training for either stage: the loop around the jitted step (handi_jax.train_step), with checkpoints, metrics,
profiling, preemption and the evaluators it is given.

Models and the train state come from handi_jax.components, data from config.data.dir
(handi_jax.data.input_pipeline). Evaluation during training (config.train.eval_every) runs through the evaluators
handed to train_and_evaluate (handi_jax.evaluation.during_training builds them from the config); training never
imports an evaluation job.
"""

import concurrent.futures
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from clu import metric_writers, periodic_actions
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from handi_jax import chips, fileio, sharding, train_step, xla_stats
from handi_jax.components import common, train_state
from handi_jax.components import frozen as frozen_lib
from handi_jax.components import unet as unet_lib
from handi_jax.convert import hub
from handi_jax.data import input_pipeline

# evaluator(step, unet, frozen models, tokenizer) -> (scalars, images): called at every config.train.eval_every
# step with the UNet being trained (eval mode, its arrays the train state's: no copy) and the frozen models.
Evaluator = Callable[[int, nnx.Module, frozen_lib.FrozenModels, object], tuple[dict, dict]]


def train_and_evaluate(config, workdir: str, evaluators: Sequence[Evaluator] = (),
                       compiled_step: jax.stages.Compiled | concurrent.futures.Future | None = None
                       ) -> train_state.TrainState:
  """Train config.train.num_steps steps, resuming from the latest checkpoint in workdir; every
  config.train.eval_every steps, run `evaluators` and write what they return (scalars, images) to the metrics.
  compiled_step: compile_train_step(config)'s result, used instead of tracing and compiling the step here; or a
  Future of it, compiling in another thread while this run initialises its models and data."""
  workdir = fileio.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config)
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.devices.size)
  step_rng = jax.device_put(jax.random.fold_in(jax.random.key(config.seed), 1 << 20),
                            NamedSharding(mesh, PartitionSpec()))

  with jax.set_mesh(mesh):  # tpu_flash's shard_map takes the mesh from here (`with mesh:` does not set it)
    manager = train_state.checkpoint_manager(config, workdir)
    latest = manager.latest_step()
    if latest is not None and latest >= config.train.num_steps:
      logging.warning("checkpoint %d in %s: already trained for config.train.num_steps=%d; nothing to train (raise "
                      "it to train on)", latest, manager.directory, config.train.num_steps)
      target, _ = train_state.abstract_train_state(config, mesh, unet_lib.abstract_unet(config))
      return train_state.restore_checkpoint(manager, latest, target)[0]
    quiet = jax.process_index() > 0
    if latest is None:
      unet = unet_lib.load_unet(config, hub.pretrained_pipeline(config), "the UNet to train")
    else:  # only the structure counts: the checkpoint's weights replace these
      unet = unet_lib.build_unet(config)
    state, unet_graphdef, rng_state, state_sh = train_state.create_train_state(config, mesh, unet)
    del unet
    frozen, frozen_sh, tokenizer = frozen_lib.place_frozen_models(config, mesh)
    position = 0
    if latest is not None:
      # Restored onto this run's mesh, whatever mesh wrote it; the initial arrays go first to free their memory.
      target = common.with_shardings(state, state_sh)
      del state
      state, data_state = train_state.restore_checkpoint(manager, latest, target)
      position = data_state["position"]
      logging.info("resumed from step %d (input position %d)", int(state.step), position)
      if not quiet:
        print(f"stage {config.stage}: resumed from step {latest} ({manager.directory / str(latest)})")
    data = input_pipeline.InputPipeline(config, mesh, tokenizer=tokenizer, position=position)

    step_fn = train_step.jit_train_step(config, mesh, unet_graphdef, state_sh, frozen_sh)
    writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items() if np.isscalar(v)})
    training_size = train_state.TrainingSize.of_config(config)
    first, num_steps = int(state.step), config.train.num_steps
    stopped = False
    with jax.transfer_guard(config.train.transfer_guard), preemption_notice(manager) as preempted, \
         ProfileWindow(config.train, workdir) as profile, \
         concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flop-count") as flop_counter:
      for index in range(first, num_steps):
        batch = {k: v for k, v in next(data).items() if isinstance(v, jax.Array)}  # drop host-side text
        args = (rng_state, frozen, batch, step_rng)
        if index == first:  # compile ahead of time: its own phase on the console, its time in the log
          if not isinstance(compiled_step, jax.stages.Compiled):
            with tqdm.tqdm(total=1, desc=f"compile stage-{config.stage} train step", disable=quiet) as compiling:
              started = time.perf_counter()
              if compiled_step is None:
                step_fn = step_fn.lower(state, *args).compile(compiler_options(config, mesh.devices.flat[0]))
              else:
                step_fn = compiled_step.result()
              compiling.update()
            logging.info("train step compiled in %.1f s" if compiled_step is None else
                         "train step: waited %.1f s for the thread compiling it", time.perf_counter() - started)
          else:
            step_fn = compiled_step
          # Counted beside the first steps: reading the program's HLO text takes seconds of Python.
          report = ProgressReport(config.train, writer, examples_per_step=batch["frames"].shape[0],
                                  flops_per_device=flop_counter.submit(step_flops, step_fn),
                                  peak_flops=peak_flops(mesh.devices.flat[0]))
          bar = tqdm.tqdm(total=num_steps, initial=first, desc=f"train stage {config.stage}", unit="step",
                          disable=quiet)
        state, metrics = step_fn(state, *args)
        step = index + 1  # not int(state.step): a device-to-host copy that transfer_guard='disallow' refuses
        bar.update()
        report(step)
        profile(step)
        if step % config.train.log_every == 0 or step == num_steps:
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if not all(np.isfinite(v) for v in scalars.values()):
            raise FloatingPointError(f"non-finite training metrics at step {step}: {scalars}")
          writer.write_scalars(step, scalars)
          loss = scalars["loss"]
          bar.set_postfix(loss=f"{loss:.4f}")
        evaluating = bool(evaluators) and bool(config.train.eval_every) and step % config.train.eval_every == 0
        stopped = step < num_steps and preempted(step)
        # Our interval, not orbax's: orbax also saves the first step of every run (a full save on a pod).
        if step % config.train.checkpoint_every == 0 or step == num_steps or evaluating or stopped:
          train_state.save_checkpoint(manager, step, state, data.state(), training_size)
        if evaluating:
          manager.wait_until_finished()  # the step is on disk before evaluation, which may take long
          unet = nnx.merge(unet_graphdef, state.params, state.frozen_params, rng_state)
          unet.eval()
          with jax.transfer_guard("allow"):  # generation and the metrics move data on purpose
            for evaluator in evaluators:
              scalars, images = evaluator(step, unet, frozen, tokenizer)
              writer.write_scalars(step, scalars)
              writer.write_images(step, images)
        if stopped:
          break
      if first < num_steps:
        bar.close()
    manager.wait_until_finished()
    writer.flush()
    if stopped:
      logging.warning("SIGTERM: stopped after step %d of %d and saved it to %s; run the same command to resume",
                      step, num_steps, manager.directory / str(step))
    elif not quiet:
      print(f"stage {config.stage}: trained to step {step}, loss {loss:.4f}; checkpoint "
            f"{manager.directory / str(step)}")
  return state


def lower_train_step(config) -> jax.stages.Lowered:
  """The train step of `config` traced as train_and_evaluate traces it (the same program and layout), from abstract
  inputs: no weights are initialised."""
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    unet_graphdef, state_sh, frozen_sh, args = train_step.abstract_train_inputs(config, mesh)
    return train_step.jit_train_step(config, mesh, unet_graphdef, state_sh, frozen_sh).lower(*args)


def compile_train_step(config, lowered: jax.stages.Lowered | None = None) -> jax.stages.Compiled:
  """`lowered` (lower_train_step(config) if None) compiled with training's options:
  train_and_evaluate(compiled_step=...) then neither traces nor compiles. XLA releases the GIL while it compiles, so
  threads can compile steps while the main thread initialises or trains (--mode=demo does)."""
  lowered = lowered or lower_train_step(config)
  return lowered.compile(compiler_options(config, sharding.make_mesh(config).devices.flat[0]))


@contextlib.contextmanager
def preemption_notice(manager: ocp.CheckpointManager):
  """Yields preempted(step) -> bool: True at the step boundary where training saves and stops after a SIGTERM
  (a TPU maintenance event, a SLURM preemption).

  Hosts must stop at the same step, or the collectives of the next step hang on the others. With several
  processes, jax.distributed.initialize has started JAX's preemption sync manager: it catches SIGTERM on any host
  and agrees on a step with all of them, which orbax's reached_preemption(step) asks, on every host, every step.
  A single process has no one to agree with, so a Python handler that sets a flag is enough; it is installed only
  then, so that it never displaces the sync manager's own handler.
  """
  if jax.process_count() > 1:
    yield manager.reached_preemption
    return
  received = threading.Event()
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
  try:
    yield lambda step: received.is_set()
  finally:
    signal.signal(signal.SIGTERM, previous)


def step_flops(compiled) -> float:
  """Per-device FLOPs of one train step: XLA's cost analysis with loop bodies (the chunked pixel losses) counted
  at their trip counts."""
  flops = xla_stats.compiled_flops(compiled)
  logging.info("train step: %.4g GFLOP per device (XLA cost analysis, loops at their trip counts)", flops / 1e9)
  return flops


def compiler_options(config, device: jax.Device) -> dict:
  """XLA options for the train step: on CPU with config.cpu_fast_compile, LLVM optimises at level 1 without its
  expensive passes (the demo's step compiles in 63 s instead of 92 s and runs 4% slower; level 0 runs 2.6x slower)."""
  if config.cpu_fast_compile and device.platform == "cpu":
    return {"xla_llvm_disable_expensive_passes": True, "xla_backend_optimization_level": 1}
  return {}


def peak_flops(device: jax.Device) -> float | None:
  """The chip's peak dense bf16 FLOP/s from handi_jax.chips; None (and no MFU) where the table has no entry."""
  chip = chips.chip_of(device)
  if chip is None:
    logging.info("MFU is not logged: handi_jax.chips has no peak FLOP/s for device kind %r (TFLOP/s per device "
                 "is logged)", device.device_kind)
    return None
  return chip.peak_bf16_flops


def steps_to_checkpoint(step: int, train_config) -> int:
  """Steps from `step` to the next checkpoint: one every checkpoint_every steps, at each evaluation, at the end."""
  intervals = [train_config.checkpoint_every] + ([train_config.eval_every] if train_config.eval_every else [])
  return min([train_config.num_steps] + [(step // n + 1) * n for n in intervals]) - step


def throughput_scalars(steps_per_sec: float, examples_per_step: int, flops_per_device: float,
                       peak_flops_per_device: float | None, steps_left_to_checkpoint: int) -> dict[str, float]:
  """What a pod user watches, from the measured step rate: examples/s, TFLOP/s per device, MFU (only with a
  known peak) and the seconds to the next checkpoint."""
  flops_per_sec = steps_per_sec * flops_per_device
  scalars = {"examples_per_sec": steps_per_sec * examples_per_step, "tflops_per_sec_per_device": flops_per_sec / 1e12,
             "seconds_to_next_checkpoint": steps_left_to_checkpoint / steps_per_sec}
  if peak_flops_per_device:
    scalars["mfu"] = flops_per_sec / peak_flops_per_device
  return scalars


class ProgressReport(periodic_actions.ReportProgress):
  """clu's ReportProgress every config.train.log_every steps (steps_per_sec and uptime to the writer, progress and
  ETA to the log) plus throughput_scalars at the same step rate. Steps are timed between calls, so checkpoint and
  evaluation time count: the rate is what the run achieves. Call it after every step."""

  def __init__(self, train_config, writer, examples_per_step: int,
               flops_per_device: float | concurrent.futures.Future, peak_flops: float | None):
    super().__init__(num_train_steps=train_config.num_steps, writer=writer, every_steps=train_config.log_every,
                     every_secs=None)
    self._train_config = train_config
    self._examples_per_step = examples_per_step
    self._flops_per_device = flops_per_device
    self._peak_flops = peak_flops

  def _apply(self, step: int, t: float):
    steps_per_sec = (step - self._previous_step) / (t - self._previous_time)  # as ReportProgress measures it
    super()._apply(step, t)
    if isinstance(self._flops_per_device, concurrent.futures.Future):
      self._flops_per_device = self._flops_per_device.result()
    self._writer.write_scalars(step, throughput_scalars(
        steps_per_sec, self._examples_per_step, self._flops_per_device, self._peak_flops,
        steps_to_checkpoint(step, self._train_config)))


class ProfileWindow:
  """config.train.profile_start_step > 0: a jax.profiler trace of the profile_num_steps steps after that step in
  <workdir>/profile (TensorBoard's Profile tab); it ends early with the run. Call it after every step."""

  def __init__(self, train_config, workdir: fileio.Path):
    self.start = train_config.profile_start_step
    self.end = self.start + train_config.profile_num_steps
    self.directory = workdir / "profile"
    self.tracing = False

  def __enter__(self):
    return self

  def __call__(self, step: int) -> None:
    if self.start and step == self.start:
      jax.profiler.start_trace(str(self.directory))
      self.tracing = True
    elif self.tracing and step >= self.end:
      self._stop(step)

  def __exit__(self, *exc_info):
    if self.tracing:
      self._stop(None)

  def _stop(self, step: int | None) -> None:
    jax.profiler.stop_trace()
    self.tracing = False
    logging.info("profile of steps %d to %s written to %s", self.start + 1, step or "the end", self.directory)


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out

