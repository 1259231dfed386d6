"""handi_jax.fileio: paths on any filesystem and the commit rule of atomic writes, on a local disk and on an
emulated remote filesystem.

The remote one is TensorFlow's `ram://` filesystem: tf.io.gfile serves it in this process's memory, and
fileio.as_path hands it to epath's TensorFlow backend, the code a `gs://` path runs when TensorFlow is installed
(only the storage behind tf.io.gfile differs). Like an object store it is not the local disk, so fileio applies
its remote rule (stage locally, marker, upload, marker removed last) to it.
"""

import itertools
import uuid

import numpy as np
import pytest

from handi_jax import fileio


def _roots(tmp_path):
  return {"local": str(tmp_path), "remote": f"ram://fileio-{uuid.uuid4().hex}"}


@pytest.fixture(params=["local", "remote"])
def root(request, tmp_path):
  return _roots(tmp_path)[request.param]


def test_as_path_keeps_the_scheme_and_is_local_tells_which(root):
  path = fileio.as_path(root) / "a" / "b.json"
  assert str(path) == f"{root}/a/b.json"
  assert fileio.is_local(path) == (not root.startswith("ram://"))
  with pytest.raises(ValueError, match="nosuchfs:// is not a filesystem"):
    fileio.as_path("nosuchfs://bucket/x")


def test_written_outputs_read_back_and_are_committed(root):
  fileio.write_json(f"{root}/out/summary.json", {"fid": float("nan"), "clips": 3})
  summary = fileio.as_path(root) / "out" / "summary.json"
  assert summary.read_text() == '{\n  "fid": null,\n  "clips": 3\n}\n'
  assert fileio.is_committed(summary)
  with fileio.atomic_directory(f"{root}/export") as tmp:
    (tmp / "unet").mkdir()
    (tmp / "unet" / "weights.bin").write_bytes(b"\x00\x01")
    (tmp / "model_index.json").write_text("{}")
  export = fileio.as_path(root) / "export"
  assert fileio.is_committed(export)
  assert (export / "unet" / "weights.bin").read_bytes() == b"\x00\x01"
  assert sorted(p.name for p in export.iterdir()) == ["model_index.json", "unet"]
  # Nothing but the outputs is left beside them: no temporary file, no marker.
  assert sorted(p.name for p in fileio.as_path(root).iterdir()) == ["export", "out"]
  assert [p.name for p in (fileio.as_path(root) / "out").iterdir()] == ["summary.json"]


def _fail_while_writing(path):
  with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(b"half of it")
    raise RuntimeError("killed mid-write")


def test_an_exception_mid_write_leaves_no_file_a_reader_accepts(root):
  path = f"{root}/generate/clip/done.json"
  with pytest.raises(RuntimeError, match="mid-write"):
    _fail_while_writing(path)
  assert not fileio.is_committed(path)
  with pytest.raises(RuntimeError, match="mid-write"), fileio.atomic_directory(f"{root}/export") as tmp:
    (tmp / "config.json").write_text("{}")
    raise RuntimeError("killed mid-write")
  assert not fileio.is_committed(f"{root}/export")
  # A failure before the upload leaves an earlier output as it was.
  fileio.write_text(path, "first")
  with pytest.raises(RuntimeError, match="mid-write"):
    _fail_while_writing(path)
  assert fileio.is_committed(path) and fileio.as_path(path).read_text() == "first"


def _upload_dying_at(fileio_module, number: int):
  """fileio's object upload, made to die at its `number`th object after writing part of it."""
  uploads, upload = itertools.count(), fileio_module._upload_file

  def upload_or_die(local, path):
    if next(uploads) == number:
      path.write_bytes(local.read_bytes()[:2])  # part of an object, then the process is gone
      raise KeyboardInterrupt
    upload(local, path)

  return upload_or_die


def test_an_upload_cut_short_leaves_an_output_no_reader_accepts_until_rewritten(tmp_path, monkeypatch):
  """The remote rule's own window: the object store holds part of the new output when the writer dies."""
  root = _roots(tmp_path)["remote"]
  fileio.write_text(f"{root}/run/done.json", "old")
  with fileio.atomic_directory(f"{root}/run/export") as tmp:
    (tmp / "a.bin").write_bytes(b"old")
  upload = fileio._upload_file

  monkeypatch.setattr(fileio, "_upload_file", _upload_dying_at(fileio, 1))
  with pytest.raises(KeyboardInterrupt), fileio.atomic_directory(f"{root}/run/export") as tmp:
    (tmp / "a.bin").write_bytes(b"new")
    (tmp / "b.bin").write_bytes(b"new")
  export = fileio.as_path(root) / "run" / "export"
  assert (export / "a.bin").read_bytes() == b"new" and not fileio.is_committed(export)

  monkeypatch.setattr(fileio, "_upload_file", _upload_dying_at(fileio, 0))
  with pytest.raises(KeyboardInterrupt):
    fileio.write_text(f"{root}/run/done.json", "new")
  assert fileio.as_path(f"{root}/run/done.json").read_text() == "ne"
  assert not fileio.is_committed(f"{root}/run/done.json")

  monkeypatch.setattr(fileio, "_upload_file", upload)
  fileio.write_text(f"{root}/run/done.json", "new")
  assert fileio.is_committed(f"{root}/run/done.json")


def test_local_copy_of_a_remote_file_and_folder(tmp_path):
  root = _roots(tmp_path)["remote"]
  frames = np.arange(6, dtype=np.uint8)
  fileio.write_bytes(f"{root}/tok/vocab.json", b'{"a": 0}')
  fileio.write_bytes(f"{root}/tok/sub/merges.txt", frames.tobytes())
  with fileio.local_copy(f"{root}/tok") as local:
    assert fileio.is_local(local) and local.name == "tok"
    assert (local / "vocab.json").read_bytes() == b'{"a": 0}'
    assert np.array_equal(np.frombuffer((local / "sub" / "merges.txt").read_bytes(), np.uint8), frames)
  assert not local.exists()
  with fileio.local_copy(tmp_path) as same:
    assert same == tmp_path
