"""A clip's dataset record as data preparation and the demo data make it: schema fields (frames and masks as PNG
bytes), drawn from frames and keypoints in the stored geometry; or the reason a clip was rejected."""

import dataclasses

import cv2
import numpy as np

from handi_jax.media import hand_masks


@dataclasses.dataclass(frozen=True)
class Rejection:
  clip_id: str
  video: str
  reason: str
  detail: str


@dataclasses.dataclass
class ClipRecord:
  fields: dict            # schema fields, frames and masks as PNG bytes
  union_mask: np.ndarray  # (H, W) uint8 {0, 255}, for the prior mask
  hands_per_frame: list   # stored hands (any joint present) per sampled frame, for the report


def _png(image: np.ndarray) -> bytes:
  """Lossless, deterministic PNG of an RGB (H, W, 3) or single-channel (H, W) uint8 image."""
  if image.ndim == 3:
    image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
  ok, encoded = cv2.imencode(".png", image)
  if not ok:
    raise RuntimeError(f"PNG encoding failed for an image of shape {image.shape}")
  return encoded.tobytes()


def make_record(*, clip_id: str, caption: str, frames: np.ndarray, keypoints: np.ndarray, presence: np.ndarray,
                handedness: np.ndarray, handedness_score: np.ndarray, frame_indices: np.ndarray, fps: float,
                source_size: tuple[int, int], num_source_frames: int, mask_rule: str) -> ClipRecord:
  """A record from frames (F, H, W, 3) uint8 RGB in the stored geometry and keypoints in that geometry.

  The masks are drawn here from the stored keypoints, so they are aligned with the stored frames by construction.
  """
  num_frames, height, width, _ = frames.shape
  frame_masks, union = hand_masks.clip_masks(keypoints, presence, height, width, mask_rule)
  fields = dict(
      frames=[_png(f) for f in frames], frame_masks=[_png(m) for m in frame_masks], union_mask=_png(union),
      keypoints=keypoints.astype(np.float32), presence=presence.astype(np.uint8),
      handedness=handedness.astype(np.int64), handedness_score=handedness_score.astype(np.float32),
      mask_area=np.float32(hand_masks.area_fraction(union)), caption=caption, clip_id=clip_id,
      frame_indices=np.asarray(frame_indices, np.int64), fps=np.float32(fps),
      source_height=np.int64(source_size[0]), source_width=np.int64(source_size[1]),
      num_source_frames=np.int64(num_source_frames))
  # Hands with a joint in the stored crop: a detection that lies wholly outside it keeps its handedness but is
  # not in the stored keypoints or masks, so it does not count for the report's hand-detection rate.
  hands_per_frame = [int(n) for n in presence.astype(bool).any(axis=-1).sum(axis=1)]
  return ClipRecord(fields, union, hands_per_frame)
