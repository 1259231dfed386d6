"""Training for either stage: state creation, the jitted train step, the loop with checkpoints and metrics.

The UNet is trained (all of it, or the release's subset: config.train.trainable); the VAE, the text encoder
and (stage 2) the hand landmark network are frozen and enter the step as arguments, never as constants.
One step: encode frames -> background freeze -> noise at random t -> UNet -> x0 (Eq. 4) -> stage loss
(noise + alpha * soft mIoU, or noise + eta * Hand Refinement Loss, both decoding x0 in the graph) -> AdamW.
"""

import dataclasses
import functools
import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from clu import metric_writers
from flax import nnx

from handi_jax import conditioning, input_pipeline, losses, sharding
from handi_jax.diffusion import schedules
from handi_jax.models import clip_text, hand_landmarks, pipeline, unet3d
from handi_jax.models import vae as vae_lib

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
class FrozenModels:
  """Graph definitions (static) and states (jit arguments) of the models the step does not train."""

  vae_graphdef: Any
  text_graphdef: Any
  vae: nnx.State
  text_encoder: nnx.State
  landmarks: Any          # hand landmark params (stage 2) or None
  uncond_ids: jax.Array   # (1, 77) token ids of the empty prompt


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


def build_unet(config, rngs: nnx.Rngs) -> unet3d.UNet3DConditionModel:
  model = config.model
  return unet3d.UNet3DConditionModel(model.unet, dtype=jnp.dtype(model.dtype), param_dtype=jnp.dtype(model.param_dtype),
                                     attention=model.attention, remat=model.remat, rngs=rngs)


def split_unet(unet, config):
  """(graphdef, trainable params, frozen params, other state such as the dropout RNG)."""
  return nnx.split(unet, trainable_filter(config), nnx.Param, ...)


def initial_unet_rngs(config) -> nnx.Rngs:
  """Parameter and dropout streams of a randomly initialised UNet (the same for training and export)."""
  key = pipeline.component_key(config, "unet")
  return nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1))


def create_train_state(config, mesh) -> tuple[TrainState, Any, nnx.State, TrainState]:
  """Sharded train state, the UNet graphdef, its RNG state, and the state's shardings.

  The UNet is built (or loaded) on one device and then placed shard by shard: the full-size model (5.7 GB in
  fp32) fits one H100 or v5p chip, and eager init avoids compiling an init graph of ~1500 random arrays.
  The optimizer state is created under jit directly in its sharded layout.
  """
  tx = make_optimizer(config)
  if config.model.pretrained:
    unet = unet3d.UNet3DConditionModel.from_pretrained(
        pathlib.Path(config.model.pretrained) / "unet", dtype=jnp.dtype(config.model.dtype),
        param_dtype=jnp.dtype(config.model.param_dtype), attention=config.model.attention, remat=config.model.remat)
    nnx.reseed(unet, dropout=jax.random.fold_in(pipeline.component_key(config, "unet"), 1))
  else:
    unet = build_unet(config, initial_unet_rngs(config))
  graphdef, params, frozen_params, rng_state = split_unet(unet, config)

  def state_from(params, frozen_params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen_params=frozen_params,
                      opt_state=tx.init(params))

  state_sh = state_shardings(jax.eval_shape(state_from, params, frozen_params), mesh, config.sharding_rules)
  params, frozen_params = jax.device_put((params, frozen_params), (state_sh.params, state_sh.frozen_params))
  state = jax.jit(state_from, out_shardings=state_sh)(params, frozen_params)
  return state, graphdef, rng_state, state_sh


def state_shardings(abstract_state: TrainState, mesh, rules) -> TrainState:
  """Parameters by their logical axes; AdamW moments mirror the parameters; scalars are replicated."""
  param_sh = sharding.param_shardings(abstract_state.params, mesh, rules)
  params_def = jax.tree.structure(abstract_state.params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def is_moment(node):
    return isinstance(node, nnx.State) and jax.tree.structure(node) == params_def

  opt_sh = jax.tree.map(lambda node: param_sh if is_moment(node) else replicated, abstract_state.opt_state,
                        is_leaf=is_moment)
  return TrainState(step=replicated, params=param_sh,
                    frozen_params=sharding.param_shardings(abstract_state.frozen_params, mesh, rules),
                    opt_state=opt_sh)


def load_frozen_models(config) -> tuple[FrozenModels, Any]:
  """VAE, text encoder, tokenizer and (stage 2, eta > 0) the landmark network."""
  vae, text_encoder, tokenizer = pipeline.load_frozen_components(config)
  vae_graphdef, vae_state = nnx.split(vae)
  text_graphdef, text_state = nnx.split(text_encoder)
  landmarks = hand_landmarks.load_hand_landmark_params() if config.stage == 2 and config.loss.eta_hand else None
  uncond_ids = jnp.asarray(clip_text.tokenize(tokenizer, [config.sampling.negative_prompt]))
  return FrozenModels(vae_graphdef, text_graphdef, vae_state, text_state, landmarks, uncond_ids), tokenizer


def make_train_step(config, unet_graphdef, frozen_graphdefs):
  """The pure step function (state, frozen states, batch, key) -> (state, metrics); jit it with shardings."""
  tx = make_optimizer(config)
  schedule = schedules.make_schedule(config.diffusion)
  vae_graphdef, text_graphdef = frozen_graphdefs
  stage = config.stage
  trainable = trainable_filter(config)

  def train_step(state: TrainState, rng_state, vae_state, text_state, landmark_params, uncond_ids, batch, key):
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
    decode = functools.partial(vae_lib.decode_video, vae, chunk_size=config.model.vae_decode_chunk)

    def loss_fn(unet):
      eps = unet(noisy, timesteps, text, context, mask=mask, motion=motion).astype(jnp.float32)
      x0 = schedules.predict_x0_from_eps(schedule, noisy, timesteps, eps)
      if stage == 1:
        return losses.stage1_loss(eps, noise, x0, batch, decode, config.loss)
      return losses.stage2_loss(eps, noise, x0, batch, decode, landmark_params, config.loss)

    # nnx.value_and_grad: gradients for the trainable subset only; dropout's RNG state may mutate inside.
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)
    (loss, terms), grads = grad_fn(unet)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def _checkpoint_manager(config, workdir) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints,
                                         save_interval_steps=config.train.checkpoint_every, create=True)
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints", options=options,
                               item_names=("state", "data"))


def restore_unet(config, workdir, step: int | None = None) -> unet3d.UNet3DConditionModel:
  """The UNet of the latest (or given) training checkpoint in `workdir`, for generation and export."""
  manager = _checkpoint_manager(config, workdir)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no training checkpoint under {pathlib.Path(workdir) / 'checkpoints'}; "
                            "train first (--mode=train) or point config.model.pretrained at weights")
  graphdef, abstract_params, abstract_frozen, rng_state = split_unet(
      nnx.eval_shape(lambda: build_unet(config, nnx.Rngs(0))), config)
  tx = make_optimizer(config)
  abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                              frozen_params=abstract_frozen, opt_state=jax.eval_shape(tx.init, abstract_params))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  unet = nnx.merge(graphdef, restored.state.params, restored.state.frozen_params, rng_state)
  unet.eval()
  return unet


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Train config.train.num_steps steps, resuming from the latest checkpoint in workdir."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config)
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.devices.size)
  step_rng = jax.random.fold_in(jax.random.key(config.seed), 1 << 20)

  with mesh:
    state, unet_graphdef, rng_state, state_sh = create_train_state(config, mesh)
    frozen, tokenizer = load_frozen_models(config)
    manager = _checkpoint_manager(config, workdir)
    position = 0
    if manager.latest_step() is not None:
      restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore()))
      state, position = restored.state, restored.data["position"]
      logging.info("resumed from step %d (input position %d)", int(state.step), position)
    data = input_pipeline.InputPipeline(config, mesh, data_dir=_data_dir(config, workdir), tokenizer=tokenizer,
                                        position=position)

    step_fn = jax.jit(make_train_step(config, unet_graphdef, (frozen.vae_graphdef, frozen.text_graphdef)),
                      out_shardings=(state_sh, None), donate_argnums=(0,))
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items() if np.isscalar(v)})
    first = int(state.step)
    bar = tqdm.tqdm(range(first, config.train.num_steps), initial=first, total=config.train.num_steps,
                    desc=f"stage {config.stage}", disable=jax.process_index() > 0)
    with jax.transfer_guard(config.train.transfer_guard):
      for _ in bar:
        batch = {k: v for k, v in next(data).items() if isinstance(v, jax.Array)}  # drop host-side text
        state, metrics = step_fn(state, rng_state, frozen.vae, frozen.text_encoder, frozen.landmarks,
                                 frozen.uncond_ids, batch, step_rng)
        step = int(state.step)
        if step % config.train.log_every == 0 or step == config.train.num_steps:
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if not all(np.isfinite(v) for v in scalars.values()):
            raise FloatingPointError(f"non-finite training metrics at step {step}: {scalars}")
          writer.write_scalars(step, scalars)
          bar.set_postfix(loss=f"{scalars['loss']:.4f}")
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data.state())),
                     force=step == config.train.num_steps)
    manager.wait_until_finished()
    writer.flush()
  return state


def _data_dir(config, workdir: pathlib.Path) -> pathlib.Path:
  """config.data.dir, or demo data written once under the workdir (the embedded default)."""
  if config.data.dir:
    return pathlib.Path(config.data.dir)
  from data_prep import demo_data

  return demo_data.write_demo_dataset(workdir / "demo_data", config)


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out

