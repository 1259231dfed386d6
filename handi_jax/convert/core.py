"""PyTorch <-> Flax NNX parameter conversion driven by one table of rules per model.

NNX attribute paths mirror the PyTorch module names, so a state-dict key maps to an NNX path by a leaf
rename (`weight` -> `kernel` / `scale` / `embedding`) plus a layout change. A `Rule` states that once and
is read in both directions: `to_flax` (import) and `to_torch` (export). Checkpoint files are read and
written as safetensors without torch; torch is imported only for a legacy `.bin` file.
"""

import dataclasses
import json
import os
import pathlib
import re
import struct
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from handi_jax import fileio

# layout -> (torch -> flax axes permutation, keyed by ndim); the inverse is derived.
_LAYOUTS = {
    "identity": {},
    # Linear (out, in) -> (in, out); Conv2d OIHW -> HWIO; Conv3d OIDHW -> DHWIO.
    "kernel": {2: (1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)},
}


class CheckpointMismatchError(ValueError):
  """A checkpoint and a model disagree: missing or unexpected keys, or shapes."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """`torch` and `flax` are key templates with `{name}` wildcards, e.g. "{m}.weight" <-> "{m}.kernel".

  `ndim` restricts the rule to arrays of that rank (a 1-D `weight` is a norm scale, a 2-D one a kernel).
  The first rule that matches wins, in either direction.
  """

  torch: str
  flax: str
  layout: str = "identity"
  ndim: int | None = None

  def _regex(self, template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+)" for i, p in enumerate(parts))
    return re.compile(pattern)

  def match(self, key: str, ndim: int, source: str) -> str | None:
    """The key in the other naming if this rule applies to `key` (named in `source`), else None."""
    if self.ndim is not None and ndim != self.ndim:
      return None
    src, dst = (self.torch, self.flax) if source == "torch" else (self.flax, self.torch)
    found = self._regex(src).fullmatch(key)
    return dst.format(**found.groupdict()) if found else None

  def permutation(self, ndim: int, source: str) -> tuple[int, ...] | None:
    perm = _LAYOUTS[self.layout].get(ndim)
    if perm is None or source == "torch":
      return perm
    return tuple(int(i) for i in np.argsort(perm))


# The rules shared by every model here; model tables prepend their exceptions.
DEFAULT_RULES = (
    Rule("{m}.weight", "{m}.scale", ndim=1),           # GroupNorm / LayerNorm
    Rule("{m}.weight", "{m}.kernel", layout="kernel"),  # Linear / Conv
    Rule("{m}.bias", "{m}.bias"),
)


def _convert(arrays: Mapping[str, np.ndarray], rules: Sequence[Rule], source: str) -> dict[str, np.ndarray]:
  out = {}
  for key, value in arrays.items():
    value = np.asarray(value)
    for rule in rules:
      new_key = rule.match(key, value.ndim, source)
      if new_key is not None:
        perm = rule.permutation(value.ndim, source)
        out[new_key] = np.transpose(value, perm) if perm else value
        break
    else:
      raise CheckpointMismatchError(f"no conversion rule covers {source} key {key!r} with shape {value.shape}")
  return out


def to_flax(state_dict: Mapping[str, np.ndarray], rules: Sequence[Rule]) -> dict[str, np.ndarray]:
  """PyTorch state dict (numpy arrays) -> flat {nnx path: array}."""
  return _convert(state_dict, rules, "torch")


def to_torch(flat_params: Mapping[str, np.ndarray], rules: Sequence[Rule]) -> dict[str, np.ndarray]:
  """Flat {nnx path: array} -> PyTorch state dict (numpy arrays)."""
  return _convert(flat_params, rules, "flax")


def flat_params(module: nnx.Module) -> dict[str, np.ndarray]:
  """{'down_blocks.0.resnets.0.conv1.kernel': array, ...} of a module's nnx.Param leaves."""
  state = nnx.state(module, nnx.Param)
  return {".".join(str(k) for k in path): np.asarray(v.value) for path, v in nnx.to_flat_state(state)}


def load_flat_params(module: nnx.Module, params: Mapping[str, np.ndarray], what: str) -> None:
  """Copy `params` into `module` in place; every key must exist with the same shape, and none be left out."""
  state = nnx.state(module, nnx.Param)
  expected = {".".join(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}
  missing = sorted(set(expected) - set(params))
  unexpected = sorted(set(params) - set(expected))
  problems = [f"missing in checkpoint: {k} (model shape {tuple(expected[k].value.shape)})" for k in missing]
  problems += [f"unexpected in checkpoint: {k} (shape {tuple(np.shape(params[k]))})" for k in unexpected]
  problems += [f"shape mismatch for {k}: checkpoint {tuple(np.shape(params[k]))}, model "
               f"{tuple(expected[k].value.shape)}" for k in sorted(set(params) & set(expected))
               if tuple(np.shape(params[k])) != tuple(expected[k].value.shape)]
  if problems:
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    raise CheckpointMismatchError(
        f"{what}: the checkpoint does not match the model built from the config ({len(problems)} problem(s)):"
        f"\n  {shown}\nCheck that the config (e.g. config.model.unet) describes this checkpoint.")
  for key, variable in expected.items():
    variable.value = np.asarray(params[key], dtype=variable.value.dtype)
  nnx.update(module, state)



def build_with_params(build: Callable[[], nnx.Module], params: Mapping[str, np.ndarray], what: str) -> nnx.Module:
  """The module `build()` makes, holding `params`: built abstractly (no random init of parameters), then filled.

  Non-parameter state (e.g. dropout RNG streams) is made by `build` under jit, where the unused parameter
  initialisers are dropped.
  """
  module = nnx.eval_shape(build)
  load_flat_params(module, params, what)
  graphdef, loaded, rest = nnx.split(module, nnx.Param, ...)
  if jax.tree.leaves(rest):
    rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, loaded), rest)

# ---------------------------------------------------------------------------------------------------
# Files: safetensors (read and written without torch), legacy .bin (torch), diffusers/transformers dirs.

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  header = read_safetensors_header(path)
  with fileio.as_path(path).open("rb") as f:
    (header_size,) = struct.unpack("<Q", f.read(8))
    f.seek(8 + header_size)
    data = f.read()
  tensors = {}
  for key, info in header.items():
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
      raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    tensors[key] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
  return tensors


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
  """Atomic write (temp file + rename): an interrupted export leaves no half-written file."""
  header, offset, blobs = {}, 0, []
  for key in sorted(tensors):
    array = np.ascontiguousarray(tensors[key])
    if array.dtype not in _ST_NAMES:
      raise ValueError(f"cannot write {key!r}: dtype {array.dtype} has no safetensors name")
    blob = array.tobytes()
    header[key] = {"dtype": _ST_NAMES[array.dtype], "shape": list(array.shape),
                   "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  header["__metadata__"] = {"format": "pt"}
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for blob in blobs:
      f.write(blob)


def read_safetensors_header(path: str | os.PathLike) -> dict:
  """{key: {"dtype", "shape", "data_offsets"}} of a safetensors file, without reading its tensors."""
  with fileio.as_path(path).open("rb") as f:
    (header_size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_size))
  header.pop("__metadata__", None)
  return header


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{path} is a legacy PyTorch .bin checkpoint; reading it needs torch "
                      "(pip install torch==2.13.0), or convert it to safetensors first.") from e
  with fileio.local_copy(path) as local:
    state = torch.load(local, map_location="cpu", weights_only=True)
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A state dict from a weights file, or from a model directory (single or sharded weights); local or remote."""
  path = fileio.as_path(path)
  if path.is_dir():
    for index in sorted(path.glob("*.safetensors.index.json")) + sorted(path.glob("*.bin.index.json")):
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      state = {}
      for shard in shards:
        state.update(read_state_dict(path / shard))
      return state
    for name in WEIGHT_FILES:
      if (path / name).is_file():
        return read_state_dict(path / name)
    raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)} "
                            "(or a sharded *.index.json)")
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  if path.suffix == ".safetensors":
    return read_safetensors(path)
  if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
    return read_torch_bin(path)
  raise ValueError(f"{path}: unknown checkpoint format (expected .safetensors or .bin)")


def read_config(directory: str | os.PathLike) -> dict:
  file = fileio.as_path(directory) / "config.json"
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: a diffusers/transformers model directory has a config.json")
  return json.loads(file.read_text())


def write_model_dir(directory: str | os.PathLike, config: Mapping, state_dict: Mapping[str, np.ndarray],
                    weights_name: str) -> None:
  """config.json + weights (safetensors) as diffusers/transformers `from_pretrained` expects."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  write_safetensors(directory / weights_name, state_dict)
  fileio.write_text(directory / "config.json", json.dumps(dict(config), indent=2, sort_keys=True) + "\n")


def check_config_matches(found: Mapping, expected: Mapping, fields: Sequence[str], what: str, where: str) -> None:
  """Raise naming every field in which a checkpoint's config (`found`) differs from the run's (`expected`)."""

  def plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value

  diffs = [f"{field}: checkpoint {plain(found[field])!r}, config {plain(expected[field])!r}" for field in fields
           if plain(found[field]) != plain(expected[field])]
  if diffs:
    raise CheckpointMismatchError(
        f"{what} at {where} does not match the config:\n  " + "\n  ".join(diffs) +
        "\nSet these fields of the config to the checkpoint's values (e.g. --config.model.<component>.<field>=...) "
        "or point config.model.pretrained at a matching checkpoint.")
