"""Sharded, restartable, deterministic writing of clip records, then the per-split summary files.

Jobs are cut into shards of `frames_per_shard // num_frames` clips in input order, so shard k always holds the
same clips. A shard is finished when its progress file `<split>/_progress/shard-0000k.json` exists; it is
written (under handi_jax.fileio's commit rule, like every file here, local or remote) after the shard itself,
and carries a fingerprint of the shard's inputs and settings; only committed files count. A rerun skips
finished shards with a matching fingerprint and redoes the rest; identical input and config give
byte-identical shards.

write_split runs the clips on a local pool of processes. Its pieces, plan_split (which clips go where),
ShardWriter (one shard and its progress files) and finish_split (the summary files), are also those of
data_prep's Apache Beam build, so both write the same dataset.
"""

import collections
import contextlib
import dataclasses
import functools
import gc
import hashlib
import io
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from handi_jax import fileio
from handi_jax.data import schema
from handi_jax.data import split_report as report_lib
from handi_jax.data.records import ClipRecord, Rejection

PROGRESS_DIR = "_progress"


@dataclasses.dataclass(frozen=True)
class SplitSummary:
  data_dir: fileio.Path
  split: str
  num_clips: int
  num_rejected: int
  rejected_by_reason: dict
  num_shards: int
  shards_reused: int

  def __str__(self) -> str:
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.rejected_by_reason.items())) or "none"
    return (f"split {self.split!r}: {self.num_clips} clips written in {self.num_shards} shards "
            f"({self.shards_reused} reused from an earlier run), {self.num_rejected} rejected ({reasons}); "
            f"dataset at {self.data_dir}")


def _json_bytes(value) -> bytes:
  return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


def clips_per_shard(config) -> int:
  return max(1, config.data.build.frames_per_shard // config.data.num_frames)


def _fingerprint(settings_key: str, keys: Sequence[str]) -> str:
  digest = hashlib.sha256(f"{schema.SCHEMA_VERSION}\n{settings_key}\n".encode())
  for key in keys:
    digest.update(key.encode() + b"\n")
  return digest.hexdigest()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
  """Around a heavy import: `import tensorflow` makes ~10^6 objects, and the cyclic GC would scan them all again
  on each of its full passes (six during that import, a quarter of its time)."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


@functools.cache
def _serializer(num_frames: int, height: int, width: int) -> schema.Serializer:
  """One per process: its features import TensorFlow."""
  with _gc_paused():
    features = schema.make_features(num_frames, height, width)
  return schema.Serializer(features)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """Which jobs each shard of a split holds (by index into the job list) and the fingerprint of each shard's
  inputs and settings. Both builds, local and Apache Beam, write from it: shard k always holds the same clips."""

  data_dir: fileio.Path
  split: str
  shard_jobs: tuple[range, ...]
  fingerprints: tuple[str, ...]

  @property
  def num_shards(self) -> int:
    return len(self.shard_jobs)

  @property
  def progress_dir(self) -> fileio.Path:
    return self.data_dir / self.split / PROGRESS_DIR

  def shard_path(self, shard: int) -> fileio.Path:
    return schema.shard_path(self.data_dir, self.split, shard, self.num_shards)

  def finished(self, shard: int) -> bool:
    state = self.progress_dir / f"shard-{shard:05d}.json"
    return (fileio.is_committed(state) and fileio.is_committed(self.shard_path(shard))
            and json.loads(state.read_text()).get("fingerprint") == self.fingerprints[shard])

  def pending(self) -> list[int]:
    """The shards an earlier run has not finished with the same inputs and settings."""
    return [s for s in range(self.num_shards) if not self.finished(s)]


def plan_split(data_dir: str | os.PathLike, split: str, jobs: Sequence, *, config, settings_key: str,
               job_keys: Sequence[str]) -> ShardPlan:
  """Cut `jobs` into shards of `frames_per_shard // num_frames` clips in input order. `settings_key` and
  `job_keys` (one string per job) identify the inputs for restarts."""
  if not jobs:
    raise ValueError(f"split {split!r} has no clips to write; check the caption file")
  if len(job_keys) != len(jobs):
    raise ValueError(f"{len(job_keys)} job keys for {len(jobs)} jobs")
  per_shard = clips_per_shard(config)
  shard_jobs = tuple(range(s, min(len(job_keys), s + per_shard)) for s in range(0, len(job_keys), per_shard))
  plan = ShardPlan(fileio.as_path(data_dir), split, shard_jobs,
                   tuple(_fingerprint(settings_key, [job_keys[i] for i in r]) for r in shard_jobs))
  plan.progress_dir.mkdir(parents=True, exist_ok=True)
  return plan


@dataclasses.dataclass(frozen=True)
class ShardWriter:
  """Writes one shard of a plan from its clips' results in job order, then its progress files, the JSON one last:
  a shard with that file is finished. Every file is replaced atomically, so a write that is repeated (a rerun, or
  a Beam bundle retried on another worker) replaces the same bytes with the same bytes. Picklable, for Beam's
  workers; each process makes its own serializer on first use."""

  plan: ShardPlan
  num_frames: int
  height: int
  width: int

  @classmethod
  def from_config(cls, plan: ShardPlan, config) -> "ShardWriter":
    return cls(plan, config.data.num_frames, config.data.height, config.data.width)

  def prepare(self) -> None:
    """Import TensorFlow for the serializer now (the local build overlaps it with its workers' start-up)."""
    _serializer(self.num_frames, self.height, self.width)

  def write(self, shard: int, results: Sequence[ClipRecord | Rejection]) -> None:
    import tensorflow as tf

    serialize = _serializer(self.num_frames, self.height, self.width)
    path = self.plan.shard_path(shard)
    records = [r for r in results if isinstance(r, ClipRecord)]
    with fileio.atomic_path(path) as tmp, tf.io.TFRecordWriter(str(tmp)) as writer:
      for record in records:
        writer.write(serialize(record.fields))
    union_count = np.zeros((self.height, self.width), np.int64)
    for record in records:
      union_count += record.union_mask > 0
    progress_dir = self.plan.progress_dir
    fileio.write_bytes(progress_dir / f"shard-{shard:05d}.npy", _npy_bytes(union_count))
    state = dict(
        fingerprint=self.plan.fingerprints[shard], num_bytes=fileio.size(path),
        clips=[dict(clip_id=r.fields["clip_id"], mask_area=float(r.fields["mask_area"]),
                    hands_per_frame=r.hands_per_frame) for r in records],
        rejected=[dataclasses.asdict(r) for r in results if isinstance(r, Rejection)])
    fileio.write_bytes(progress_dir / f"shard-{shard:05d}.json", _json_bytes(state))


@contextlib.contextmanager
def _results(process: Callable, jobs: Sequence, workers: int) -> Iterator[Iterator]:
  """Results in job order: in this process for workers <= 1, else from a pool of spawned processes that is
  started at once, so that the workers start up while the caller imports TensorFlow."""
  if workers <= 1:
    yield map(process, jobs)
    return
  # spawn, not fork: the parent holds TensorFlow and JAX thread pools that a forked child must not inherit.
  with multiprocessing.get_context("spawn").Pool(workers) as pool:  # leaving it stops the workers
    yield pool.imap(process, jobs, chunksize=1)


def write_split(data_dir: str | os.PathLike, split: str, jobs: Sequence, process: Callable, *, config,
                settings_key: str, job_keys: Sequence[str], workers: int = 1, progress: bool = True) -> SplitSummary:
  """Turn `jobs` into shards of `split` under `data_dir` with a local pool of `workers` processes, then write the
  split's summary files and metadata.

  `process(job)` returns a ClipRecord or a Rejection (it runs in worker processes when workers > 1, so it must
  be picklable). `settings_key` and `job_keys` (one string per job) identify the inputs for restarts.
  """
  plan = plan_split(data_dir, split, jobs, config=config, settings_key=settings_key, job_keys=job_keys)
  pending = plan.pending()
  pending_jobs = [jobs[i] for s in pending for i in plan.shard_jobs[s]]
  shard_writer = ShardWriter.from_config(plan, config)
  # No pool for a single clip: starting a worker costs more than the clip.
  with _results(process, pending_jobs, min(workers, len(pending_jobs))) as results:
    shard_writer.prepare()
    with tqdm(total=len(jobs), initial=len(jobs) - len(pending_jobs), desc=f"{split} clips", unit="clip",
              disable=not progress) as bar:
      for shard in pending:
        chunk = []
        for _ in plan.shard_jobs[shard]:
          chunk.append(next(results))
          bar.update(1)
        shard_writer.write(shard, chunk)
  return finish_split(plan, config, shards_reused=plan.num_shards - len(pending))


def finish_split(plan: ShardPlan, config, shards_reused: int) -> SplitSummary:
  """Once every shard of the plan is written: remove what an earlier run with other shards left, then the
  summary files and metadata (finalize_split)."""
  unfinished = plan.pending()
  if unfinished:
    raise RuntimeError(f"shards {unfinished} of split {plan.split!r} were not written; run the build again")
  _remove_stale(plan.data_dir, plan.split, plan.num_shards)
  return finalize_split(plan.data_dir, plan.split, plan.num_shards, config, shards_reused=shards_reused)


def _remove_stale(data_dir: fileio.Path, split: str, num_shards: int) -> None:
  """Shards and progress files of an earlier run with a different number of shards."""
  planned = {schema.shard_path(data_dir, split, s, num_shards) for s in range(num_shards)}
  for path in schema.split_files(data_dir, split):
    if path not in planned:
      path.unlink()
  for path in (data_dir / split / PROGRESS_DIR).glob("shard-*"):
    if int(path.stem.split("-")[1]) >= num_shards:
      path.unlink()


def finalize_split(data_dir: fileio.Path, split: str, num_shards: int, config,
                   shards_reused: int = 0) -> SplitSummary:
  """rejected.jsonl, prior mask, motion-intensive index, report, TFDS metadata and manifest for one split."""
  progress_dir = data_dir / split / PROGRESS_DIR
  states = [json.loads((progress_dir / f"shard-{s:05d}.json").read_text()) for s in range(num_shards)]
  clips = [clip for state in states for clip in state["clips"]]
  rejected = [r for state in states for r in state["rejected"]]
  split_dir = data_dir / split
  fileio.write_bytes(split_dir / schema.REJECTED,
                     b"".join(_json_bytes(r).replace(b"\n", b"") + b"\n" for r in rejected))
  by_reason = dict(collections.Counter(r["reason"] for r in rejected))
  if clips:
    union_count = sum(np.load(io.BytesIO((progress_dir / f"shard-{s:05d}.npy").read_bytes()))
                      for s in range(num_shards))
    prior = (union_count / len(clips)).astype(np.float32)
    report_lib.write_split_files(split_dir, clips, rejected, prior, config, fileio.write_bytes)
    _write_metadata(data_dir, split, states, config)
  return SplitSummary(data_dir, split, len(clips), len(rejected), by_reason, num_shards, shards_reused)


def _write_metadata(data_dir: fileio.Path, split: str, states: list[dict], config) -> None:
  """manifest.json (all splits built into this folder) and the TFDS folder-dataset metadata."""
  import tensorflow_datasets as tfds

  manifest_path = data_dir / schema.MANIFEST
  manifest = json.loads(manifest_path.read_text()) if fileio.is_committed(manifest_path) else {}
  size = dict(num_frames=config.data.num_frames, height=config.data.height, width=config.data.width)
  if manifest and any(manifest[k] != v for k, v in size.items()):
    raise ValueError(f"{data_dir} holds clips of {[manifest[k] for k in size]} (frames, height, width) but this "
                     f"run writes {list(size.values())}; use another output folder")
  splits = manifest.get("splits", {})
  splits[split] = dict(
      num_clips=sum(len(s["clips"]) for s in states), num_rejected=sum(len(s["rejected"]) for s in states),
      shard_lengths=[len(s["clips"]) for s in states], num_bytes=sum(s["num_bytes"] for s in states),
      config=json.loads(config.data.to_json_best_effort()))
  manifest = dict(schema_version=schema.SCHEMA_VERSION, dataset_name=schema.DATASET_NAME,
                  file_format=schema.FILE_FORMAT, feature_names=list(schema.feature_names()), splits=splits, **size)
  features = schema.make_features(**size)
  split_infos = [tfds.core.SplitInfo(name=name, shard_lengths=info["shard_lengths"], num_bytes=info["num_bytes"],
                                     filename_template=schema.filename_template(data_dir, name))
                 for name, info in sorted(splits.items())]
  tfds.folder_dataset.write_metadata(
      data_dir=data_dir, features=features, split_infos=split_infos, version=schema.SCHEMA_VERSION,
      filename_template=schema.filename_template(data_dir, split), check_data=False,
      description="HANDI clips: frames, MediaPipe hand keypoints, per-frame and union motion-area masks.")
  fileio.write_bytes(manifest_path, _json_bytes(manifest))
