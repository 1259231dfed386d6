"""Training for either stage: state creation, the jitted train step, the loop with checkpoints and metrics.

The UNet is trained (all of it, or the release's subset: config.train.trainable, see train_state); the VAE,
the text encoder and (stage 2) the hand landmark network are frozen and enter the step as arguments, never as
constants. Models come from handi_jax.checkpoints, data from config.data.dir (handi_jax.data.input_pipeline).
One step: encode frames -> background freeze -> noise at random t -> UNet -> x0 (Eq. 4, from the output as
config.diffusion.prediction_type reads it: epsilon, v_prediction or sample) -> stage loss
(noise + alpha * soft mIoU, or noise + eta * Hand Refinement Loss, both decoding x0 in the graph) -> AdamW.
"""

import dataclasses
import functools
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from clu import metric_writers
from flax import nnx

from handi_jax import checkpoints, conditioning, evaluate, losses, sharding, tokenizers, train_state, video_io
from handi_jax.data import input_pipeline
from handi_jax.diffusion import schedules
from handi_jax.hands import landmarks as landmarks_lib
from handi_jax.models import vae as vae_lib


@dataclasses.dataclass(frozen=True)
class FrozenModels:
  """Graph definitions (static) and states (jit arguments) of the models the step does not train."""

  vae_graphdef: Any
  text_graphdef: Any
  vae: nnx.State
  text_encoder: nnx.State
  landmarks: Any          # hand landmark params (stage 2) or None
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
  state_sh = train_state.state_shardings(jax.eval_shape(state_from, params, frozen_params), mesh,
                                         config.sharding_rules)
  params, frozen_params = jax.device_put((params, frozen_params), (state_sh.params, state_sh.frozen_params))
  state = jax.jit(state_from, out_shardings=state_sh)(params, frozen_params)
  return state, graphdef, rng_state, state_sh


def load_frozen_models(config) -> tuple[FrozenModels, Any]:
  """VAE, text encoder, tokenizer and (stage 2, eta > 0) the landmark network."""
  vae, text_encoder, tokenizer = checkpoints.load_frozen_components(config)
  vae_graphdef, vae_state = nnx.split(vae)
  text_graphdef, text_state = nnx.split(text_encoder)
  landmarks = landmarks_lib.load_hand_landmark_params() if config.stage == 2 and config.loss.eta_hand else None
  uncond_ids = jnp.asarray(tokenizers.tokenize(tokenizer, [config.sampling.negative_prompt]))
  return FrozenModels(vae_graphdef, text_graphdef, vae_state, text_state, landmarks, uncond_ids), tokenizer


def make_train_step(config, unet_graphdef, frozen_graphdefs):
  """The pure step function (state, frozen states, batch, key) -> (state, metrics); jit it with shardings."""
  tx = train_state.make_optimizer(config)
  schedule = schedules.make_schedule(config.diffusion)
  prediction_type = config.diffusion.prediction_type
  vae_graphdef, text_graphdef = frozen_graphdefs
  stage = config.stage
  trainable = train_state.trainable_filter(config)

  def train_step(state: train_state.TrainState, rng_state, vae_state, text_state, landmark_params, uncond_ids, batch,
                 key):
    key = jax.random.fold_in(key, state.step)
    t_key, noise_key, uncond_key, dropout_key = jax.random.split(key, 4)
    vae = nnx.merge(vae_graphdef, vae_state)
    text_encoder = nnx.merge(text_graphdef, text_state)

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
        return losses.stage1_loss(output, target, x0, batch, decode, config.loss, config.model.frame_chunk)
      return losses.stage2_loss(output, target, x0, batch, decode, landmark_params, config.loss,
                                config.model.frame_chunk)

    # nnx.value_and_grad: gradients for the trainable subset only; dropout's RNG state may mutate inside.
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)
    (loss, terms), grads = grad_fn(unet)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def train_and_evaluate(config, workdir: str) -> train_state.TrainState:
  """Train config.train.num_steps steps, resuming from the latest checkpoint in workdir."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config)
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.devices.size)
  step_rng = jax.random.fold_in(jax.random.key(config.seed), 1 << 20)

  with mesh:
    state, unet_graphdef, rng_state, state_sh = create_train_state(config, mesh)
    frozen, tokenizer = load_frozen_models(config)
    manager = train_state.checkpoint_manager(config, workdir)
    position = 0
    if manager.latest_step() is not None:
      restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore()))
      state, position = restored.state, restored.data["position"]
      logging.info("resumed from step %d (input position %d)", int(state.step), position)
    data = input_pipeline.InputPipeline(config, mesh, tokenizer=tokenizer, position=position)

    step_fn = jax.jit(make_train_step(config, unet_graphdef, (frozen.vae_graphdef, frozen.text_graphdef)),
                      out_shardings=(state_sh, None), donate_argnums=(0,))
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items() if np.isscalar(v)})
    quiet = jax.process_index() > 0
    first = int(state.step)
    with jax.transfer_guard(config.train.transfer_guard):
      for index in range(first, config.train.num_steps):
        batch = {k: v for k, v in next(data).items() if isinstance(v, jax.Array)}  # drop host-side text
        args = (rng_state, frozen.vae, frozen.text_encoder, frozen.landmarks, frozen.uncond_ids, batch, step_rng)
        if index == first:  # compile ahead of time: its own phase on the console, its time in the log
          with tqdm.tqdm(total=1, desc=f"compile stage-{config.stage} train step", disable=quiet) as compiling:
            started = time.perf_counter()
            step_fn = step_fn.lower(state, *args).compile()
            compiling.update()
          logging.info("train step compiled in %.1f s", time.perf_counter() - started)
          bar = tqdm.tqdm(total=config.train.num_steps, initial=first, desc=f"train stage {config.stage}",
                          unit="step", disable=quiet)
        state, metrics = step_fn(state, *args)
        step = int(state.step)
        bar.update()
        if step % config.train.log_every == 0 or step == config.train.num_steps:
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if not all(np.isfinite(v) for v in scalars.values()):
            raise FloatingPointError(f"non-finite training metrics at step {step}: {scalars}")
          writer.write_scalars(step, scalars)
          bar.set_postfix(loss=f"{scalars['loss']:.4f}")
        evaluating = bool(config.train.eval_every) and step % config.train.eval_every == 0
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data.state())),
                     force=step == config.train.num_steps or evaluating)
        if evaluating:
          manager.wait_until_finished()  # evaluation loads this checkpoint
          evaluate_during_training(config, workdir, step, writer)
      if first < config.train.num_steps:
        bar.close()
    manager.wait_until_finished()
    writer.flush()
  return state


def evaluate_during_training(config, workdir: pathlib.Path, step: int, writer) -> None:
  """config.train.eval_every: generate config.evaluate's clips with the checkpoint of `step`, evaluate them into
  <workdir>/eval/step_<step>/ (videos, metrics, report) and log the metrics and contact sheets (TensorBoard)."""
  if jax.process_index() > 0:  # generation and the metrics run on one host's devices
    return
  writer.write_scalars(step, evaluate.evaluate_checkpoint(config, workdir, step))
  sheets = sorted((workdir / "eval" / f"step_{step}").glob("contact_*.png"))
  writer.write_images(step, {f"eval/{p.stem}": np.asarray(video_io.load_image(p))[None] for p in sheets})


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out

