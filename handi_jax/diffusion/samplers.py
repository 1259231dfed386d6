"""DPM-Solver++ (multistep, orders 1-2, midpoint) and DDIM with diffusers' semantics, in one compiled loop.

`make_plan` turns the settings (config.sampling + config.diffusion, optionally overridden by a diffusers
`scheduler_config.json`) into per-step tables on the host: the timestep grid exactly as diffusers'
`set_timesteps` builds it (linspace / leading + steps_offset / trailing), the final sigma, the step orders
(first step first-order, `lower_order_final`, a first-order last step when the final sigma is zero) and the
update coefficients, all computed in float32 in diffusers' order. `sample` then runs every step in one
`lax.scan`, so the model function is traced once per call and the loop compiles once per shape.

Differences from diffusers kept on purpose: the latents stay float32 between steps whatever the model's
compute dtype (diffusers casts back after each step). Unsupported options (thresholding, Karras/exponential
sigmas, Heun, SDE or third-order DPM) are rejected with an error rather than ignored.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from handi_jax import fileio
from handi_jax.diffusion import schedules

SAMPLERS = ("dpmsolver++", "ddim")
SPACINGS = ("linspace", "leading", "trailing")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  sampler: str = "dpmsolver++"
  num_inference_steps: int = 25
  timestep_spacing: str = "linspace"
  steps_offset: int = 0
  prediction_type: str = "epsilon"
  # DPM-Solver++
  solver_order: int = 2
  lower_order_final: bool = True
  euler_at_final: bool = False
  final_sigmas_type: str = "sigma_min"
  lambda_min_clipped: float = -float("inf")
  # DDIM
  eta: float = 0.0
  clip_sample: bool = False
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool = False

  def __post_init__(self):
    if self.sampler not in SAMPLERS:
      raise ValueError(f"sampler {self.sampler!r} is not supported; expected one of {SAMPLERS}")
    if self.timestep_spacing not in SPACINGS:
      raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not supported; expected one of {SPACINGS}")
    if self.solver_order not in (1, 2):
      raise ValueError(f"solver_order must be 1 or 2 (DPM-Solver++ 2M), got {self.solver_order}")
    if self.final_sigmas_type not in ("sigma_min", "zero"):
      raise ValueError(f"final_sigmas_type must be 'sigma_min' or 'zero', got {self.final_sigmas_type!r}")
    if self.num_inference_steps < 1:
      raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
    if self.prediction_type not in schedules.PREDICTION_TYPES:
      raise ValueError(f"prediction_type {self.prediction_type!r} is not supported; "
                       f"expected one of {schedules.PREDICTION_TYPES}")


# scheduler_config.json keys read into the settings / the diffusion config, and values that must hold there.
_SETTING_KEYS = ("timestep_spacing", "steps_offset", "prediction_type", "solver_order", "lower_order_final",
                 "euler_at_final", "final_sigmas_type", "lambda_min_clipped", "clip_sample", "clip_sample_range",
                 "set_alpha_to_one")
_DIFFUSION_KEYS = {"num_train_timesteps": "num_train_timesteps", "beta_schedule": "beta_schedule",
                   "beta_start": "beta_start", "beta_end": "beta_end", "prediction_type": "prediction_type",
                   "rescale_betas_zero_snr": "rescale_zero_terminal_snr"}
_REQUIRED = {"algorithm_type": ("dpmsolver++", "deis"), "solver_type": ("midpoint", "logrho", "bh1", "bh2"),
             "thresholding": (False,), "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,),
             "use_beta_sigmas": (False,), "use_lu_lambdas": (False,), "use_flow_sigmas": (False,),
             "trained_betas": (None,), "variance_type": (None,)}


def read_scheduler_config(path: str | os.PathLike) -> dict:
  """A diffusers scheduler_config.json as a dict; options handi-jax does not implement raise here."""
  path = fileio.as_path(path)
  if not path.is_file():
    raise FileNotFoundError(f"scheduler config {path} not found (expected a diffusers scheduler_config.json)")
  scheduler_config = json.loads(path.read_text())
  for key, allowed in _REQUIRED.items():
    if key in scheduler_config and scheduler_config[key] not in allowed:
      raise ValueError(f"{path}: {key}={scheduler_config[key]!r} is not supported by handi-jax's samplers "
                       f"(supported: {allowed}); edit the file or use a scheduler config without it")
  return scheduler_config


def settings_from_config(config, scheduler_config: Mapping | None = None):
  """(SamplerSettings, diffusion dict) from config.sampling / config.diffusion; keys present in a diffusers
  `scheduler_config` override them, keys it lacks keep the config's values."""
  sampling = dict(config.sampling)
  diffusion = dict(config.diffusion)
  for key, value in (scheduler_config or {}).items():
    if key in _SETTING_KEYS:
      sampling[key] = value
    if key in _DIFFUSION_KEYS:
      diffusion[_DIFFUSION_KEYS[key]] = value
  sampling["prediction_type"] = diffusion["prediction_type"]
  fields = {f.name for f in dataclasses.fields(SamplerSettings)}
  return SamplerSettings(**{k: v for k, v in sampling.items() if k in fields}), diffusion


@flax.struct.dataclass
class SamplerPlan:
  """Per-step tables (leading axis = step) of one sampling run; `sample` scans over them."""

  timesteps: jax.Array          # (N,) int32, the model's timestep at each step
  signal: jax.Array             # (N,) alpha_t of the current step: x0 = (x - noise * eps) / signal
  noise: jax.Array              # (N,) sigma_t of the current step
  coefficients: dict            # sampler-specific (N,) float32 tables
  sampler: str = flax.struct.field(pytree_node=False)
  prediction_type: str = flax.struct.field(pytree_node=False)
  clip_range: float = flax.struct.field(pytree_node=False)   # DDIM x0 clipping; 0 = off
  stochastic: bool = flax.struct.field(pytree_node=False)    # DDIM with eta > 0: each step adds noise

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]


def dpm_timesteps(settings: SamplerSettings, alphas_cumprod: np.ndarray) -> np.ndarray:
  """DPMSolverMultistepScheduler.set_timesteps' grid, e.g. [999, 959, ..., 40] for 25 linspace steps."""
  steps, train_steps = settings.num_inference_steps, alphas_cumprod.shape[0]
  lambdas = np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(np.float32(1) - alphas_cumprod))
  clipped = int(np.searchsorted(lambdas[::-1], settings.lambda_min_clipped))
  last = train_steps - clipped
  if settings.timestep_spacing == "linspace":
    return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
  if settings.timestep_spacing == "leading":
    ratio = last // (steps + 1)
    return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + settings.steps_offset
  return np.arange(last, 0, -train_steps / steps).round().astype(np.int64) - 1


def ddim_timesteps(settings: SamplerSettings, train_steps: int) -> np.ndarray:
  """DDIMScheduler.set_timesteps' grid, e.g. [961, 921, ..., 1] for 25 leading steps with offset 1."""
  steps = settings.num_inference_steps
  if settings.timestep_spacing == "linspace":
    return np.linspace(0, train_steps - 1, steps).round()[::-1].astype(np.int64)
  if settings.timestep_spacing == "leading":
    return (np.arange(0, steps) * (train_steps // steps)).round()[::-1].astype(np.int64) + settings.steps_offset
  return np.round(np.arange(train_steps, 0, -train_steps / steps)).astype(np.int64) - 1


def _dpm_plan(settings: SamplerSettings, alphas_cumprod: np.ndarray) -> SamplerPlan:
  alphas_cumprod = alphas_cumprod.copy()
  if alphas_cumprod[-1] == 0:  # zero terminal SNR: diffusers keeps the first sigma finite this way
    alphas_cumprod[-1] = np.float32(2.0**-24)
  timesteps = dpm_timesteps(settings, alphas_cumprod)
  table = ((1 - alphas_cumprod) / alphas_cumprod) ** np.float32(0.5)
  sigma_last = table[0] if settings.final_sigmas_type == "sigma_min" else np.float32(0)
  sigmas = np.concatenate([np.interp(timesteps, np.arange(len(table)), table), [sigma_last]]).astype(np.float32)
  alpha = np.float32(1) / (sigmas**2 + np.float32(1)) ** np.float32(0.5)
  sigma = sigmas * alpha
  with np.errstate(divide="ignore"):
    lambdas = np.log(alpha) - np.log(sigma)
  steps = len(timesteps)
  h = lambdas[1:] - lambdas[:-1]
  orders = np.full(steps, settings.solver_order)
  orders[0] = 1
  last_first_order = settings.euler_at_final or (settings.lower_order_final and steps < 15) or (
      settings.final_sigmas_type == "zero")
  if last_first_order:
    orders[-1] = 1
  inv_r0 = np.zeros(steps, np.float32)
  second = np.nonzero(orders == 2)[0]
  inv_r0[second] = np.float32(1) / ((lambdas[second] - lambdas[second - 1]) / h[second])
  ratio = sigma[1:] / sigma[:-1]   # 0 at the end when the final sigma is zero
  phi = alpha[1:] * (np.exp(-h) - np.float32(1))
  coefficients = dict(ratio=ratio, phi=phi, half_phi=np.float32(0.5) * phi, inv_r0=inv_r0)
  return SamplerPlan(
      timesteps=jnp.asarray(timesteps, jnp.int32), signal=jnp.asarray(alpha[:-1]), noise=jnp.asarray(sigma[:-1]),
      coefficients={k: jnp.asarray(v, jnp.float32) for k, v in coefficients.items()}, sampler="dpmsolver++",
      prediction_type=settings.prediction_type, clip_range=0.0, stochastic=False)


def _ddim_plan(settings: SamplerSettings, alphas_cumprod: np.ndarray) -> SamplerPlan:
  train_steps = alphas_cumprod.shape[0]
  timesteps = ddim_timesteps(settings, train_steps)
  previous = timesteps - train_steps // settings.num_inference_steps
  final = np.float32(1) if settings.set_alpha_to_one else alphas_cumprod[0]
  alpha_bar = alphas_cumprod[timesteps]
  alpha_bar_prev = np.where(previous >= 0, alphas_cumprod[np.maximum(previous, 0)], final).astype(np.float32)
  beta, beta_prev = np.float32(1) - alpha_bar, np.float32(1) - alpha_bar_prev
  variance = (beta_prev / beta) * (np.float32(1) - alpha_bar / alpha_bar_prev)
  std = np.float32(settings.eta) * variance ** np.float32(0.5)
  coefficients = dict(prev_signal=alpha_bar_prev ** np.float32(0.5),
                      direction=(np.float32(1) - alpha_bar_prev - std**2) ** np.float32(0.5), std=std)
  return SamplerPlan(
      timesteps=jnp.asarray(timesteps, jnp.int32), signal=jnp.asarray(alpha_bar ** np.float32(0.5)),
      noise=jnp.asarray(beta ** np.float32(0.5)),
      coefficients={k: jnp.asarray(v, jnp.float32) for k, v in coefficients.items()}, sampler="ddim",
      prediction_type=settings.prediction_type,
      clip_range=float(settings.clip_sample_range) if settings.clip_sample else 0.0, stochastic=settings.eta > 0)


def make_plan(settings: SamplerSettings, schedule: schedules.Schedule) -> SamplerPlan:
  """The per-step tables for `sample`, computed once on the host."""
  alphas_cumprod = np.asarray(schedule.alphas_cumprod, np.float32)
  if settings.sampler == "dpmsolver++":
    return _dpm_plan(settings, alphas_cumprod)
  return _ddim_plan(settings, alphas_cumprod)


def add_initial_noise(plan: SamplerPlan, x0: jax.Array, noise: jax.Array) -> jax.Array:
  """x0 noised to the first timestep of the grid (the scheduler's add_noise at timesteps[0])."""
  return plan.signal[0] * x0 + plan.noise[0] * noise


def _to_x0_and_eps(plan: SamplerPlan, x, output, signal, noise):
  if plan.prediction_type == "epsilon":
    return (x - noise * output) / signal, output
  if plan.prediction_type == "v_prediction":
    return signal * x - noise * output, signal * output + noise * x
  return output, (x - signal * output) / noise


def _step_noise(key: jax.Array, index, shape, dtype) -> jax.Array:
  """DDIM's noise of step `index` from one key, or from each sample's key of a (B,) key array."""
  if key.ndim == 0:
    return jax.random.normal(jax.random.fold_in(key, index), shape, dtype)
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), shape[1:], dtype))(key)


def sample(model_fn: Callable[[jax.Array, jax.Array], jax.Array], plan: SamplerPlan, x_init: jax.Array,
           key: jax.Array | None = None) -> jax.Array:
  """Run all `plan.num_steps` steps from `x_init` in one lax.scan.

  model_fn(x, t) -> model output shaped like x, with t an int32 scalar (broadcast it to the batch inside).
  `key` is needed (and used) only by DDIM with eta > 0: one key for the batch, or one per sample (a (B,) key array:
  a sample's noise then does not depend on the batch it is in). Returns the final sample.
  """
  x_init = x_init.astype(jnp.float32)
  if plan.stochastic and key is None:
    raise ValueError("DDIM with eta > 0 adds noise at every step: pass a `key` to sample()")

  def step(carry, inputs):
    x, previous_x0 = carry
    index, t, signal, noise, c = inputs
    output = model_fn(x, t).astype(jnp.float32)
    x0, eps = _to_x0_and_eps(plan, x, output, signal, noise)
    if plan.sampler == "dpmsolver++":
      d1 = c["inv_r0"] * (x0 - previous_x0)
      x_next = c["ratio"] * x - c["phi"] * x0 - c["half_phi"] * d1
    else:
      if plan.clip_range:
        x0 = jnp.clip(x0, -plan.clip_range, plan.clip_range)
      x_next = c["prev_signal"] * x0 + c["direction"] * eps
      if plan.stochastic:
        x_next = x_next + c["std"] * _step_noise(key, index, x.shape, x.dtype)
    return (x_next, x0), None

  steps = (jnp.arange(plan.num_steps), plan.timesteps, plan.signal, plan.noise, plan.coefficients)
  (x_final, _), _ = jax.lax.scan(step, (x_init, jnp.zeros_like(x_init)), steps)
  return x_final
