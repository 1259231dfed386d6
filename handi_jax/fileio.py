"""Atomic writes of files and folders: readers never see half an output, and a failure leaves nothing behind.

Every output of handi-jax (checkpoint exports, videos, shards, reports) is written through these, under one
temporary-name convention: `.<name>.tmp-<pid>` beside the target (files keep their suffix after it, so
writers that pick a format from the suffix still work).
"""

import contextlib
import json
import math
import os
import pathlib
import shutil
from collections.abc import Iterator


def _temporary(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yield a temporary file path to write; on success it replaces `path`, on error it is removed."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _temporary(path)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """`path` holds exactly `data` (flushed to disk) or, after a crash, its previous content."""
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, value, indent: int | None = 2, sort_keys: bool = False) -> None:
  """`value` as JSON that any parser reads, written as write_text: NaN and infinities (which JSON lacks, and
  json.dumps would write as bare NaN / Infinity) become null; non-ASCII text stays readable UTF-8."""
  text = json.dumps(_finite(value), indent=indent, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False)
  write_text(path, text + "\n")


def _finite(value):
  """`value` with every non-finite float (numpy's float64 included) replaced by None, tuples as lists."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {key: _finite(item) for key, item in value.items()}
  if isinstance(value, list | tuple):
    return [_finite(item) for item in value]
  return value


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yield a temporary sibling folder to fill; on success it replaces `directory`, on error it is removed."""
  directory = pathlib.Path(directory)
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = _temporary(directory)
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
  if directory.exists():
    os.replace(directory, old)
  os.replace(tmp, directory)
  shutil.rmtree(old, ignore_errors=True)
