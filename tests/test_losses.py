"""Stage losses: numbers by hand, L_HR on real frames against MediaPipe, finite differences, and gradients that
reach a tiny UNet through a tiny VAE decoder and the real landmark network inside jax.jit."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import configs.common
from handi_jax import losses
from handi_jax.diffusion import schedules
from handi_jax.hands import landmarks as hl
from handi_jax.models import unet3d
from handi_jax.models import vae as vae_lib
from tests.helpers import keypoints_of, mediapipe_hands, synthetic_hand


@pytest.fixture(scope="module")
def landmark_params():
  return hl.load_hand_landmark_params()


def loss_config(**overrides) -> ml_collections.ConfigDict:
  config = configs.common.get_config(2).loss
  config.update(dict(hand_frame_stride=1, **overrides))
  return config


# ---------------------------------------------------------------------------------------------------
# Numbers by hand.

def test_noise_loss_by_hand():
  eps = jnp.asarray([[1.0, 2.0], [0.0, -1.0]])
  noise = jnp.asarray([[0.0, 0.0], [0.0, 1.0]])
  assert float(losses.noise_loss(eps, noise)) == pytest.approx((1 + 4 + 0 + 4) / 4)


def test_soft_iou_and_masks_by_hand():
  pixels = jnp.asarray([[[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]], [[0.0, 0.5, -0.5], [1.0, 1.0, 1.0]]])
  np.testing.assert_allclose(losses.pixels_to_mask(pixels), [[0.0, 1.0], [0.5, 1.0]])
  masks = jnp.asarray([[1.0, 0.5], [0.0, 0.0]])
  targets = jnp.asarray([[1.0, 1.0], [0.0, 0.0]])
  # intersection 1 + 0.5; union (1 + 1 - 1) + (0.5 + 1 - 0.5) = 2.
  assert float(losses.soft_iou(masks, targets, smooth=0.0)) == pytest.approx(0.75)
  assert float(losses.soft_iou(masks, targets, smooth=1.0)) == pytest.approx(2.5 / 3)
  empty = jnp.zeros((2, 2))
  assert float(losses.soft_iou(empty, empty)) == 1.0  # a hand-less frame predicted hand-less is right
  both = jnp.stack([jnp.stack([masks, empty])])  # (B=1, L=2, 2, 2)
  assert float(losses.soft_miou_loss(both, jnp.stack([jnp.stack([targets, empty])]), smooth=0.0 + 1.0)) == (
      pytest.approx(1 - (2.5 / 3 + 1.0) / 2))


def test_hand_weights_and_reduction_by_hand():
  presence = np.ones((1, 2, 21), np.float32)
  presence[0, 0, 20] = 0   # left: pinky tip missing -> 20 joints count
  presence[0, 1, 0] = 0    # right: wrist missing -> no ROI, the hand does not count
  joints, hands = losses.hand_slot_weights(jnp.asarray(presence))
  np.testing.assert_array_equal(hands, [[1.0, 0.0]])
  assert float(joints.sum()) == 20 and float(joints[0, 0, 20]) == 0
  sums = dict(squared_error=jnp.asarray(0.4), joints=jnp.asarray(20.0), presence_nll=jnp.asarray(3.0),
              presence=jnp.asarray(1.5), hands=jnp.asarray(2.0))
  loss, terms = losses.hand_refinement_from_sums(sums, presence_weight=0.1)
  assert float(terms["hand_mse"]) == pytest.approx(0.02)
  assert float(loss) == pytest.approx(0.02 + 0.1 * 1.5)
  assert float(terms["hand_presence"]) == pytest.approx(0.75)
  empty = {k: jnp.asarray(0.0) for k in sums}
  assert float(losses.hand_refinement_from_sums(empty, 0.0)[0]) == 0.0


# ---------------------------------------------------------------------------------------------------
# L_HR on real frames.

@pytest.fixture(scope="module")
def two_hand_frames(shared_data):
  """EPIC frames 3 and 5 (two hands each): frames in [-1, 1], MediaPipe's landmarks, and its tracked landmarks."""
  frames, first, tracked = [], [], []
  for k in (3, 5):
    image = np.asarray(Image.open(shared_data / "ek_frames" / f"{k}.png").convert("RGB"))
    with mediapipe_hands(static_image_mode=False) as tracker:
      a, b = tracker.process(image), tracker.process(image)
    hands = [keypoints_of(h) for h in a.multi_hand_landmarks]
    again = [keypoints_of(h) for h in b.multi_hand_landmarks]
    assert len(hands) == 2 and len(again) == 2, f"frame {k}: expected two hands"
    frames.append(image.astype(np.float32) / 127.5 - 1.0)
    first.append(np.stack(hands))
    tracked.append(np.stack([min(again, key=lambda t, h=h: np.abs(t - h).sum()) for h in hands]))
  # (B=1, L=2, ...): two generated frames of one clip.
  return np.stack(frames)[None], np.stack(first)[None], np.stack(tracked)[None]


def test_hand_refinement_loss_on_real_frames(landmark_params, two_hand_frames):
  frames, keypoints, tracked = two_hand_frames
  presence = np.ones(keypoints.shape[:-1], np.float32)
  fn = jax.jit(lambda f, k, p: losses.hand_refinement_loss(f, k, p, landmark_params))
  loss, terms = fn(frames, keypoints, presence)
  # MediaPipe's own answer on the ROI from `keypoints` is `tracked`; the JAX path reproduces it within half
  # a pixel, so the RMS joint error can differ from MediaPipe's by at most that much (triangle inequality).
  expected_rms = np.sqrt(np.mean(np.sum((tracked - keypoints) ** 2, axis=-1)))
  half_pixel = 0.5 / min(frames.shape[2:4])
  assert abs(np.sqrt(float(loss)) - expected_rms) < half_pixel, (np.sqrt(float(loss)), expected_rms)
  assert float(terms["hands_counted"]) == 4 and float(terms["hand_presence"]) > 0.5

  # A hand missing in the ground truth does not count, whatever is in the frame.
  presence[0, 0, 1] = 0.0
  loss_3, terms_3 = fn(frames, keypoints, presence)
  assert float(terms_3["hands_counted"]) == 3
  errors = np.sum((tracked - keypoints) ** 2, axis=-1)[0]  # (L, 2, 21)
  expected_3 = (errors.sum() - errors[0, 1].sum()) / (3 * 21)
  assert abs(np.sqrt(float(loss_3)) - np.sqrt(expected_3)) < half_pixel

  # Ground truth 3 % of the width off: the network still finds the hand, so the error is about that shift.
  shifted = keypoints + np.asarray([0.03, 0.0], np.float32)
  loss_shifted, _ = fn(frames, shifted, np.ones_like(presence))
  assert 0.02 < np.sqrt(float(loss_shifted)) < 0.04, np.sqrt(float(loss_shifted))


# ---------------------------------------------------------------------------------------------------
# Finite differences along a random direction in pixel space.

def smooth_direction(shape, seed: int, grid: int = 16) -> np.ndarray:
  """A random direction in pixel space: a grid x grid Gaussian field, bilinearly upsampled to the frames.

  The landmark network is piecewise linear (ReLU6): a per-pixel noise direction crosses so many kinks that
  even a 1e-4 step averages over different linear pieces; a spatially smooth direction crosses few.
  """
  coarse = np.random.default_rng(seed).normal(size=(*shape[:-3], grid, grid, shape[-1])).astype(np.float32)
  return np.asarray(jax.image.resize(coarse, shape, "bilinear"))


def directional_derivatives(loss_fn, x: np.ndarray, directions, step: float) -> list[tuple[float, float]]:
  """Per direction d: (autodiff <grad, d>, central difference (L(x + h d) - L(x - h d)) / 2h), in float32."""
  loss = jax.jit(loss_fn)
  grad = np.asarray(jax.jit(jax.grad(loss_fn))(jnp.asarray(x)), np.float64)
  return [(float(np.vdot(grad, d)), (float(loss(x + step * d)) - float(loss(x - step * d))) / (2 * step))
          for d in directions]


def test_miou_directional_derivative_matches_finite_difference():
  rng = np.random.default_rng(0)
  pixels = rng.uniform(-0.9, 0.9, (1, 3, 16, 16, 3)).astype(np.float32)  # inside (-1, 1): off the clip's kinks
  targets = jnp.asarray(rng.uniform(size=(1, 3, 16, 16)) > 0.6, jnp.float32)
  loss_fn = lambda p: losses.soft_miou_loss(losses.pixels_to_mask(p), targets)
  direction = rng.normal(size=pixels.shape).astype(np.float32)
  ((autodiff, numeric),) = directional_derivatives(loss_fn, pixels, [direction], step=1e-3)
  assert autodiff != 0.0 and numeric == pytest.approx(autodiff, rel=0.05), (autodiff, numeric)


def test_hand_loss_directional_derivative_matches_finite_difference(landmark_params, two_hand_frames):
  frames, keypoints, _ = two_hand_frames
  keypoints = keypoints + np.asarray([0.02, 0.01], np.float32)  # off the optimum, where the gradient is 0
  presence = np.ones(keypoints.shape[:-1], np.float32)
  loss_fn = lambda f: losses.hand_refinement_loss(f, keypoints, presence, landmark_params)[0]
  directions = [smooth_direction(frames.shape, seed) for seed in (0, 1)]
  for autodiff, numeric in directional_derivatives(loss_fn, frames, directions, step=3e-5):
    assert autodiff != 0.0 and numeric == pytest.approx(autodiff, rel=0.05), (autodiff, numeric)


# ---------------------------------------------------------------------------------------------------
# Gradients into the denoiser through a tiny VAE decoder, in jit: a one-conv stand-in (fast) and the tiny
# UNet (slow: its compilation takes minutes on a shared 2-core machine).

TINY_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8,
                 cross_attention_dim=16, norm_num_groups=4, norm_eps=1e-5, transformer_in_heads=2, mask_channels=1,
                 motion_strength=True, sample_size=4)
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                norm_num_groups=4, scaling_factor=0.18215, sample_size=16)


class ConvDenoiser(nnx.Module):
  """The UNet's call signature over one 3 x 3 conv per frame: enough to carry gradients to parameters."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(4, 4, (3, 3), rngs=rngs)

  def __call__(self, sample, timesteps, encoder_hidden_states, condition_latent, mask=None):
    return self.conv(sample.reshape(-1, *sample.shape[2:])).reshape(sample.shape)


def _tiny_batch():
  """One clip of 3 frames (context + 2 generated) at 16 x 16 pixels (8 x 8 latents with the 2-block VAE)."""
  rng = np.random.default_rng(0)
  keypoints = np.stack([synthetic_hand(0.3, 0.8, 0.4), synthetic_hand(0.7, 0.8, 0.4)])
  return dict(
      latents=jnp.asarray(rng.normal(size=(1, 3, 8, 8, 4)), jnp.float32),  # stands in for the encoded frames
      keypoints=jnp.asarray(np.broadcast_to(keypoints, (1, 3, 2, 21, 2))),
      presence=jnp.ones((1, 3, 2, 21)),
      target_masks=jnp.asarray(rng.uniform(size=(1, 2, 16, 16)) > 0.5, jnp.float32))


def _grads(stage, model, vae, batch, landmark_params, config, frame_chunk=None):
  """One jitted training-step gradient: noise at t = 700, denoise, Eq. 4, stage loss (decoding in-graph)."""
  schedule = schedules.make_schedule(configs.common.get_config(stage).diffusion)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, batch):
    latents = batch["latents"]
    noise = jax.random.normal(jax.random.key(0), latents.shape)
    t = jnp.asarray([700])
    noisy = schedules.q_sample(schedule, latents, t, noise)
    text = jnp.zeros((1, 77, TINY_UNET["cross_attention_dim"]))
    decode = lambda z: vae_lib.decode_video(vae, z, chunk_size=2)

    def loss_fn(params):
      denoiser = nnx.merge(graphdef, params, rest)
      eps = denoiser(noisy, t, text, latents[:, :1], mask=jnp.ones((1, *latents.shape[2:4], 1)))
      x0 = schedules.predict_x0_from_eps(schedule, noisy, t, eps)
      if stage == 1:
        return losses.stage1_loss(eps, noise, x0, batch, decode, config, frame_chunk)
      return losses.stage2_loss(eps, noise, x0, batch, decode, landmark_params, config, frame_chunk)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, terms), grads = step(params, batch)
  return float(loss), jax.device_get(terms), jax.device_get(grads)


def _flat(grads) -> np.ndarray:
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)])


def _check_pixel_loss_reaches(stage, model, landmark_params):
  vae = vae_lib.AutoencoderKL(TINY_VAE, rngs=nnx.Rngs(1))
  batch = _tiny_batch()
  weight = "alpha_miou" if stage == 1 else "eta_hand"
  loss, terms, grads = _grads(stage, model, vae, batch, landmark_params, loss_config(**{weight: 0.1}), frame_chunk=1)
  _, terms_0, grads_0 = _grads(stage, model, vae, batch, landmark_params, loss_config(**{weight: 0.0}))
  pixel_term = terms["miou_loss"] if stage == 1 else terms["hand_loss"]
  assert loss == pytest.approx(float(terms["noise"]) + 0.1 * float(pixel_term), rel=1e-5)
  assert float(terms_0["noise"]) == pytest.approx(float(terms["noise"]), rel=1e-6)
  g, g0 = _flat(grads), _flat(grads_0)
  assert np.isfinite(g).all() and np.isfinite(g0).all()
  # The pixel loss moves the gradient: eta * dL_HR/dtheta (alpha * dL_mIoU/dtheta) is not zero.
  contribution = np.linalg.norm(g - g0)
  assert contribution > 1e-6 * np.linalg.norm(g0), (contribution, np.linalg.norm(g0))
  if stage == 2:
    assert float(terms["hands_counted"]) == 4  # 2 generated frames x 2 hands
  return contribution / np.linalg.norm(g0)


@pytest.mark.parametrize("stage", [1, 2])
def test_pixel_loss_gradients_reach_the_denoiser(stage, landmark_params):
  _check_pixel_loss_reaches(stage, ConvDenoiser(nnx.Rngs(0)), landmark_params)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_pixel_loss_gradients_reach_the_unet(stage, landmark_params):
  ratio = _check_pixel_loss_reaches(stage, unet3d.UNet3DConditionModel(TINY_UNET, rngs=nnx.Rngs(0)),
                                    landmark_params)
  print(f"stage {stage}: |grad(with pixel loss) - grad(without)| / |grad(without)| = {ratio:.3g}")
