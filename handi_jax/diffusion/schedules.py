"""Noise schedules and the closed-form identities of the forward process, as pure functions.

A schedule is the table of cumulative alphas a_t = prod_{s<=t} (1 - beta_s) (HANDI Eq. 1:
x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps). Betas and the cumulative product are computed in float32 in the
same order as diffusers, so `alphas_cumprod` equals its schedulers' to the last bit or two.

Zero terminal SNR (Lin et al. 2023) is optional and really rescales the cumulative alphas here. The
release's `rescale_schedule: True` is a silent no-op (it reassigns `betas` after `alphas_cumprod` was
built), so it trained on the plain scaled_linear schedule: the default `rescale_zero_terminal_snr=False`
reproduces that.

Timesteps `t` are integer arrays of shape () or (B,); the value tables broadcast over the trailing axes of
the samples (B, ...).
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@flax.struct.dataclass
class Schedule:
  betas: jax.Array            # (T,) float32
  alphas_cumprod: jax.Array   # (T,) float32

  @property
  def num_train_timesteps(self) -> int:
    return self.alphas_cumprod.shape[0]


def make_betas(num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float) -> np.ndarray:
  """(T,) float32 betas for one of BETA_SCHEDULES, as diffusers builds them."""
  if beta_schedule == "linear":
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64).astype(np.float32)
  if beta_schedule == "scaled_linear":  # the release (and every SD-family model): linear in sqrt(beta)
    root = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64).astype(np.float32)
    return root * root
  if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine schedule, betas capped at 0.999

    def alpha_bar(t):
      return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)],
                    dtype=np.float32)
  raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; expected one of {BETA_SCHEDULES}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Betas whose last cumulative alpha is exactly 0 (Lin et al. 2023, Algorithm 1), the first one unchanged."""
  root = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
  first, last = root[0].copy(), root[-1].copy()
  root = (root - last) * (first / (first - last))
  alphas_cumprod = root * root
  alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
  return (1.0 - alphas).astype(np.float32)


def make_schedule(diffusion_config) -> Schedule:
  """The schedule of config.diffusion (num_train_timesteps, beta_schedule, beta_start, beta_end,
  rescale_zero_terminal_snr)."""
  betas = make_betas(int(diffusion_config.num_train_timesteps), diffusion_config.beta_schedule,
                     float(diffusion_config.beta_start), float(diffusion_config.beta_end))
  if diffusion_config.rescale_zero_terminal_snr:
    betas = rescale_zero_terminal_snr(betas)
  alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
  return Schedule(betas=jnp.asarray(betas), alphas_cumprod=jnp.asarray(alphas_cumprod))


def _gather(table: jax.Array, t, like: jax.Array) -> jax.Array:
  """table[t] shaped to broadcast against `like` (B, ...): t is () or (B,)."""
  values = table[jnp.asarray(t, jnp.int32)].astype(like.dtype)
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _signal_noise(schedule: Schedule, t, like: jax.Array) -> tuple[jax.Array, jax.Array]:
  alpha_bar = _gather(schedule.alphas_cumprod, t, like)
  return alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5


def q_sample(schedule: Schedule, x0: jax.Array, t, noise: jax.Array) -> jax.Array:
  """Eq. 1: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (diffusers' DDPMScheduler.add_noise)."""
  signal, sigma = _signal_noise(schedule, t, x0)
  return signal * x0 + sigma * noise


def predict_x0_from_eps(schedule: Schedule, x_t: jax.Array, t, eps: jax.Array) -> jax.Array:
  """Eq. 4, the clean-latent estimate: x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
  signal, sigma = _signal_noise(schedule, t, x_t)
  return (x_t - sigma * eps) / signal


def predict_eps_from_x0(schedule: Schedule, x_t: jax.Array, t, x0: jax.Array) -> jax.Array:
  signal, sigma = _signal_noise(schedule, t, x_t)
  return (x_t - signal * x0) / sigma


def velocity(schedule: Schedule, x0: jax.Array, t, noise: jax.Array) -> jax.Array:
  """The v-prediction target v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (diffusers' get_velocity)."""
  signal, sigma = _signal_noise(schedule, t, x0)
  return signal * noise - sigma * x0


def predict_x0_from_v(schedule: Schedule, x_t: jax.Array, t, v: jax.Array) -> jax.Array:
  signal, sigma = _signal_noise(schedule, t, x_t)
  return signal * x_t - sigma * v


def predict_eps_from_v(schedule: Schedule, x_t: jax.Array, t, v: jax.Array) -> jax.Array:
  signal, sigma = _signal_noise(schedule, t, x_t)
  return signal * v + sigma * x_t


def _check_prediction_type(prediction_type: str) -> None:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}")


def model_output_to_x0(schedule: Schedule, prediction_type: str, x_t: jax.Array, t, output: jax.Array) -> jax.Array:
  """The clean-sample estimate from a model output of the given prediction type."""
  _check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return predict_x0_from_eps(schedule, x_t, t, output)
  if prediction_type == "v_prediction":
    return predict_x0_from_v(schedule, x_t, t, output)
  return output


def model_output_to_eps(schedule: Schedule, prediction_type: str, x_t: jax.Array, t,
                        output: jax.Array) -> jax.Array:
  """The noise estimate from a model output of the given prediction type."""
  _check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return output
  if prediction_type == "v_prediction":
    return predict_eps_from_v(schedule, x_t, t, output)
  return predict_eps_from_x0(schedule, x_t, t, output)


def training_target(schedule: Schedule, prediction_type: str, x0: jax.Array, t, noise: jax.Array) -> jax.Array:
  """What the model regresses onto: the noise, the velocity or the clean sample."""
  _check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return velocity(schedule, x0, t, noise)
  return x0
