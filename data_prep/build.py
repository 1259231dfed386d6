"""Build a handi dataset: videos + captions -> TFRecord shards with MediaPipe hand keypoints and masks.

  python -m data_prep.build --captions=videos/train.json --split=train --output_dir=data/handi
      [--video_dir=videos] [--config=configs/stage2.py:paper] [--config.data.build.mask_rule=joint_hull]

The caption file is either the release's JSON list `[{"caption": "...", "video": "1.mp4"}, ...]` or JSON lines
`{"source": "source/1.png", "target": "target/1.mp4", "prompt": "..."}` (the video is `target`). Video paths
are relative to --video_dir (default: the caption file's folder). Frame count, size and detector settings come
from the config (config.data.*). See data_prep/README.md for the outputs.
"""

import functools
import json
import os
import pathlib
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "stage2.py")


def _define_flags() -> None:
  """Only when run as a program: handi_jax.main defines its own --config in the same global flag registry."""
  config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Config with the data settings (config.data.*), e.g. configs/stage2.py:paper; "
      "override fields with --config.data.build.mask_rule=joint_hull.", lock_config=True)
  flags.DEFINE_string("captions", None, "JSON list [{caption, video}] or JSON lines {source, target, prompt}.")
  flags.DEFINE_string("video_dir", None, "Folder the video paths are relative to (default: the caption file's "
                      "folder).")
  flags.DEFINE_string("split", "train", "Split name (train, test, ...). Training's prior mask comes from 'train'.")
  flags.DEFINE_string("output_dir", None, "Dataset folder (created; several splits may share it).")
  flags.DEFINE_integer("workers", 0, "Worker processes for decoding and detection; 0 = all cores.")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")


def read_caption_index(captions: str | os.PathLike, video_dir: str | os.PathLike | None = None) -> list:
  """ClipJobs from either caption format, in file order; clip ids are the video paths without extension."""
  from data_prep.clips import ClipJob

  path = pathlib.Path(captions)
  if not path.is_file():
    raise FileNotFoundError(f"caption file {path} not found (--captions)")
  root = pathlib.Path(video_dir) if video_dir else path.parent
  text = path.read_text()
  try:
    entries = json.loads(text)
    if isinstance(entries, dict):
      entries = [entries]
  except json.JSONDecodeError:
    try:
      entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is neither a JSON list nor JSON lines ({e}); expected "
                       '[{"caption": ..., "video": "1.mp4"}] or lines of {"source", "target", "prompt"}') from None
  jobs, seen = [], {}
  for number, entry in enumerate(entries, 1):
    if isinstance(entry, dict) and "video" in entry and "caption" in entry:
      video, caption = entry["video"], entry["caption"]
    elif isinstance(entry, dict) and "target" in entry and "prompt" in entry:
      video, caption = entry["target"], entry["prompt"]
    else:
      keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
      raise ValueError(f"{path} entry {number} has {keys}; expected keys caption + video, or source + target + "
                       "prompt")
    clip_id = str(pathlib.PurePosixPath(video).with_suffix(""))
    seen[clip_id] = seen.get(clip_id, 0) + 1
    if seen[clip_id] > 1:  # the same video with another caption: a distinct clip
      clip_id = f"{clip_id}~{seen[clip_id]}"
    jobs.append(ClipJob(clip_id=clip_id, video=str(root / video), caption=str(caption or "")))
  return jobs


def build(config, captions, output_dir, *, split: str = "train", video_dir=None, workers: int = 0,
          progress: bool = True):
  """Build (or finish) one split; returns the writer's SplitSummary."""
  from data_prep import writer
  from data_prep.clips import BuildSettings, job_key, process_video
  from data_prep.hands import HandDetector

  jobs = read_caption_index(captions, video_dir)
  settings = BuildSettings.from_config(config)
  HandDetector(settings.detector)  # a wrong detector setting fails here, not once per clip
  workers = min(workers or os.cpu_count() or 1, len(jobs))
  return writer.write_split(
      output_dir, split, jobs, functools.partial(process_video, settings=settings), config=config,
      settings_key=repr(settings), job_keys=[job_key(j) for j in jobs], workers=workers, progress=progress)


def run(config, captions, output_dir, **kw) -> int:
  """build() plus the summary on stdout; the exit status: 1 only when no clip could be written."""
  summary = build(config, captions, output_dir, **kw)
  print(summary)
  if summary.num_rejected:
    print(f"rejected clips and reasons: {summary.data_dir / summary.split / 'rejected.jsonl'}")
  if summary.num_clips == 0:
    print("error: no clip could be written", file=sys.stderr)
    return 1
  return 0


_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


def _flag_error(error: Exception, argv) -> str:
  """One line for a bad flag or --config override (ml_collections raises a bare AttributeError for an unknown
  field, while the flag is defined or parsed)."""
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  names = re.findall(r"'(\w+)'", text) or re.findall(r"--config\.[\w.]+", text)
  culprit = next((a for a in argv[1:] if a.startswith("--config.") and any(n in a for n in names)), None)
  text = text.strip().strip("\"'")
  hint = next((line.strip().strip("\"'") for line in text.splitlines() if line.strip().startswith("Did you mean")), "")
  what = f"{culprit} is not a valid override ({hint or 'no such field, or a bad value: ' + text})" if culprit else text
  return (f"error: {what}. Config fields are defined in configs/common.py (data settings under config.data "
          "and config.data.build); run with --help for the flags.")


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    sys.exit(_flag_error(e, argv))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.captions or not f.output_dir:
    raise app.UsageError("--captions and --output_dir are required")
  return run(f.config, f.captions, f.output_dir, split=f.split, video_dir=f.video_dir, workers=f.workers,
             progress=f.progress)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    _define_flags()
  except _FLAG_ERRORS as e:
    sys.exit(_flag_error(e, sys.argv))
  app.run(main, flags_parser=_parse_flags)
