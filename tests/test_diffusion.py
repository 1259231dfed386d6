"""Schedules and samplers against diffusers 0.42.1 (the PyTorch reference) and numbers computed by hand."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from configs import common
from handi_jax.diffusion import samplers, schedules

RELEASE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _diffusion_config(**overrides):
  values = dict(num_train_timesteps=1000, prediction_type="epsilon", rescale_zero_terminal_snr=False, **RELEASE)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def _model(x, t, lib):
  """A deterministic, nonlinear, timestep-dependent stand-in for the UNet, written for torch and jnp alike."""
  return lib.tanh(0.5 * x + 0.3 * lib.sin(t / 97.0)) * 0.9 + 0.1 * x


def _start(shape=(2, 4, 3, 5)):
  return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _run_diffusers(scheduler, steps, x_init, **step_kwargs):
  scheduler.set_timesteps(steps)
  x = torch.tensor(x_init)
  for i, t in enumerate(scheduler.timesteps):
    kwargs = {k: (v(i) if callable(v) else v) for k, v in step_kwargs.items()}
    x = scheduler.step(_model(x, t.float(), torch), t, x, **kwargs).prev_sample
  return scheduler.timesteps.numpy(), x.numpy()


def _run_jax(settings, diffusion_config, x_init, key=None):
  plan = samplers.make_plan(settings, schedules.make_schedule(diffusion_config))
  final = samplers.sample(lambda x, t: _model(x, t.astype(jnp.float32), jnp), plan, jnp.asarray(x_init), key=key)
  return np.asarray(plan.timesteps), np.asarray(final)


def _assert_roundoff(ours, reference):
  # float32 round-off over 25 steps: a few tens of ulps of the largest value
  np.testing.assert_allclose(ours, reference, rtol=0, atol=5e-6 * np.abs(reference).max())


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("rescale", [False, True])
def test_alphas_cumprod_match_diffusers(beta_schedule, rescale):
  ours = schedules.make_schedule(_diffusion_config(beta_schedule=beta_schedule, rescale_zero_terminal_snr=rescale))
  ref = DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012,
                      rescale_betas_zero_snr=rescale)
  np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=2e-6,
                             atol=2e-6 if rescale else 1e-9)  # rescaled values near 0 carry absolute round-off
  assert ours.alphas_cumprod.dtype == jnp.float32 and ours.alphas_cumprod.shape == (1000,)


def test_release_schedule_values_and_rescale_really_changes_it():
  plain = np.asarray(schedules.make_schedule(_diffusion_config()).alphas_cumprod)
  # reference_spec.md section 2: a_0 = 0.99915, a_250 = 0.6738, a_500 = 0.2763, a_750 = 0.0562, a_999 = 0.004660
  for t, value in [(0, 0.99915), (250, 0.6738), (500, 0.2763), (750, 0.0562), (951, 0.008155), (999, 0.004660)]:
    assert plain[t] == pytest.approx(value, rel=1e-3)
  rescaled = np.asarray(schedules.make_schedule(_diffusion_config(rescale_zero_terminal_snr=True)).alphas_cumprod)
  assert rescaled[-1] == 0.0 and rescaled[0] == pytest.approx(plain[0], rel=1e-6)
  assert np.abs(rescaled - plain).max() > 1e-2


def test_q_sample_matches_ddpm_add_noise():
  schedule = schedules.make_schedule(_diffusion_config())
  rng = np.random.default_rng(1)
  x0, noise = rng.standard_normal((2, 6, 3, 4, 4, 2)).astype(np.float32)
  t = np.array([0, 17, 250, 500, 951, 999])
  ref = DDPMScheduler(**RELEASE).add_noise(torch.tensor(x0), torch.tensor(noise), torch.tensor(t)).numpy()
  ours = schedules.q_sample(schedule, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-6, atol=1e-6)


def test_x0_eps_v_conversions_invert_each_other():
  schedule = schedules.make_schedule(_diffusion_config())
  rng = np.random.default_rng(2)
  x0, noise = (jnp.asarray(a) for a in rng.standard_normal((2, 4, 2, 3, 3, 4)).astype(np.float32))
  t = jnp.array([3, 300, 700, 990])
  x_t = schedules.q_sample(schedule, x0, t, noise)
  # Eq. 4 by hand at t = 300: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)
  a = float(schedule.alphas_cumprod[300])
  np.testing.assert_allclose(schedules.predict_x0_from_eps(schedule, x_t, t, noise)[1],
                             (x_t[1] - np.sqrt(1 - a) * noise[1]) / np.sqrt(a), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(schedules.predict_x0_from_eps(schedule, x_t, t, noise), x0, atol=2e-4)
  np.testing.assert_allclose(schedules.predict_eps_from_x0(schedule, x_t, t, x0), noise, atol=2e-4)
  v = schedules.velocity(schedule, x0, t, noise)
  ref_v = DDPMScheduler(**RELEASE).get_velocity(torch.tensor(np.asarray(x0)), torch.tensor(np.asarray(noise)),
                                                torch.tensor(np.asarray(t))).numpy()
  np.testing.assert_allclose(v, ref_v, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(schedules.predict_x0_from_v(schedule, x_t, t, v), x0, atol=1e-5)
  np.testing.assert_allclose(schedules.predict_eps_from_v(schedule, x_t, t, v), noise, atol=1e-5)
  for kind, target in [("epsilon", noise), ("v_prediction", v), ("sample", x0)]:
    np.testing.assert_allclose(schedules.training_target(schedule, kind, x0, t, noise), target, atol=1e-6)
    np.testing.assert_allclose(schedules.model_output_to_x0(schedule, kind, x_t, t, target), x0, atol=2e-4)
    np.testing.assert_allclose(schedules.model_output_to_eps(schedule, kind, x_t, t, target), noise, atol=2e-4)


def test_timestep_grids_equal_the_release_facts():
  schedule = schedules.make_schedule(_diffusion_config())
  linspace = samplers.make_plan(samplers.SamplerSettings(), schedule)
  assert np.asarray(linspace.timesteps).tolist() == [999, 959, 919, 879, 839, 799, 759, 719, 679, 639, 599, 559,
                                                     519, 480, 440, 400, 360, 320, 280, 240, 200, 160, 120, 80, 40]
  leading = samplers.make_plan(samplers.SamplerSettings(timestep_spacing="leading", steps_offset=1), schedule)
  assert np.asarray(leading.timesteps).tolist() == list(range(951, 38, -38))
  # The release ends at sigma(t=0) = 0.0292: the last step lands on alpha_t = 1 / sqrt(1 + 0.0292^2).
  sigma_min = float(np.sqrt((1 - schedule.alphas_cumprod[0]) / schedule.alphas_cumprod[0]))
  assert sigma_min == pytest.approx(0.0292, abs=1e-4)


SPACINGS = [("linspace", 0), ("leading", 1), ("trailing", 0)]


@pytest.mark.parametrize("spacing,offset", SPACINGS)
@pytest.mark.parametrize("final_sigmas_type", ["sigma_min", "zero"])
def test_dpm_solver_pp_2m_matches_diffusers(spacing, offset, final_sigmas_type):
  x_init = _start()
  ref_t, ref = _run_diffusers(DPMSolverMultistepScheduler(
      **RELEASE, timestep_spacing=spacing, steps_offset=offset, final_sigmas_type=final_sigmas_type), 25, x_init)
  settings = samplers.SamplerSettings(timestep_spacing=spacing, steps_offset=offset,
                                      final_sigmas_type=final_sigmas_type)
  ours_t, ours = _run_jax(settings, _diffusion_config(), x_init)
  np.testing.assert_array_equal(ours_t, ref_t)
  _assert_roundoff(ours, ref)


@pytest.mark.parametrize("steps,order,prediction_type,beta_schedule", [
    (8, 2, "epsilon", "scaled_linear"),        # < 15 steps: lower_order_final
    (25, 1, "epsilon", "scaled_linear"),
    (25, 2, "v_prediction", "squaredcos_cap_v2"),
    (12, 2, "sample", "linear")])
def test_dpm_solver_variants_match_diffusers(steps, order, prediction_type, beta_schedule):
  x_init = _start()
  ref_t, ref = _run_diffusers(DPMSolverMultistepScheduler(
      beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012, solver_order=order,
      prediction_type=prediction_type, final_sigmas_type="sigma_min"), steps, x_init)
  settings = samplers.SamplerSettings(num_inference_steps=steps, solver_order=order, prediction_type=prediction_type)
  ours_t, ours = _run_jax(settings, _diffusion_config(beta_schedule=beta_schedule), x_init)
  np.testing.assert_array_equal(ours_t, ref_t)
  _assert_roundoff(ours, ref)


@pytest.mark.parametrize("spacing,offset", SPACINGS)
def test_ddim_matches_diffusers(spacing, offset):
  x_init = _start()
  ref_t, ref = _run_diffusers(DDIMScheduler(**RELEASE, timestep_spacing=spacing, steps_offset=offset,
                                            clip_sample=False, set_alpha_to_one=False), 25, x_init)
  settings = samplers.SamplerSettings(sampler="ddim", timestep_spacing=spacing, steps_offset=offset)
  ours_t, ours = _run_jax(settings, _diffusion_config(), x_init)
  np.testing.assert_array_equal(ours_t, ref_t)
  _assert_roundoff(ours, ref)


def test_ddim_with_eta_and_clipping_matches_diffusers():
  x_init = _start()
  key = jax.random.key(3)
  noise = [torch.tensor(np.asarray(jax.random.normal(jax.random.fold_in(key, i), x_init.shape)))
           for i in range(10)]
  ref_t, ref = _run_diffusers(DDIMScheduler(**RELEASE, steps_offset=1, clip_sample=True, set_alpha_to_one=True),
                              10, x_init, eta=0.7, variance_noise=lambda i: noise[i])
  settings = samplers.SamplerSettings(sampler="ddim", num_inference_steps=10, timestep_spacing="leading",
                                      steps_offset=1, eta=0.7, clip_sample=True, set_alpha_to_one=True)
  ours_t, ours = _run_jax(settings, _diffusion_config(), x_init, key=key)
  np.testing.assert_array_equal(ours_t, ref_t)
  _assert_roundoff(ours, ref)


def test_sampling_loop_traces_the_model_once():
  traces = []

  def model_fn(x, t):
    traces.append(t.shape)
    return _model(x, t.astype(jnp.float32), jnp)

  run = jax.jit(lambda plan, x: samplers.sample(model_fn, plan, x))
  schedule = schedules.make_schedule(_diffusion_config())
  x = jnp.asarray(_start())
  run(samplers.make_plan(samplers.SamplerSettings(), schedule), x).block_until_ready()
  assert len(traces) == 1
  # Another grid of the same length and another start point reuse the compiled loop.
  run(samplers.make_plan(samplers.SamplerSettings(timestep_spacing="leading", steps_offset=1), schedule), x + 1)
  assert len(traces) == 1
  # Unjitted, the loop still traces the model once (lax.scan), not once per step.
  samplers.sample(model_fn, samplers.make_plan(samplers.SamplerSettings(), schedule), x)
  assert len(traces) == 2


def test_scheduler_config_json_overrides_the_config(tmp_path):
  config = common.get_config(stage=2)
  path = tmp_path / "scheduler_config.json"
  # A checkpoint re-saved by diffusers >= 0.2x: leading spacing with offset 1 (-> 951, 913, ...).
  path.write_text(json.dumps({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                              "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
                              "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading"}))
  settings, diffusion = samplers.settings_from_config(config, samplers.read_scheduler_config(path))
  assert settings.timestep_spacing == "leading" and settings.steps_offset == 1
  plan = samplers.make_plan(settings, schedules.make_schedule(ml_collections.ConfigDict(diffusion)))
  assert np.asarray(plan.timesteps)[:3].tolist() == [951, 913, 875]
  # ModelScope's original file has no timestep_spacing: the config's linspace stays (999, 959, ...).
  path.write_text(json.dumps({"beta_schedule": "scaled_linear", "steps_offset": 1}))
  settings, _ = samplers.settings_from_config(config, samplers.read_scheduler_config(path))
  assert settings.timestep_spacing == "linspace"
  path.write_text(json.dumps({"use_karras_sigmas": True}))
  with pytest.raises(ValueError, match="use_karras_sigmas"):
    samplers.read_scheduler_config(path)


def test_initial_noise_matches_the_schedulers_add_noise():
  x0, noise = (np.random.default_rng(4).standard_normal((2, 3, 4)).astype(np.float32) for _ in range(2))
  schedule = schedules.make_schedule(_diffusion_config())
  ddim = DDIMScheduler(**RELEASE, timestep_spacing="linspace")
  for settings, ref in [(samplers.SamplerSettings(), DPMSolverMultistepScheduler(**RELEASE)),
                        (samplers.SamplerSettings(sampler="ddim"), ddim)]:
    plan = samplers.make_plan(settings, schedule)
    ref.set_timesteps(25)
    expected = ref.add_noise(torch.tensor(x0), torch.tensor(noise), ref.timesteps[:1]).numpy()
    np.testing.assert_allclose(samplers.add_initial_noise(plan, jnp.asarray(x0), jnp.asarray(noise)), expected,
                               rtol=1e-6, atol=1e-6)
