"""Training input pipeline on demo data: global arrays on 8 simulated devices, exact values, resume, sharding."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from handi_jax import sharding, tokenizers
from handi_jax.data import demo_clips, input_pipeline, schema


def _config(stage, data_dir, **overrides):
  config = common.get_config(stage)
  config.data.demo.num_clips = 8
  config.data.dir = str(data_dir)
  config.train.global_batch_size = 8
  for key, value in overrides.items():
    section, field = key.split(".")
    setattr(config[section], field, value)
  return config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """Demo data in 2 shards (4 clips each) and the stored clips by id, decoded through TFDS."""
  config = common.get_config(2)
  config.data.demo.num_clips = 8
  config.data.build.frames_per_shard = 4 * config.data.num_frames
  path = demo_clips.write_demo_dataset(tmp_path_factory.mktemp("demo"), config)
  stored = tfds.builder_from_directory(str(path)).as_dataset(split="train").as_numpy_iterator()
  return path, {e["clip_id"].decode(): e for e in stored}


def _host(batch, key):
  return np.asarray(jax.device_get(batch[key]))


def test_stage2_batch_is_global_sharded_and_exact(dataset):
  path, clips = dataset
  config = _config(2, path)
  mesh = sharding.make_mesh(config)
  batch = next(input_pipeline.InputPipeline(config, mesh))
  f, h, w = config.data.num_frames, config.data.height, config.data.width
  shapes = {k: v.shape for k, v in input_pipeline.batch_shapes(config).items()}
  assert {k: batch[k].shape for k in shapes} == shapes == {
      "frames": (8, f, h, w, 3), "keypoints": (8, f, 2, 21, 2), "presence": (8, f, 2, 21), "mask": (8, h, w, 1)}
  for key in shapes:
    assert isinstance(batch[key], jax.Array) and batch[key].dtype == np.float32
    assert batch[key].sharding == sharding.batch_sharding(mesh, batch[key].ndim)
    assert len(batch[key].addressable_shards) == 8 and batch[key].addressable_shards[0].data.shape[0] == 1
  assert sorted(batch["clip_id"]) == sorted(clips)  # one full epoch, no clip twice
  for i, clip_id in enumerate(batch["clip_id"]):
    clip = clips[clip_id]
    assert batch["caption"][i] == clip["caption"].decode()
    np.testing.assert_array_equal(_host(batch, "frames")[i], clip["frames"].astype(np.float32) / 127.5 - 1)
    np.testing.assert_array_equal(_host(batch, "keypoints")[i], clip["keypoints"])
    np.testing.assert_array_equal(_host(batch, "presence")[i], clip["presence"])
    np.testing.assert_array_equal(_host(batch, "mask")[i], clip["union_mask"] / np.float32(255))
  assert _host(batch, "frames").min() >= -1 and _host(batch, "frames").max() <= 1


def test_stage1_batch_has_mask_video_and_prior(dataset):
  path, clips = dataset
  config = _config(1, path)
  batch = next(input_pipeline.InputPipeline(config, sharding.make_mesh(config)))
  f = config.data.num_frames
  assert batch["frames"].shape == (8, f, 64, 64, 3) and batch["target_masks"].shape == (8, f - 1, 64, 64)
  prior = np.mean([c["union_mask"][..., 0] > 0 for c in clips.values()], axis=0)
  np.testing.assert_allclose(_host(batch, "mask")[..., 0], np.broadcast_to(prior, (8, 64, 64)), atol=1e-6)
  for i, clip_id in enumerate(batch["clip_id"]):
    clip = clips[clip_id]
    frames = _host(batch, "frames")[i]
    np.testing.assert_array_equal(frames[0], clip["frames"][0] / np.float32(127.5) - 1)
    masks = clip["frame_masks"][1:, ..., 0] / np.float32(255)
    np.testing.assert_array_equal(_host(batch, "target_masks")[i], masks)
    np.testing.assert_array_equal(frames[1:], np.repeat(masks[..., None] * 2 - 1, 3, axis=-1))


def test_stream_is_deterministic_and_resumes_from_position(dataset):
  path, _ = dataset
  config = _config(2, path, **{"train.global_batch_size": 8, "data.shuffle_buffer": 4})
  mesh = sharding.make_mesh(config)
  first = input_pipeline.InputPipeline(config, mesh)
  ids = [next(first)["clip_id"] for _ in range(4)]
  assert first.state() == {"position": 4}
  assert ids[0] != ids[1]  # a new order every epoch
  again = input_pipeline.InputPipeline(config, mesh)
  assert [next(again)["clip_id"] for _ in range(4)] == ids
  resumed = input_pipeline.InputPipeline(config, mesh, position=2)
  batch = next(resumed)
  assert batch["clip_id"] == ids[2] and resumed.state() == {"position": 3}
  reference = input_pipeline.InputPipeline(config, mesh)
  for _ in range(2):
    next(reference)
  np.testing.assert_array_equal(_host(batch, "frames"), _host(next(reference), "frames"))


def test_the_stream_is_not_autotuned_so_training_ends_without_waiting_for_tf_data(dataset):
  """Deleting an autotuned tf.data iterator waits for its model thread, asleep for up to 60 s between
  optimisations: in `make demo`, 20-56 s of standing still after a stage's last checkpoint, in C++
  (RootDataset::Iterator::~Iterator)."""
  path, _ = dataset
  config = _config(2, path, **{"train.global_batch_size": 8})
  stream = input_pipeline.InputPipeline(config, sharding.make_mesh(config))
  next(stream)
  options = stream._dataset.options()
  assert options.autotune.enabled is False and options.deterministic is True


def test_each_process_reads_its_own_files(dataset):
  path, clips = dataset
  assert len(schema.split_files(path, "train")) == 2
  config = _config(2, path, **{"train.global_batch_size": 16})
  mesh = sharding.make_mesh(config)
  seen = [set(next(input_pipeline.InputPipeline(config, mesh, process_index=p, process_count=2))["clip_id"])
          for p in range(2)]
  assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(clips)


def test_bad_batch_size_and_missing_data_say_what_to_do(dataset, tmp_path):
  path, _ = dataset
  config = _config(2, path, **{"train.global_batch_size": 2})
  with pytest.raises(ValueError, match="multiple of 8"):
    input_pipeline.InputPipeline(config, sharding.make_mesh(config))
  config = _config(2, tmp_path)
  with pytest.raises(FileNotFoundError, match="data_prep.build"):
    input_pipeline.InputPipeline(config, sharding.make_mesh(config))


def test_input_ids_come_from_the_given_tokenizer(dataset):
  path, _ = dataset
  config = _config(2, path)
  tokenizer = tokenizers.demo_tokenizer()
  batch = next(input_pipeline.InputPipeline(config, sharding.make_mesh(config), tokenizer=tokenizer))
  assert batch["input_ids"].shape == (8, 77) and batch["input_ids"].dtype == np.int32
  expected = tokenizer(batch["caption"], padding="max_length", max_length=77, truncation=True)["input_ids"]
  np.testing.assert_array_equal(_host(batch, "input_ids"), np.array(expected))
  np.testing.assert_array_equal(_host(batch, "input_ids"), tokenizers.tokenize(tokenizer, batch["caption"]))
