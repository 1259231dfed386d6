"""Motion-area masks from hand keypoints, in the pixel grid of the stored frames.

Pixel (row i, column j) of an H x W frame covers normalised coordinates [j/W, (j+1)/W) x [i/H, (i+1)/H); a
keypoint (x, y) in [0, 1] lies at pixel-centre coordinates (x*W - 0.5, y*H - 0.5). Hulls are rasterised with
OpenCV at 1/16-pixel vertex precision.
"""

import cv2
import numpy as np

MASK_RULES = ("per_hand_hull", "joint_hull")
_SHIFT = 4  # fractional bits of the vertex coordinates passed to OpenCV


def _fill_hull(mask: np.ndarray, points: np.ndarray) -> None:
  """Fill the convex hull of normalised (x, y) points into `mask` (uint8, in place) with 255."""
  if len(points) == 0:
    return
  height, width = mask.shape
  pixels = (points * np.array([width, height], np.float64) - 0.5) * (1 << _SHIFT)
  pixels = np.round(pixels).astype(np.int32)
  hull = cv2.convexHull(pixels.reshape(-1, 1, 2))
  cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_8, shift=_SHIFT)


def frame_mask(keypoints: np.ndarray, presence: np.ndarray, height: int, width: int, rule: str) -> np.ndarray:
  """(H, W) uint8 {0, 255} mask of one frame from keypoints (2, 21, 2) in [0, 1] and presence (2, 21).

  per_hand_hull (the paper): union of the filled convex hulls of each hand's present joints.
  joint_hull (the release's mask_video.py): one filled hull around the present joints of both hands.
  """
  if rule not in MASK_RULES:
    raise ValueError(f"mask rule {rule!r} is unknown; expected one of {MASK_RULES} "
                     "(config.data.build.mask_rule)")
  mask = np.zeros((height, width), np.uint8)
  present = presence.astype(bool)
  if rule == "joint_hull":
    _fill_hull(mask, keypoints[present].astype(np.float64))
  else:
    for hand in range(keypoints.shape[0]):
      _fill_hull(mask, keypoints[hand][present[hand]].astype(np.float64))
  return mask


def clip_masks(keypoints: np.ndarray, presence: np.ndarray, height: int, width: int,
               rule: str) -> tuple[np.ndarray, np.ndarray]:
  """Per-frame masks (F, H, W) and their union (H, W), both uint8 {0, 255}."""
  masks = np.stack([frame_mask(k, p, height, width, rule) for k, p in zip(keypoints, presence, strict=True)])
  return masks, np.bitwise_or.reduce(masks, axis=0)


def area_fraction(mask: np.ndarray) -> float:
  return float(np.count_nonzero(mask)) / mask.size
