"""The training step of either stage as a pure function, and its jitted form with the training layout.

The UNet is trained (all of it, or the release's subset: config.train.trainable); the VAE, the text encoder and
(stage 2) the hand landmark network are frozen and enter the step as arguments (components.frozen.FrozenModels),
never as constants. One step: encode frames -> background freeze -> noise at random t -> UNet -> x0 (Eq. 4, from
the output as config.diffusion.prediction_type reads it: epsilon, v_prediction or sample) -> stage loss (noise +
alpha * soft mIoU, or noise + eta * Hand Refinement Loss, both decoding x0 in the graph) -> AdamW.

Training runs it; the compile report compiles it for pod and GPU targets without running it.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from handi_jax import conditioning, losses, sharding
from handi_jax.components import common, train_state
from handi_jax.components import frozen as frozen_lib
from handi_jax.components import unet as unet_lib
from handi_jax.components.frozen import FrozenModels
from handi_jax.data import input_pipeline
from handi_jax.diffusion import schedules
from handi_jax.models import vae as vae_lib


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
    vae, text_encoder = frozen.vae_module(), frozen.text_encoder_module()
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


def abstract_train_inputs(config, mesh):
  """(unet graphdef, state shardings, frozen-model shardings, abstract args of the train step), laid out as
  training lays them out (train_state.abstract_train_state, frozen.frozen_shardings)."""
  unet = unet_lib.abstract_unet(config)
  graphdef, _, _, rng_state = train_state.split_unet(unet, config)
  abstract_state, state_sh = train_state.abstract_train_state(config, mesh, unet)
  frozen = frozen_lib.abstract_frozen_models(config)
  frozen_sh = frozen_lib.frozen_shardings(frozen, mesh, config)
  batch_sh = sharding.batch_sharding(mesh, 1)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
           for k, v in input_pipeline.batch_shapes(config, with_input_ids=True, mesh=mesh).items()}
  replicated = NamedSharding(mesh, PartitionSpec())
  args = (abstract_state, common.with_shardings(rng_state, replicated), common.with_shardings(frozen, frozen_sh),
          batch, common.with_shardings(jax.eval_shape(lambda: jax.random.key(0)), replicated))
  return graphdef, state_sh, frozen_sh, args
