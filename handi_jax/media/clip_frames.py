"""Video decoding, even frame sampling, and the resize + centre-crop geometry shared by frames and keypoints."""

import dataclasses
import math
import pathlib

import cv2
import numpy as np


class ClipRejected(Exception):  # noqa: N818 - a verdict on the clip, not a program error
  """A clip that cannot go into the dataset; `reason` is a short stable code for rejected.jsonl."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


# Leading bytes of the containers people store clips in; a file without one is not a video at all.
_SIGNATURES = ((4, b"ftyp"), (0, b"\x1aE\xdf\xa3"), (0, b"RIFF"), (0, b"GIF8"), (0, b"OggS"), (0, b"\x00\x00\x01\xba"),
               (0, b"FLV"))


def _looks_like_video(path: pathlib.Path) -> bool:
  with open(path, "rb") as f:
    head = f.read(16)
  return any(head[offset:offset + len(magic)] == magic for offset, magic in _SIGNATURES)


# How many frames the decoder may deliver fewer than the container lists before the file counts as damaged:
# MP4/MOV store the exact count, but Matroska/WebM, GIF and unindexed AVI only give duration x frame rate
# (rounded), and a decoder may drop a frame at either end (an edit list, a last frame of zero duration). A
# truncated file loses far more (half the frames for half the bytes); losing under 5 % still spans the clip.
FRAME_COUNT_SLACK = (2, 0.05)  # frames, fraction of the listed count: the larger applies


def missing_frames(decoded: int, listed: int, fps: float, last_ms: float) -> bool:
  """Whether `decoded` frames, the last at `last_ms`, fall short of the `listed` container count (damaged file).

  A count short by more than FRAME_COUNT_SLACK is excused only when the decoded timeline still reaches the
  container's duration (listed / fps): then the count was an estimate (variable frame rate), not a lost tail.
  """
  if listed <= 0:  # the container does not say
    return False
  slack = max(FRAME_COUNT_SLACK[0], math.ceil(FRAME_COUNT_SLACK[1] * listed))
  if decoded >= listed - slack:
    return False
  if fps <= 0 or last_ms <= 0:
    return True
  return (last_ms + 1000 / fps) < (listed - slack) * 1000 / fps


def sample_indices(num_source_frames: int, num_frames: int) -> np.ndarray:
  """`num_frames` indices spread evenly from the first to the last frame (the paper's even sampling)."""
  return np.round(np.linspace(0, num_source_frames - 1, num_frames)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class SampledClip:
  frames: np.ndarray         # (F, H_src, W_src, 3) uint8 RGB
  frame_indices: np.ndarray  # (F,) int64
  fps: float
  num_source_frames: int


def _retrieve_rgb(capture: cv2.VideoCapture) -> np.ndarray | None:
  """The frame of the last grab() as RGB, or None when it cannot be decoded."""
  ok, bgr = capture.retrieve()
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if ok else None


def _decode_again(path: pathlib.Path, wanted: np.ndarray) -> dict[int, np.ndarray | None]:
  """The frames at `wanted` from a second pass, for a clip whose decoded count differs from the container's."""
  capture = cv2.VideoCapture(str(path))
  keep, frames = set(wanted.tolist()), {}
  try:
    for index in range(int(wanted[-1]) + 1):
      if not capture.grab():
        raise ClipRejected("corrupt_video", f"{path}: frame {index} decoded on the first pass but not the second")
      if index in keep:
        frames[index] = _retrieve_rgb(capture)
  finally:
    capture.release()
  return frames


def read_sampled_frames(path: str | pathlib.Path, num_frames: int) -> SampledClip:
  """Decode a video and keep `num_frames` evenly sampled RGB frames; raises ClipRejected for bad clips.

  Every frame is decoded once (grab()): the count decides the sampling and finds truncated files, since the
  container's count can be off. The samples are kept on that same pass at the positions the container's count
  gives, which is exact for MP4/MOV; only a clip whose decoded count differs is decoded a second time.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ClipRejected("missing_file", f"{path} does not exist")
  if path.stat().st_size == 0 or not _looks_like_video(path):
    raise ClipRejected("not_a_video", f"{path} has no known video container signature")
  capture = cv2.VideoCapture(str(path))
  try:
    if not capture.isOpened():
      raise ClipRejected("corrupt_video", f"OpenCV/FFmpeg cannot open {path} (truncated or damaged file)")
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    listed = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    expected = set(sample_indices(listed, num_frames).tolist()) if listed > 0 else set()
    frames, total, last_ms = {}, 0, 0.0
    while capture.grab():
      if total in expected:
        frames[total] = _retrieve_rgb(capture)
      total += 1
      last_ms = float(capture.get(cv2.CAP_PROP_POS_MSEC) or 0.0)
  finally:
    capture.release()
  if total == 0:
    raise ClipRejected("corrupt_video", f"{path} opened but no frame could be decoded")
  # A file cut short with its index (the mp4 moov atom) at the front opens and decodes up to the cut.
  if missing_frames(total, listed, fps, last_ms):
    raise ClipRejected("corrupt_video", f"{path}: only {total} of the {listed} frames its container lists could be "
                       "decoded (truncated or damaged file; re-download or re-encode it)")
  if total < num_frames:
    raise ClipRejected("too_few_frames", f"{path} has {total} frames, {num_frames} are needed "
                       "(config.data.num_frames)")
  wanted = sample_indices(total, num_frames)
  if not all(int(i) in frames for i in wanted):
    frames = _decode_again(path, wanted)
  for index in wanted:
    if frames[int(index)] is None:
      raise ClipRejected("corrupt_video", f"{path}: frame {index} cannot be decoded")
  return SampledClip(np.stack([frames[int(i)] for i in wanted]), wanted, fps, total)


@dataclasses.dataclass(frozen=True)
class CropGeometry:
  """Aspect-preserving resize so the frame covers (height, width), then a centred crop to exactly that."""

  source_height: int
  source_width: int
  height: int
  width: int

  @property
  def resized_size(self) -> tuple[int, int]:
    scale = max(self.height / self.source_height, self.width / self.source_width)
    return (max(self.height, round(self.source_height * scale)), max(self.width, round(self.source_width * scale)))

  @property
  def offset(self) -> tuple[int, int]:
    resized_h, resized_w = self.resized_size
    return ((resized_h - self.height) // 2, (resized_w - self.width) // 2)

  def image(self, image: np.ndarray) -> np.ndarray:
    resized_h, resized_w = self.resized_size
    shrinking = resized_h < self.source_height
    resized = cv2.resize(image, (resized_w, resized_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    top, left = self.offset
    return np.ascontiguousarray(resized[top:top + self.height, left:left + self.width])

  def points(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (x, y) of the source frame -> normalised (x, y) of the crop, and whether each lies inside."""
    resized_h, resized_w = self.resized_size
    top, left = self.offset
    x = (points[..., 0] * resized_w - left) / self.width
    y = (points[..., 1] * resized_h - top) / self.height
    out = np.stack([x, y], axis=-1).astype(np.float32)
    inside = (x >= 0) & (x <= 1) & (y >= 0) & (y <= 1)
    return out, inside
