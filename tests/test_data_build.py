"""data_prep.build on the real clips (../shared/data/clips/*.gif, converted to mp4), next to broken clips."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from data_prep import build
from data_prep.clips import BuildSettings, ClipJob, process_video
from handi_jax.data import schema
from handi_jax.media import clip_frames as video
from handi_jax.media import hand_masks as masks
from handi_jax.media.hand_detection import DetectorSettings, Hand, HandDetector, assign_slots, write_bundled_task_file
from tests.conftest import REPO_ROOT
from tests.helpers import hull_mask

NUM_FRAMES, SIZE = 8, 256
OVERRIDES = {"data.num_frames": NUM_FRAMES, "data.height": SIZE, "data.width": SIZE,
             "data.build.frames_per_shard": 2 * NUM_FRAMES}
GOOD = ("31", "36", "816")
FAULTS = {"broken/truncated.mp4": "corrupt_video", "broken/text.mp4": "not_a_video",
          "broken/three_frames.mp4": "too_few_frames", "broken/nowhere.mp4": "missing_file"}


def _config():
  config = common.get_config(2)
  for key, value in OVERRIDES.items():
    section, *rest = key.split(".")
    node = config[section]
    for name in rest[:-1]:
      node = node[name]
    node[rest[-1]] = value
  return config


def _read_all_frames(path):
  capture = cv2.VideoCapture(str(path))
  frames = []
  while True:
    ok, frame = capture.read()
    if not ok:
      return frames
    frames.append(frame)


def _write_mp4(path, frames, fps=10.0):
  height, width = frames[0].shape[:2]
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
  for frame in frames:
    writer.write(frame)
  writer.release()


def _write_faststart_mp4(path, frames, fps=10):
  """An mp4 with its index (the moov atom) at the front, as streaming sites serve them (MPEG-4 part 2)."""
  import imageio.v2 as imageio

  with imageio.get_writer(path, fps=fps, codec="mpeg4", macro_block_size=2, ffmpeg_log_level="error",
                          output_params=["-movflags", "+faststart", "-q:v", "3"]) as writer:
    for frame in frames:
      writer.append_data(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
  data = pathlib.Path(path).read_bytes()
  assert 0 < data.find(b"moov") < data.find(b"mdat")
  return data


def write_test_videos(root: pathlib.Path, shared_data: pathlib.Path) -> pathlib.Path:
  """The three real clips as mp4 (each listed 4 times with different captions) and the broken cases, with
  root/captions.json naming them; returns root."""
  (root / "broken").mkdir()
  for name in GOOD:
    _write_mp4(root / f"{name}.mp4", _read_all_frames(shared_data / "clips" / f"{name}.gif"))
  data = (root / "31.mp4").read_bytes()
  (root / "broken/truncated.mp4").write_bytes(data[: len(data) // 2])
  (root / "broken/text.mp4").write_text("this is a text file, not a video\n")
  _write_mp4(root / "broken/three_frames.mp4", _read_all_frames(shared_data / "clips" / "31.gif")[:3])
  entries = []
  for repeat in range(4):
    entries += [dict(video=f"{name}.mp4", caption=f"clip {name}, take {repeat}") for name in GOOD]
    if repeat == 0:
      entries += [dict(video=video, caption="a broken clip") for video in FAULTS]
      entries.append(dict(video="36.mp4", caption=""))
  (root / "captions.json").write_text(json.dumps(entries))
  return root


@pytest.fixture(scope="module")
def videos(shared_data, tmp_path_factory):
  return write_test_videos(tmp_path_factory.mktemp("videos"), shared_data)


@pytest.fixture(scope="module")
def built(videos, tmp_path_factory):
  out = tmp_path_factory.mktemp("built")
  summary = build.build(_config(), videos / "captions.json", out, workers=1, progress=False)
  return summary, out


def _plain_mediapipe():
  import mediapipe as mp

  return mp.solutions.hands.Hands(static_image_mode=True, max_num_hands=2, model_complexity=1,
                                  min_detection_confidence=0.1, min_tracking_confidence=0.1)


def test_bad_clips_are_rejected_with_distinct_reasons_and_good_ones_written(built):
  summary, out = built
  assert (summary.num_clips, summary.num_rejected) == (12, 5)
  rejected = [json.loads(line) for line in (out / "train" / schema.REJECTED).read_text().splitlines()]
  reasons = {pathlib.Path(r["video"]).name: r["reason"] for r in rejected if r["reason"] != "empty_caption"}
  assert reasons == {pathlib.Path(v).name: reason for v, reason in FAULTS.items()}
  assert [r["clip_id"] for r in rejected if r["reason"] == "empty_caption"] == ["36~2"]
  assert len({r["reason"] for r in rejected}) == 5
  manifest = json.loads((out / schema.MANIFEST).read_text())
  assert manifest["splits"]["train"]["num_clips"] == 12 and manifest["schema_version"] == schema.SCHEMA_VERSION
  report = json.loads((out / "train" / schema.REPORT).read_text())
  assert report["clips"] == 12 and report["frames"] == 12 * NUM_FRAMES and report["rejected"] == 5
  assert len(report["hand_detection_rate_per_frame"]) == NUM_FRAMES
  assert cv2.imread(str(out / "train" / schema.COVERAGE_HISTOGRAM)) is not None
  index = json.loads((out / "train" / schema.MOTION_INTENSIVE).read_text())
  areas = sorted((c["mask_area"] for c in json.loads((out / "train" / "_progress" / "shard-00000.json").read_text())
                  ["clips"]), reverse=True)
  assert len(index["clips"]) == 2 and index["clips"][0]["mask_area"] >= areas[0]  # ceil(10% of 12) = 2


def test_stored_masks_are_hulls_of_stored_keypoints_and_line_up_with_the_frames(built, videos):
  _, out = built
  examples = list(tfds.builder_from_directory(str(out)).as_dataset(split="train").as_numpy_iterator())
  assert len(examples) == 12 and len({e["clip_id"] for e in examples}) == 12
  detector = _plain_mediapipe()
  distances, inside, total = [], 0, 0
  for example in examples[:3]:  # the three distinct videos
    assert example["frames"].shape == (NUM_FRAMES, SIZE, SIZE, 3)
    frame_masks = example["frame_masks"][..., 0]
    np.testing.assert_array_equal(example["union_mask"][..., 0], np.bitwise_or.reduce(frame_masks))
    for f in range(NUM_FRAMES):
      expected = np.zeros((SIZE, SIZE), np.uint8)
      for hand in range(2):
        present = example["presence"][f, hand].astype(bool)
        points = example["keypoints"][f, hand][present]
        expected |= hull_mask(points, SIZE, SIZE)
        # Drawn on the stored frame, every stored joint is in (or touching) the stored mask.
        for x, y in points:
          column, row = min(int(x * SIZE), SIZE - 1), min(int(y * SIZE), SIZE - 1)
          assert frame_masks[f, max(row - 1, 0):row + 2, max(column - 1, 0):column + 2].any()
      np.testing.assert_array_equal(frame_masks[f], expected)
      # Independent check of the geometry: MediaPipe run again on the stored frame finds the same hands at the
      # stored keypoints, inside the stored mask (hands it finds only on the crop have no stored counterpart).
      stored = [example["keypoints"][f, s] for s in range(2) if example["presence"][f, s].all()]
      near = cv2.dilate(frame_masks[f], np.ones((9, 9), np.uint8)) > 0  # 4 px of detector jitter
      for landmarks in detector.process(example["frames"][f]).multi_hand_landmarks or []:
        found = np.array([(p.x, p.y) for p in landmarks.landmark])
        matches = [s for s in stored if np.abs(found[0] - s[0]).max() < 0.1]
        if not matches:
          continue
        distances.append(min(np.abs(found - s).mean() for s in matches) * SIZE)
        pixels = np.clip((found * SIZE).astype(int), 0, SIZE - 1)
        inside += int(near[pixels[:, 1], pixels[:, 0]].sum())
        total += len(pixels)
  assert len(distances) >= 15 and np.median(distances) < 3.0  # pixels at 256 x 256
  assert inside / total > 0.9


def test_hands_found_in_at_least_as_many_frames_as_plain_mediapipe(built, videos):
  _, out = built
  examples = list(tfds.builder_from_directory(str(out)).as_dataset(split="train").as_numpy_iterator())[:3]
  detector = _plain_mediapipe()
  for example in examples:
    name = example["clip_id"].decode()
    frames = _read_all_frames(videos / f"{name}.mp4")
    plain = sum(bool(detector.process(cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB)).multi_hand_landmarks)
                for i in example["frame_indices"])
    ours = int((example["handedness"] != schema.NO_HAND).any(axis=1).sum())
    assert ours >= plain, name
    assert ours > 0 and (example["presence"].any(axis=(1, 2)) <= (example["handedness"] != -1).any(axis=1)).all()


def test_slot_rule_puts_colliding_labels_in_image_order(shared_data):
  left_of_image = Hand(np.full((21, 2), 0.3, np.float32), hand=schema.RIGHT, score=0.6)
  right_of_image = Hand(np.full((21, 2), 0.7, np.float32), hand=schema.RIGHT, score=0.9)
  slots, codes = assign_slots([right_of_image, left_of_image])
  assert slots == [left_of_image, right_of_image] and codes.tolist() == [schema.RIGHT, schema.RIGHT]
  slots, codes = assign_slots([right_of_image])
  assert slots == [None, right_of_image] and codes.tolist() == [schema.NO_HAND, schema.RIGHT]
  # Real frames (../shared/data/README.md): frame 3 has two hands that MediaPipe labels alike; in frame 5 the
  # knife hand on the right of the image is the person's right hand.
  detector = HandDetector(DetectorSettings())
  frames = np.stack([cv2.cvtColor(cv2.imread(str(shared_data / "ek_frames" / f"{i}.png")), cv2.COLOR_BGR2RGB)
                     for i in (3, 5)])
  collided, distinct = detector.detect_clip(frames, fps=1.0)
  assert len(collided) == 2 and collided[0].hand == collided[1].hand
  slots, _ = assign_slots(collided)
  assert slots[0].landmarks[0, 0] < slots[1].landmarks[0, 0]
  slots, codes = assign_slots(distinct)
  assert codes.tolist() == [schema.LEFT, schema.RIGHT] and slots[1].landmarks[0, 0] > 0.7


def test_tasks_hand_landmarker_agrees_with_solutions_on_slots(shared_data, tmp_path):
  frames = np.stack([cv2.cvtColor(cv2.imread(str(shared_data / "ek_frames" / f"{i}.png")), cv2.COLOR_BGR2RGB)
                     for i in (1, 5)])
  task = write_bundled_task_file(tmp_path / "hand_landmarker.task")
  by_tasks = HandDetector(DetectorSettings(detector=str(task))).detect_clip(frames, fps=1.0)
  by_solutions = HandDetector(DetectorSettings()).detect_clip(frames, fps=1.0)
  for tasks_hands, solutions_hands in zip(by_tasks, by_solutions, strict=True):
    tasks_slots, tasks_codes = assign_slots(tasks_hands)
    solutions_slots, solutions_codes = assign_slots(solutions_hands)
    assert tasks_codes.tolist() == solutions_codes.tolist()
    for a, b in zip(tasks_slots, solutions_slots, strict=True):
      assert (a is None) == (b is None)
      if a is not None:
        assert np.abs(a.landmarks - b.landmarks).mean() < 0.02  # the two graphs crop the hand slightly differently
  with pytest.raises(FileNotFoundError, match="task"):
    HandDetector(DetectorSettings(detector=str(tmp_path / "missing.task")))


def test_mask_rules_by_hand():
  # Two 3-joint "hands": right triangles with legs of 8 px, 24 px apart, in a 40 x 40 frame.
  def triangle(x0):
    return np.array([[x0, 4], [x0 + 8, 4], [x0, 12]], np.float64) + 0.5
  keypoints = np.zeros((2, 21, 2), np.float32)
  presence = np.zeros((2, 21), np.uint8)
  keypoints[0, :3], keypoints[1, :3] = triangle(4) / 40, triangle(28) / 40
  presence[:, :3] = 1
  per_hand = masks.frame_mask(keypoints, presence, 40, 40, "per_hand_hull")
  joint = masks.frame_mask(keypoints, presence, 40, 40, "joint_hull")
  # A right triangle with 8-px legs on pixel centres covers 9 + 8 + ... + 1 = 45 pixels.
  assert np.count_nonzero(per_hand) == 2 * 45
  assert not per_hand[4:13, 13:28].any() and joint[4:13, 13:28].all()
  assert np.count_nonzero(joint) > np.count_nonzero(per_hand) and (joint >= per_hand).all()
  with pytest.raises(ValueError, match="mask_rule"):
    masks.frame_mask(keypoints, presence, 40, 40, "squash")


def test_caption_index_reads_the_release_json_lines(shared_data):
  jobs = build.read_caption_index(shared_data / "ek_frames" / "prompt.json")
  assert len(jobs) == 5 and all(j.caption for j in jobs)
  assert jobs[0].clip_id == "target/1" and jobs[0].video == str(shared_data / "ek_frames" / "target" / "1.mp4")


@pytest.mark.slow
def test_killed_run_resumes_to_identical_shards(built, videos, tmp_path):
  summary, reference = built
  out = tmp_path / "resumed"
  command = [sys.executable, "-m", "data_prep.build", f"--captions={videos / 'captions.json'}",
             f"--output_dir={out}", "--workers=2", "--noprogress", f"--workdir={tmp_path}"] + [
                 f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  progress = out / "train" / "_progress" / "shard-00000.json"
  deadline = time.monotonic() + 120
  while not progress.exists() and first.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  os.killpg(first.pid, signal.SIGKILL)
  first.wait()
  done = sorted((out / "train" / "_progress").glob("shard-*.json"))
  assert 1 <= len(done) < summary.num_shards, "the run was not interrupted midway"
  finished = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert finished.returncode == 0, finished.stderr[-2000:]
  assert f"({len(done)} reused from an earlier run)" in finished.stdout
  ours, theirs = schema.split_files(out, "train"), schema.split_files(reference, "train")
  assert [p.name for p in ours] == [p.name for p in theirs] and len(ours) == summary.num_shards
  for a, b in zip(ours, theirs, strict=True):
    assert a.read_bytes() == b.read_bytes(), a.name
  assert not list(out.glob(".tmp-*"))
  assert (out / "train" / schema.REJECTED).read_bytes() == (reference / "train" / schema.REJECTED).read_bytes()


def test_exit_status_is_nonzero_only_when_nothing_was_written(videos, tmp_path, capsys):
  captions = tmp_path / "bad.json"
  captions.write_text(json.dumps([dict(video=v, caption="x") for v in FAULTS]))
  assert build.run(_config(), captions, tmp_path / "out", video_dir=videos, workers=1, progress=False) == 1
  output = capsys.readouterr()
  assert "no clip could be written" in output.err and "0 clips written" in output.out and "4 rejected" in output.out


def test_command_line_help_documents_the_flags():
  result = subprocess.run([sys.executable, "-m", "data_prep.build", "--help"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
  assert "Traceback" not in result.stderr  # absl exits with status 1 after --help
  for flag in ("captions", "captions_format", "output_dir", "split", "video_dir", "workers", "runner", "beam_options",
               "config", "workdir", "traceback"):
    assert f"\n  --{flag}: " in result.stdout or f"\n  --[no]{flag}: " in result.stdout, (flag, result.stdout)


def test_training_pipeline_reads_the_built_clips_past_empty_shards(built):
  from handi_jax import sharding
  from handi_jax.data import input_pipeline

  summary, out = built
  lengths = json.loads((out / schema.MANIFEST).read_text())["splits"]["train"]["shard_lengths"]
  assert 0 in lengths  # shards whose clips were all rejected
  config = _config()
  config.data.dir, config.train.global_batch_size = str(out), 16
  examples = {e["clip_id"].decode(): e for e in tfds.builder_from_directory(str(out)).as_dataset(split="train")
              .as_numpy_iterator()}
  batch = next(input_pipeline.InputPipeline(config, sharding.make_mesh(config)))
  assert batch["frames"].shape == (16, NUM_FRAMES, SIZE, SIZE, 3)
  assert set(batch["clip_id"]) == set(examples)
  for i, clip_id in enumerate(batch["clip_id"]):
    np.testing.assert_array_equal(np.asarray(batch["keypoints"][i]), examples[clip_id]["keypoints"])
    np.testing.assert_array_equal(np.asarray(batch["mask"][i]), examples[clip_id]["union_mask"] / np.float32(255))


def test_bad_config_override_is_one_line(tmp_path):
  result = subprocess.run([sys.executable, "-m", "data_prep.build", "--captions=x.json", "--output_dir=out",
                           f"--workdir={tmp_path}", "--config.data.build.mask_rul=joint_hull"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and result.stderr.splitlines() == [
      "error: unknown config key data.build.mask_rul (in --config.data.build.mask_rul=joint_hull). "
      "Did you mean data.build.mask_rule?", "(--traceback shows where)"]


def test_bad_caption_entries_are_rejected_with_their_line_and_the_rest_written(videos, tmp_path, capsys):
  lines = [json.dumps(dict(source="source/31.png", target="31.mp4", prompt="julienne the carrot")),
           "",
           '{"source": "source/816.png", "target": "816.mp4", "prompt": "knit',  # cut off
           json.dumps(dict(source="source/36.png", target="36.mp4", text="roll the dough")),  # wrong field name
           "not json at all",
           json.dumps(dict(source="source/816.png", target="816.mp4", prompt="knit the fabric"))]
  (tmp_path / "prompt.jsonl").write_text("\n".join(lines) + "\n")
  entries = [dict(video="31.mp4", caption="julienne the carrot"), dict(vidoe="36.mp4", caption="roll the dough"),
             ["816.mp4", "knit the fabric"]]
  (tmp_path / "captions.json").write_text(json.dumps(entries, indent=1))
  out = tmp_path / "out"
  expected = dict(
      lines=(["31", "816"], {"prompt.jsonl line 3": "line 3 of {} is not JSON (Unterminated string",
                             "prompt.jsonl line 4": "line 4 of {} has keys ['source', 'target', 'text']; expected",
                             "prompt.jsonl line 5": "line 5 of {} is not JSON (Expecting value at column 1)"}),
      list=(["31"], {"captions.json index 1": "index 1 of {} has keys ['caption', 'vidoe']; expected",
                     "captions.json index 2": "index 2 of {} is a JSON list; expected"}))
  for split, captions in (("lines", tmp_path / "prompt.jsonl"), ("list", tmp_path / "captions.json")):
    assert build.run(_config(), captions, out, split=split, video_dir=videos, workers=1, progress=False) == 0
    clip_ids, problems = expected[split]
    states = [json.loads(p.read_text()) for p in sorted((out / split / "_progress").glob("shard-*.json"))]
    assert [c["clip_id"] for state in states for c in state["clips"]] == clip_ids
    rejected = [json.loads(line) for line in (out / split / schema.REJECTED).read_text().splitlines()]
    assert [r["clip_id"] for r in rejected] == list(problems)
    assert [r["video"] for r in rejected] == (["", str(videos / "36.mp4"), ""] if split == "lines" else ["", ""])
    for row, start in zip(rejected, problems.values(), strict=True):
      assert row["reason"] == "bad_caption_entry" and row["detail"].startswith(start.format(captions)), row
    assert json.loads((out / split / schema.REPORT).read_text())["rejected_by_reason"] == {
        "bad_caption_entry": len(problems)}
  assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("name, content, says", [
    ("latin1.json", '[{"video": "31.mp4", "caption": "julienne the carrot for the sauté"}]'.encode("latin-1"),
     "is not UTF-8 text (byte 0xe9 on line 1); save it as UTF-8"),
    ("syntax.json", b'[{"video": "31.mp4", "caption": "a"},\n {"video": "36.mp4" "caption": "b"}]',
     "is not valid JSON: Expecting ',' delimiter at line 2 column 21; fix the file (expected a JSON list"),
    ("table.json", b"video,caption\n31.mp4,julienne the carrot\n",
     "is neither a JSON list nor JSON lines (line 1 is not JSON (Expecting value at column 1)); expected"),
    ("empty.json", b"[]", "has no entries; expected a JSON list")])
def test_unreadable_caption_file_ends_the_build_with_one_error_line(videos, tmp_path, capsys, name, content, says):
  captions = tmp_path / name
  captions.write_bytes(content)
  assert build.run(_config(), captions, tmp_path / "out", video_dir=videos, workers=1, progress=False) == 1
  output = capsys.readouterr()
  assert output.err.startswith(f"error: {captions} {says}") and output.err.count("\n") == 1 and not output.out
  assert not (tmp_path / "out").exists()


def test_unreadable_caption_file_on_the_command_line_is_one_line(tmp_path):
  captions = tmp_path / "captions.json"
  captions.write_bytes(b'[{"video": "31.mp4", "caption": "saut\xe9"}]')
  result = subprocess.run([sys.executable, "-m", "data_prep.build", f"--captions={captions}",
                           f"--output_dir={tmp_path / 'out'}", f"--workdir={tmp_path}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (f"error: {captions} is not UTF-8 text (byte 0xe9 on line 1); "
                                                    "save it as UTF-8 and run again (--captions)")


def test_truncated_mp4_with_its_index_at_the_front_is_a_corrupt_video(shared_data, tmp_path):
  """Cut in half, such a file still opens (the moov is intact) and decodes up to the cut: 49 of 130 frames
  here, and 9 of 20, which was a too_few_frames verdict. Both are damaged files."""
  source = [frame[:182] for frame in _read_all_frames(shared_data / "clips" / "31.gif")]  # even height for mpeg4
  config = _config()
  config.data.num_frames = 16
  settings = BuildSettings.from_config(config)
  for name, count in (("long", 130), ("short", 20)):
    data = _write_faststart_mp4(tmp_path / f"{name}.mp4", [source[i % len(source)] for i in range(count)])
    clip = video.read_sampled_frames(tmp_path / f"{name}.mp4", 16)  # the whole file is a good clip
    assert clip.num_source_frames == count and clip.frames.shape[0] == 16
    cut = tmp_path / f"{name}_cut.mp4"
    cut.write_bytes(data[:len(data) // 2])
    capture = cv2.VideoCapture(str(cut))
    assert capture.isOpened() and capture.get(cv2.CAP_PROP_FRAME_COUNT) == count
    capture.release()
    result = process_video(ClipJob(f"{name}_cut", str(cut), "julienne the carrot"), settings)
    assert result.reason == "corrupt_video", result
    assert f"of the {count} frames its container lists could be decoded" in result.detail
  assert video.read_sampled_frames(shared_data / "clips" / "31.gif", 16).num_source_frames == 20  # a GIF too


def test_sampled_frames_are_those_of_a_full_decode_also_when_the_container_count_is_off(shared_data, tmp_path):
  """The frames are kept on the one decoding pass at the positions the container's count gives; a clip whose
  count is off (a variable-frame-rate mkv with a 2 s gap: 40 frames listed, 20 decoded) is decoded again."""
  import imageio_ffmpeg

  _write_mp4(tmp_path / "even.mp4", _read_all_frames(shared_data / "clips" / "31.gif"))
  subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(tmp_path / "even.mp4"), "-vf",
                  "setpts='if(lt(N,10),N,N+20)/(10*TB)'", "-fps_mode", "passthrough", "-c:v", "mpeg4", "-q:v", "3",
                  str(tmp_path / "gap.mkv")], check=True, timeout=120)
  for name, listed in (("even.mp4", 20), ("gap.mkv", 40)):
    capture = cv2.VideoCapture(str(tmp_path / name))
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) == listed
    capture.release()
    decoded = _read_all_frames(tmp_path / name)
    clip = video.read_sampled_frames(tmp_path / name, 16)
    wanted = video.sample_indices(len(decoded), 16)
    assert clip.num_source_frames == len(decoded) == 20 and clip.frame_indices.tolist() == wanted.tolist()
    np.testing.assert_array_equal(clip.frames, [cv2.cvtColor(decoded[i], cv2.COLOR_BGR2RGB) for i in wanted])


def test_frame_count_slack_excuses_an_estimated_count_but_not_a_lost_tail():
  at_10_fps = lambda frames: (frames - 1) * 100.0  # noqa: E731 - the time of the last frame, in ms
  assert not video.missing_frames(128, 130, 10.0, at_10_fps(128))  # 2 short: a dropped edit-list frame
  assert not video.missing_frames(191, 200, 10.0, at_10_fps(191))  # 4.5 % short: duration x rate rounded
  assert video.missing_frames(120, 130, 10.0, at_10_fps(120))
  assert video.missing_frames(49, 130, 10.0, at_10_fps(49))
  assert video.missing_frames(49, 130, 0.0, 0.0)  # no timeline: the count decides
  assert not video.missing_frames(100, 130, 10.0, 12900.0)  # variable frame rate: the timeline reaches the end
  assert not video.missing_frames(20, 0, 10.0, at_10_fps(20))  # the container gives no count
  assert not video.missing_frames(20, 18, 10.0, at_10_fps(20))  # more frames than listed


def test_report_counts_only_the_hands_stored_in_the_crop(shared_data, tmp_path):
  """ek_frames 4 and 5 (448 x 256) cropped to 256 x 64 keep the middle seventh of the width: frame 4's hand and
  frame 5's knife hand lie wholly outside it (detected, not stored); frame 5's other hand is inside."""
  stills = {i: cv2.imread(str(shared_data / "ek_frames" / f"{i}.png")) for i in (4, 5)}
  _write_mp4(tmp_path / "edge.mp4", [stills[5]] * 4 + [stills[4]] * 4)
  (tmp_path / "captions.json").write_text(json.dumps([dict(video="edge.mp4", caption="cut the onion")]))
  config = _config()
  config.data.width = 64
  summary = build.build(config, tmp_path / "captions.json", tmp_path / "out", workers=1, progress=False)
  assert summary.num_clips == 1
  (example,) = tfds.builder_from_directory(str(tmp_path / "out")).as_dataset(split="train").as_numpy_iterator()
  detected = (example["handedness"] != schema.NO_HAND).sum(axis=1)
  stored = example["presence"].any(axis=2).sum(axis=1)
  assert detected.tolist() == [2] * 4 + [1] * 4 and stored.tolist() == [1] * 4 + [0] * 4
  report = json.loads((tmp_path / "out" / "train" / schema.REPORT).read_text())
  assert report["hand_detection_rate"] == 0.5 and report["mean_hands_per_frame"] == 0.5
  assert report["hand_detection_rate_per_frame"] == [1.0] * 4 + [0.0] * 4
