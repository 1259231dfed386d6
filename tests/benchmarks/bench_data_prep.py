"""Clips per second: data_prep.build against a per-frame script that does what the release's mask_video.py does.

The per-frame side follows reference_spec.md section 6.1: every frame of every video through a MediaPipe Tasks
HandLandmarker (IMAGE mode, 2 hands, confidences 0.1; here built from the models bundled with mediapipe), the
landmark polygon plus one convex hull around all joints per frame, the OR over frames written as a PNG at the
video's resolution, one process per core. data_prep.build samples 16 frames per clip, resizes and crops them to
256 x 256, detects, draws per-frame and union masks and writes TFRecord shards, prior, index and report.

Input, the same files for both sides: the three clips of ../shared/data/clips (20 frames, 10 fps), each looped in
time to `--lengths` frames (130 = the length of a real EPIC-KITCHENS clip) and written as mp4, each listed
`--copies` times. For each length both sides run back to back in this process. The table gives wall times including
worker start-up (modules and TensorFlow are imported before either side is timed) and the CPU time of each side
with its workers (a figure that a busy machine disturbs less than the wall time), and the sha256 of data_prep's
shards, to check that a change leaves its output unchanged. Then the same build as an Apache Beam pipeline on
the DirectRunner (multi_processing, as many worker processes) next to the local build, at `--runner_length`
frames: clips per second, per second and core, CPU seconds per clip, and what a 146k-clip build (the dataset
scale the issue sizes) costs in core-hours at that rate. Last, one command-line build of a
single clip, from interpreter start to exit: what a one-clip build costs in fixed start-up.

  .venv/bin/python tests/benchmarks/bench_data_prep.py [--copies=12] [--lengths 130 20] [--runner_length=130]
      [--parts baseline runners command_line]
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
CLIPS = REPO_ROOT.parent / "shared" / "data" / "clips"
NAMES = ("31", "36", "816")
SIZE = dict(num_frames=16, height=256, width=256)


def make_videos(root: pathlib.Path, copies: int, length: int) -> pathlib.Path:
  """Each real clip looped to `length` frames as mp4 (10 fps), listed `copies` times; returns the caption file."""
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
    for index in range(length):
      writer.write(frames[index % len(frames)])
    writer.release()
  entries = [dict(video=f"{name}.mp4", caption=f"clip {name} copy {i}") for i in range(copies) for name in NAMES]
  captions = root / "captions.json"
  captions.write_text(json.dumps(entries))
  return captions


def _release_style_mask(job):
  """One video, every frame: Tasks HandLandmarker, landmark polygon + joint hull, OR over frames, PNG."""
  video, task, out_path = job
  from handi_jax.media.hand_detection import block_tensorflow_import

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


class Timer:
  """Wall seconds and CPU seconds of this process plus its finished children (worker pools are joined on exit),
  so that a run on a busy machine still shows how much work each side did."""

  def __enter__(self):
    self._start = self._now()
    return self

  def __exit__(self, *exc):
    self.wall, self.cpu = (end - start for end, start in zip(self._now(), self._start, strict=True))

  @staticmethod
  def _now() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_per_frame_baseline(captions: pathlib.Path, out: pathlib.Path, workers: int) -> Timer:
  from handi_jax.media.hand_detection import write_bundled_task_file

  task = str(write_bundled_task_file(out / "hand_landmarker.task"))
  entries = json.loads(captions.read_text())
  jobs = [(str(captions.parent / e["video"]), task, str(out / f"{i}.png")) for i, e in enumerate(entries)]
  with Timer() as timer, multiprocessing.get_context("fork").Pool(workers) as pool:
    pool.map(_release_style_mask, jobs, chunksize=1)
  return timer


def _config():
  from configs import common

  config = common.get_config(2)
  for key, value in SIZE.items():
    config.data[key] = value
  return config


def run_data_prep(captions: pathlib.Path, out: pathlib.Path, workers: int, runner: str = "") -> tuple[Timer, str]:
  """The build's times and the sha256 of its shards in order (to compare outputs across versions). Its modules
  are imported first, as the per-frame side's are; its worker processes start inside the timing. With a Beam
  `runner`, `workers` DirectRunner worker processes."""
  from data_prep import build  # noqa: F401 - imported before the timing
  from handi_jax.data import schema

  beam_options = f"--direct_num_workers={workers} --direct_running_mode=multi_processing"
  with Timer() as timer:
    summary = build.build(_config(), captions, out, workers=workers, progress=False, runner=runner,
                          beam_options=beam_options)
  assert summary.num_rejected == 0, summary
  digest = hashlib.sha256()
  for shard in schema.split_files(out, "train"):
    digest.update(shard.read_bytes())
  return timer, digest.hexdigest()


DATASET_CLIPS = 146_000


def compare_runners(copies: int, length: int, workers: int) -> None:
  """The local build and the DirectRunner on the same clips, back to back, in clips per second and per core."""
  import apache_beam  # noqa: F401 - imported before the timing, as TensorFlow is

  num_clips = copies * len(NAMES)
  print(f"\n{num_clips} clips of {length} frames, {workers} worker processes per build")
  print("| build | wall | clips/s | clips/s per core | CPU s per clip | 146k clips, core-hours (wall x cores) | "
        "load after | shards sha256 |")
  print("|---|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / "videos").mkdir()
    captions = make_videos(tmp / "videos", copies, length)
    for name, runner in (("local pool", ""), ("Beam DirectRunner", "DirectRunner")):
      timer, digest = run_data_prep(captions, tmp / name.replace(" ", "_"), workers, runner)
      per_core = num_clips / timer.wall / workers
      print(f"| {name} | {timer.wall:.1f} s | {num_clips / timer.wall:.2f} | {per_core:.3f} | "
            f"{timer.cpu / num_clips:.2f} | {DATASET_CLIPS / per_core / 3600:.0f} | {_load()} | {digest[:16]} |",
            flush=True)


def one_clip_command_line(root: pathlib.Path) -> float:
  """Seconds from interpreter start to exit of `python -m data_prep.build` on one 130-frame clip."""
  make_videos(root, 1, 130)
  (root / "one.json").write_text(json.dumps([dict(video="31.mp4", caption="julienne the carrot")]))
  command = [sys.executable, "-m", "data_prep.build", f"--captions={root / 'one.json'}",
             f"--output_dir={root / 'out'}", "--noprogress"] + [f"--config.data.{k}={v}" for k, v in SIZE.items()]
  start = time.perf_counter()
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, env=env)
  return time.perf_counter() - start


def _load() -> str:
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


def compare_with_per_frame_script(copies: int, lengths: list[int], workers: int) -> None:
  """data_prep.build against the per-frame script, per clip length, back to back."""
  num_clips = copies * len(NAMES)
  print("| clip length | data_prep.build | per-frame mask_video-style | ratio (wall) | CPU s, ours / theirs "
        "(ratio) | load after | shards sha256 |")
  print("|---|---|---|---|---|---|---|")
  for length in lengths:
    with tempfile.TemporaryDirectory() as tmp:
      tmp = pathlib.Path(tmp)
      (tmp / "videos").mkdir()
      (tmp / "release").mkdir()
      captions = make_videos(tmp / "videos", copies, length)
      ours, digest = run_data_prep(captions, tmp / "ours", workers)
      theirs = run_per_frame_baseline(captions, tmp / "release", workers)
      print(f"| {length} frames | {num_clips / ours.wall:.2f} clips/s ({ours.wall:.1f} s) | "
            f"{num_clips / theirs.wall:.2f} clips/s ({theirs.wall:.1f} s) | {theirs.wall / ours.wall:.2f}x | "
            f"{ours.cpu:.1f} / {theirs.cpu:.1f} ({theirs.cpu / ours.cpu:.2f}x) | {_load()} | {digest[:16]} |",
            flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--copies", type=int, default=12, help="times each of the 3 clips is listed")
  parser.add_argument("--lengths", type=int, nargs="+", default=[130, 20], help="clip lengths in frames")
  parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for both sides")
  parser.add_argument("--runner_length", type=int, default=130, help="clip length of the local-vs-Beam comparison")
  parser.add_argument("--parts", nargs="+", choices=("baseline", "runners", "command_line"),
                      default=["baseline", "runners", "command_line"], help="which comparisons to run")
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf  # data_prep's writer uses it; imported here so neither timing pays for it

  tf.config.set_visible_devices([], "GPU")
  num_clips = args.copies * len(NAMES)
  print(f"{os.cpu_count()} CPU cores, {args.workers} worker processes per side, {num_clips} clips per run; "
        f"load average (1/5/15 min) at start {_load()}")
  if "baseline" in args.parts:
    compare_with_per_frame_script(args.copies, args.lengths, args.workers)
  if "runners" in args.parts:
    compare_runners(args.copies, args.runner_length, args.workers)
  if "command_line" in args.parts:
    with tempfile.TemporaryDirectory() as tmp:
      print(f"one-clip command-line build (130 frames): {one_clip_command_line(pathlib.Path(tmp)):.1f} s; "
            f"load average after {_load()}")


if __name__ == "__main__":
  main()
