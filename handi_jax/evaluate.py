"""Evaluation: the HANDI paper's Table 2 / Table 3 metrics of generated videos against the ground truth.

    python -m handi_jax.evaluate --prompts_file=prompt.json --image_dir=frames --gt_dir=videos \\
        --runs=handi=runs/g/generate,aa=baselines/aa --clip=/path/to/clip-vit-base-patch32 --output_dir=eval
    python -m handi_jax.main --config=configs/stage2.py:paper --mode=evaluate --workdir=runs/e \\
        --config.evaluate.data_dir=data/handi --config.evaluate.split=test \\
        --config.model.pretrained=/path/to/pipeline --config.generate.stage2_pretrained=runs/s2

Clips (config.evaluate): the release's layout, `prompts_file` (JSON lines {"source", "target", "prompt"}) with
source images under `image_dir` and ground-truth videos (mp4 / gif) under `gt_dir` at `target` (or its file
name), motion-area masks optional under `mask_dir` (`<stem>_mask.png` or `<stem>.png`); or a TFRecord split
(`data_dir`, `split`; frames, union mask, caption from the records). `max_clips` > 0 keeps the first ones.

Runs: `runs` = "name=folder,..." of already generated videos, `<folder>/<stem>/video.mp4` (what --mode=generate
writes) or `<folder>/<stem>.mp4|.gif`; empty = generate every clip now with pipeline.Generator (the models of
config.model / config.generate, e.g. a trained stage-2 workdir) into `<output_dir>/generated/`, run "generated".

Devices and processes: every process of a job runs the same command. Clip i belongs to process
i % process_count: that process generates it (config.generate.batch_size clips per local device at once) and scores
it (features batched over its devices, MediaPipe over config.evaluate.hand_workers worker processes); the per-clip
results are gathered, and process 0 writes the outputs, the same as one process writes. output_dir must be one
place every process reads (a shared disk or a bucket): the processes wait for each other's generated videos.

Alignment: a generated video has F frames, frame 0 the context image. The ground truth is sampled evenly to
F frames (data_prep's rule) and resized to the generated frame size (area interpolation; masks nearest).
Every metric uses frames 1..F-1, the L generated frames.

Motion area (MA): the ground-truth mask (`mask_dir`, the record's union mask) or, when none is given, the
union over the L ground-truth frames of the filled hand hulls MediaPipe finds (data_prep's rule and settings,
config.data.build). Scope "full" feeds whole frames; scope "ma" feeds each frame multiplied by the mask (black
outside) and cropped to the mask's bounding box grown to a square (so CLIP's centre crop keeps all of it),
the same box for generated and ground-truth frames. Every extractor then resizes as it always does. A clip
whose mask is empty has no MA values.

Metrics per clip and scope: HS-Err (Eq. 2 on MediaPipe keypoints of generated vs ground-truth frames, config
.data.build's detector settings), the share of hand slots with a generated hand, CLIP_GT, CLIP_Cs, CLIP_Tx
(x100), EgoVLP (cosine of EgoVLP's video embeddings of the L generated and L ground-truth frames, each sampled
to config.evaluate.egovlp_frames: 4 with egovlp.pth, 16 with epic_mir_plus.pth; handi_jax.evaluation.egovlp),
BLIP (each generated frame captioned by BLIP, the caption's EgoVLP text cosine with the prompt, mean over frames;
config.evaluate.blip's captioner/ and text_encoder/, handi_jax.evaluation.blip), and for the full scope the
share of motion-flow (Farneback, config.generate.flow_threshold) inside the mask. Over clips: means, FID over
all L frames, FVD over clips; for all clips and for the motion-intensive subset (top config.evaluate
.motion_intensive_fraction by mask area, or the data's motion_intensive.json). Extractors without weights are
"not configured"; a configured path that does not exist is an error naming its config field.

FID and FVD protocol (report.md's section, summary.json's "protocol" and each row's counts): FID pools the
Inception's pool3 features of every scored frame (299 x 299, bilinear, [0, 1] scaled to [-1, 1] inside); FVD
takes one I3D clip of the L frames of each video, in order (224 x 224, bilinear, [-1, 1]); both name their
weights file and its SHA-256. A value from fewer than 10,000 frames (FID, the FID authors' recommended minimum)
or 2048 clips (FVD, StyleGAN-V's fvd2048_16f protocol) is marked † "not comparable with published values".

Skipped videos: a run's video that is missing, unreadable, has fewer frames than the metrics need (F >= 2; >= 3 with
CLIP, whose CLIP_Cs needs two generated frames; >= 10 with FVD, whose I3D needs L >= 9), has more frames than its
ground truth, or is another size than the run's other videos and another aspect ratio than its ground truth (by more
than 5%) is skipped for that run with a warning naming run, clip, file and why; the run's other clips are scored.

Outputs in output_dir (default <workdir>/evaluate): metrics.csv (per run, clip, scope; a skipped clip has one row
with the reason under `skipped`), summary.json ({"protocol": FID / FVD protocol, "runs": per run, subset, scope,
with `skipped` counts}), report.md (tables, FID and FVD protocol, skipped videos),
metrics.png (bars across runs), hs_err.png (per-clip HS-Err), contact_<run>.png (generated above ground truth, mask
outlined), config.json. The console gets where they are and each run's headline numbers.
"""

import json

import jax

from handi_jax import command_line, fileio, pipeline, sharding
from handi_jax.evaluation import clips as clips_lib
from handi_jax.evaluation import report, scoring


def evaluate(config, workdir) -> dict:
  """--mode=evaluate: see the module docstring; returns summary.json's "runs"."""
  e = config.evaluate
  out_dir = fileio.as_path(e.output_dir or fileio.as_path(workdir) / "evaluate")
  clips = clips_lib.load_clips(config)
  runs = clips_lib.parse_runs(e.runs)
  if not runs:
    runs = {"generated": clips_lib.generate_run(lambda: pipeline.Generator.from_config(config, workdir), clips,
                                                out_dir / "generated")}
    sharding.wait_for_processes("evaluate: generated")  # scoring reads every process's videos
  summary = scoring.evaluate_runs(config, clips, runs, out_dir)
  if jax.process_index() == 0:
    fileio.write_json(out_dir / "config.json", json.loads(config.to_json_best_effort()), indent=1)
    print(report.closing_summary(summary, out_dir))
  return summary



if __name__ == "__main__":
  command_line.run("evaluate", ("prompts_file", "image_dir", "gt_dir", "mask_dir", "data_dir", "split", "runs",
                                "output_dir", "clip", "egovlp", "blip"),
                   "runs/evaluate", "Working directory (default output_dir).", evaluate)
