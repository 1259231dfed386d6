"""Training for either stage: state creation, the jitted train step, the loop with checkpoints and metrics.

The UNet is trained (all of it, or the release's subset: config.train.trainable, see train_state); the VAE,
the text encoder and (stage 2) the hand landmark network are frozen and enter the step as arguments, never as
constants. Models come from handi_jax.checkpoints, data from config.data.dir (handi_jax.data.input_pipeline).
One step: encode frames -> background freeze -> noise at random t -> UNet -> x0 (Eq. 4, from the output as
config.diffusion.prediction_type reads it: epsilon, v_prediction or sample) -> stage loss
(noise + alpha * soft mIoU, or noise + eta * Hand Refinement Loss, both decoding x0 in the graph) -> AdamW.
"""

import contextlib
import functools
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from clu import metric_writers, periodic_actions
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from handi_jax import (
  checkpoints,
  chips,
  conditioning,
  evaluate,
  losses,
  sharding,
  tokenizers,
  train_state,
  xla_stats,
)
from handi_jax.data import input_pipeline
from handi_jax.diffusion import schedules
from handi_jax.hand_landmarks import network as landmarks_lib
from handi_jax.media import files as media_files
from handi_jax.models import clip_text
from handi_jax.models import vae as vae_lib


@struct.dataclass
class FrozenModels:
  """The models the step does not train, as one pytree (one jit argument): the graph definitions are static,
  the states, landmark params and token ids are its leaves."""

  vae_graphdef: nnx.GraphDef = struct.field(pytree_node=False)
  text_graphdef: nnx.GraphDef = struct.field(pytree_node=False)
  vae: nnx.State
  text_encoder: nnx.State
  landmarks: Any          # hand landmark params (stage 2, eta > 0) or None
  uncond_ids: jax.Array   # (1, 77) token ids of the empty prompt

def create_train_state(config, mesh) -> tuple[train_state.TrainState, Any, nnx.State, train_state.TrainState]:
  """Sharded train state, the UNet graphdef, its RNG state, and the state's shardings.

  The UNet is built (or loaded) on one device and then placed shard by shard: the full-size model (5.7 GB in
  fp32) fits one H100 or v5p chip, and eager init avoids compiling an init graph of ~1500 random arrays.
  The optimizer state is created under jit directly in its sharded layout.
  """
  unet = checkpoints.load_unet(config, config.model.pretrained, "the UNet to train")
  graphdef, params, frozen_params, rng_state = train_state.split_unet(unet, config)
  state_from = functools.partial(train_state.initial_state, config)
  state_sh = _state_shardings(config, mesh, jax.eval_shape(state_from, params, frozen_params))
  params, frozen_params = jax.device_put((params, frozen_params), (state_sh.params, state_sh.frozen_params))
  state = jax.jit(state_from, out_shardings=state_sh)(params, frozen_params)
  rng_state = jax.device_put(rng_state, NamedSharding(mesh, PartitionSpec()))  # placed: no implicit transfer
  return state, graphdef, rng_state, state_sh

def _state_shardings(config, mesh, shapes: train_state.TrainState) -> train_state.TrainState:
  return train_state.state_shardings(shapes, mesh, config.sharding_rules, config.sharding_min_size)

def restore_train_state(config, mesh, manager: ocp.CheckpointManager, step: int) -> train_state.TrainState:
  """Checkpoint `step`'s train state on `mesh`, without initialising any model (the UNet is built abstractly)."""
  _, params, frozen_params, _ = train_state.split_unet(nnx.eval_shape(lambda: checkpoints.build_unet(config)),
                                                       config)
  shapes = jax.eval_shape(functools.partial(train_state.initial_state, config), params, frozen_params)
  target = train_state.abstract_state(shapes, _state_shardings(config, mesh, shapes))
  return train_state.restore_checkpoint(manager, step, target)[0]

def _weights_in_compute_dtype(model: nnx.Module) -> nnx.Module:
  """Store the kernels and embeddings of Linear, Conv and Embed layers in the layer's compute dtype: the layer
  casts them to it anyway, so the outputs are the same and bf16 halves their bytes. Norms keep their params."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.Linear, nnx.Conv, nnx.Embed)) and node.dtype is not None:
      for name in ("kernel", "bias", "embedding"):
        variable = getattr(node, name, None)
        if isinstance(variable, nnx.Param):
          variable.value = variable.value.astype(node.dtype)
  return model

def _frozen_models(config, vae, text_encoder, uncond_ids) -> FrozenModels:
  vae_graphdef, vae_state = nnx.split(_weights_in_compute_dtype(vae))
  text_graphdef, text_state = nnx.split(_weights_in_compute_dtype(text_encoder))
  landmarks = landmarks_lib.load_hand_landmark_params() if config.stage == 2 and config.loss.eta_hand else None
  return FrozenModels(vae_graphdef, text_graphdef, vae_state, text_state, landmarks, uncond_ids)

def load_frozen_models(config) -> tuple[FrozenModels, Any]:
  """VAE, text encoder and (stage 2, eta > 0) the landmark network on the default device, and the tokenizer."""
  vae, text_encoder, tokenizer = checkpoints.load_frozen_components(config)
  uncond_ids = jnp.asarray(tokenizers.tokenize(tokenizer, [config.sampling.negative_prompt]))
  return _frozen_models(config, vae, text_encoder, uncond_ids), tokenizer

def abstract_frozen_models(config) -> FrozenModels:
  """load_frozen_models(config)'s pytree as shapes and dtypes, without reading or initialising any weight."""
  dtypes = dict(dtype=jnp.dtype(config.model.dtype), param_dtype=jnp.dtype(config.model.param_dtype))

  def build():
    vae = vae_lib.AutoencoderKL(config.model.vae, rngs=nnx.Rngs(0), **dtypes)
    text_encoder = clip_text.CLIPTextModel(config.model.text_encoder, rngs=nnx.Rngs(0), **dtypes)
    return _frozen_models(config, vae, text_encoder, jnp.zeros((1, tokenizers.CONTEXT_LENGTH), jnp.int32))

  return jax.eval_shape(build)

def frozen_shardings(frozen: FrozenModels, mesh, config) -> FrozenModels:
  """NamedShardings of the (abstract) frozen models: the text encoder by the UNet's logical-axis rules and
  config.sharding_min_size; the VAE, the landmark params and the token ids replicated.

  The VAE stays whole: its activations are far larger than its weights (0.17 GB in bf16), and with FSDP-sharded
  weights XLA reshards the decoder's activations to follow them (the compile report measured 97 GiB of
  all-gather per device and step on v5p-64 for the pixel loss) instead of gathering the weights once.
  """
  shardings = sharding.param_shardings(frozen, mesh, config.sharding_rules, config.sharding_min_size)
  replicated = NamedSharding(mesh, PartitionSpec())
  return shardings.replace(vae=jax.tree.map(lambda _: replicated, shardings.vae))

def place_frozen_models(config, mesh) -> tuple[FrozenModels, FrozenModels, Any]:
  """(frozen models on the mesh, their shardings, the tokenizer)."""
  frozen, tokenizer = load_frozen_models(config)
  frozen_sh = frozen_shardings(frozen, mesh, config)
  return jax.device_put(frozen, frozen_sh), frozen_sh, tokenizer

def make_train_step(config, unet_graphdef):
  """The pure step function (state, rng_state, frozen models, batch, key) -> (state, metrics); jit_train_step
  jits it with the training layout."""
  tx = train_state.make_optimizer(config)
  schedule = schedules.make_schedule(config.diffusion)
  prediction_type = config.diffusion.prediction_type
  stage = config.stage
  trainable = train_state.trainable_filter(config)

  def train_step(state: train_state.TrainState, rng_state, frozen: FrozenModels, batch, key):
    key = jax.random.fold_in(key, state.step)
    t_key, noise_key, uncond_key, dropout_key, frames_key = jax.random.split(key, 5)
    vae = nnx.merge(frozen.vae_graphdef, frozen.vae)
    text_encoder = nnx.merge(frozen.text_graphdef, frozen.text_encoder)
    landmark_params, uncond_ids = frozen.landmarks, frozen.uncond_ids

    latents = jax.lax.stop_gradient(vae_lib.encode_video(vae, batch["frames"]))
    context = latents[:, :1]
    mask = conditioning.latent_mask(batch["mask"])
    if config.train.freeze_background:
      latents = conditioning.freeze_background(latents, mask)
    motion = conditioning.latent_motion(latents)
    batch_size = latents.shape[0]
    timesteps = jax.random.randint(t_key, (batch_size,), 0, config.diffusion.num_train_timesteps)
    noise = jax.random.normal(noise_key, latents.shape, latents.dtype)
    noisy = schedules.q_sample(schedule, latents, timesteps, noise)

    text = text_encoder(batch["input_ids"])
    uncond = jnp.broadcast_to(text_encoder(uncond_ids), text.shape)
    # Like the release: with probability uncond_prob the whole batch trains the unconditional branch.
    text = jnp.where(jax.random.uniform(uncond_key) < config.train.uncond_prob, uncond, text)
    text = jax.lax.stop_gradient(text)

    unet = nnx.merge(unet_graphdef, state.params, state.frozen_params, rng_state)
    nnx.reseed(unet, dropout=dropout_key)
    unet.train()
    decode = functools.partial(vae_lib.decode_video, vae)  # the losses chunk decode + loss together

    target = schedules.training_target(schedule, prediction_type, latents, timesteps, noise)

    def loss_fn(unet):
      output = unet(noisy, timesteps, text, context, mask=mask, motion=motion).astype(jnp.float32)
      x0 = schedules.model_output_to_x0(schedule, prediction_type, noisy, timesteps, output)
      if stage == 1:
        return losses.stage1_loss(output, target, x0, batch, decode, config.loss, config.model.frame_chunk,
                                  frames_key)
      return losses.stage2_loss(output, target, x0, batch, decode, landmark_params, config.loss,
                                config.model.frame_chunk, frames_key)

    # nnx.value_and_grad: gradients for the trainable subset only; dropout's RNG state may mutate inside.
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)
    (loss, terms), grads = grad_fn(unet)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step

def jit_train_step(config, mesh, unet_graphdef, state_sh: train_state.TrainState, frozen_sh: FrozenModels):
  """make_train_step jitted with the training layout: state and frozen models sharded as given, the batch split
  over the mesh's batch axes, RNG state and key replicated; the state is donated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(make_train_step(config, unet_graphdef),
                 in_shardings=(state_sh, replicated, frozen_sh, sharding.batch_sharding(mesh, 1), replicated),
                 out_shardings=(state_sh, None), donate_argnums=(0,))

def train_and_evaluate(config, workdir: str) -> train_state.TrainState:
  """Train config.train.num_steps steps, resuming from the latest checkpoint in workdir."""
  workdir = pathlib.Path(workdir)
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
      return restore_train_state(config, mesh, manager, latest)
    state, unet_graphdef, rng_state, state_sh = create_train_state(config, mesh)
    frozen, frozen_sh, tokenizer = place_frozen_models(config, mesh)
    position = 0
    if latest is not None:
      # Restored onto this run's mesh, whatever mesh wrote it; the initial arrays go first to free their memory.
      target = train_state.abstract_state(state, state_sh)
      del state
      state, data_state = train_state.restore_checkpoint(manager, latest, target)
      position = data_state["position"]
      logging.info("resumed from step %d (input position %d)", int(state.step), position)
    data = input_pipeline.InputPipeline(config, mesh, tokenizer=tokenizer, position=position)

    step_fn = jit_train_step(config, mesh, unet_graphdef, state_sh, frozen_sh)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items() if np.isscalar(v)})
    quiet = jax.process_index() > 0
    first, num_steps = int(state.step), config.train.num_steps
    stopped = False
    with jax.transfer_guard(config.train.transfer_guard), preemption_notice(manager) as preempted, \
         ProfileWindow(config.train, workdir) as profile:
      for index in range(first, num_steps):
        batch = {k: v for k, v in next(data).items() if isinstance(v, jax.Array)}  # drop host-side text
        args = (rng_state, frozen, batch, step_rng)
        if index == first:  # compile ahead of time: its own phase on the console, its time in the log
          with tqdm.tqdm(total=1, desc=f"compile stage-{config.stage} train step", disable=quiet) as compiling:
            started = time.perf_counter()
            step_fn = step_fn.lower(state, *args).compile(compiler_options(config, mesh.devices.flat[0]))
            compiling.update()
          logging.info("train step compiled in %.1f s", time.perf_counter() - started)
          report = ProgressReport(config.train, writer, examples_per_step=batch["frames"].shape[0],
                                  flops_per_device=step_flops(step_fn), peak_flops=peak_flops(mesh.devices.flat[0]))
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
          bar.set_postfix(loss=f"{scalars['loss']:.4f}")
        evaluating = bool(config.train.eval_every) and step % config.train.eval_every == 0
        stopped = step < num_steps and preempted(step)
        # Our interval, not orbax's: orbax also saves the first step of every run (a full save on a pod).
        if step % config.train.checkpoint_every == 0 or step == num_steps or evaluating or stopped:
          train_state.save_checkpoint(manager, step, state, data.state())
        if evaluating:
          manager.wait_until_finished()  # evaluation loads this checkpoint
          with jax.transfer_guard("allow"):  # generation and the metrics move data on purpose
            evaluate_during_training(config, workdir, step, writer)
        if stopped:
          break
      if first < num_steps:
        bar.close()
    manager.wait_until_finished()
    writer.flush()
    if stopped:
      logging.warning("SIGTERM: stopped after step %d of %d and saved it to %s; run the same command to resume",
                      step, num_steps, manager.directory / str(step))
  return state

def evaluate_during_training(config, workdir: pathlib.Path, step: int, writer) -> None:
  """config.train.eval_every: generate config.evaluate's clips with the checkpoint of `step`, evaluate them into
  <workdir>/eval/step_<step>/ (videos, metrics, report) and log the metrics and contact sheets (TensorBoard)."""
  if jax.process_index() > 0:  # generation and the metrics run on one host's devices
    return
  writer.write_scalars(step, evaluate.evaluate_checkpoint(config, workdir, step))
  sheets = sorted((workdir / "eval" / f"step_{step}").glob("contact_*.png"))
  writer.write_images(step, {f"eval/{p.stem}": np.asarray(media_files.load_image(p))[None] for p in sheets})

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
  """XLA options for the train step: on CPU with config.cpu_fast_compile, LLVM's expensive passes are skipped."""
  if config.cpu_fast_compile and device.platform == "cpu":
    return {"xla_llvm_disable_expensive_passes": True}
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

  def __init__(self, train_config, writer, examples_per_step: int, flops_per_device: float,
               peak_flops: float | None):
    super().__init__(num_train_steps=train_config.num_steps, writer=writer, every_steps=train_config.log_every,
                     every_secs=None)
    self._train_config = train_config
    self._examples_per_step = examples_per_step
    self._flops_per_device = flops_per_device
    self._peak_flops = peak_flops

  def _apply(self, step: int, t: float):
    steps_per_sec = (step - self._previous_step) / (t - self._previous_time)  # as ReportProgress measures it
    super()._apply(step, t)
    self._writer.write_scalars(step, throughput_scalars(
        steps_per_sec, self._examples_per_step, self._flops_per_device, self._peak_flops,
        steps_to_checkpoint(step, self._train_config)))

class ProfileWindow:
  """config.train.profile_start_step > 0: a jax.profiler trace of the profile_num_steps steps after that step in
  <workdir>/profile (TensorBoard's Profile tab); it ends early with the run. Call it after every step."""

  def __init__(self, train_config, workdir: pathlib.Path):
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

