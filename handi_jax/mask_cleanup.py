"""Stage-1 mask clean-up: a decoded motion-area mask video -> one binary motion-area mask (paper Fig. 2e).

Each mask frame is mapped from the VAE's [-1, 1] RGB to a [0, 1] probability (channel mean), thresholded,
and stripped of connected components smaller than `min_component_fraction` of the frame ("denoising"); the
frames are united, and a morphological closing fills holes and gaps narrower than `closing_kernel` pixels.
The release has no such step (it needs a user-supplied mask); the parameters live in config.mask_cleanup.
Runs on the host with OpenCV.
"""

import cv2
import numpy as np


def mask_probability(frames: np.ndarray) -> np.ndarray:
  """(F, H, W, 3) decoded mask frames in about [-1, 1] -> (F, H, W) float32 in [0, 1]."""
  frames = np.asarray(frames, np.float32)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"mask frames must be (F, H, W, 3) in [-1, 1], got shape {frames.shape}")
  return np.clip((frames.mean(axis=-1) + 1.0) / 2.0, 0.0, 1.0)


def remove_small_components(binary: np.ndarray, min_area: int) -> np.ndarray:
  """Drop 8-connected foreground components with fewer than `min_area` pixels from an (H, W) bool mask."""
  count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
  keep = stats[:, cv2.CC_STAT_AREA] >= min_area
  keep[0] = False  # label 0 is the background
  return keep[labels] if count > 1 else np.zeros_like(binary, dtype=bool)


def close(binary: np.ndarray, kernel_size: int) -> np.ndarray:
  """Morphological closing with an elliptical kernel (no-op for kernel_size <= 1)."""
  if kernel_size <= 1:
    return binary.astype(bool)
  kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
  # Pad so the closing sees background beyond the border instead of OpenCV's replicated edge.
  pad = kernel_size
  padded = np.pad(binary.astype(np.uint8), pad)
  closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)
  return closed[pad:-pad, pad:-pad].astype(bool)


def clean_mask_video(frames: np.ndarray, threshold: float, min_component_fraction: float,
                     closing_kernel: int) -> np.ndarray:
  """(F, H, W, 3) mask frames in [-1, 1] (the L generated frames, not the RGB context) -> (H, W) bool mask."""
  probability = mask_probability(frames)
  height, width = probability.shape[1:]
  min_area = int(np.ceil(min_component_fraction * height * width))
  union = np.zeros((height, width), bool)
  for frame in probability:
    union |= remove_small_components(frame >= threshold, min_area)
  return close(union, int(closing_kernel))


def clean_mask_video_from_config(frames: np.ndarray, cleanup_config) -> np.ndarray:
  """clean_mask_video with the parameters of config.mask_cleanup."""
  return clean_mask_video(frames, float(cleanup_config.threshold), float(cleanup_config.min_component_fraction),
                          int(cleanup_config.closing_kernel))
