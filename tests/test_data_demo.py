"""Demo data: procedural clips written through the real writer, read back through TFDS."""

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from handi_jax.data import demo_clips, schema
from tests.helpers import hull_mask


def _config(**data):
  config = common.get_config(2)
  config.data.demo.num_clips = 8
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  config = _config()
  return config, demo_clips.write_demo_dataset(tmp_path_factory.mktemp("demo"), config)


def test_demo_reads_back_bit_exact_through_tfds(demo):
  config, path = demo
  builder = tfds.builder_from_directory(str(path))
  assert builder.info.splits["train"].num_examples == config.data.demo.num_clips
  examples = list(builder.as_dataset(split="train").as_numpy_iterator())
  assert [e["clip_id"].decode() for e in examples] == [f"demo-{i:04d}" for i in range(config.data.demo.num_clips)]
  f, h, w = config.data.num_frames, config.data.height, config.data.width
  for index, example in enumerate(examples):
    clip = demo_clips.synthesize_clip(index, config)
    assert example["frames"].shape == (f, h, w, 3) and example["frames"].dtype == np.uint8
    np.testing.assert_array_equal(example["frames"], clip["frames"])
    np.testing.assert_array_equal(example["keypoints"], clip["keypoints"])
    np.testing.assert_array_equal(example["presence"], clip["presence"])
    np.testing.assert_array_equal(example["handedness"], clip["handedness"])
    assert example["caption"].decode() == clip["caption"]
    # Per-frame masks are the per-hand hulls of the stored keypoints; the union is their OR.
    for frame in range(f):
      expected = np.zeros((h, w), np.uint8)
      for hand in range(2):
        present = clip["presence"][frame, hand].astype(bool)
        expected |= hull_mask(clip["keypoints"][frame, hand][present], h, w)
      np.testing.assert_array_equal(example["frame_masks"][frame, ..., 0], expected)
    np.testing.assert_array_equal(example["union_mask"][..., 0], np.bitwise_or.reduce(example["frame_masks"][..., 0]))
    assert example["mask_area"] == pytest.approx(np.count_nonzero(example["union_mask"]) / (h * w))
  total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
  assert total < 5e6


def test_demo_hands_move_inside_the_mask_and_the_background_is_still(demo):
  config, _ = demo
  for index in range(3):
    clip = demo_clips.synthesize_clip(index, config)
    union = np.zeros(clip["frames"].shape[1:3], np.uint8)
    for frame in range(config.data.num_frames):
      for hand in range(2):
        present = clip["presence"][frame, hand].astype(bool)
        union |= hull_mask(clip["keypoints"][frame, hand][present], *union.shape)
    # Finger strokes are ~2 px wide around the joint hull: allow 3 px around the mask.
    near_hands = cv2.dilate(union, np.ones((7, 7), np.uint8)) > 0
    changed = (clip["frames"] != clip["frames"][:1]).any(axis=(0, 3))
    assert changed.any() and not (changed & ~near_hands).any()
    assert 0.02 < union.mean() / 255 < 0.6


def test_demo_is_deterministic_and_rerun_reuses_shards(demo, tmp_path):
  config, path = demo
  again = demo_clips.write_demo_dataset(tmp_path / "again", config)
  for first, second in zip(schema.split_files(path, "train"), schema.split_files(again, "train"), strict=True):
    assert first.name == second.name and first.read_bytes() == second.read_bytes()
  shard = schema.split_files(again, "train")[0]
  before = shard.stat().st_mtime_ns
  demo_clips.write_demo_dataset(again, config)
  assert shard.stat().st_mtime_ns == before
  for name in (schema.PRIOR_MASK_NPY, schema.MOTION_INTENSIVE, schema.REPORT):
    assert (path / "train" / name).read_bytes() == (again / "train" / name).read_bytes()


def test_crashed_write_resumes_to_the_same_bytes_without_duplicates(demo, tmp_path, monkeypatch):
  config, clean = demo
  config = _config()
  config.data.build.frames_per_shard = 2 * config.data.num_frames  # 4 shards of 2 clips
  intact = demo_clips._demo_record

  def crash_on_clip_5(index, config):
    if index == 5:
      raise RuntimeError("simulated crash")
    return intact(index, config)

  monkeypatch.setattr(demo_clips, "_demo_record", crash_on_clip_5)
  with pytest.raises(RuntimeError, match="simulated crash"):
    demo_clips.write_demo_dataset(tmp_path / "a", config)
  shards = schema.split_files(tmp_path / "a", "train")
  assert [p.name[-14:] for p in shards] == ["00000-of-00004", "00001-of-00004"]
  before = [p.stat().st_mtime_ns for p in shards]
  monkeypatch.setattr(demo_clips, "_demo_record", intact)
  demo_clips.write_demo_dataset(tmp_path / "a", config)
  assert [p.stat().st_mtime_ns for p in shards] == before  # finished shards were not redone
  fresh = demo_clips.write_demo_dataset(tmp_path / "b", config)
  resumed = schema.split_files(tmp_path / "a", "train")
  assert len(resumed) == 4
  for a, b in zip(resumed, schema.split_files(fresh, "train"), strict=True):
    assert a.read_bytes() == b.read_bytes()
  ids = [e["clip_id"] for e in tfds.builder_from_directory(str(tmp_path / "a")).as_dataset(split="train")
         .as_numpy_iterator()]
  assert len(ids) == len(set(ids)) == config.data.demo.num_clips
  assert not list((tmp_path / "a").glob(".tmp-*"))
