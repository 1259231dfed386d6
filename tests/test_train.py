"""The train step: the release's trainable subset, the real step with its pixel losses reaching the denoiser, the
configured regression target, the CPU compile options. Training end to end (checkpoints, resume, restore):
tests/test_preemption.py."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from handi_jax import conditioning, train, train_step
from handi_jax.components import frozen as frozen_lib
from handi_jax.components import train_state
from handi_jax.components import unet as unet_lib
from handi_jax.data import demo_clips
from handi_jax.diffusion import schedules
from handi_jax.hand_landmarks import crops as hand_crops
from handi_jax.media import hand_masks as masks
from handi_jax.models import vae as vae_lib
from tests.helpers import tiny_train_config


def test_release_trainable_subset_matches_the_release_rule():
  config = common.get_config(2, "paper")
  config.train.trainable = "release"
  config.model.unet.in_channels = 5  # as the release's checkpoints are saved
  unet = nnx.eval_shape(lambda: unet_lib.build_unet(config))
  _, trainable, frozen, _ = train_state.split_unet(unet, config)
  count = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  # reference_spec.md 3.3: 643,846,976 of 1,413,404,420 parameters are trainable.
  assert count(trainable) == 643_846_976
  assert count(trainable) + count(frozen) == 1_413_404_420


# ---------------------------------------------------------------------------------------------------
# The real train step (train_step.make_train_step) with its pixel losses, on a one-conv stand-in for the UNet so
# that it compiles in seconds: the VAE, text encoder and MediaPipe landmark network are the real ones.

class ConvDenoiser(nnx.Module):
  """The UNet's call signature over one 3 x 3 conv per frame: enough to carry gradients to parameters."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(4, 4, (3, 3), rngs=rngs)

  def __call__(self, sample, timesteps, encoder_hidden_states, condition_latent, mask=None, motion=None):
    return self.conv(sample.reshape(-1, *sample.shape[2:])).reshape(sample.shape)


def _step_config(stage, **loss):
  config = tiny_train_config(stage=stage)
  # Stage 1 decodes the 3 generated frames in a chunk of 2 and a remainder of 1; stage 2 scores a random 2 of
  # them in one chunk. (Every chunk layout is checked against the unchunked result in test_chunking.py.)
  config.data.num_frames = 4
  config.model.frame_chunk = 2
  config.loss.update({"alpha_miou": 0.0, "eta_hand": 0.0, "miou_frames": 0, "hand_frames": 2, **loss})
  return config


def _batch(config, batch_size=2):
  """Demo clips as the input pipeline delivers them (frames in [-1, 1], masks in {0, 1})."""
  clips = [demo_clips.synthesize_clip(i, config) for i in range(batch_size)]
  height, width = config.data.height, config.data.width
  per_frame = [masks.clip_masks(c["keypoints"], c["presence"].astype(bool), height, width,
                                config.data.build.mask_rule) for c in clips]
  return dict(
      frames=jnp.asarray(np.stack([c["frames"] for c in clips]) / 127.5 - 1.0, jnp.float32),
      mask=jnp.asarray(np.stack([union for _, union in per_frame])[..., None] / 255.0, jnp.float32),
      target_masks=jnp.asarray(np.stack([m[1:] for m, _ in per_frame]) / 255.0, jnp.float32),
      keypoints=jnp.asarray(np.stack([c["keypoints"] for c in clips]), jnp.float32),
      presence=jnp.asarray(np.stack([c["presence"] for c in clips]), jnp.float32),
      input_ids=jnp.zeros((batch_size, 77), jnp.int32))


def _run_step(config, batches):
  """One compiled train step from the same initial state on each batch: [(new params, metrics), ...].

  (The first step's learning rate is 0 during warm-up: the gradient shows in metrics["grad_norm"].)"""
  graphdef, params, frozen_params, rng_state = train_state.split_unet(ConvDenoiser(nnx.Rngs(0)), config)
  state = train_state.initial_state(config, params, frozen_params)
  frozen, _ = frozen_lib.load_frozen_models(config)
  step = jax.jit(train_step.make_train_step(config, graphdef))
  outputs = []
  for batch in batches:
    new_state, metrics = step(state, rng_state, frozen, batch, jax.random.key(7))
    outputs.append((jax.device_get(new_state.params), jax.device_get(metrics)))
  return outputs


@pytest.mark.parametrize("stage", [1, 2])
def test_real_train_step_pixel_loss_reaches_the_denoiser(stage):
  """The pixel loss's ground truth (target masks / keypoints) changes the update, not the noise term."""
  config = _step_config(stage, **({"alpha_miou": 0.1} if stage == 1 else {"eta_hand": 0.1}))
  batch = _batch(config)
  other = dict(batch)
  if stage == 1:
    other["target_masks"] = 1.0 - batch["target_masks"]
  else:
    other["keypoints"] = batch["keypoints"] + 0.05
  (_, metrics), (_, other_metrics) = _run_step(config, [batch, other])
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics["noise"]) == pytest.approx(float(other_metrics["noise"]), rel=1e-6)
  assert abs(float(metrics["grad_norm"]) - float(other_metrics["grad_norm"])) > 1e-6 * float(metrics["grad_norm"])
  if stage == 1:
    assert 0.0 < float(metrics["miou_loss"]) < 1.0
  else:
    # Hands are counted over all generated frames, scored or not; one counts when its ROI joints are all present.
    presence = np.asarray(batch["presence"])[:, 1:] > 0.5
    expected = np.all(presence[..., list(hand_crops.ROI_JOINTS)], axis=-1).sum()
    assert float(metrics["hands_counted"]) == expected > 0
    assert float(metrics["hand_loss"]) > 0.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_train_step_regresses_the_configured_target(prediction_type):
  """metrics["noise"] equals the mean squared error of the denoiser against the target computed here by hand."""
  config = _step_config(2)
  config.diffusion.prediction_type = prediction_type
  config.train.uncond_prob = 0.0
  batch = _batch(config)
  ((_, metrics),) = _run_step(config, [batch])

  # The step's randomness, reproduced: its key folded with step 0, then split for t and the noise.
  t_key, noise_key, _, _ = jax.random.split(jax.random.fold_in(jax.random.key(7), 0), 4)
  frozen, _ = frozen_lib.load_frozen_models(config)
  vae = nnx.merge(frozen.vae_graphdef, frozen.vae)
  latents = vae_lib.encode_video(vae, batch["frames"])
  latents = conditioning.freeze_background(latents, conditioning.latent_mask(batch["mask"]))
  t = jax.random.randint(t_key, (2,), 0, config.diffusion.num_train_timesteps)
  noise = jax.random.normal(noise_key, latents.shape)
  alpha_bar = np.asarray(schedules.make_schedule(config.diffusion).alphas_cumprod)[np.asarray(t)][:, None, None, None,
                                                                                                 None]
  noisy = np.sqrt(alpha_bar) * latents + np.sqrt(1 - alpha_bar) * noise
  target = {"epsilon": noise, "sample": latents,
            "v_prediction": np.sqrt(alpha_bar) * noise - np.sqrt(1 - alpha_bar) * latents}[prediction_type]
  output = ConvDenoiser(nnx.Rngs(0))(jnp.asarray(noisy, jnp.float32), t, None, None)
  expected = float(np.mean(np.square(np.asarray(output) - np.asarray(target))))
  assert float(metrics["noise"]) == pytest.approx(expected, rel=1e-4)


def test_cpu_fast_compile_options_reach_xla_and_keep_the_result():
  config = common.get_config(2)
  cpu = jax.devices("cpu")[0]
  options = train.compiler_options(config, cpu)
  assert options == {"xla_llvm_disable_expensive_passes": True, "xla_backend_optimization_level": 1}
  config.cpu_fast_compile = False
  assert train.compiler_options(config, cpu) == {}

  def f(x):
    return jnp.tanh(x @ x.T).sum(axis=0) + jnp.exp(-x[:, 0])

  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)), jnp.float32)
  lowered = jax.jit(f).lower(x)
  fast = lowered.compile(options)
  np.testing.assert_allclose(fast(x), lowered.compile()(x), rtol=1e-6)
  with pytest.raises(Exception, match="no_such_xla_option"):  # XLA checks the names it is given
    lowered.compile({"no_such_xla_option": True})
