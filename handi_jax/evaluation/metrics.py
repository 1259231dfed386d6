"""The paper's evaluation metrics as pure numpy functions (Table 2 / Table 3 of the HANDI paper).

Everything here works on features or keypoints that extractors already produced; distances are computed in
float64, because the Frechet distance subtracts traces of large matrices and float32 loses the small answer.
Scores follow the paper's scale: CLIP_GT and CLIP_Cs are plain cosines (0.95...), CLIP_Tx is x100 (30...),
as in CLIPScore, the paper's reference [92].
"""

import math

import numpy as np

NUM_JOINTS_PER_FRAME = 42  # J of Eq. 2: 21 joints x 2 hands
# A Frechet distance estimated from fewer samples is biased (it falls as samples grow), so below these counts a value
# is not comparable with published ones. FID: the FID authors' recommended minimum sample size (bioinf-jku/TTUR's
# README). FVD: StyleGAN-V's protocol (universome/stylegan-v, metric fvd2048_16f: 2048 clips of 16 frames a side),
# the convention of recent video-generation papers.
FID_MINIMUM_FRAMES = 10_000
FVD_MINIMUM_CLIPS = 2048
FVD_CONVENTION_FRAMES = 16


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of features (N, D) in float64, covariance with N - 1 as pytorch-fid computes it."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"gaussian_stats needs features of shape (N >= 2, D), got {features.shape}: "
                     "evaluate at least two frames or clips")
  return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Square root of a symmetric positive semi-definite matrix; round-off negatives are clipped to 0."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance of two Gaussians: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

  tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2): the right-hand matrix is symmetric PSD, so eigh
  gives a real, stable root even for the singular covariances of fewer samples than dimensions (where
  scipy.linalg.sqrtm returns complex noise and pytorch-fid adds an eps to the diagonal).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
    raise ValueError(f"frechet_distance: shapes disagree: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / "
                     f"{sigma2.shape}; both sides must come from the same extractor")
  root1 = _psd_sqrt(sigma1)
  middle = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  trace_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
  distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
  return float(max(distance, 0.0))


def frechet_distance_of_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID / FVD from two sets of features (N1, D), (N2, D)."""
  return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


# ---------------------------------------------------------------------------------------------------
# Hands: HS-Err (Eq. 2 as a metric) and detection rates.


def hs_err(gen_keypoints, gen_presence, gt_keypoints, gt_presence) -> float:
  """Hand Structure Error of one clip, Eq. 2: (1/L) sum_l (1/J) ||P_l^gen - P_l^gt||_F^2 with J = 42.

  keypoints (L, 2, 21, 2) in [0, 1] of the frame (slot 0 left hand, slot 1 right), presence (L, 2, 21).
  The paper's rule for undetected joints: their coordinates are set to 0 in whichever P_l misses them. A
  joint missing on both sides adds 0; a hand the generated video lacks (or invents) adds the squared
  distance of the other side's joints to the origin, so a video without hands is penalised, as the IVG
  paper intends ("so that D2 will be optimised for such samples as well").
  """
  gen = np.where(np.asarray(gen_presence, bool)[..., None], np.asarray(gen_keypoints, np.float64), 0.0)
  gt = np.where(np.asarray(gt_presence, bool)[..., None], np.asarray(gt_keypoints, np.float64), 0.0)
  if gen.shape != gt.shape or gen.shape[1:] != (2, 21, 2):
    raise ValueError(f"hs_err: keypoints must both be (L, 2, 21, 2), got {gen.shape} and {gt.shape}")
  per_frame = ((gen - gt) ** 2).sum(axis=(1, 2, 3)) / NUM_JOINTS_PER_FRAME
  return float(per_frame.mean())


def hand_detection_rates(gen_presence, gt_presence) -> dict[str, float]:
  """Per clip: `gen_hand_rate`, the share of (frame, hand slot) pairs with a hand in the generated video;
  `gt_hand_rate`, the same in the ground truth; `gt_hands_found`, the share of ground-truth hands whose slot
  also holds a generated hand (NaN when the ground truth has none)."""
  gen = np.asarray(gen_presence, bool).any(axis=-1)
  gt = np.asarray(gt_presence, bool).any(axis=-1)
  found = float((gen & gt).sum() / gt.sum()) if gt.any() else float("nan")
  return dict(gen_hand_rate=float(gen.mean()), gt_hand_rate=float(gt.mean()), gt_hands_found=found)


# ---------------------------------------------------------------------------------------------------
# CLIP scores from embeddings (any scale: they are normalised here).


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_gt(gen_embeddings, gt_embeddings) -> float:
  """CLIP_GT: mean cosine between each generated frame and the ground-truth frame at the same index, (L, D)."""
  return float(np.mean(np.sum(_unit(gen_embeddings) * _unit(gt_embeddings), axis=-1)))


def clip_consecutive(gen_embeddings) -> float:
  """CLIP_Cs: mean cosine between consecutive generated frames (L, D), L >= 2."""
  unit = _unit(gen_embeddings)
  if unit.shape[0] < 2:
    raise ValueError(f"clip_consecutive needs at least 2 frames, got {unit.shape[0]}")
  return float(np.mean(np.sum(unit[1:] * unit[:-1], axis=-1)))


def clip_text(gen_embeddings, text_embedding) -> float:
  """CLIP_Tx: 100 x mean cosine between the generated frames (L, D) and the prompt's embedding (D,)."""
  return float(100.0 * np.mean(_unit(gen_embeddings) @ _unit(text_embedding)))


# ---------------------------------------------------------------------------------------------------
# Motion: where the generated video moves.


def flow_inside_share(flow_magnitude: np.ndarray, mask: np.ndarray) -> float:
  """Share of the total optical-flow magnitude (H, W) that lies inside the (H, W) motion-area mask: 1 when the
  video moves only where the hands act, about the mask's area when motion is spread evenly (NaN if still)."""
  flow = np.asarray(flow_magnitude, np.float64)
  total = flow.sum()
  return float(flow[np.asarray(mask, bool)].sum() / total) if total > 0 else float("nan")


def motion_intensive_subset(mask_areas: dict[str, float], fraction: float) -> list[str]:
  """Clip ids of the top `fraction` largest motion-area masks (at least one clip), the paper's subset; the
  same rule (rounding up, ties by id) as data_prep's motion_intensive.json."""
  if not 0 < fraction <= 1:
    raise ValueError(f"motion-intensive fraction must be in (0, 1], got {fraction}")
  ordered = sorted(mask_areas, key=lambda name: (-mask_areas[name], name))
  return ordered[:max(1, math.ceil(len(ordered) * fraction))]
