"""Training input: TFRecord shards (handi_jax.data.schema) -> batches of global jax.Arrays on the mesh.

Every host reads its own files (file `i` goes to process `i % process_count`), shuffles them and their records
with `config.seed`, decodes and batches (global batch) // process_count clips, and the batch is assembled
into global arrays split over the mesh's batch axes. The stream repeats forever and is deterministic: the
integer `position` (batches delivered so far, `state()`) is all a checkpoint needs to resume it.

Batch keys (B = global batch, F frames, H x W pixels):
  stage 2: frames (B, F, H, W, 3) in [-1, 1]; keypoints (B, F, 2, 21, 2); presence (B, F, 2, 21) float {0, 1};
           mask (B, H, W, 1) in [0, 1]: the clip's union mask or the prior (config.data.conditioning_mask).
  stage 1: frames (B, F, H, W, 3): frame 0 RGB, frames 1..F-1 the hand masks as grey RGB in [-1, 1] (V_mask);
           target_masks (B, F-1, H, W) float {0, 1}; mask (B, H, W, 1) = the prior mask.
  both:    input_ids (B, 77) int32 when a tokenizer is given; host-side lists "caption" and "clip_id" (str).
"""

import io
import os

import jax
import numpy as np

from handi_jax import fileio, sharding
from handi_jax.data import schema

CONDITIONING_MASKS = ("union", "prior")
HOST_KEYS = ("caption", "clip_id")
PRIOR_SPLIT = "train"


def _hide_accelerators_from_tensorflow(tf) -> None:
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices (handi_jax.main hides them first)
    if tf.config.get_visible_devices("GPU"):
      raise RuntimeError("TensorFlow already claimed the GPUs; import handi_jax.data.input_pipeline (or call "
                         "tf.config.set_visible_devices([], 'GPU')) before anything initialises TensorFlow") from None


def _batch_devices(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))


def per_host_batch_size(config, mesh, process_count: int) -> int:
  """Clips each host reads per step; checks that the global batch splits over the batch devices and hosts.

  `mesh` may be a jax.sharding.AbstractMesh (the target's mesh, checked without its devices).
  """
  batch_devices = _batch_devices(mesh)
  global_batch = sharding.global_batch_size(config.train, batch_devices)
  if global_batch % process_count or global_batch % batch_devices:
    multiple = int(np.lcm(process_count, batch_devices))
    raise ValueError(
        f"global batch {global_batch} does not split over the {batch_devices} devices of the mesh's batch axes "
        f"{sharding.BATCH_AXES} and {process_count} process(es): set --config.train.global_batch_size to a "
        f"multiple of {multiple} (e.g. {multiple * max(1, round(global_batch / multiple))}) or "
        f"--config.train.per_device_batch_size=N (global batch N x {batch_devices})")
  return global_batch // process_count


def load_prior_mask(data_dir: str | os.PathLike, split: str) -> np.ndarray:
  """(H, W, 1) float32 prior mask: the training split's if the dataset has one, else `split`'s."""
  data_dir = fileio.as_path(data_dir)
  manifest = schema.read_manifest(data_dir)
  prior_split = PRIOR_SPLIT if PRIOR_SPLIT in manifest["splits"] else split
  path = data_dir / prior_split / schema.PRIOR_MASK_NPY
  if not fileio.is_committed(path):
    raise FileNotFoundError(f"prior mask {path} not found; it is written by data_prep.build for each split")
  return np.load(io.BytesIO(path.read_bytes())).astype(np.float32)[..., None]


def batch_shapes(config, stage: int | None = None, with_input_ids: bool = False, mesh=None) -> dict:
  """Global shapes and dtypes of a batch (jax.ShapeDtypeStruct), e.g. to compile a step before data exists.

  `mesh` (a Mesh or an AbstractMesh; default the one config.mesh resolves to here) sets the global batch when
  config.train.per_device_batch_size is set.
  """
  stage = config.stage if stage is None else stage
  if mesh is None:
    batch_devices = sharding.mesh_shape(config.mesh, jax.device_count(), config.num_devices_expected).batch_devices
  else:
    batch_devices = _batch_devices(mesh)
  b = sharding.global_batch_size(config.train, batch_devices)
  f, h, w = config.data.num_frames, config.data.height, config.data.width
  shapes = dict(frames=(b, f, h, w, 3), mask=(b, h, w, 1))
  if stage == 1:
    shapes["target_masks"] = (b, f - 1, h, w)
  else:
    shapes.update(keypoints=(b, f, schema.NUM_HANDS, schema.NUM_JOINTS, 2),
                  presence=(b, f, schema.NUM_HANDS, schema.NUM_JOINTS))
  out = {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()}
  if with_input_ids:
    out["input_ids"] = jax.ShapeDtypeStruct((b, 77), np.int32)
  return out


class InputPipeline:
  """Iterator of training batches; see the module docstring for the keys."""

  def __init__(self, config, mesh, *, stage: int | None = None, split: str | None = None,
               data_dir: str | os.PathLike | None = None, tokenizer=None, position: int = 0,
               process_index: int | None = None, process_count: int | None = None):
    import tensorflow as tf

    _hide_accelerators_from_tensorflow(tf)
    self.stage = config.stage if stage is None else stage
    if self.stage not in (1, 2):
      raise ValueError(f"stage must be 1 or 2, got {self.stage}")
    if config.data.conditioning_mask not in CONDITIONING_MASKS:
      raise ValueError(f"config.data.conditioning_mask={config.data.conditioning_mask!r}; expected one of "
                       f"{CONDITIONING_MASKS}")
    if not str(data_dir or config.data.dir):
      raise ValueError("config.data.dir is empty: point it at a dataset built by `python -m data_prep.build` "
                       "or by handi_jax.data.demo_clips.write_demo_dataset")
    split = split or config.data.split
    data_dir = fileio.as_path(data_dir or config.data.dir)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    self.mesh = mesh
    self.tokenizer = tokenizer
    self.per_host_batch = per_host_batch_size(config, mesh, process_count)
    self.position = int(position)

    features = schema.load_features(data_dir)
    stored = features["frames"].shape
    wanted = (config.data.num_frames, config.data.height, config.data.width)
    if tuple(stored[:3]) != wanted:
      raise ValueError(f"dataset {data_dir} stores clips of {tuple(stored[:3])} (frames, height, width) but the "
                       f"config asks for {wanted}; rebuild the data or set config.data.num_frames/height/width")
    splits = self._splits(data_dir)
    if split not in splits:
      raise FileNotFoundError(f"no split {split!r} in {data_dir}; splits there: {sorted(splits)}")
    # Shards whose clips were all rejected are empty; hosts share only the others.
    files = [f for f, n in zip(schema.split_files(data_dir, split), splits[split]["shard_lengths"], strict=True) if n]
    host_files = [str(f) for f in files[process_index::process_count]]
    if not host_files:
      raise ValueError(f"split {split!r} has {len(files)} non-empty shard file(s) for {process_count} processes; "
                       "every process needs one: rebuild with a smaller config.data.build.frames_per_shard")
    self._prior = load_prior_mask(data_dir, split)
    self._dataset = self._make_dataset(tf, features, host_files, config)
    self._iterator = iter(self._dataset.as_numpy_iterator())

  @staticmethod
  def _splits(data_dir) -> dict:
    return schema.read_manifest(data_dir)["splits"]

  def _make_dataset(self, tf, features, files: list[str], config):
    import tensorflow_datasets as tfds

    seed = config.seed
    stage = self.stage
    union_mask = config.data.conditioning_mask == "union"
    prior = tf.constant(self._prior)
    decoders = None if stage == 1 else {"frame_masks": tfds.decode.SkipDecoding()}

    def decode(serialized):
      clip = features.deserialize_example(serialized, decoders=decoders)
      frames = tf.cast(clip["frames"], tf.float32) / 127.5 - 1.0
      out = dict(caption=clip["caption"], clip_id=clip["clip_id"])
      if stage == 1:
        masks = tf.cast(clip["frame_masks"], tf.float32) / 255.0
        grey = tf.repeat(masks[1:] * 2.0 - 1.0, 3, axis=-1)
        out.update(frames=tf.concat([frames[:1], grey], axis=0), target_masks=masks[1:, ..., 0], mask=prior)
      else:
        mask = tf.cast(clip["union_mask"], tf.float32) / 255.0 if union_mask else prior
        out.update(frames=frames, keypoints=clip["keypoints"], presence=tf.cast(clip["presence"], tf.float32),
                   mask=mask)
      return out

    options = tf.data.Options()
    options.deterministic = True
    # No autotuning: deleting an autotuned iterator waits for its model thread, which sleeps up to 60 s between
    # optimisations (training's end stood still 20-56 s). AUTOTUNE parallelism is then the host's core count.
    options.autotune.enabled = False
    # Shuffle, then repeat: every epoch is one full pass over this host's clips, in a new order.
    records = (tf.data.Dataset.from_tensor_slices(files)
               .shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
               .interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)), block_length=1,
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .shuffle(config.data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
               .repeat())
    # Resuming skips serialized records: nothing before the position is decoded.
    return (records.skip(self.position * self.per_host_batch)
            .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(self.per_host_batch, drop_remainder=True)
            .prefetch(2).with_options(options))

  def state(self) -> dict:
    """What a checkpoint stores to resume this stream: InputPipeline(..., position=state["position"])."""
    return {"position": self.position}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    local = next(self._iterator)
    batch = {key: [v.decode("utf-8") for v in local.pop(key)] for key in HOST_KEYS}
    if self.tokenizer is not None:
      from handi_jax.tokenizers import tokenize

      local["input_ids"] = np.asarray(tokenize(self.tokenizer, batch["caption"]), np.int32)
    for key, value in local.items():
      batch[key] = jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, value.ndim), value)
    self.position += 1
    return batch
