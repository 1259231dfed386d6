"""MediaPipe hand detection and the left/right slot layout of the stored keypoints.

Handedness: `mp.solutions.hands` labels hands as if the image were mirrored (a selfie camera); its documentation
says to swap the labels for unmirrored input. Training videos are unmirrored (egocentric), so the hand it calls
'Right' is the person's left hand (checked on ../shared/data/ek_frames/5.png: the knife hand on the right of the
image is labelled 'Left'). The Tasks `HandLandmarker` already reports the person's hand for unmirrored images
('Right' for that knife hand, with the same models), so its labels are used as they are.

Slot rule: slot 0 = left hand, slot 1 = right hand, each hand in the slot of its label. When both hands get the
same label (it happens, e.g. ek_frames/3.png at confidence 0.1), the hand whose wrist is further left in the
image takes slot 0 and the other slot 1: in egocentric views the left hand is on the left.
"""

import dataclasses
import multiprocessing
import pathlib
import sys
import zipfile

import numpy as np

from handi_jax.data.schema import LEFT, NO_HAND, NUM_HANDS, NUM_JOINTS, RIGHT

# MediaPipe label -> the person's hand in an unmirrored video, per API (see the module docstring).
_SOLUTIONS_HAND = {"Right": LEFT, "Left": RIGHT}
_TASKS_HAND = {"Left": LEFT, "Right": RIGHT}


@dataclasses.dataclass(frozen=True)
class DetectorSettings:
  """The detector part of config.data.build."""

  detector: str = "solutions"   # "solutions" (bundled models) or a path to a MediaPipe Tasks .task bundle
  max_num_hands: int = 2
  model_complexity: int = 1
  min_detection_confidence: float = 0.1
  min_tracking_confidence: float = 0.1
  static_image_mode: bool = True

  @classmethod
  def from_config(cls, build_config) -> "DetectorSettings":
    return cls(**{f.name: build_config[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Hand:
  landmarks: np.ndarray  # (21, 2) normalised (x, y) of the detector's input frame
  hand: int              # LEFT or RIGHT: the person's hand as labelled by the detector
  score: float           # handedness confidence


def write_bundled_task_file(path: str | pathlib.Path) -> pathlib.Path:
  """A Tasks `hand_landmarker.task` made of the models bundled with mediapipe 0.10.21 (palm detector + full
  landmark model), for the Tasks API without a download. A .task file is a zip of these two named models."""
  import mediapipe

  modules = pathlib.Path(mediapipe.__file__).parent / "modules"
  path = pathlib.Path(path)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as bundle:
    bundle.write(modules / "palm_detection" / "palm_detection_full.tflite", "hand_detector.tflite")
    bundle.write(modules / "hand_landmark" / "hand_landmark_full.tflite", "hand_landmarks_detector.tflite")
  return path


def block_tensorflow_import() -> None:
  """In a worker process, make `import tensorflow` fail: `import mediapipe` pulls in all of TensorFlow
  (2-3 s, 500 MB per process) only for doc decorators, and falls back cleanly when it is absent."""
  if multiprocessing.parent_process() is not None and "tensorflow" not in sys.modules:
    sys.modules["tensorflow"] = None


class HandDetector:
  """Runs MediaPipe on the RGB frames of one clip at a time."""

  def __init__(self, settings: DetectorSettings):
    self.settings = settings
    self._solution = None
    if settings.detector != "solutions":
      task = pathlib.Path(settings.detector)
      if task.suffix != ".task" or not task.is_file():
        raise FileNotFoundError(f"config.data.build.detector={settings.detector!r}: expected 'solutions' or the "
                                "path of an existing MediaPipe Tasks hand_landmarker .task file")

  def detect_clip(self, frames: np.ndarray, fps: float) -> list[list[Hand]]:
    """Hands per frame for frames (F, H, W, 3) uint8 RGB; in video mode tracking runs across the clip."""
    if self.settings.detector == "solutions":
      return self._detect_solutions(frames)
    return self._detect_tasks(frames, fps)

  def _detect_solutions(self, frames):
    import mediapipe as mp

    s = self.settings
    make = lambda: mp.solutions.hands.Hands(
        static_image_mode=s.static_image_mode, max_num_hands=s.max_num_hands, model_complexity=s.model_complexity,
        min_detection_confidence=s.min_detection_confidence, min_tracking_confidence=s.min_tracking_confidence)
    if not s.static_image_mode:  # tracking state must not leak from one clip into the next
      self._close()
    if self._solution is None:
      self._solution = make()
    hands_per_frame = []
    for frame in frames:
      result = self._solution.process(frame)
      hands = []
      for landmarks, handedness in zip(result.multi_hand_landmarks or [], result.multi_handedness or [],
                                       strict=True):
        label = handedness.classification[0]
        points = np.array([(p.x, p.y) for p in landmarks.landmark], np.float32)
        hands.append(Hand(points, _SOLUTIONS_HAND[label.label], float(label.score)))
      hands_per_frame.append(hands)
    return hands_per_frame

  def _detect_tasks(self, frames, fps):
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    s = self.settings
    mode = vision.RunningMode.IMAGE if s.static_image_mode else vision.RunningMode.VIDEO
    options = vision.HandLandmarkerOptions(
        base_options=BaseOptions(model_asset_path=s.detector), running_mode=mode, num_hands=s.max_num_hands,
        min_hand_detection_confidence=s.min_detection_confidence,
        min_hand_presence_confidence=s.min_detection_confidence, min_tracking_confidence=s.min_tracking_confidence)
    hands_per_frame = []
    with vision.HandLandmarker.create_from_options(options) as landmarker:
      for index, frame in enumerate(frames):
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))
        if mode == vision.RunningMode.IMAGE:
          result = landmarker.detect(image)
        else:  # timestamps must increase; the sampled frames are evenly spaced in the clip
          result = landmarker.detect_for_video(image, int(index * 1000 / max(fps, 1.0)))
        hands = []
        for landmarks, handedness in zip(result.hand_landmarks, result.handedness, strict=True):
          points = np.array([(p.x, p.y) for p in landmarks], np.float32)
          hands.append(Hand(points, _TASKS_HAND[handedness[0].category_name], float(handedness[0].score)))
        hands_per_frame.append(hands)
    return hands_per_frame

  def _close(self):
    if self._solution is not None:
      self._solution.close()
      self._solution = None


def assign_slots(hands: list[Hand]) -> tuple[list[Hand | None], np.ndarray]:
  """Hands of one frame -> [left slot, right slot] (None = empty) and the (2,) handedness codes per slot.

  See the module docstring for the rule; more than two hands cannot occur with max_num_hands <= 2.
  """
  if len(hands) > NUM_HANDS:
    raise ValueError(f"{len(hands)} hands in one frame; at most {NUM_HANDS} fit the slots "
                     "(config.data.build.max_num_hands must be <= 2)")
  slots: list[Hand | None] = [None] * NUM_HANDS
  if len(hands) == 2 and hands[0].hand == hands[1].hand:
    ordered = sorted(hands, key=lambda h: float(h.landmarks[0, 0]))
    slots = [ordered[0], ordered[1]]
  else:
    for hand in hands:
      slots[hand.hand] = hand
  codes = np.array([NO_HAND if h is None else h.hand for h in slots], np.int64)
  return slots, codes


def empty_keypoints(num_frames: int) -> tuple[np.ndarray, np.ndarray]:
  return (np.zeros((num_frames, NUM_HANDS, NUM_JOINTS, 2), np.float32),
          np.zeros((num_frames, NUM_HANDS, NUM_JOINTS), np.uint8))


