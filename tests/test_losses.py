"""Stage losses: numbers by hand, L_HR on real frames against MediaPipe, finite differences. The real train step
with these losses (gradients into the denoiser, inside jit) is tested in test_train.py."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from handi_jax import losses
from handi_jax.hand_landmarks import network as hl
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
  presence = np.ones((1, 2, 2, 21), np.float32)  # (B = 1, L = 2 frames, 2 hands, 21 joints)
  presence[0, 0, 0, 20] = 0   # frame 0, left: pinky tip missing -> 20 joints count
  presence[0, 0, 1, 0] = 0    # frame 0, right: wrist missing -> no ROI, the hand does not count
  joints, hands = losses.hand_slot_weights(jnp.asarray(presence))
  np.testing.assert_array_equal(hands, [[[1.0, 0.0], [1.0, 1.0]]])
  assert float(joints.sum()) == 20 + 42 and float(joints[0, 0, 0, 20]) == 0
  sums = dict(squared_error=jnp.asarray([[0.4, 0.22]]), presence_nll=jnp.asarray([[1.0, 2.0]]),
              presence=jnp.asarray([[0.5, 1.0]]))
  loss, terms = losses.hand_refinement_from_sums(sums, jnp.asarray(presence), presence_weight=0.1)
  assert float(terms["hand_mse"]) == pytest.approx(0.62 / 62)
  assert float(loss) == pytest.approx(0.62 / 62 + 0.1 * 3.0 / 3)
  assert float(terms["hand_presence"]) == pytest.approx(1.5 / 3) and float(terms["hands_counted"]) == 3
  # Frame 1 alone scored (k = 1 of L = 2): its sums count L / k = 2 times, the counts stay those of both frames.
  loss_1, terms_1 = losses.hand_refinement_from_sums({k: v[:, 1:] for k, v in sums.items()}, jnp.asarray(presence),
                                                     presence_weight=0.1)
  assert float(loss_1) == pytest.approx(2 * 0.22 / 62 + 0.1 * 2 * 2.0 / 3)
  assert float(terms_1["hands_counted"]) == 3
  empty = {k: jnp.zeros((1, 2)) for k in sums}
  assert float(losses.hand_refinement_from_sums(empty, jnp.zeros_like(presence), 0.0)[0]) == 0.0


# ---------------------------------------------------------------------------------------------------
# A random subset of frames: unbiased for the loss over all frames.

def test_random_frames_draws_uniformly_without_replacement():
  clips, frames, count, draws = 3, 4, 2, 4000
  ids = jnp.broadcast_to(jnp.arange(frames), (clips, frames))
  # A second video with trailing axes gets the same frames.
  videos = (ids, 10 * ids[..., None, None] + jnp.zeros((clips, frames, 2, 3), jnp.int32))
  keys = jax.random.split(jax.random.key(0), draws)
  chosen, other = jax.vmap(lambda key: losses.random_frames(key, count, *videos))(keys)
  chosen, other = np.asarray(chosen), np.asarray(other)
  assert chosen.shape == (draws, clips, count) and other.shape == (draws, clips, count, 2, 3)
  np.testing.assert_array_equal(other, np.broadcast_to(10 * chosen[..., None, None], other.shape))
  assert np.all(chosen[..., 0] != chosen[..., 1])  # without replacement
  # Each of the C(4, 2) = 6 subsets with probability 1/6, in every clip (within 5 standard errors).
  subset = np.sort(chosen, axis=-1) @ np.asarray([frames, 1])
  expected = 1 / 6
  tolerance = 5 * np.sqrt(expected * (1 - expected) / draws)
  for code in {a * frames + b for a in range(frames) for b in range(a + 1, frames)}:
    np.testing.assert_allclose(np.mean(subset == code, axis=0), expected, atol=tolerance)
  # Clips draw independently: two clips share a subset with probability 1/6.
  assert abs(np.mean(subset[:, 0] == subset[:, 1]) - expected) < tolerance
  # All frames (0 or >= L) need no key and keep the order; a subset needs one; a negative size is refused.
  for everything in (0, frames, frames + 3):
    np.testing.assert_array_equal(losses.random_frames(None, everything, ids)[0], ids)
  with pytest.raises(ValueError, match="needs a random key"):
    losses.random_frames(None, count, ids)
  with pytest.raises(ValueError, match="must be >= 0"):
    losses.random_frames(keys[0], -1, ids)


def subset_expectation(loss_fn, count: int, clips: int, frames: int, draws: int = 1000):
  """loss_fn(key) -> (loss, terms) over many keys, grouped by the frames each key draws (as `random_frames`).

  Returns (the mean over all C(frames, count)^clips equally likely draws: the exact expectation, the Monte Carlo
  mean, its standard error). Every draw must have come up.
  """
  ids = jnp.broadcast_to(jnp.arange(frames), (clips, frames))
  keys = jax.random.split(jax.random.key(1), draws)
  values, chosen = jax.jit(jax.vmap(lambda key: (loss_fn(key), losses.random_frames(key, count, ids)[0])))(keys)
  chosen = np.sort(np.asarray(chosen), axis=-1)
  first_of_draw = {}
  for i, draw in enumerate(chosen):
    first_of_draw.setdefault(draw.tobytes(), i)
  assert len(first_of_draw) == math.comb(frames, count) ** clips
  rows = list(first_of_draw.values())
  exact = jax.tree.map(lambda v: float(np.mean(np.asarray(v, np.float64)[rows])), values)
  monte_carlo = jax.tree.map(lambda v: float(np.mean(v)), values)
  standard_error = jax.tree.map(lambda v: float(np.std(v) / np.sqrt(draws)), values)
  return exact, monte_carlo, standard_error


def fake_hand_errors(frames, keypoints, presence, landmark_params, remat_landmarks=False):
  """The per-frame sums of `losses.hand_errors` from a stand-in for the landmark network, cheap enough to run for
  thousands of draws: every joint is predicted at the frame's mean colour (R, G), the hand presence score is a
  sigmoid of the mean blue. The reduction (weights, counts, scaling) is the real one."""
  joint_w, hand_w = losses.hand_slot_weights(presence)
  mean = jnp.mean(frames, axis=(2, 3))                                        # (B, L, 3)
  squared = jnp.sum(jnp.square(mean[:, :, None, None, :2] - keypoints), -1)   # (B, L, 2, 21)
  score = jax.nn.sigmoid(mean[:, :, None, 2] + jnp.asarray([0.0, 1.0]))      # (B, L, 2)
  per_frame = lambda x: jnp.sum(x, axis=tuple(range(2, x.ndim)))
  return dict(squared_error=per_frame(squared * joint_w), presence_nll=per_frame(-jnp.log(score) * hand_w),
              presence=per_frame(score * hand_w))


def _loss_config(**overrides):
  defaults = dict(alpha_miou=0.5, eta_hand=0.5, miou_frames=0, hand_frames=0, decode_dtype="float32",
                  remat_decoder=False, remat_landmarks=False, hand_presence_weight=0.3)
  return ml_collections.ConfigDict({**defaults, **overrides})


def test_hand_refinement_subset_estimate_is_unbiased(monkeypatch):
  monkeypatch.setattr(losses, "hand_errors", fake_hand_errors)
  clips, frames = 2, 4  # F = 5: the context frame and L = 4 generated frames
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.normal(size=(clips, frames + 1, 3, 3, 4)), jnp.float32)
  presence = np.ones((clips, frames + 1, 2, 21), np.float32)
  presence[0, 1, 0, [4, 8, 12, 16]] = 0  # absent fingertips: 17 of 21 joints count
  presence[0, 2, 1, 0] = 0       # no wrist: the hand does not count
  presence[1, 3] = 0             # a frame without hands
  presence[1, 4, 0] = 0          # a frame with one hand
  batch = dict(keypoints=jnp.asarray(rng.uniform(size=(clips, frames + 1, 2, 21, 2)), jnp.float32),
               presence=jnp.asarray(presence))
  decode = lambda z: z[..., :3]

  def stage2(count, key):
    return losses.stage2_loss(x0, x0, x0, batch, decode, None, _loss_config(hand_frames=count), frames_key=key)

  full_loss, full_terms = stage2(0, None)
  assert float(full_terms["hands_counted"]) == 2 * 4 * 2 - 1 - 2 - 1
  assert float(stage2(frames, jax.random.key(0))[0]) == pytest.approx(float(full_loss), rel=1e-6)
  # 3 of 4 frames: scale 4 / 3, 4^2 equally likely draws for the two clips.
  (loss, terms), (mc_loss, _), (se, _) = subset_expectation(lambda key: stage2(3, key), 3, clips, frames)
  assert loss == pytest.approx(float(full_loss), rel=1e-5)
  for name in ("hand_mse", "hand_presence_nll", "hand_presence", "hands_counted"):
    assert terms[name] == pytest.approx(float(full_terms[name]), rel=1e-5), name
  assert abs(mc_loss - float(full_loss)) < 4 * se, (mc_loss, float(full_loss), se)


def test_soft_miou_subset_estimate_is_unbiased():
  clips, frames = 2, 4
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.normal(size=(clips, frames + 1, 6, 6, 4)), jnp.float32)
  batch = dict(target_masks=jnp.asarray(rng.uniform(size=(clips, frames, 6, 6)) > 0.5, jnp.float32))
  decode = lambda z: jnp.tanh(z[..., :3])

  def stage1(count, key):
    return losses.stage1_loss(x0, x0, x0, batch, decode, _loss_config(miou_frames=count), frame_chunk=2,
                              frames_key=key)

  full_loss, full_terms = stage1(0, None)
  assert float(stage1(frames, jax.random.key(0))[0]) == pytest.approx(float(full_loss), rel=1e-6)
  # 2 of 4 frames: 6^2 equally likely draws for the two clips.
  (loss, terms), (mc_loss, _), (se, _) = subset_expectation(lambda key: stage1(2, key), 2, clips, frames)
  assert loss == pytest.approx(float(full_loss), rel=1e-5)
  assert terms["miou"] == pytest.approx(float(full_terms["miou"]), rel=1e-5)
  assert abs(mc_loss - float(full_loss)) < 4 * se, (mc_loss, float(full_loss), se)


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
  fn = jax.jit(lambda f, k, p: losses.hand_refinement_from_sums(losses.hand_errors(f, k, p, landmark_params), p, 0.0))
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
                                                       presence, 0.0)[0]
  directions = [smooth_direction(frames.shape, seed) for seed in (0, 1)]
  for autodiff, numeric in directional_derivatives(loss_fn, frames, directions, step=3e-5):
    assert autodiff != 0.0 and numeric == pytest.approx(autodiff, rel=0.05), (autodiff, numeric)
