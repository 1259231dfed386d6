"""data_prep at dataset scale: the Apache Beam build writes what the local build writes, and segments of long
videos (EPIC-KITCHENS-100 CSV, Ego4D-style JSON, JSON lines) give the records of the same clips cut into files."""

import csv
import json
import math
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_prep import beam_build, build
from data_prep.captions import CaptionFileError, parse_timestamp, read_caption_index
from handi_jax.data import schema
from handi_jax.media import clip_frames as video
from tests.test_data_build import _config, _read_all_frames, _write_mp4, write_test_videos

FPS, KEYFRAME_INTERVAL, REPEATS = 10, 12, 5
EPIC100_HEADER = ("narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
                  "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
                  "noun_class", "all_nouns", "all_noun_classes")
# (narration_id, video_id, start, stop, narration); the long video is 20 s: clips 31 and 816 alternating.
SEGMENTS = (("P01_101_0", "P01_101", "00:00:02.00", "00:00:04.00", "knit the fabric"),  # starts between keyframes
            ("P01_101_1", "P01_101", "00:00:13.30", "00:00:19.90", "julienne the carrot, then knit"),
            ("P02_07_0", "P02_07", "00:00:00.00", "00:00:01.50", "julienne the carrot"))
BAD_SEGMENTS = {("P01_101_2", "P01_101", "00:00:19.00", "00:00:25.00", "knit on"): "segment_outside_video",
                ("P01_101_3", "P01_101", "00:00:08.00", "00:00:06.00", "cut backwards"): "bad_segment",
                ("P01_101_4", "P01_101", "00:00:05.00", "00:00:05.00", "cut nothing"): "bad_segment",
                ("P03_01_0", "P03_01", "00:00:01.00", "00:00:02.00", "no such video"): "missing_file"}


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_files(ours: pathlib.Path, reference: pathlib.Path) -> None:
  a, b = _files(ours), _files(reference)
  assert sorted(a) == sorted(b)
  assert [name for name in a if a[name] != b[name]] == []


def _records(out: pathlib.Path) -> list[bytes]:
  import tensorflow as tf

  return [r.numpy() for shard in schema.split_files(out, "train") for r in tf.data.TFRecordDataset(str(shard))]


def _rejected(out: pathlib.Path) -> dict[str, str]:
  rows = [json.loads(line) for line in (out / "train" / schema.REJECTED).read_text().splitlines()]
  return {row["clip_id"]: row["reason"] for row in rows}


# ---------------------------------------------------------------------------------------------- Apache Beam


@pytest.fixture(scope="module")
def two_clips(shared_data, tmp_path_factory):
  """Two real 20-frame clips and a missing one (3 jobs, 2 shards), and the local build of them."""
  root = tmp_path_factory.mktemp("two_clips")
  for name in ("31", "816"):
    _write_mp4(root / f"{name}.mp4", _read_all_frames(shared_data / "clips" / f"{name}.gif"))
  entries = [dict(video="31.mp4", caption="julienne the carrot"), dict(video="816.mp4", caption="knit the fabric"),
             dict(video="gone.mp4", caption="a clip that is not there")]
  (root / "captions.json").write_text(json.dumps(entries))
  build.build(_config(), root / "captions.json", root / "local", workers=1, progress=False)
  return root


def test_beam_direct_runner_writes_the_local_build_and_a_rerun_redoes_only_unfinished_shards(two_clips, tmp_path):
  out = tmp_path / "beam"
  summary = build.build(_config(), two_clips / "captions.json", out, runner="DirectRunner")
  assert (summary.num_clips, summary.num_rejected, summary.num_shards) == (2, 1, 2)
  _assert_same_files(out, two_clips / "local")
  (out / "train" / "_progress" / "shard-00001.json").unlink()  # as if the run had died before shard 1 was done
  shard_0 = schema.shard_path(out, "train", 0, 2).stat().st_mtime_ns
  again = build.build(_config(), two_clips / "captions.json", out, runner="DirectRunner")
  assert again.shards_reused == 1 and schema.shard_path(out, "train", 0, 2).stat().st_mtime_ns == shard_0
  _assert_same_files(out, two_clips / "local")


def test_runner_without_beam_says_how_to_install_it_and_unknown_options_are_named(two_clips, monkeypatch, tmp_path):
  with pytest.raises(ValueError, match="Beam has no option --direct_num_wokers"):
    build.build(_config(), two_clips / "captions.json", tmp_path / "out", runner="DirectRunner",
                beam_options="--direct_num_wokers=2")
  monkeypatch.setitem(sys.modules, "apache_beam.options.pipeline_options", None)  # as if not installed
  with pytest.raises(ValueError, match=r"--runner needs Apache Beam, which is not installed: pip install "
                     r"apache-beam==2\.77\.0"):
    build.build(_config(), two_clips / "captions.json", tmp_path / "out", runner="DirectRunner")
  assert not (tmp_path / "out").exists()
  assert beam_build.INSTALL in (pathlib.Path(build.__file__).parent / "README.md").read_text()


@pytest.mark.slow
def test_beam_multi_process_build_writes_the_local_build_on_the_real_clips(shared_data, tmp_path):
  videos = write_test_videos(tmp_path, shared_data)
  local = build.build(_config(), videos / "captions.json", tmp_path / "local", workers=2, progress=False)
  beam = build.build(_config(), videos / "captions.json", tmp_path / "beam", runner="DirectRunner",
                     beam_options="--direct_num_workers=2 --direct_running_mode=multi_processing")
  assert (beam.num_clips, beam.num_rejected) == (local.num_clips, local.num_rejected) == (12, 5)
  _assert_same_files(tmp_path / "beam", tmp_path / "local")


# ------------------------------------------------------------------------------------ segments of long videos


@pytest.fixture(scope="module")
def long_videos(shared_data, tmp_path_factory):
  """A 20 s video (clips 31 and 816, 320 x 182, alternating 5 times; MPEG-4 at 10 fps, a keyframe every 12
  frames) in EPIC's layout as P01/videos/P01_101.MP4 and again as P02_07.mp4 at the top; the EPIC-100 CSV of
  SEGMENTS and BAD_SEGMENTS; and each good segment cut into its own lossless file from a full decode."""
  import imageio.v2 as imageio

  root = tmp_path_factory.mktemp("epic")
  source = [frame[:182] for name in ("31", "816") for frame in _read_all_frames(shared_data / "clips" / f"{name}.gif")]
  path = root / "P01" / "videos" / "P01_101.MP4"
  path.parent.mkdir(parents=True)
  with imageio.get_writer(path, format="FFMPEG", fps=FPS, codec="mpeg4", macro_block_size=2, ffmpeg_log_level="error",
                          output_params=["-g", str(KEYFRAME_INTERVAL), "-q:v", "3"]) as writer:
    for frame in source * REPEATS:
      writer.append_data(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
  (root / "P02_07.mp4").write_bytes(path.read_bytes())
  with open(root / "EPIC_100_test.csv", "w", newline="") as f:
    table = csv.writer(f)
    table.writerow(EPIC100_HEADER)
    for narration_id, video_id, start, stop, narration in (*SEGMENTS, *BAD_SEGMENTS):
      frames = [round(parse_timestamp(t) * 60) + 1 for t in (start, stop)]  # EPIC counts frames at 60 fps
      table.writerow([narration_id, video_id.split("_")[0], video_id, start, start, stop, *frames, narration,
                      narration.split()[0], 0, narration.split()[-1], 1, f"['{narration.split()[-1]}']", "[1]"])
  decoded = _read_all_frames(path)
  assert len(decoded) == len(source) * REPEATS
  (root / "cut").mkdir()
  for narration_id, _, start, stop, _ in SEGMENTS:
    first, end = (math.ceil(parse_timestamp(t) * FPS) for t in (start, stop))
    writer = cv2.VideoWriter(str(root / "cut" / f"{narration_id}.avi"), cv2.VideoWriter_fourcc(*"FFV1"), FPS,
                             decoded[0].shape[1::-1])
    for frame in decoded[first:end]:
      writer.write(frame)
    writer.release()
  (root / "cut" / "captions.json").write_text(json.dumps(
      [dict(video=f"{narration_id}.avi", caption=narration) for narration_id, _, _, _, narration in SEGMENTS]))
  return root


def test_epic100_segments_give_the_records_of_the_cut_clips_and_bad_rows_are_rejected(long_videos, tmp_path):
  segments = build.build(_config(), long_videos / "EPIC_100_test.csv", tmp_path / "segments", workers=1,
                         progress=False)
  cut = build.build(_config(), long_videos / "cut" / "captions.json", tmp_path / "cut", workers=1, progress=False)
  assert (segments.num_clips, cut.num_clips, cut.num_rejected) == (3, 3, 0)
  assert _records(tmp_path / "segments") == _records(tmp_path / "cut")
  assert _rejected(tmp_path / "segments") == {row[0]: reason for row, reason in BAD_SEGMENTS.items()}
  details = {row["clip_id"]: row["detail"] for row in map(json.loads, (
      tmp_path / "segments" / "train" / schema.REJECTED).read_text().splitlines())}
  assert details["P01_101_2"].startswith("segment [19 s, 25 s) is not inside") and "ends at 20 s" in details[
      "P01_101_2"]
  assert "is reversed" in details["P01_101_3"] and "is empty" in details["P01_101_4"]
  assert details["P03_01_0"] == f"{long_videos / 'P03' / 'videos' / 'P03_01.MP4'} does not exist"


def test_a_segment_is_reached_by_seeking_not_by_decoding_the_video_before_it(long_videos, monkeypatch):
  """Frames grabbed by our code, counted: the segment, the frame before it and the first one after it.

  OpenCV's seek itself decodes from the keyframe before its target (at most KEYFRAME_INTERVAL + 16 frames
  here, cap_ffmpeg_impl.hpp); that stays inside OpenCV and is not counted."""
  grabs, opencv_capture = [], cv2.VideoCapture

  class CountingCapture:  # a wrapper: a subclass of cv2.VideoCapture crashes the interpreter when freed
    def __init__(self, *args):
      self._capture = opencv_capture(*args)

    def grab(self):
      grabs.append(1)
      return self._capture.grab()

    def __getattr__(self, name):
      return getattr(self._capture, name)

  path = long_videos / "P01" / "videos" / "P01_101.MP4"
  decoded = [cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) for frame in _read_all_frames(path)]
  monkeypatch.setattr(cv2, "VideoCapture", CountingCapture)
  for start, end, first, count in ((13.3, 19.9, 133, 66), (2.0, 4.0, 20, 20), (0.0, 1.5, 0, 15)):
    grabs.clear()
    clip = video.read_sampled_frames(path, 8, video.Segment(start, end))
    assert clip.num_source_frames == count and clip.fps == FPS
    assert clip.frame_indices.tolist() == video.sample_indices(count, 8).tolist()
    np.testing.assert_array_equal(clip.frames, [decoded[first + i] for i in clip.frame_indices])
    assert len(grabs) == count + (2 if first else 1), (start, end, len(grabs))
  grabs.clear()
  video.read_sampled_frames(path, 8)
  assert len(grabs) == len(decoded) + 1  # the whole file, and the grab that finds its end


def test_segments_of_a_variable_frame_rate_video_are_found_by_their_timestamps(shared_data, tmp_path):
  """An mkv of clip 31 with a 2 s gap after frame 9 (frames at 0-0.9 s and 3.0-3.9 s; 40 listed at 10 fps): a
  seek by the frame rate lands past a start after the gap, so the reader seeks back, and a segment across the
  gap holds fewer frames than its length predicts, so it is decoded a second time."""
  import imageio_ffmpeg

  _write_mp4(tmp_path / "even.mp4", _read_all_frames(shared_data / "clips" / "31.gif"))
  subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(tmp_path / "even.mp4"), "-vf",
                  "setpts='if(lt(N,10),N,N+20)/(10*TB)'", "-fps_mode", "passthrough", "-c:v", "mpeg4", "-q:v", "3",
                  str(tmp_path / "gap.mkv")], check=True, timeout=120)
  decoded = [cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) for frame in _read_all_frames(tmp_path / "gap.mkv")]
  for start, end, first, count in ((3.0, 3.5, 10, 5), (0.5, 3.5, 5, 10), (3.2, 3.9, 12, 7)):
    clip = video.read_sampled_frames(tmp_path / "gap.mkv", 4, video.Segment(start, end))
    assert clip.num_source_frames == count, (start, end)
    np.testing.assert_array_equal(clip.frames, [decoded[first + i] for i in clip.frame_indices])
  with pytest.raises(video.ClipRejected, match="too_few_frames: segment .1.5 s, 2.5 s. of .* has 0 frames"):
    video.read_sampled_frames(tmp_path / "gap.mkv", 4, video.Segment(1.5, 2.5))


# --------------------------------------------------------------------------------------------- caption files


def test_epic100_csv_finds_each_video_in_either_layout_in_any_case_and_reports_bad_rows(long_videos, tmp_path):
  jobs = read_caption_index(long_videos / "EPIC_100_test.csv")
  assert [j.clip_id for j in jobs] == [row[0] for row in (*SEGMENTS, *BAD_SEGMENTS)]
  assert jobs[0].video == str(long_videos / "P01" / "videos" / "P01_101.MP4")
  assert jobs[2].video == str(long_videos / "P02_07.mp4")
  assert (jobs[1].segment, jobs[1].caption) == (video.Segment(13.3, 19.9), "julienne the carrot, then knit")
  lines = (long_videos / "EPIC_100_test.csv").read_text().splitlines()
  (tmp_path / "narrations.txt").write_text("\n".join([lines[0], lines[1].replace("00:00:04.00", "4 s"), lines[2]]))
  (bad, good) = read_caption_index(tmp_path / "narrations.txt", long_videos, captions_format="epic100")
  assert good.clip_id == "P01_101_1" and bad.clip_id == "narrations.txt line 2"
  assert bad.problem == f"line 2 of {tmp_path / 'narrations.txt'} has timestamp '4 s', not HH:MM:SS.ff"
  (tmp_path / "short.csv").write_text("narration_id,video_id,narration\nP01_101_0,P01_101,knit\n")
  with pytest.raises(CaptionFileError, match="has no column participant_id, start_timestamp, stop_timestamp"):
    read_caption_index(tmp_path / "short.csv")
  assert parse_timestamp("01:02:03.5") == 3723.5


def test_ego4d_json_and_json_lines_name_segments(tmp_path):
  (tmp_path / "abc.mp4").write_bytes(b"")
  (tmp_path / "narrations.json").write_text(json.dumps({"videos": [
      {"video_uid": "abc", "segments": [{"start_sec": 1, "end_sec": 2.5, "caption": "open the jar"},
                                        {"start_sec": 3, "end_sec": 4, "narration_text": "#C C stirs the pot"},
                                        {"start_sec": 5, "caption": "no end"}]},
      {"video_uid": "def", "clips": [{"start_sec": 0, "end_sec": 1, "caption": "wipe the table"}]},
      {"segments": []}]}))
  jobs = read_caption_index(tmp_path / "narrations.json")
  assert [(j.clip_id, j.video, j.segment, j.caption) for j in jobs if not j.problem] == [
      ("abc_0", str(tmp_path / "abc.mp4"), video.Segment(1.0, 2.5), "open the jar"),
      ("abc_1", str(tmp_path / "abc.mp4"), video.Segment(3.0, 4.0), "#C C stirs the pot"),
      ("def_0", str(tmp_path / "def.mp4"), video.Segment(0.0, 1.0), "wipe the table")]
  assert [j.clip_id for j in jobs if j.problem] == ["narrations.json videos[0].segments[2]",
                                                     "narrations.json videos[2]"]
  lines = [dict(video="kitchen.mp4", start=12.5, end=16, caption="crack the egg"),
           dict(video="kitchen.mp4", start=20, end=18, caption="reversed: the worker rejects it"),
           dict(video="kitchen.mp4", start="0:12", end=16, caption="start is not in seconds"),
           dict(video="whole.mp4", caption="a whole file")]
  (tmp_path / "segments.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  jobs = read_caption_index(tmp_path / "segments.jsonl")
  assert [(j.clip_id, j.segment) for j in jobs] == [
      ("kitchen", video.Segment(12.5, 16.0)), ("kitchen~2", video.Segment(20.0, 18.0)),
      ("segments.jsonl line 3", None), ("whole", None)]
  assert "has start '0:12' and end 16; expected both, in seconds" in jobs[2].problem
  with pytest.raises(CaptionFileError, match="is not a JSON object with a list \"videos\""):
    read_caption_index(tmp_path / "segments.jsonl", captions_format="ego4d")
