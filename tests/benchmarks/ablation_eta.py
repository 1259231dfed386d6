"""Ablation of the Hand Refinement Loss weight on the procedural demo data: eta 0 against eta 0.1, one table.

1. Writes the demo dataset once (handi_jax.data.demo_clips): config.data.demo.num_clips training clips (split "train")
   and --test_clips held-out clips (split "test") drawn with demo seed + 1, so other backgrounds, hand paths and
   hand sizes from the same generator.
2. Trains the tiny stage-2 model of configs/stage2.py twice with handi_jax.train.train_and_evaluate: the same
   config, steps, seed and data order; only config.loss.eta_hand differs.
3. Generates every held-out clip from each run's last checkpoint, the same seed per clip, conditioned on the
   clip's ground-truth motion-area mask as the demo does (stage 1 is not trained here), and evaluates both runs
   with handi_jax.evaluation.scoring.evaluate_runs (HS-Err, hands found, CLIP scores when --clip is given, flow share).
4. Whether MediaPipe (handi_jax/media/hand_detection.py, config.data.build's settings) finds the drawn hands in
   the held-out ground-truth frames, and how far its joints land from the drawn ones. Then the landmark network's
   keypoint error on the ground-truth ROI: handi_jax.losses.hand_errors (the L_HR quantity: MediaPipe's landmark network
   in JAX on the crop that the ground-truth keypoints place) on each run's generated frames and, as the floor,
   on the ground-truth frames.

    .venv/bin/python tests/benchmarks/ablation_eta.py [--workdir /tmp/handi_ablation_eta] [--steps 20]

Reruns with the same workdir reuse the data, finished trainings (the checkpoints) and finished generations.
Outputs: <workdir>/eta_<eta>/ (training runs), <workdir>/generated/<run>/, <workdir>/evaluate/ (report.md, ...).
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import common  # noqa: E402
from handi_jax import command_line, losses, pipeline, prompts, train  # noqa: E402
from handi_jax.data import demo_clips  # noqa: E402
from handi_jax.evaluation import clips as clips_lib
from handi_jax.evaluation import (
  extractors,  # noqa: E402
  scoring,
)
from handi_jax.hand_landmarks import network as hl  # noqa: E402
from handi_jax.media import files as media_files  # noqa: E402
from handi_jax.media import hand_detection as hand_detection  # noqa: E402


def make_config(args):
  config = common.get_config(2)  # the demo variant's tiny models, with the settings its figures were measured with
  config.data.num_frames, config.data.demo.num_clips = 16, 8
  config.diffusion.prediction_type = "epsilon"
  config.sampling.guidance_scale = 9.0
  config.train.update(num_steps=args.steps, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                      log_every=1, checkpoint_every=args.steps, keep_checkpoints=1)
  config.sampling.height, config.sampling.width = config.data.height, config.data.width
  config.evaluate.update(split="test", clip=args.clip, output_dir=str(args.workdir / "evaluate"))
  return config


def write_data(config, args):
  """Training clips as the demo writes them and held-out clips of the next demo seed, in one dataset folder
  that config.data.dir and config.evaluate.data_dir then name; returns the held-out clips' config."""
  data_dir = demo_clips.write_demo_dataset(args.workdir / "demo_data", config)
  held_out = config.copy_and_resolve_references()
  held_out.data.demo.update(seed=config.data.demo.seed + 1, num_clips=args.test_clips)
  demo_clips.write_demo_dataset(data_dir, held_out, split="test")
  config.data.dir = config.evaluate.data_dir = str(data_dir)
  return held_out


def training_scalars(workdir: pathlib.Path) -> dict[str, list[float]]:
  """{metric: values by step} from the run's TensorBoard event files (what train_and_evaluate wrote)."""
  import tensorflow as tf

  by_step = {}
  for path in sorted(workdir.glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "scalars":
          by_step.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return {tag: [values[s] for s in sorted(values)] for tag, values in by_step.items()}


def train_run(config, eta: float, workdir: pathlib.Path) -> dict[str, list[float]]:
  run = config.copy_and_resolve_references()
  run.loss.eta_hand = eta
  started = time.perf_counter()
  train.train_and_evaluate(run, str(workdir))
  print(f"eta {eta}: trained {config.train.num_steps} steps in {time.perf_counter() - started:.0f} s "
        "(compile included; 0 s = already done)", flush=True)
  return training_scalars(workdir)


def generate_run(config, eta: float, workdir: pathlib.Path, clips, out_dir: pathlib.Path) -> None:
  """Every held-out clip from the run's checkpoint, conditioned on its ground-truth union mask; seed per clip."""
  run = config.copy_and_resolve_references()
  run.generate.stage2_pretrained = str(workdir)
  inputs = out_dir.parent / "inputs"
  todo = [(i, c) for i, c in enumerate(clips) if not (out_dir / c.name / prompts.DONE_FILE["generate"]).is_file()]
  if not todo:
    return
  started = time.perf_counter()
  generator = pipeline.Generator.from_config(run, workdir)
  for index, clip in todo:
    image, mask = inputs / f"{clip.name}.png", inputs / f"{clip.name}_mask.png"
    media_files.write_png(image, clip.frames()[0])
    media_files.write_png(mask, clip.mask.astype(np.uint8) * 255)
    generator.run(prompts.Sample(index, clip.name, image, clip.prompt, mask), out_dir / clip.name)
  print(f"eta {eta}: generated {len(todo)} clips in {time.perf_counter() - started:.0f} s", flush=True)


def mediapipe_on_ground_truth(config, held_out, clips) -> dict:
  """MediaPipe on the held-out ground-truth frames 1..F-1 against the drawn hands: hand slots found, slots
  filled where no hand is drawn, and the mean joint distance (pixels) of found hands to the drawn joints."""
  detector = hand_detection.HandDetector(hand_detection.DetectorSettings.from_config(config.data.build))
  drawn_slots = found = invented = 0
  distances = []
  for index, clip in enumerate(clips):
    truth = demo_clips.synthesize_clip(index, held_out)
    keypoints, presence = scoring.detect_keypoints(detector, clip.frames()[1:])
    drawn = truth["presence"][1:].any(-1)
    detected = presence.any(-1) > 0
    drawn_slots += int(drawn.sum())
    found += int((drawn & detected).sum())
    invented += int((detected & ~drawn).sum())
    both = drawn & detected
    pixels = np.array([config.data.width, config.data.height])
    distances += list(np.linalg.norm((keypoints[both] - truth["keypoints"][1:][both]) * pixels, axis=-1).mean(-1))
  return dict(drawn=drawn_slots, found=found, invented=invented,
              distance_px=float(np.mean(distances)) if distances else float("nan"))


@jax.jit
def _roi_terms(params, frames, keypoints, presence):
  sums = losses.hand_errors(frames.astype(np.float32) / 127.5 - 1.0, keypoints, presence, params)
  return losses.hand_refinement_from_sums(sums, presence, 0.0)[1]


def roi_keypoint_error(frames: np.ndarray, keypoints: np.ndarray, presence: np.ndarray, params) -> dict:
  """The landmark network's keypoint error on the ground-truth ROI over clips: frames (K, L, H, W, 3) uint8,
  drawn keypoints (K, L, 2, 21, 2) and presence (K, L, 2, 21). Returns the mean squared joint distance in
  normalised frame units (L_HR's hand_mse), its root in pixels, and the network's mean hand-presence score."""
  terms = jax.device_get(_roi_terms(params, frames, keypoints, presence))
  return dict(mse=float(terms["hand_mse"]), rms_px=float(np.sqrt(terms["hand_mse"])) * frames.shape[3],
              presence=float(terms["hand_presence"]))


def _number(value, digits=4) -> str:
  return value if isinstance(value, str) else ("n/a" if not np.isfinite(value) else f"{value:.{digits}f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/handi_ablation_eta"))
  parser.add_argument("--steps", type=int, default=20, help="training steps of each run")
  parser.add_argument("--learning_rate", type=float, default=1e-3,
                      help="the tiny models start from random weights: 5e-5 (fine-tuning) barely moves them")
  parser.add_argument("--warmup_steps", type=int, default=5)
  parser.add_argument("--test_clips", type=int, default=4, help="held-out clips generated and evaluated")
  parser.add_argument("--etas", type=float, nargs=2, default=(0.0, 0.1))
  parser.add_argument("--clip", default="", help="a transformers CLIPModel folder for the CLIP scores")
  args = parser.parse_args()
  args.workdir.mkdir(parents=True, exist_ok=True)
  config = make_config(args)
  command_line.enable_compilation_cache(config)
  started = time.perf_counter()
  held_out = write_data(config, args)
  clips = clips_lib.load_clips(config)
  if [c.name for c in clips] != [f"demo-{i:04d}" for i in range(args.test_clips)]:
    raise RuntimeError(f"held-out clips read back as {[c.name for c in clips]}; expected demo-0000.. in order "
                       f"(delete {args.workdir / 'demo_data'} and rerun)")

  runs, scalars = {}, {}
  for eta in args.etas:
    name = f"eta_{eta:g}"
    scalars[name] = train_run(config, eta, args.workdir / name)
    runs[name] = args.workdir / "generated" / name
    generate_run(config, eta, args.workdir / name, clips, runs[name])
  summary = scoring.evaluate_runs(config, clips, runs, pathlib.Path(config.evaluate.output_dir))

  seen = mediapipe_on_ground_truth(config, held_out, clips)
  truths = [demo_clips.synthesize_clip(i, held_out) for i in range(len(clips))]
  keypoints = np.stack([t["keypoints"][1:] for t in truths])
  presence = np.stack([t["presence"][1:] for t in truths])
  params = hl.load_hand_landmark_params()
  roi = {name: roi_keypoint_error(np.stack([clips_lib.read_generated(folder, c.name)[1:] for c in clips]),
                                  keypoints, presence, params) for name, folder in runs.items()}
  roi["ground truth"] = roi_keypoint_error(np.stack([t["frames"][1:] for t in truths]), keypoints, presence, params)

  def trained(name, tag):
    values = scalars[name].get(tag)
    if not values:
      return "not computed"
    window = max(1, min(5, len(values) // 3))
    return f"{np.mean(values[:window]):.4f} -> {np.mean(values[-window:]):.4f}"

  full = {name: summary[name]["all"]["full"] for name in runs}
  rows = [
      ("HS-Err (full frame, MediaPipe on both sides)", {n: _number(v["hs_err"], 5) for n, v in full.items()}),
      ("hands found in generated frames (share of slots)", {n: _number(v["gen_hand_rate"]) for n, v in full.items()}),
      ("CLIP_GT / CLIP_Cs / CLIP_Tx", {n: v["clip_gt"] if isinstance(v["clip_gt"], str) else
                                       " / ".join(_number(v[k]) for k in ("clip_gt", "clip_cs", "clip_tx"))
                                       for n, v in full.items()}),
      ("flow share inside the motion area", {n: _number(v["flow_inside"]) for n, v in full.items()}),
      ("landmark network on the GT ROI: keypoint MSE (L_HR units)", {n: _number(roi[n]["mse"], 5) for n in runs}),
      ("... its RMS joint distance (px of 64)", {n: _number(roi[n]["rms_px"], 2) for n in runs}),
      ("... its hand-presence score", {n: _number(roi[n]["presence"], 3) for n in runs}),
      ("training noise loss (first -> last steps, mean of up to 5)", {n: trained(n, "noise") for n in runs}),
      ("training hand_mse (first -> last)", {n: trained(n, "hand_mse") for n in runs}),
  ]
  print(f"\n{len(clips)} held-out clips, {args.steps} steps per run, lr {args.learning_rate:g}, "
        f"{time.perf_counter() - started:.0f} s in all\n")
  print("| metric | " + " | ".join(runs) + " |")
  print("|---|" + "---|" * len(runs))
  for title, values in rows:
    print(f"| {title} | " + " | ".join(values[n] for n in runs) + " |")
  print(f"\nMediaPipe on the held-out ground-truth frames: found {seen['found']} of {seen['drawn']} drawn hands "
        f"(hand slots x frames), filled {seen['invented']} slots where no hand is drawn; found hands' joints lie "
        f"{_number(seen['distance_px'], 2)} px (mean) from the drawn joints. Landmark network on the ground-truth "
        f"ROI of the ground-truth frames (the floor): MSE {_number(roi['ground truth']['mse'], 5)}, RMS "
        f"{_number(roi['ground truth']['rms_px'], 2)} px, presence {_number(roi['ground truth']['presence'], 3)}.")
  if not config.evaluate.clip:
    print(f"CLIP scores: {extractors.NOT_CONFIGURED} (--clip names a transformers CLIPModel folder).")


if __name__ == "__main__":
  main()
