"""Procedural demo clips with exactly known hand keypoints, written through the same writer as real data.

Each clip: a still textured background and one or two articulated hand-like shapes (palm + five jointed
fingers in MediaPipe's 21-joint order) that move along smooth paths while the fingers curl and open. The
keypoints are the drawn joints, so no detector is needed. Deterministic in config.data.demo.seed.
"""

import functools
import math
import pathlib

import cv2
import numpy as np

from handi_jax.data import writer
from handi_jax.data.records import ClipRecord, make_record
from handi_jax.data.schema import LEFT, NO_HAND, NUM_HANDS, NUM_JOINTS, RIGHT

_SUPERSAMPLE = 4
_FPS = 8.0
_VERBS = ("stir", "slice", "knead", "wipe", "pour", "fold", "peel", "shake", "grate", "mix")
_OBJECTS = ("the soup", "a carrot", "the dough", "the table", "the water", "a towel", "a potato", "the jar",
            "the cheese", "the batter")
# Fingers (thumb, index, middle, ring, pinky): base point (lateral, along) in hand units, direction offset from
# the hand axis (radians), segment lengths. Lateral is mirrored for the left hand.
_FINGERS = (
    ((0.14, 0.10), 0.95, (0.16, 0.13, 0.11)),
    ((0.10, 0.42), 0.12, (0.20, 0.12, 0.10)),
    ((0.02, 0.45), 0.00, (0.22, 0.14, 0.11)),
    ((-0.06, 0.43), -0.12, (0.20, 0.13, 0.10)),
    ((-0.13, 0.38), -0.26, (0.15, 0.10, 0.09)),
)


def hand_keypoints(wrist: np.ndarray, angle: float, size: float, curl: float, hand: int) -> np.ndarray:
  """(21, 2) joints in MediaPipe order for a hand with its wrist at `wrist` (normalised x, y), its fingers
  pointing along `angle` (radians, 0 = up the image), `size` = wrist-to-fingertip length, curl in [0, 1]."""
  side = -1.0 if hand == LEFT else 1.0  # left hand: thumb on the right of the hand axis, as seen from above
  axis = np.array([math.sin(angle), -math.cos(angle)])
  lateral = np.array([math.cos(angle), math.sin(angle)])
  points = [np.asarray(wrist, np.float64)]
  for (across, along), offset, lengths in _FINGERS:
    base = wrist + size * (side * across * lateral + along * axis)
    direction = angle + side * offset
    joint = base
    finger = [base]
    for segment, length in enumerate(lengths):
      # Curling bends each segment further towards the palm (towards the thumb side for the thumb).
      bend = direction - side * curl * 0.55 * (segment + 1) * (1.0 if offset < 0.5 else -0.6)
      joint = joint + size * length * np.array([math.sin(bend), -math.cos(bend)])
      finger.append(joint)
    points.extend(finger)
  return np.array(points, np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A still kitchen-counter-like texture: smooth colour blotches, wood-grain stripes and a board."""
  blotches = cv2.resize(rng.uniform(0, 1, (6, 6, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
  base = np.array(rng.choice([(120, 95, 70), (90, 100, 110), (150, 140, 120)]), np.float32)
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
  grain = 0.5 + 0.5 * np.sin(2 * math.pi * (rng.uniform(6, 12) * y + 0.6 * np.sin(5 * x + rng.uniform(0, 6))))
  image = base * (0.75 + 0.25 * grain[..., None]) + 60 * (blotches - 0.5)
  top, left = (rng.uniform(0.15, 0.5, 2) * size).astype(int)
  board = tuple(int(c) for c in rng.integers(150, 230, 3))
  cv2.rectangle(image, (left, top), (left + size // 3, top + size // 4), board, thickness=-1)
  return np.clip(image, 0, 255).astype(np.uint8)


def _draw_hand(canvas: np.ndarray, points: np.ndarray, colour: tuple, width: int) -> None:
  pixels = np.round(points * canvas.shape[1]).astype(np.int32)
  palm = pixels[[0, 1, 5, 9, 13, 17]]
  cv2.fillConvexPoly(canvas, cv2.convexHull(palm), colour, lineType=cv2.LINE_AA)
  shade = tuple(int(c * 0.85) for c in colour)
  for finger in range(5):  # joints 1-4 thumb, 5-8 index, ..., 17-20 pinky
    chain = pixels[1 + 4 * finger:5 + 4 * finger]
    for a, b in zip(chain[:-1], chain[1:], strict=True):
      cv2.line(canvas, tuple(int(v) for v in a), tuple(int(v) for v in b), shade, width, lineType=cv2.LINE_AA)


def synthesize_clip(index: int, config) -> dict:
  """Frames (F, H, W, 3) uint8 and exact keypoints (F, 2, 21, 2) / presence (F, 2, 21) of demo clip `index`."""
  num_frames, height, width = config.data.num_frames, config.data.height, config.data.width
  rng = np.random.default_rng([config.data.demo.seed, index])
  side = max(height, width) * _SUPERSAMPLE
  background = _background(rng, side)
  hands = (LEFT, RIGHT) if index % 3 == 2 else ((LEFT,) if index % 3 == 0 else (RIGHT,))
  t = np.linspace(0.0, 1.0, num_frames)
  keypoints = np.zeros((num_frames, NUM_HANDS, NUM_JOINTS, 2), np.float32)
  colours = {}
  for hand in hands:
    start = np.array([0.35 if hand == LEFT else 0.65, rng.uniform(0.6, 0.75)])
    amplitude = rng.uniform(0.06, 0.14, 2)
    phase = rng.uniform(0, 2 * math.pi, 2)
    cycles = rng.uniform(0.5, 1.2)
    size = rng.uniform(0.28, 0.36)
    tilt = (0.35 if hand == LEFT else -0.35) + rng.uniform(-0.15, 0.15)
    colours[hand] = tuple(int(c) for c in rng.integers((170, 120, 95), (235, 185, 160)))
    for f, time in enumerate(t):
      wave = np.sin(2 * math.pi * cycles * time + phase)
      wrist = start + amplitude * wave
      curl = 0.5 + 0.5 * math.sin(2 * math.pi * 1.5 * cycles * time + phase[0])
      keypoints[f, hand] = hand_keypoints(wrist, tilt + 0.25 * wave[1], size, curl, hand)
  # A square canvas cropped to the frame size: keypoints are normalised to the stored frame.
  top, left = (side - height * _SUPERSAMPLE) // 2, (side - width * _SUPERSAMPLE) // 2
  frames = []
  for f in range(num_frames):
    canvas = background.copy()
    for hand in hands:
      square = keypoints[f, hand] * np.array([width, height]) * _SUPERSAMPLE + np.array([left, top])
      _draw_hand(canvas, square / side, colours[hand], width=max(2, round(0.035 * side)))
    crop = canvas[top:top + height * _SUPERSAMPLE, left:left + width * _SUPERSAMPLE]
    frames.append(cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA))
  inside = ((keypoints >= 0) & (keypoints <= 1)).all(axis=-1)
  present = np.zeros((num_frames, NUM_HANDS, NUM_JOINTS), bool)
  present[:, list(hands)] = inside[:, list(hands)]
  keypoints = np.where(present[..., None], keypoints, 0.0).astype(np.float32)
  handedness = np.full((num_frames, NUM_HANDS), NO_HAND, np.int64)
  handedness[:, list(hands)] = list(hands)
  hands_text = "both hands" if len(hands) == 2 else ("the left hand" if hands == (LEFT,) else "the right hand")
  caption = f"{_VERBS[index % len(_VERBS)]} {_OBJECTS[(index // 2) % len(_OBJECTS)]} with {hands_text}"
  return dict(frames=np.stack(frames), keypoints=keypoints, presence=present.astype(np.uint8),
              handedness=handedness, handedness_score=(handedness != NO_HAND).astype(np.float32), caption=caption)


def _demo_record(index: int, config) -> ClipRecord:
  clip = synthesize_clip(index, config)
  num_frames, height, width = clip["frames"].shape[:3]
  return make_record(
      clip_id=f"demo-{index:04d}", caption=clip["caption"], frames=clip["frames"], keypoints=clip["keypoints"],
      presence=clip["presence"], handedness=clip["handedness"], handedness_score=clip["handedness_score"],
      frame_indices=np.arange(num_frames), fps=_FPS, source_size=(height, width), num_source_frames=num_frames,
      mask_rule=config.data.build.mask_rule)


def write_demo_dataset(out_dir, config, split: str = "train", progress: bool = False) -> pathlib.Path:
  """Write config.data.demo.num_clips procedural clips as a handi dataset in `out_dir`; returns the folder.

  Reruns with the same config reuse the finished shards (seconds either way)."""
  demo = config.data.demo
  jobs = list(range(demo.num_clips))
  settings_key = (f"demo seed={demo.seed} frames={config.data.num_frames} size={config.data.height}x"
                  f"{config.data.width} mask_rule={config.data.build.mask_rule}")
  summary = writer.write_split(out_dir, split, jobs, functools.partial(_demo_record, config=config), config=config,
                               settings_key=settings_key, job_keys=[f"demo-{i}" for i in jobs], progress=progress)
  return summary.data_dir
