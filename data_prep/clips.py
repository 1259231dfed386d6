"""One clip -> one schema record: sample frames, detect hands, map them into the stored geometry, draw masks.

Everything here runs in worker processes without TensorFlow; frames and masks leave as PNG bytes.
"""

import dataclasses

import cv2
import numpy as np

from handi_jax import fileio
from handi_jax.data.records import ClipRecord, Rejection, make_record
from handi_jax.data.schema import NO_HAND, NUM_HANDS
from handi_jax.media.clip_frames import ClipRejected, CropGeometry, Segment, read_sampled_frames
from handi_jax.media.hand_detection import (
  DetectorSettings,
  HandDetector,
  assign_slots,
  block_tensorflow_import,
  empty_keypoints,
)


@dataclasses.dataclass(frozen=True)
class ClipJob:
  clip_id: str
  video: str
  caption: str
  problem: str = ""  # why its caption-file entry is unusable; such a job is only reported (bad_caption_entry)
  segment: Segment | None = None  # the clip's stretch of a longer video; None: the whole file


@dataclasses.dataclass(frozen=True)
class BuildSettings:
  """What a worker needs from the config (picklable)."""

  num_frames: int
  height: int
  width: int
  mask_rule: str
  keep_handless_clips: bool
  detector: DetectorSettings

  @classmethod
  def from_config(cls, config) -> "BuildSettings":
    data = config.data
    return cls(num_frames=data.num_frames, height=data.height, width=data.width, mask_rule=data.build.mask_rule,
               keep_handless_clips=data.build.keep_handless_clips,
               detector=DetectorSettings.from_config(data.build))


_detectors: dict[DetectorSettings, HandDetector] = {}


def _detector(settings: DetectorSettings) -> HandDetector:
  """One MediaPipe detector per process and settings, made on first use (a failure then rejects the clip
  instead of crashing a pool initializer, which multiprocessing would restart forever)."""
  if settings not in _detectors:
    block_tensorflow_import()
    _detectors[settings] = HandDetector(settings)
  return _detectors[settings]


def process_video(job: ClipJob, settings: BuildSettings) -> ClipRecord | Rejection:
  """Build one clip's record, or say why it cannot be used. Never raises for a bad clip."""
  try:
    return _process_video(job, settings)
  except ClipRejected as e:
    return Rejection(job.clip_id, job.video, e.reason, e.detail)
  except cv2.error as e:
    return Rejection(job.clip_id, job.video, "corrupt_video", f"OpenCV failed: {e}".strip())
  except Exception as e:  # noqa: BLE001 - one broken clip must not stop a long run; it is reported, not hidden
    return Rejection(job.clip_id, job.video, "processing_error", f"{type(e).__name__}: {e}")


def _process_video(job: ClipJob, settings: BuildSettings) -> ClipRecord:
  if job.problem:
    raise ClipRejected("bad_caption_entry", job.problem)
  if not job.caption.strip():
    raise ClipRejected("empty_caption", f"clip {job.clip_id!r} has an empty caption")
  clip = read_sampled_frames(job.video, settings.num_frames, job.segment)
  source_h, source_w = clip.frames.shape[1:3]
  geometry = CropGeometry(source_h, source_w, settings.height, settings.width)
  hands_per_frame = _detector(settings.detector).detect_clip(clip.frames, clip.fps)

  num_frames = settings.num_frames
  keypoints, presence = empty_keypoints(num_frames)
  handedness = np.full((num_frames, NUM_HANDS), NO_HAND, np.int64)
  scores = np.zeros((num_frames, NUM_HANDS), np.float32)
  for f, hands in enumerate(hands_per_frame):
    slots, handedness[f] = assign_slots(hands)
    for s, hand in enumerate(slots):
      if hand is None:
        continue
      points, inside = geometry.points(hand.landmarks)
      keypoints[f, s] = np.where(inside[:, None], points, 0.0)
      presence[f, s] = inside
      scores[f, s] = hand.score
  if not presence.any() and not settings.keep_handless_clips:
    raise ClipRejected("no_hands", f"no hand found in any of the {num_frames} sampled frames of {job.video} "
                       "(keep such clips with --config.data.build.keep_handless_clips=True)")
  frames = np.stack([geometry.image(frame) for frame in clip.frames])
  return make_record(
      clip_id=job.clip_id, caption=job.caption, frames=frames, keypoints=keypoints, presence=presence,
      handedness=handedness, handedness_score=scores, frame_indices=clip.frame_indices, fps=clip.fps,
      source_size=(source_h, source_w), num_source_frames=clip.num_source_frames, mask_rule=settings.mask_rule)


def job_key(job: ClipJob) -> str:
  """What identifies a job's input for the restart fingerprint: id, caption, file name and size (and the segment,
  or the problem of a bad caption entry)."""
  path = fileio.as_path(job.video)
  stat = f"{fileio.size(path)}" if job.video and path.is_file() else "missing"
  key = f"{job.clip_id}\t{job.caption}\t{path.name}\t{stat}"
  if job.segment is not None:
    key += f"\t{job.segment.start!r}\t{job.segment.end!r}"
  return f"{key}\t{job.problem}" if job.problem else key
