import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx

from handi_jax.convert import core


class _Tiny(nnx.Module):
  """Names mirror the torch module below."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 5, (3, 3), rngs=rngs)
    self.norm = nnx.GroupNorm(5, num_groups=1, epsilon=1e-5, rngs=rngs)
    self.proj = nnx.Linear(5, 7, rngs=rngs)


def _torch_tiny():
  torch.manual_seed(0)
  return torch.nn.ModuleDict(dict(conv=torch.nn.Conv2d(3, 5, 3), norm=torch.nn.GroupNorm(1, 5),
                                  proj=torch.nn.Linear(5, 7)))


def test_rules_round_trip_and_layouts():
  state = {k: v.detach().numpy() for k, v in _torch_tiny().state_dict().items()}
  flax_params = core.to_flax(state, core.DEFAULT_RULES)
  assert flax_params["conv.kernel"].shape == (3, 3, 3, 5)  # OIHW -> HWIO
  np.testing.assert_array_equal(flax_params["conv.kernel"][1, 2, 0, 4], state["conv.weight"][4, 0, 1, 2])
  assert flax_params["proj.kernel"].shape == (5, 7) and "norm.scale" in flax_params
  back = core.to_torch(flax_params, core.DEFAULT_RULES)
  assert set(back) == set(state)
  for key in state:
    np.testing.assert_array_equal(back[key], state[key])


def test_load_flat_params_names_missing_and_mismatched_keys():
  model = _Tiny(nnx.Rngs(0))
  params = core.flat_params(model)
  params["proj.kernel"] = np.zeros((5, 8), np.float32)
  del params["norm.scale"]
  params["extra.bias"] = np.zeros(3, np.float32)
  with pytest.raises(core.CheckpointMismatchError) as info:
    core.load_flat_params(model, params, "tiny")
  text = str(info.value)
  assert "missing in checkpoint: norm.scale (model shape (5,))" in text
  assert "unexpected in checkpoint: extra.bias (shape (3,))" in text
  assert "shape mismatch for proj.kernel: checkpoint (5, 8), model (5, 7)" in text


def test_safetensors_interoperate_with_the_reference_library(tmp_path):
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
  core.write_safetensors(tmp_path / "x.safetensors", tensors)
  loaded = safetensors.numpy.load_file(str(tmp_path / "x.safetensors"))
  for key in tensors:
    np.testing.assert_array_equal(loaded[key], tensors[key])
  safetensors.numpy.save_file(tensors, str(tmp_path / "y.safetensors"))
  mine = core.read_safetensors(tmp_path / "y.safetensors")
  for key in tensors:
    np.testing.assert_array_equal(mine[key], tensors[key])
  assert not list(tmp_path.glob("*.tmp"))


def test_torch_model_loads_into_nnx_and_matches_forward():
  reference = _torch_tiny()
  model = _Tiny(nnx.Rngs(1))
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  core.load_flat_params(model, core.to_flax(state, core.DEFAULT_RULES), "tiny")
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
  jax_out = model.proj(model.norm(model.conv(x)))
  with torch.no_grad():
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    torch_conv = torch.nn.functional.conv2d(t, reference["conv"].weight, reference["conv"].bias, padding=1)
    torch_out = reference["proj"](reference["norm"](torch_conv).permute(0, 2, 3, 1)).numpy()
  np.testing.assert_allclose(np.asarray(jax_out), torch_out, atol=2e-6)
