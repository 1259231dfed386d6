"""Training end to end on demo data: a tiny model, 8 simulated devices, checkpoints, resume, restore."""

import logging
from unittest import mock

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


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  """The demo dataset at the tiny training size, written once (the same for both stages)."""
  return str(demo_clips.write_demo_dataset(tmp_path_factory.mktemp("demo_data"), tiny_train_config()))


@pytest.mark.parametrize("stage", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_train_checkpoints_resumes_and_restores(tmp_path, stage, caplog, capsys, demo_dir, monkeypatch):
  caplog.set_level(logging.INFO)
  config = tiny_train_config(stage=stage, steps=2)
  config.data.dir = demo_dir
  # Evaluation during training (its metrics are tested in test_evaluate.py): the evaluator training is given runs
  # at step 2 with the UNet being trained (eval mode, the train state's weights) and the checkpoint of step 2 on
  # disk; its scalars and images reach the metric writer.
  config.train.eval_every = 2
  evaluated = []

  def evaluator(step, unet, frozen, tokenizer):
    params = jax.tree.leaves(nnx.state(unet, nnx.Param))
    dropouts = [m for _, m in nnx.iter_graph(unet) if isinstance(m, nnx.Dropout)]
    eval_mode = bool(dropouts) and all(d.deterministic for d in dropouts)
    evaluated.append((step, train_state.checkpoint_manager(config, tmp_path).latest_step(), eval_mode, params))
    return {"eval/all/full/hs_err": 0.5}, {"eval/contact_generated": np.zeros((1, 4, 6, 3), np.uint8)}

  writers = []
  create_writer = train.metric_writers.create_default_writer
  monkeypatch.setattr(train.metric_writers, "create_default_writer",
                      lambda *a, **k: writers.append(mock.MagicMock(wraps=create_writer(*a, **k))) or writers[-1])
  state = train.train_and_evaluate(config, str(tmp_path), [evaluator])
  assert int(state.step) == 2
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
  ((step, on_disk, eval_mode, params),) = evaluated
  assert (step, on_disk, eval_mode) == (2, 2, True)
  for a, b in zip(params, jax.tree.leaves(state.params), strict=True):  # the step's weights, not a copy from disk
    assert a is b or np.array_equal(a, b)
  writers[0].write_scalars.assert_any_call(2, {"eval/all/full/hs_err": 0.5})
  ((step, images), _), = writers[0].write_images.call_args_list
  assert step == 2 and list(images) == ["eval/contact_generated"] and images["eval/contact_generated"].shape == (
      1, 4, 6, 3)
  config.train.eval_every = 0
  first_params = jax.device_get(state.params)
  leaves = jax.tree.leaves(first_params)
  assert all(np.isfinite(x).all() for x in leaves)

  # The console's closing line; every checkpoint records the size trained at.
  last_loss = [c.args[1]["loss"] for c in writers[0].write_scalars.call_args_list if "loss" in c.args[1]][-1]
  assert f"stage {stage}: trained to step 2, loss {last_loss:.4f}; checkpoint {tmp_path / 'checkpoints' / '2'}" in (
      capsys.readouterr().out)
  manager = train_state.checkpoint_manager(config, tmp_path)
  assert [train_state.recorded_training_size(manager, step) for step in (1, 2)] == [
      train_state.TrainingSize(height=32, width=32, num_frames=3)] * 2

  # Resume: two more steps continue from step 2 and its input position, not from scratch. The console says so,
  # and not that the UNet was randomly initialised (its weights come from the checkpoint).
  config.train.num_steps = 4
  caplog.clear()
  resumed = train.train_and_evaluate(config, str(tmp_path))
  console = capsys.readouterr().out
  assert f"stage {stage}: resumed from step 2 ({tmp_path / 'checkpoints' / '2'})" in console
  assert f"stage {stage}: trained to step 4, loss " in console
  assert "randomly initialised from config.model.unet" not in caplog.text
  assert int(resumed.step) == 4
  assert (tmp_path / "checkpoints" / "4").is_dir()
  changed = [not np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(jax.device_get(resumed.params)),
                                                      strict=True)]
  assert any(changed)
  assert "resumed from step 2 (input position 2)" in caplog.text
  # 2 + 2 resumed steps equal 4 uninterrupted ones: the optimizer state and the data position came back.
  config_straight = tiny_train_config(stage=stage, steps=4)
  config_straight.data.dir = demo_dir
  config_straight.train.update(checkpoint_every=3, keep_checkpoints=5)
  straight = train.train_and_evaluate(config_straight, str(tmp_path / "straight"))
  # Saved: the multiples of checkpoint_every and the last step; not the first step (orbax's own rule).
  assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == ["3", "4"]
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.params)), jax.tree.leaves(jax.device_get(resumed.params)),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

  # Run again when already finished (a second `make demo`): the checkpoint's state, and no model initialised.
  for module, name in ((train_state, "create_train_state"), (frozen_lib, "load_frozen_models")):
    monkeypatch.setattr(module, name, lambda *args, name=name, **kw: pytest.fail(f"{name} with nothing to train"))
  again = train.train_and_evaluate(config, str(tmp_path))
  assert int(again.step) == 4 and "nothing to train" in caplog.text
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The checkpointed UNet loads for generation and export with exactly the trained parameters.
  unet = unet_lib.restore_unet(config, str(tmp_path))
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(unet)))  # dropout streams too: no shapes
  restored = nnx.state(unet, nnx.Param)
  assert not jax.tree.leaves(resumed.frozen_params)  # trainable = "all"
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(jax.device_get(resumed.params)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
