"""Caption files -> ClipJobs, in file order. Formats (data_prep/README.md has examples):

- json: the release's JSON list `[{"caption": ..., "video": "1.mp4"}, ...]` or JSON lines, either
  `{"source": ..., "target": "1.mp4", "prompt": ...}` or, for a segment of a longer video,
  `{"video": "kitchen.mp4", "start": 12.5, "end": 16.0, "caption": ...}` (seconds);
- epic100: the EPIC-KITCHENS-100 annotation CSV as published (one segment per narration);
- ego4d: `{"videos": [{"video_uid": ..., "segments": [{"start_sec", "end_sec", "caption"}, ...]}, ...]}`.

A bad entry becomes a job with a `problem` (rejected as bad_caption_entry, with its line or place); a file that
cannot be read at all raises CaptionFileError.
"""

import csv
import dataclasses
import io
import json
import os
import pathlib
import re

from handi_jax import fileio

FORMATS = ("auto", "json", "epic100", "ego4d")
# The columns of EPIC-KITCHENS-100's annotation CSV that a clip needs.
EPIC100_COLUMNS = ("narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp", "narration")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif", ".mpg", ".mpeg")


class CaptionFileError(ValueError):
  """A caption file that cannot be read at all (missing, not UTF-8, not JSON, no entries): the build stops."""


_JSON_FORMATS = ('expected a JSON list [{"caption": ..., "video": "1.mp4"}, ...] or JSON lines '
                 '{"source": ..., "target": "1.mp4", "prompt": ...}, one object per line')
_EGO4D_LAYOUT = '{"videos": [{"video_uid": ..., "segments": [{"start_sec": ..., "end_sec": ..., "caption": ...}]}]}'


def _json_type(value) -> str:
  return {str: "string", int: "number", float: "number", bool: "boolean", list: "list", dict: "object"}.get(
      type(value), "null")


def _is_number(value) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool)


def _read_text(path: fileio.Path) -> str:
  data = path.read_bytes()
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise CaptionFileError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as "
                           "UTF-8 and run again (--captions)") from None


def _json_whole(text: str):
  """The file as one JSON value, or None when it is not one (JSON lines)."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return None


def detect_format(path: fileio.Path, text: str) -> str:
  """epic100 for a .csv file or one whose first line names EPIC's columns, ego4d for a JSON object with
  "videos", else json."""
  if path.suffix.lower() == ".csv" or text.lstrip().startswith("narration_id"):
    return "epic100"
  whole = _json_whole(text)
  return "ego4d" if isinstance(whole, dict) and "videos" in whole else "json"


def _json_entries(path: fileio.Path, text: str) -> list[tuple[str, object, str]]:
  """(where, entry, problem) per entry of a JSON list or JSON lines, where = "line 3" (JSON lines) or "index 2"
  (0-based, in a JSON list); a line that is not JSON has a problem instead of an entry."""
  try:
    whole = json.loads(text)
  except json.JSONDecodeError as e:
    if text.lstrip().startswith("["):  # a JSON list that does not parse: no entry can be trusted
      raise CaptionFileError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; fix the "
                             f"file ({_JSON_FORMATS})") from None
  else:
    if isinstance(whole, list):
      return [(f"index {i}", entry, "") for i, entry in enumerate(whole)]
    if isinstance(whole, dict):  # a single object: one JSON line
      return [("line 1", whole, "")]
    raise CaptionFileError(f"{path} holds a JSON {_json_type(whole)}; {_JSON_FORMATS}")
  entries = []
  for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
    if line.strip():
      try:
        entries.append((f"line {number}", json.loads(line), ""))
      except json.JSONDecodeError as e:
        entries.append((f"line {number}", None, f"is not JSON ({e.msg} at column {e.colno})"))
  if entries and all(problem for _, _, problem in entries):
    where, _, problem = entries[0]
    raise CaptionFileError(f"{path} is neither a JSON list nor JSON lines ({where} {problem}); {_JSON_FORMATS}")
  return entries


def _json_fields(entry) -> tuple[str, str, tuple[float, float] | None] | str:
  """(video, caption, segment or None) of one JSON entry, or what is wrong with it."""
  if isinstance(entry, dict) and "video" in entry and "caption" in entry:
    video, caption = entry["video"], entry["caption"]
  elif isinstance(entry, dict) and "target" in entry and "prompt" in entry:
    video, caption = entry["target"], entry["prompt"]
  else:
    found = f"has keys {sorted(entry)}" if isinstance(entry, dict) else f"is a JSON {_json_type(entry)}"
    return f"{found}; expected keys caption + video (+ start + end for a segment), or source + target + prompt"
  if not isinstance(video, str) or not pathlib.PurePosixPath(video).name:
    return f"has video {video!r}; expected the path of a video file"
  if caption is not None and not isinstance(caption, str):
    return f"has caption {caption!r}; expected text"
  segment = None
  if "start" in entry or "end" in entry:
    start, end = entry.get("start"), entry.get("end")
    if not (_is_number(start) and _is_number(end)):
      return f"has start {start!r} and end {end!r}; expected both, in seconds"
    segment = (float(start), float(end))
  return video, caption or "", segment


def parse_timestamp(text: str) -> float:
  """Seconds of an EPIC-KITCHENS timestamp, HH:MM:SS.ff (any number of decimals)."""
  match = re.fullmatch(r"(\d+):([0-5]\d):([0-5]\d(?:\.\d+)?)", text.strip())
  if match is None:
    raise ValueError(f"timestamp {text!r}, not HH:MM:SS.ff")
  hours, minutes, seconds = match.groups()
  return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


class VideoFinder:
  """`<name>.<ext>` (a video suffix in any case: .MP4, .mp4, .mkv ...) in given folders; each folder is listed
  once, so that 10^5 segments of a few hundred videos cost a few hundred listings."""

  def __init__(self):
    self._listings: dict[fileio.Path, dict[str, str]] = {}

  def _listing(self, folder: fileio.Path) -> dict[str, str]:
    if folder not in self._listings:
      names = sorted(child.name for child in folder.iterdir()) if folder.is_dir() else []
      self._listings[folder] = {}
      for name in names:  # sorted: the same file wins on every run when two differ only in their suffix
        stem, suffix = os.path.splitext(name)
        if suffix.lower() in VIDEO_SUFFIXES:
          self._listings[folder].setdefault(stem, name)
    return self._listings[folder]

  def find(self, name: str, folders: tuple[fileio.Path, ...], usual_suffix: str) -> str:
    """The first folder's match; where none has one, the path it was expected at (rejected as missing_file)."""
    for folder in folders:
      if name in (listing := self._listing(folder)):
        return str(folder / listing[name])
    return str(folders[0] / f"{name}{usual_suffix}")


def _segment_job(clip_id: str, video: str, caption: str, start: float, end: float):
  from data_prep.clips import ClipJob
  from handi_jax.media.clip_frames import Segment

  return ClipJob(clip_id=clip_id, video=video, caption=caption, segment=Segment(start, end))


def _bad_entry(path: fileio.Path, where: str, video: str, problem: str):
  from data_prep.clips import ClipJob

  return ClipJob(clip_id=f"{path.name} {where}", video=video, caption="", problem=f"{where} of {path} {problem}")


def _json_jobs(path: fileio.Path, text: str, root: fileio.Path) -> list:
  """Clip ids are the video paths without extension."""
  from data_prep.clips import ClipJob

  jobs = []
  for where, entry, problem in _json_entries(path, text):
    fields = problem or _json_fields(entry)
    if isinstance(fields, str):
      video = entry.get("video", entry.get("target")) if isinstance(entry, dict) else None
      jobs.append(_bad_entry(path, where, str(root / video) if isinstance(video, str) and video else "", fields))
      continue
    video, caption, segment = fields
    clip_id = str(pathlib.PurePosixPath(video).with_suffix(""))
    if segment is None:
      jobs.append(ClipJob(clip_id=clip_id, video=str(root / video), caption=caption))
    else:
      jobs.append(_segment_job(clip_id, str(root / video), caption, *segment))
  return jobs


def _epic100_jobs(path: fileio.Path, text: str, root: fileio.Path) -> list:
  """Clip id = narration_id; the video is <root>/<participant_id>/videos/<video_id>.MP4 (the published layout)
  or <root>/<video_id>.<ext>."""
  rows = csv.DictReader(io.StringIO(text, newline=""))
  missing = [column for column in EPIC100_COLUMNS if column not in (rows.fieldnames or ())]
  if missing:
    raise CaptionFileError(f"{path} has no column {', '.join(missing)}; expected the EPIC-KITCHENS-100 annotation "
                           f"CSV as published, with a header naming at least {', '.join(EPIC100_COLUMNS)} "
                           "(--captions_format)")
  finder, jobs = VideoFinder(), []
  for row in rows:
    where = f"line {rows.line_num}"
    video_id, participant = row["video_id"] or "", row["participant_id"] or ""
    if not video_id or not row["narration_id"]:
      jobs.append(_bad_entry(path, where, "", "has no narration_id or video_id"))
      continue
    video = finder.find(video_id, (root / participant / "videos", root), ".MP4")
    try:
      start, end = (parse_timestamp(row[column] or "") for column in ("start_timestamp", "stop_timestamp"))
    except ValueError as e:
      jobs.append(_bad_entry(path, where, video, f"has {e}"))
      continue
    jobs.append(_segment_job(row["narration_id"], video, row["narration"] or "", start, end))
  return jobs


def _ego4d_jobs(path: fileio.Path, text: str, root: fileio.Path) -> list:
  """Clip id = <video_uid>_<n> (n counts the video's segments from 0); the video is <root>/<video_uid>.<ext>."""
  whole = _json_whole(text)
  videos = whole.get("videos") if isinstance(whole, dict) else None
  if not isinstance(videos, list):
    raise CaptionFileError(f"{path} is not a JSON object with a list \"videos\"; expected {_EGO4D_LAYOUT}")
  finder, jobs = VideoFinder(), []
  for v, entry in enumerate(videos):
    uid = entry.get("video_uid") if isinstance(entry, dict) else None
    segments = entry.get("segments", entry.get("clips")) if isinstance(entry, dict) else None
    if not isinstance(uid, str) or not uid or not isinstance(segments, list):
      jobs.append(_bad_entry(path, f"videos[{v}]", "", f"is not an object with a video_uid and a list of segments; "
                             f"expected {_EGO4D_LAYOUT}"))
      continue
    video = finder.find(uid, (root,), ".mp4")
    for n, segment in enumerate(segments):
      where = f"videos[{v}].segments[{n}]"
      fields = segment if isinstance(segment, dict) else {}
      start, end = fields.get("start_sec"), fields.get("end_sec")
      caption = fields.get("caption", fields.get("narration_text"))
      if not (_is_number(start) and _is_number(end) and isinstance(caption, str)):
        jobs.append(_bad_entry(path, where, video, f"is {json.dumps(segment)[:200]}; expected an object with "
                               "start_sec, end_sec (seconds) and caption (or narration_text)"))
        continue
      jobs.append(_segment_job(f"{uid}_{n}", video, caption, float(start), float(end)))
  return jobs


def _unique_ids(jobs: list) -> list:
  """A clip id seen before gets `~2`, `~3` ... (the same video listed again with another caption)."""
  seen, unique = {}, []
  for job in jobs:
    seen[job.clip_id] = seen.get(job.clip_id, 0) + 1
    unique.append(dataclasses.replace(job, clip_id=f"{job.clip_id}~{seen[job.clip_id]}")
                  if seen[job.clip_id] > 1 else job)
  return unique


def read_caption_index(captions: str | os.PathLike, video_dir: str | os.PathLike | None = None,
                       captions_format: str = "auto") -> list:
  """ClipJobs of a caption file in any of FORMATS (auto: detect_format), in file order; video paths are relative
  to `video_dir` (default: the caption file's folder)."""
  path = fileio.as_path(captions)
  if not path.is_file():
    raise CaptionFileError(f"caption file {path} not found; check --captions")
  if captions_format not in FORMATS:
    raise CaptionFileError(f"caption format {captions_format!r} is not one of {', '.join(FORMATS)}")
  root = fileio.as_path(video_dir) if video_dir else path.parent
  text = _read_text(path)
  if captions_format == "auto":
    captions_format = detect_format(path, text)
  read = {"json": _json_jobs, "epic100": _epic100_jobs, "ego4d": _ego4d_jobs}[captions_format]
  jobs = _unique_ids(read(path, text, root))
  if not jobs:
    raise CaptionFileError(f"{path} has no entries; " + (_JSON_FORMATS if captions_format == "json" else
                                                          f"expected {captions_format} entries"))
  return jobs
