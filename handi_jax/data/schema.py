"""The one TFRecord schema of handi-jax clips: written by handi_jax.data.writer (for data_prep and the demo
data), read by handi_jax.data.input_pipeline.

A dataset directory is a TFDS folder dataset (`tfds.builder_from_directory(dir)` reads it):
`handi-<split>.tfrecord-00000-of-00004` shards, `dataset_info.json` / `features.json`, plus handi's own
`manifest.json` and per-split extras under `<split>/` (prior mask, motion-intensive index, report).

Per clip (F frames of H x W, frame 0 = the context image):
  frames            (F, H, W, 3) uint8, PNG-encoded per frame
  frame_masks       (F, H, W, 1) uint8 {0, 255}: filled hand hulls of that frame, PNG per frame
  union_mask        (H, W, 1) uint8 {0, 255}: OR of the frame masks (the clip's motion area)
  keypoints         (F, 2, 21, 2) float32 (x, y) in [0, 1] of the stored frame; slot 0 = left, 1 = right hand
  presence          (F, 2, 21) uint8 {0, 1}; absent joints have keypoints (0, 0)
  handedness        (F, 2) int64: the hand the detector reported for the slot (LEFT, RIGHT) or NO_HAND;
                    differs from the slot index only where two hands got the same label
  handedness_score  (F, 2) float32: the detector's handedness confidence, 0 without a hand
  mask_area         float32: fraction of pixels in union_mask
  caption, clip_id  text
  frame_indices     (F,) int64 source frame numbers; fps (source frame rate, float32)
  source_height, source_width, num_source_frames  int64
"""

import json
import os

import numpy as np

from handi_jax import fileio

# tensorflow_datasets is imported inside the functions: data_prep's worker processes use the constants
# below and must not pay for (or initialise) TensorFlow.

SCHEMA_VERSION = "1.0.0"
DATASET_NAME = "handi"
FILE_FORMAT = "tfrecord"
MANIFEST = "manifest.json"
NUM_HANDS = 2
NUM_JOINTS = 21
NO_HAND, LEFT, RIGHT = -1, 0, 1

# Per-split files next to the shards: <data_dir>/<split>/<name>.
PRIOR_MASK_NPY = "prior_mask.npy"
PRIOR_MASK_PNG = "prior_mask.png"
MOTION_INTENSIVE = "motion_intensive.json"
REPORT = "report.json"
COVERAGE_HISTOGRAM = "coverage_histogram.png"
REJECTED = "rejected.jsonl"


def make_features(num_frames: int, height: int, width: int):
  """The tfds FeaturesDict for clips of `num_frames` frames of `height` x `width` pixels."""
  import tensorflow_datasets as tfds

  f, h, w = num_frames, height, width
  return tfds.features.FeaturesDict({
      "frames": tfds.features.Video((f, h, w, 3), encoding_format="png"),
      "frame_masks": tfds.features.Video((f, h, w, 1), encoding_format="png"),
      "union_mask": tfds.features.Image(shape=(h, w, 1), encoding_format="png"),
      "keypoints": tfds.features.Tensor(shape=(f, NUM_HANDS, NUM_JOINTS, 2), dtype=np.float32),
      "presence": tfds.features.Tensor(shape=(f, NUM_HANDS, NUM_JOINTS), dtype=np.uint8),
      "handedness": tfds.features.Tensor(shape=(f, NUM_HANDS), dtype=np.int64),
      "handedness_score": tfds.features.Tensor(shape=(f, NUM_HANDS), dtype=np.float32),
      "mask_area": tfds.features.Scalar(dtype=np.float32),
      "caption": tfds.features.Text(),
      "clip_id": tfds.features.Text(),
      "frame_indices": tfds.features.Tensor(shape=(f,), dtype=np.int64),
      "fps": tfds.features.Scalar(dtype=np.float32),
      "source_height": tfds.features.Scalar(dtype=np.int64),
      "source_width": tfds.features.Scalar(dtype=np.int64),
      "num_source_frames": tfds.features.Scalar(dtype=np.int64),
  })


def feature_names() -> tuple[str, ...]:
  return tuple(make_features(1, 1, 1).keys())


class Serializer:
  """Clip dict -> deterministic `tf.train.Example` bytes (same input, same bytes, in any process).

  Frames and masks may be given as uint8 arrays or as lists of PNG bytes (what data_prep workers send).
  """

  def __init__(self, features):
    from tensorflow_datasets.core import example_serializer

    self.features = features
    self._serializer = example_serializer.ExampleSerializer(features.get_serialized_info())

  def __call__(self, clip: dict) -> bytes:
    missing = set(self.features.keys()) - set(clip)
    extra = set(clip) - set(self.features.keys())
    if missing or extra:
      raise ValueError(f"clip record does not match schema {SCHEMA_VERSION}: missing {sorted(missing)}, "
                       f"unexpected {sorted(extra)}; fields are {feature_names()}")
    encoded = self.features.encode_example(clip)
    # Map-field order in a proto is otherwise up to the runtime; deterministic=True sorts it.
    return self._serializer.get_tf_example(encoded).SerializeToString(deterministic=True)


def filename_template(data_dir: str | os.PathLike, split: str):
  """TFDS's default naming: <data_dir>/handi-<split>.tfrecord-00000-of-00004."""
  import tensorflow_datasets as tfds

  return tfds.core.ShardedFileTemplate(data_dir=fileio.as_path(data_dir), dataset_name=DATASET_NAME, split=split,
                                       filetype_suffix=FILE_FORMAT)


def shard_path(data_dir: str | os.PathLike, split: str, index: int, num_shards: int) -> fileio.Path:
  return fileio.as_path(filename_template(data_dir, split).sharded_filepath(shard_index=index, num_shards=num_shards))


def split_files(data_dir: str | os.PathLike, split: str) -> list[fileio.Path]:
  """The committed shard files of one split (handi_jax.fileio), in shard order."""
  return sorted(filter(fileio.is_committed,
                       fileio.as_path(data_dir).glob(f"{DATASET_NAME}-{split}.{FILE_FORMAT}-*-of-*")))


def read_manifest(data_dir: str | os.PathLike) -> dict:
  """manifest.json, written last by a build: a dataset without a committed one (handi_jax.fileio) is unfinished."""
  path = fileio.as_path(data_dir) / MANIFEST
  if not fileio.is_committed(path):
    raise FileNotFoundError(f"{path} not found or not finished: {data_dir} is not a finished handi dataset; run "
                            "`python -m data_prep.build` into it (again)")
  return json.loads(path.read_text())


def load_features(data_dir: str | os.PathLike):
  """The feature spec stored with a dataset (its `features.json`)."""
  import tensorflow_datasets as tfds

  path = fileio.as_path(data_dir)
  if not (path / "features.json").is_file():
    raise FileNotFoundError(f"{path} is not a handi dataset: no features.json there. Build one with "
                            "`python -m data_prep.build` (or write the demo data with handi_jax.data.demo_clips).")
  return tfds.features.FeatureConnector.from_config(str(path))
