"""Build a handi dataset: videos + captions -> TFRecord shards with MediaPipe hand keypoints and masks.

  python -m data_prep.build --captions=videos/train.json --split=train --output_dir=data/handi
      [--video_dir=videos] [--config=configs/stage2.py:paper] [--config.data.build.mask_rule=joint_hull]

The caption file is either the release's JSON list `[{"caption": "...", "video": "1.mp4"}, ...]` or JSON lines
`{"source": "source/1.png", "target": "target/1.mp4", "prompt": "..."}` (the video is `target`). Video paths
are relative to --video_dir (default: the caption file's folder). Frame count, size and detector settings come
from the config (config.data.*). See data_prep/README.md for the outputs.
"""

import functools
import gc
import json
import os
import pathlib
import sys

from handi_jax import command_line


class CaptionFileError(ValueError):
  """A caption file that cannot be read at all (missing, not UTF-8, not JSON, no entries): the build stops."""


_FORMATS = ('expected a JSON list [{"caption": ..., "video": "1.mp4"}, ...] or JSON lines '
            '{"source": ..., "target": "1.mp4", "prompt": ...}, one object per line')


def _json_type(value) -> str:
  return {str: "string", int: "number", float: "number", bool: "boolean", list: "list", dict: "object"}.get(
      type(value), "null")


def _caption_entries(path: pathlib.Path) -> list[tuple[str, object, str]]:
  """(where, entry, problem) per entry of a caption file, where = "line 3" (JSON lines) or "index 2" (0-based, in
  a JSON list); a line that is not JSON has a problem instead of an entry. Raises CaptionFileError for a file
  that is unreadable as a whole."""
  data = path.read_bytes()
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise CaptionFileError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as "
                           "UTF-8 and run again (--captions)") from None
  try:
    whole = json.loads(text)
  except json.JSONDecodeError as e:
    if text.lstrip().startswith("["):  # a JSON list that does not parse: no entry can be trusted
      raise CaptionFileError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; fix the "
                             f"file ({_FORMATS})") from None
  else:
    if isinstance(whole, list):
      return [(f"index {i}", entry, "") for i, entry in enumerate(whole)]
    if isinstance(whole, dict):  # a single object: one JSON line
      return [("line 1", whole, "")]
    raise CaptionFileError(f"{path} holds a JSON {_json_type(whole)}; {_FORMATS}")
  entries = []
  for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
    if line.strip():
      try:
        entries.append((f"line {number}", json.loads(line), ""))
      except json.JSONDecodeError as e:
        entries.append((f"line {number}", None, f"is not JSON ({e.msg} at column {e.colno})"))
  if entries and all(problem for _, _, problem in entries):
    where, _, problem = entries[0]
    raise CaptionFileError(f"{path} is neither a JSON list nor JSON lines ({where} {problem}); {_FORMATS}")
  return entries


def _video_and_caption(entry) -> tuple[str, str] | str:
  """(video, caption) of one entry, or what is wrong with it."""
  if isinstance(entry, dict) and "video" in entry and "caption" in entry:
    video, caption = entry["video"], entry["caption"]
  elif isinstance(entry, dict) and "target" in entry and "prompt" in entry:
    video, caption = entry["target"], entry["prompt"]
  else:
    found = f"has keys {sorted(entry)}" if isinstance(entry, dict) else f"is a JSON {_json_type(entry)}"
    return f"{found}; expected keys caption + video, or source + target + prompt"
  if not isinstance(video, str) or not pathlib.PurePosixPath(video).name:
    return f"has video {video!r}; expected the path of a video file"
  if caption is not None and not isinstance(caption, str):
    return f"has caption {caption!r}; expected text"
  return video, caption or ""


def read_caption_index(captions: str | os.PathLike, video_dir: str | os.PathLike | None = None) -> list:
  """ClipJobs from either caption format, in file order; clip ids are the video paths without extension.

  A bad entry becomes a job with a `problem` (rejected as bad_caption_entry, with its line or index); a file
  that cannot be read at all raises CaptionFileError."""
  from data_prep.clips import ClipJob

  path = pathlib.Path(captions)
  if not path.is_file():
    raise CaptionFileError(f"caption file {path} not found; check --captions")
  root = pathlib.Path(video_dir) if video_dir else path.parent
  jobs, seen = [], {}
  for where, entry, problem in _caption_entries(path):
    fields = problem or _video_and_caption(entry)
    if isinstance(fields, str):
      video = entry.get("video", entry.get("target")) if isinstance(entry, dict) else None
      video = str(root / video) if isinstance(video, str) and video else ""
      jobs.append(ClipJob(clip_id=f"{path.name} {where}", video=video, caption="",
                          problem=f"{where} of {path} {fields}"))
      continue
    video, caption = fields
    clip_id = str(pathlib.PurePosixPath(video).with_suffix(""))
    seen[clip_id] = seen.get(clip_id, 0) + 1
    if seen[clip_id] > 1:  # the same video with another caption: a distinct clip
      clip_id = f"{clip_id}~{seen[clip_id]}"
    jobs.append(ClipJob(clip_id=clip_id, video=str(root / video), caption=caption))
  if not jobs:
    raise CaptionFileError(f"{path} has no entries; {_FORMATS}")
  return jobs


def build(config, captions, output_dir, *, split: str = "train", video_dir=None, workers: int = 0,
          progress: bool = True):
  """Build (or finish) one split; returns the writer's SplitSummary."""
  jobs = read_caption_index(captions, video_dir)  # before the heavy imports: a bad caption file fails fast
  from data_prep.clips import BuildSettings, job_key, process_video
  from handi_jax.data import writer
  from handi_jax.media.hand_detection import HandDetector

  settings = BuildSettings.from_config(config)
  HandDetector(settings.detector)  # a wrong detector setting fails here, not once per clip
  workers = min(workers or os.cpu_count() or 1, len(jobs))
  return writer.write_split(
      output_dir, split, jobs, functools.partial(process_video, settings=settings), config=config,
      settings_key=repr(settings), job_keys=[job_key(j) for j in jobs], workers=workers, progress=progress)


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


def build_from_flags(config, workdir, *, captions, video_dir, split, output_dir, workers, progress):
  """The command's job; exits with run()'s status."""
  del workdir  # only the log file goes there
  if not captions or not output_dir:
    raise ValueError("--captions and --output_dir are required")
  status = run(config, captions, output_dir, split=split, video_dir=video_dir, workers=workers, progress=progress)
  # The interpreter's exit would run the cyclic GC over the ~10^6 objects TensorFlow, JAX and MediaPipe made
  # (1-4 s); frozen, they are left to the end of the process.
  gc.freeze()
  sys.exit(status)


if __name__ == "__main__":
  command_line.run("data_prep", (), "runs/data_prep", "The log goes to <workdir>/logs/.", build_from_flags, options=(
      command_line.Option("captions", None, "JSON list [{caption, video}] or JSON lines {source, target, prompt}."),
      command_line.Option("video_dir", None, "Folder the video paths are relative to (default: the caption file's "
                          "folder)."),
      command_line.Option("split", "train", "Split name (train, test, ...). Training's prior mask comes from "
                          "'train'."),
      command_line.Option("output_dir", None, "Dataset folder (created; several splits may share it)."),
      command_line.Option("workers", 0, "Worker processes for decoding and detection; 0 = all cores."),
      command_line.Option("progress", True, "Show a progress bar.")))
