"""Paths on any filesystem, and atomic writes: readers never accept half an output.

Paths: every path a user gives (a local path, `gs://...`, or any scheme `tf.io.gfile` serves, e.g. `ram://` or
`hdfs://`) goes through `as_path`: a local path stays a pathlib.Path (local behaviour is exactly as before); a
remote one is an `etils.epath.Path` (the same pathlib-like API), which reaches `gs://` / `s3://` / `az://`
through epath's TensorFlow (tf.io.gfile) backend, as it does the schemes only tf.io.gfile knows, which
`as_path` registers with epath on first use. Code that needs a local file name (video decoders, MediaPipe, safetensors'
reader) reads a remote file through `local_copy`.

Commit rule, the same for every output (checkpoint exports, videos, shards, done markers, reports):
- local paths: the output is written to a temporary name beside the target, `.<name>.tmp-<pid>` (files keep
  their suffix after it, so writers that pick a format from the suffix still work), then renamed over it with
  os.replace, which is atomic: a reader sees the old output or the new one, and a failure leaves the old one.
- remote paths (an object store has no atomic rename, of a folder least of all): the output is first written
  whole to a local temporary file or folder; only then the marker `.<name>.writing` is written beside the
  target, the old output removed, the new one uploaded object by object, and the marker deleted last. A reader
  accepts an output only when it exists and no marker is beside it (`is_committed`), so an upload cut short
  leaves an output no reader accepts until it is written again; a failure before the upload leaves the old one.
  Outputs copied into a bucket by hand (a dataset built locally, a pipeline directory) carry no marker and are
  accepted as they are.
"""

import contextlib
import json
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from etils.epath import register as epath_register

PathLike = str | os.PathLike
Path = pathlib.Path | epath.Path  # what as_path returns: local | remote


def is_local(path: PathLike) -> bool:
  """Whether `path` is on the local filesystem (no `scheme://`)."""
  return "://" not in os.fspath(path)


def as_path(path: PathLike) -> Path:
  """`path` as a pathlib.Path when local, else an epath.Path (a scheme only tf.io.gfile serves is registered with
  epath first)."""
  if is_local(path):
    return pathlib.Path(path)
  _serve_with_gfile(os.fspath(path).split("://", 1)[0])
  return epath.Path(path)


def size(path: PathLike) -> int:
  """The file's size in bytes, local or remote."""
  return os.path.getsize(path) if is_local(path) else as_path(path).stat().length


def _serve_with_gfile(scheme: str) -> None:
  """epath's own table knows gs, s3, az and hf; another scheme tf.io.gfile serves (ram, hdfs, ...) is added to
  it with the TensorFlow backend, the one epath uses for gs:// when TensorFlow is installed, so such a path
  runs the same code as a gs:// path."""
  if scheme in epath_gpath._URI_SCHEMES:  # noqa: SLF001  (epath has no public hook for a new scheme)
    return
  import tensorflow as tf  # only for a scheme epath lacks: TensorFlow is heavy to import
  if scheme not in tf.io.gfile.get_registered_schemes():
    raise ValueError(f"{scheme}:// is not a filesystem handi-jax can read; use a local path, gs://, or a scheme "
                     f"tf.io.gfile serves ({', '.join(s for s in tf.io.gfile.get_registered_schemes() if s)})")
  prefix = f"{scheme}://"
  epath_gpath._URI_SCHEMES = epath_gpath._URI_SCHEMES | {scheme}  # noqa: SLF001
  epath_gpath._URI_PREFIXES = (*epath_gpath._URI_PREFIXES, prefix)  # noqa: SLF001
  epath_gpath._URI_MAP_ROOT[prefix] = f"/{scheme}/"  # noqa: SLF001
  epath_gpath._PREFIX_TO_BACKEND[scheme] = epath_backend.tf_backend  # noqa: SLF001
  epath_register.register_path_cls(prefix)(epath_gpath.PosixGPath)


def _writing_marker(path: epath.Path) -> epath.Path:
  return path.with_name(f".{path.name}.writing")


def is_committed(path: PathLike) -> bool:
  """Whether `path` is a finished output (see the module docstring): it exists and, remote, has no marker."""
  path = as_path(path)
  return path.exists() and (is_local(path) or not _writing_marker(path).exists())


def _temporary(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def _staged(path: epath.Path, upload) -> Iterator[pathlib.Path]:
  """A local temporary folder for `path`'s new content; `upload(staged, path)` runs between the marker's
  write and its removal, once the caller's writing succeeded."""
  with tempfile.TemporaryDirectory(prefix="handi_jax-") as staging:
    staged = pathlib.Path(staging) / path.name
    yield staged
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = _writing_marker(path)
    marker.write_bytes(b"")
    if path.is_dir():
      path.rmtree()
    elif path.exists():  # removed, not overwritten: a filesystem may append to an object opened again (ram://)
      path.unlink()
    upload(staged, path)
    marker.unlink()


def _upload_file(local: pathlib.Path, path: epath.Path) -> None:
  path.write_bytes(local.read_bytes())


def _upload_tree(local: pathlib.Path, path: epath.Path) -> None:
  for source in sorted(local.rglob("*")):
    target = path / source.relative_to(local).as_posix()
    if source.is_dir():
      target.mkdir(parents=True, exist_ok=True)
    else:
      target.parent.mkdir(parents=True, exist_ok=True)
      _upload_file(source, target)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[pathlib.Path]:
  """Yield a local temporary file path to write; on success it becomes `path` (committed as the module
  docstring says), on error it is removed."""
  if not is_local(path):
    with _staged(as_path(path), _upload_file) as staged:
      yield staged
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _temporary(path)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_bytes(path: PathLike, data: bytes) -> None:
  """`path` holds exactly `data` (flushed to disk) or, after a crash, its previous content (local) or no
  committed content (remote)."""
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: PathLike, value, indent: int | None = 2, sort_keys: bool = False) -> None:
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
def atomic_directory(directory: PathLike) -> Iterator[pathlib.Path]:
  """Yield a local temporary folder to fill; on success it replaces `directory` (committed as the module
  docstring says), on error it is removed."""
  if not is_local(directory):
    with _staged(as_path(directory), _upload_tree) as staged:
      staged.mkdir()
      yield staged
    return
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


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[pathlib.Path]:
  """`path` (a file or a folder) as a local name for readers that need one: itself when local, else a temporary
  copy of the remote file or folder (same name, so a suffix that picks the decoder still does), removed
  afterwards."""
  if is_local(path):
    yield pathlib.Path(path)
    return
  source = as_path(path)
  if not source.exists():
    raise FileNotFoundError(f"{path} does not exist")
  with tempfile.TemporaryDirectory(prefix="handi_jax-") as staging:
    local = pathlib.Path(staging) / source.name
    _download(source, local)
    yield local


def _download(source: epath.Path, local: pathlib.Path) -> None:
  if source.is_dir():
    local.mkdir()
    for child in source.iterdir():
      _download(child, local / child.name)
  else:
    local.write_bytes(source.read_bytes())
