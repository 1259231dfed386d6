"""Clips per second: data_prep.build against a per-frame script that does what the release's mask_video.py does.

The per-frame side follows reference_spec.md section 6.1: every frame of every video through a MediaPipe Tasks
HandLandmarker (IMAGE mode, 2 hands, confidences 0.1; here built from the models bundled with mediapipe), the
landmark polygon plus one convex hull around all joints per frame, the OR over frames written as a PNG at the
video's resolution, one process per core. data_prep.build samples 16 frames per clip, resizes and crops them to
256 x 256, detects, draws per-frame and union masks and writes TFRecord shards, prior, index and report.

Input: the three clips of ../shared/data/clips (20 frames, 10 fps) as mp4, each listed `--copies` times; with
`--time_loops=N` every clip is also looped N times in time (longer clips, like real training videos).

  .venv/bin/python tests/benchmarks/bench_data_prep.py [--copies=12] [--time_loops=1 8]
"""

import argparse
import json
import multiprocessing
import os
import pathlib
import sys
import tempfile
import time

import cv2
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
CLIPS = REPO_ROOT.parent / "shared" / "data" / "clips"
NAMES = ("31", "36", "816")


def make_videos(root: pathlib.Path, copies: int, time_loops: int) -> pathlib.Path:
  for name in NAMES:
    capture = cv2.VideoCapture(str(CLIPS / f"{name}.gif"))
    frames = []
    while True:
      ok, frame = capture.read()
      if not ok:
        break
      frames.append(frame)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(root / f"{name}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (width, height))
    for _ in range(time_loops):
      for frame in frames:
        writer.write(frame)
    writer.release()
  entries = [dict(video=f"{name}.mp4", caption=f"clip {name} copy {i}") for i in range(copies) for name in NAMES]
  captions = root / "captions.json"
  captions.write_text(json.dumps(entries))
  return captions


def _release_style_mask(job):
  """One video, every frame: Tasks HandLandmarker, landmark polygon + joint hull, OR over frames, PNG."""
  video, task, out_path = job
  from data_prep.hands import block_tensorflow_import

  block_tensorflow_import()
  import mediapipe as mp
  from mediapipe.tasks.python import BaseOptions, vision

  options = vision.HandLandmarkerOptions(
      base_options=BaseOptions(model_asset_path=task), num_hands=2, min_hand_detection_confidence=0.1,
      min_hand_presence_confidence=0.1, min_tracking_confidence=0.1)
  union = None
  with vision.HandLandmarker.create_from_options(options) as landmarker:
    capture = cv2.VideoCapture(video)
    while True:
      ok, bgr = capture.read()
      if not ok:
        break
      height, width = bgr.shape[:2]
      rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
      result = landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb))
      mask = np.zeros((height, width), np.uint8)
      joints = []
      for hand in result.hand_landmarks:
        points = np.array([(int(p.x * width), int(p.y * height)) for p in hand], np.int32)
        cv2.fillPoly(mask, [points], 255)
        joints.append(points)
      if joints:
        cv2.fillConvexPoly(mask, cv2.convexHull(np.concatenate(joints)), 255)
      union = mask if union is None else union | mask
  cv2.imwrite(out_path, union)


def run_per_frame_baseline(captions: pathlib.Path, out: pathlib.Path, workers: int) -> float:
  from data_prep.hands import write_bundled_task_file

  task = str(write_bundled_task_file(out / "hand_landmarker.task"))
  entries = json.loads(captions.read_text())
  jobs = [(str(captions.parent / e["video"]), task, str(out / f"{i}.png")) for i, e in enumerate(entries)]
  start = time.perf_counter()
  with multiprocessing.get_context("fork").Pool(workers) as pool:
    pool.map(_release_style_mask, jobs, chunksize=1)
  return time.perf_counter() - start


def run_data_prep(captions: pathlib.Path, out: pathlib.Path, workers: int) -> float:
  from configs import common
  from data_prep import build

  config = common.get_config(2)
  config.data.num_frames, config.data.height, config.data.width = 16, 256, 256
  start = time.perf_counter()
  summary = build.build(config, captions, out, workers=workers, progress=False)
  elapsed = time.perf_counter() - start
  assert summary.num_rejected == 0, summary
  return elapsed


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--copies", type=int, default=12, help="times each of the 3 clips is listed")
  parser.add_argument("--time_loops", type=int, nargs="+", default=[1, 8], help="clip lengths, in loops of 20 frames")
  parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for both sides")
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf  # data_prep's writer uses it; imported here so neither timing pays for it

  tf.config.set_visible_devices([], "GPU")
  print(f"{os.cpu_count()} CPU cores, {args.workers} worker processes, {args.copies * len(NAMES)} clips per run")
  for loops in args.time_loops:
    with tempfile.TemporaryDirectory() as tmp:
      tmp = pathlib.Path(tmp)
      (tmp / "videos").mkdir()
      (tmp / "release").mkdir()
      captions = make_videos(tmp / "videos", args.copies, loops)
      num_clips = args.copies * len(NAMES)
      ours = run_data_prep(captions, tmp / "ours", args.workers)
      theirs = run_per_frame_baseline(captions, tmp / "release", args.workers)
      print(f"clips of {20 * loops} frames: data_prep.build {num_clips / ours:.2f} clips/s ({ours:.1f} s), "
            f"per-frame mask_video-style {num_clips / theirs:.2f} clips/s ({theirs:.1f} s), "
            f"ratio {theirs / ours:.2f}x")


if __name__ == "__main__":
  main()
