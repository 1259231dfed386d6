"""Stage losses: numbers by hand, L_HR on real frames against MediaPipe, finite differences. The real train step
with these losses (gradients into the denoiser, inside jit) is tested in test_train.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from handi_jax import losses
from handi_jax.hands import landmarks as hl
from tests.helpers import keypoints_of, mediapipe_hands


@pytest.fixture(scope="module")
def landmark_params():
  return hl.load_hand_landmark_params()


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
  fn = jax.jit(lambda f, k, p: losses.hand_refinement_from_sums(losses.hand_errors(f, k, p, landmark_params), 0.0))
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
  loss_fn = lambda f: losses.hand_refinement_from_sums(losses.hand_errors(f, keypoints, presence, landmark_params),
                                                       0.0)[0]
  directions = [smooth_direction(frames.shape, seed) for seed in (0, 1)]
  for autodiff, numeric in directional_derivatives(loss_fn, frames, directions, step=3e-5):
    assert autodiff != 0.0 and numeric == pytest.approx(autodiff, rel=0.05), (autodiff, numeric)
