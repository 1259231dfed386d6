"""Video decoding, even frame sampling, and the resize + centre-crop geometry shared by frames and keypoints."""

import dataclasses
import math
import pathlib
from collections.abc import Iterator

import cv2
import numpy as np

from handi_jax import fileio


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
  frame_indices: np.ndarray  # (F,) int64, counted from the clip's first frame (the segment's, for a segment)
  fps: float
  num_source_frames: int     # frames of the clip (of the segment)


# Frame timestamps come from the container's time base (e.g. 1/10240 s) through floats: 2000 ms can read as
# 1999.9999999999998. A frame is in a segment when its timestamp lies in [start, end) to within this.
TIME_TOLERANCE_MS = 1e-3


@dataclasses.dataclass(frozen=True)
class Segment:
  """[start, end) in seconds of a longer video: the clip is the frames whose timestamps lie in it, as a cutting
  tool (ffmpeg -ss start -to end) would keep them."""

  start: float
  end: float

  def __str__(self) -> str:
    return f"[{self.start:g} s, {self.end:g} s)"

  def check(self) -> None:
    if not (math.isfinite(self.start) and math.isfinite(self.end)) or self.start < 0:
      raise ClipRejected("bad_segment", f"segment {self} does not lie on a video's timeline")
    if self.end <= self.start:
      raise ClipRejected("bad_segment", f"segment {self} is {'empty' if self.end == self.start else 'reversed'}: "
                         "its end must come after its start")

  def position(self, ms: float) -> int:
    """-1 before the segment, 0 in it, 1 at or after its end."""
    if ms < self.start * 1000 - TIME_TOLERANCE_MS:
      return -1
    return 0 if ms < self.end * 1000 - TIME_TOLERANCE_MS else 1

  def frame_count(self, fps: float) -> int:
    """Frames in the segment at a constant `fps` (a prediction: the timestamps decide)."""
    first, stop = (math.ceil((t * 1000 - TIME_TOLERANCE_MS) * fps / 1000) for t in (self.start, self.end))
    return max(0, stop - first)


def _retrieve_rgb(capture: cv2.VideoCapture) -> np.ndarray | None:
  """The frame of the last grab() as RGB, or None when it cannot be decoded."""
  ok, bgr = capture.retrieve()
  return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if ok else None


def _timestamp(capture: cv2.VideoCapture) -> float:
  """Milliseconds from the stream's start to the frame of the last grab()."""
  return float(capture.get(cv2.CAP_PROP_POS_MSEC) or 0.0)


def _grab_frames(capture: cv2.VideoCapture, start_ms: float, period_ms: float, duration_ms: float
                 ) -> Iterator[float]:
  """grab() from a frame before `start_ms` (the last one before it, where the frame rate holds) to the end of the
  file; yields each frame's timestamp.

  OpenCV seeks to the keyframe before its target and decodes forward from there, so reaching a segment costs a
  keyframe interval, not the video up to it. It finds the target by the frame rate; where the first frame's
  timestamp says it landed at or past the start, or it found no frame before the container's `duration_ms`
  (timestamps off the frame rate's grid), it seeks further back, at worst to the first frame."""
  margin = period_ms
  while (target := start_ms - margin) > 0:
    capture.set(cv2.CAP_PROP_POS_MSEC, target)
    if not capture.grab():
      if target >= duration_ms:  # past the end of the file
        return
    elif _timestamp(capture) < start_ms - TIME_TOLERANCE_MS:
      break
    margin *= 4
  else:
    capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
    if not capture.grab():
      return
  yield _timestamp(capture)
  while capture.grab():
    yield _timestamp(capture)


@dataclasses.dataclass(frozen=True)
class _Decoded:
  frames: dict[int, np.ndarray | None]  # the kept frames (None: grabbed but not decodable), by index in the clip
  count: int                            # frames of the clip
  last_ms: float                        # timestamp of the clip's last frame
  video_end_ms: float                   # where the last frame grabbed ends (segments: to see if the video ends first)
  reached_segment_end: bool             # a frame at or past the segment's end was grabbed


def _decode(capture: cv2.VideoCapture, keep: set[int], segment: Segment | None, fps: float) -> _Decoded:
  """Grab every frame of the clip (the whole file, or the segment) once, retrieving those at the indices `keep`."""
  period_ms = 1000 / fps if fps > 0 else 0.0
  if segment is None:
    timestamps = iter(lambda: _timestamp(capture) if capture.grab() else None, None)
  else:
    listed = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    duration_ms = listed * period_ms if listed > 0 else math.inf
    timestamps = _grab_frames(capture, segment.start * 1000, period_ms, duration_ms)
  frames, count, last_ms, seen_ms = {}, 0, 0.0, -period_ms
  for ms in timestamps:
    seen_ms = ms
    where = 0 if segment is None else segment.position(ms)
    if where > 0:
      return _Decoded(frames, count, last_ms, seen_ms + period_ms, reached_segment_end=True)
    if where == 0:
      if count in keep:
        frames[count] = _retrieve_rgb(capture)
      count += 1
      last_ms = ms
  return _Decoded(frames, count, last_ms, seen_ms + period_ms, reached_segment_end=False)


def _decode_again(local: pathlib.Path, path: fileio.Path, wanted: np.ndarray, segment: Segment | None, fps: float
                  ) -> dict[int, np.ndarray | None]:
  """The frames at `wanted` from a second pass, for a clip whose decoded count differs from the predicted one."""
  capture = cv2.VideoCapture(str(local))
  try:
    frames = _decode(capture, set(wanted.tolist()), segment, fps).frames
  finally:
    capture.release()
  for index in wanted:
    if int(index) not in frames:
      raise ClipRejected("corrupt_video", f"{path}: frame {index} decoded on the first pass but not the second")
  return frames


def _check_segment_inside(path: fileio.Path, segment: Segment, decoded: _Decoded, fps: float) -> None:
  """A segment must lie in the video, to within a frame at its end (annotations round their times)."""
  if decoded.reached_segment_end:
    return
  if segment.end * 1000 > decoded.video_end_ms + 1000 / fps + TIME_TOLERANCE_MS:
    video_end = f"at {decoded.video_end_ms / 1000:g} s" if decoded.video_end_ms > 0 else "before it"
    raise ClipRejected("segment_outside_video", f"segment {segment} is not inside {path}, which ends {video_end}")


def read_sampled_frames(path: str | pathlib.Path, num_frames: int, segment: Segment | None = None) -> SampledClip:
  """Decode a video, or a segment of it, and keep `num_frames` evenly sampled RGB frames; raises ClipRejected for
  bad clips.

  Every frame of the clip is decoded once (grab()): the count decides the sampling and finds truncated files,
  since the container's count can be off. The samples are kept on that same pass at the positions the predicted
  count gives (the container's, or the segment's length times the frame rate), which is exact for MP4/MOV at a
  constant rate; only a clip whose decoded count differs is decoded a second time. A segment is reached by
  seeking, so only the keyframe interval before it is decoded besides the segment itself; its frames are those of
  the segment cut into a file of its own.

  A remote video (gs://..., handi_jax.fileio) is first copied to a local temporary file, since OpenCV reads
  local files only: a segment of a long recording in a bucket costs the download of the whole recording.
  """
  path = fileio.as_path(path)
  if segment is not None:
    segment.check()
  if not path.is_file():
    raise ClipRejected("missing_file", f"{path} does not exist")
  with fileio.local_copy(path) as local:
    return _sampled_frames(path, local, num_frames, segment)


def _sampled_frames(path: fileio.Path, local: pathlib.Path, num_frames: int, segment: Segment | None
                    ) -> SampledClip:
  """read_sampled_frames' decoding of `local`, the file of `path` (which the errors name)."""
  if local.stat().st_size == 0 or not _looks_like_video(local):
    raise ClipRejected("not_a_video", f"{path} has no known video container signature")
  capture = cv2.VideoCapture(str(local))
  try:
    if not capture.isOpened():
      raise ClipRejected("corrupt_video", f"OpenCV/FFmpeg cannot open {path} (truncated or damaged file)")
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    if segment is not None and fps <= 0:
      raise ClipRejected("corrupt_video", f"{path} gives no frame rate, so segment {segment} cannot be found in it")
    listed = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if segment is None else segment.frame_count(fps)
    expected = set(sample_indices(listed, num_frames).tolist()) if listed > 0 else set()
    decoded = _decode(capture, expected, segment, fps)
  finally:
    capture.release()
  where = str(path) if segment is None else f"segment {segment} of {path}"
  if segment is not None:
    _check_segment_inside(path, segment, decoded, fps)
  elif decoded.count == 0:
    raise ClipRejected("corrupt_video", f"{path} opened but no frame could be decoded")
  # A file cut short with its index (the mp4 moov atom) at the front opens and decodes up to the cut.
  elif missing_frames(decoded.count, listed, fps, decoded.last_ms):
    raise ClipRejected("corrupt_video", f"{path}: only {decoded.count} of the {listed} frames its container lists "
                       "could be decoded (truncated or damaged file; re-download or re-encode it)")
  if decoded.count < num_frames:
    raise ClipRejected("too_few_frames", f"{where} has {decoded.count} frames, {num_frames} are needed "
                       "(config.data.num_frames)")
  wanted = sample_indices(decoded.count, num_frames)
  frames = decoded.frames
  if not all(int(i) in frames for i in wanted):
    frames = _decode_again(local, path, wanted, segment, fps)
  for index in wanted:
    if frames[int(index)] is None:
      raise ClipRejected("corrupt_video", f"{where}: frame {index} cannot be decoded")
  return SampledClip(np.stack([frames[int(i)] for i in wanted]), wanted, fps, decoded.count)


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
