"""The metric math of handi_jax.evaluation.metrics against independent formulas and hand-computed answers."""

import numpy as np
import pytest
import scipy.linalg

from handi_jax.evaluation import metrics


def _scipy_frechet(mu1, s1, mu2, s2):
  """pytorch-fid's formula with scipy.linalg.sqrtm (no eps: the covariances here are well conditioned)."""
  root = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root.real))


def test_frechet_distance_equals_the_sqrtm_formula_on_random_gaussians():
  rng = np.random.default_rng(0)
  for dim in (1, 5, 64):
    a, b = rng.standard_normal((400, dim)), 0.7 * rng.standard_normal((400, dim)) @ rng.standard_normal((dim, dim))
    b += 0.3
    ours = metrics.frechet_distance_of_features(a, b)
    theirs = _scipy_frechet(*metrics.gaussian_stats(a), *metrics.gaussian_stats(b))
    assert abs(ours - theirs) <= 1e-6 * abs(theirs), (dim, ours, theirs)


def test_frechet_distance_of_identical_features_is_zero_even_when_singular():
  features = np.random.default_rng(1).standard_normal((10, 32))  # 10 samples < 32 dims: singular covariance
  assert metrics.frechet_distance_of_features(features, features) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_shifted_features_is_the_squared_shift():
  features = np.random.default_rng(2).standard_normal((50, 4))
  assert metrics.frechet_distance_of_features(features, features + [1, 2, 0, 0]) == pytest.approx(5.0, rel=1e-9)


def test_frechet_distance_rejects_mismatched_extractors():
  with pytest.raises(ValueError, match="same extractor"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _hands(frames=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.random((frames, 2, 21, 2)), np.ones((frames, 2, 21), np.uint8)


def test_hs_err_of_identical_keypoints_is_zero():
  keypoints, presence = _hands()
  assert metrics.hs_err(keypoints, presence, keypoints, presence) == 0.0


def test_hs_err_of_shifted_keypoints_is_the_squared_shift():
  keypoints, presence = _hands()
  # every one of the 42 joints moves by (0.03, -0.04): squared norm 0.0025 per joint, / J * 42 joints.
  assert metrics.hs_err(keypoints + [0.03, -0.04], presence, keypoints, presence) == pytest.approx(0.0025)


def test_hs_err_zero_fills_joints_missing_on_one_side():
  gt = np.zeros((2, 2, 21, 2))
  gt[:, 0] = [0.3, 0.4]                      # left hand: every joint at distance 0.5 from the origin
  gt_presence = np.zeros((2, 2, 21), bool)
  gt_presence[:, 0] = True
  gen_presence = np.zeros_like(gt_presence)
  gen_presence[0, 0] = True                  # generated hand found in frame 0 only, exactly right
  gen_presence[1, 1] = True                  # frame 1: an invented right hand at (0.1, 0), none on the left
  gen = gt.copy()
  gen[1, 1] = [0.1, 0.0]
  # frame 0: 0; frame 1: 21 x 0.25 (missing left) + 21 x 0.01 (invented right), / 42 -> 0.13; mean 0.065.
  assert metrics.hs_err(gen, gen_presence, gt, gt_presence) == pytest.approx(0.065)
  rates = metrics.hand_detection_rates(gen_presence, gt_presence)
  assert rates == dict(gen_hand_rate=0.5, gt_hand_rate=0.5, gt_hands_found=0.5)


def test_clip_scores_are_cosine_aggregations():
  gen = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
  gt = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  assert metrics.clip_gt(gen, gt) == pytest.approx((1 + 0.5 ** 0.5 + 1) / 3)
  assert metrics.clip_consecutive(gen) == pytest.approx(0.5 ** 0.5)
  assert metrics.clip_text(gen, np.array([0.0, 3.0])) == pytest.approx(100 * (0 + 0.5 ** 0.5 + 1) / 3)


def test_flow_share_and_motion_intensive_subset():
  flow = np.zeros((4, 4))
  flow[0, 0], flow[3, 3] = 3.0, 1.0
  mask = np.zeros((4, 4), bool)
  mask[:2, :2] = True
  assert metrics.flow_inside_share(flow, mask) == 0.75
  assert np.isnan(metrics.flow_inside_share(np.zeros((4, 4)), mask))
  areas = {f"c{i}": a for i, a in enumerate([0.1, 0.5, 0.3, 0.5, 0.2, 0.05, 0.0, 0.4, 0.2, 0.1, 0.9])}
  assert metrics.motion_intensive_subset(areas, 0.1) == ["c10", "c1"]  # ceil(11 x 0.1) = 2
