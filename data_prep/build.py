"""Build a handi dataset: videos + captions -> TFRecord shards with MediaPipe hand keypoints and masks.

  python -m data_prep.build --captions=videos/train.json --split=train --output_dir=data/handi
      [--video_dir=videos] [--config=configs/stage2.py:paper] [--config.data.build.mask_rule=joint_hull]
      [--runner=DirectRunner --beam_options="--direct_num_workers=2 --direct_running_mode=multi_processing"]

The caption file is the release's JSON list `[{"caption": "...", "video": "1.mp4"}, ...]` or JSON lines
`{"source": "source/1.png", "target": "target/1.mp4", "prompt": "..."}` (the video is `target`), or it names
segments of longer videos: JSON lines `{"video", "start", "end", "caption"}`, the EPIC-KITCHENS-100 annotation
CSV, or an Ego4D-style JSON (data_prep/captions.py). Video paths are relative to --video_dir (default: the caption
file's folder). Frame count, size and detector settings come from the config (config.data.*). The clips run on
a local process pool, or with --runner in an Apache Beam pipeline. See data_prep/README.md for the outputs.
"""

import functools
import gc
import os
import sys

from data_prep.captions import FORMATS, CaptionFileError, read_caption_index
from handi_jax import command_line


def build(config, captions, output_dir, *, split: str = "train", video_dir=None, captions_format: str = "auto",
          workers: int = 0, progress: bool = True, runner: str = "", beam_options: str = ""):
  """Build (or finish) one split; returns the writer's SplitSummary. With a Beam `runner` (e.g. "DirectRunner")
  the clips run in an Apache Beam pipeline with Beam's own `beam_options`, else on `workers` local processes."""
  if runner:
    from data_prep import beam_build

    pipeline_options = beam_build.pipeline_options(runner, beam_options)  # Beam missing or a bad option: fail now
  jobs = read_caption_index(captions, video_dir, captions_format)  # before the heavy imports: fails fast
  from data_prep.clips import BuildSettings, job_key, process_video
  from handi_jax.data import writer
  from handi_jax.media.hand_detection import HandDetector

  settings = BuildSettings.from_config(config)
  HandDetector(settings.detector)  # a wrong detector setting fails here, not once per clip
  process = functools.partial(process_video, settings=settings)
  inputs = dict(config=config, settings_key=repr(settings), job_keys=[job_key(j) for j in jobs])
  if runner:
    return beam_build.write_split(output_dir, split, jobs, process, options=pipeline_options, **inputs)
  workers = min(workers or os.cpu_count() or 1, len(jobs))
  return writer.write_split(output_dir, split, jobs, process, workers=workers, progress=progress, **inputs)


def run(config, captions, output_dir, **kw) -> int:
  """build() plus the summary on stdout; the exit status: 1 when the caption file is unreadable or no clip could
  be written."""
  try:
    summary = build(config, captions, output_dir, **kw)
  except CaptionFileError as e:  # one line, like a bad flag: the file is named and so is the fix
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(summary)
  if summary.num_rejected:
    print(f"rejected clips and reasons: {summary.data_dir / summary.split / 'rejected.jsonl'}")
  if summary.num_clips == 0:
    print("error: no clip could be written", file=sys.stderr)
    return 1
  return 0


def build_from_flags(config, workdir, *, captions, output_dir, **options):
  """The command's job; exits with run()'s status."""
  del workdir  # only the log file goes there
  if not captions or not output_dir:
    raise ValueError("--captions and --output_dir are required")
  status = run(config, captions, output_dir, **options)
  # The interpreter's exit would run the cyclic GC over the ~10^6 objects TensorFlow, JAX and MediaPipe made
  # (1-4 s); frozen, they are left to the end of the process.
  gc.freeze()
  sys.exit(status)


if __name__ == "__main__":
  command_line.run("data_prep", (), "runs/data_prep", "The log goes to <workdir>/logs/.", build_from_flags, options=(
      command_line.Option("captions", None, "JSON list [{caption, video}], JSON lines {source, target, prompt} or "
                          "{video, start, end, caption}, the EPIC-KITCHENS-100 annotation CSV, or an Ego4D-style JSON "
                          "{videos: [{video_uid, segments: [{start_sec, end_sec, caption}]}]}."),
      command_line.Option("captions_format", "auto", "Format of --captions; auto: epic100 for a .csv, ego4d for a "
                          "JSON object with 'videos', else json.", choices=FORMATS),
      command_line.Option("video_dir", None, "Folder the video paths are relative to (default: the caption file's "
                          "folder); EPIC-KITCHENS videos are found as <participant>/videos/<video_id>.MP4 or "
                          "<video_id>.<ext> in it."),
      command_line.Option("split", "train", "Split name (train, test, ...). Training's prior mask comes from "
                          "'train'."),
      command_line.Option("output_dir", None, "Dataset folder (created; several splits may share it)."),
      command_line.Option("workers", 0, "Worker processes of the local build; 0 = all cores."),
      command_line.Option("progress", True, "Show a progress bar (local build)."),
      command_line.Option("runner", "", "Apache Beam runner (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner) "
                          "for the build instead of the local process pool; needs apache-beam==2.77.0."),
      command_line.Option("beam_options", "", "Beam pipeline options for --runner, as one string, e.g. "
                          "\"--direct_num_workers=2 --direct_running_mode=multi_processing\".")))
