"""The FID Inception and the FVD I3D against their PyTorch references (pytorch-fid's and pytorch-i3d's
architectures, tests/reference_torch.py) on random weights."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from handi_jax.convert import core
from handi_jax.convert import inception as convert_inception
from tests import reference_torch

TOLERANCE = 1e-4  # relative to the largest |feature|: float32 round-off through ~100 convolutions
# Both networks once ran op by op here (each convolution and pool compiled on its own: I3D 36-65 s, Inception 80 s
# on this 2-core CPU; building and running the PyTorch references takes 0.1-1 s). Jitted whole at XLA:CPU's default
# backend optimisation the I3D still compiled in 24-40 s, nearly all of it LLVM optimising machine code; at level 0
# it takes 3-6 s (the Inception 8.5 s), the same operations in unoptimised code, so both run in the default suite.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _numpy_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _inception_pair(resize_input, tmp_path=None):
  torch.manual_seed(0)
  reference = reference_torch.randomize_batchnorm(reference_torch.FidInceptionV3(resize_input=resize_input), 1)
  state = _numpy_state(reference)
  if tmp_path is not None:  # through a file, as pytorch-fid's weights would come
    core.write_safetensors(tmp_path / "pt_inception.safetensors", state)
    ours = convert_inception.load_pretrained(tmp_path / "pt_inception.safetensors",
                                             resize_to=299 if resize_input else None)
  else:
    ours = convert_inception.from_state_dict(state, resize_to=299 if resize_input else None)
  return ours, reference


def _forward(model, inputs) -> np.ndarray:
  """model(inputs) as one jitted program compiled with COMPILER_OPTIONS."""
  graph, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, x: nnx.merge(graph, s)(x)).lower(state, inputs).compile(COMPILER_OPTIONS)(
      state, inputs))


def _compare(ours, reference, images):
  with torch.no_grad():
    theirs = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  mine = _forward(ours, images)
  error = np.abs(mine - theirs).max()
  return error, error / np.abs(theirs).max()


def test_fid_inception_matches_the_reference_at_a_small_input_size(tmp_path):
  ours, reference = _inception_pair(resize_input=False, tmp_path=tmp_path)
  images = np.random.default_rng(0).random((2, 75, 75, 3), np.float32)
  error, relative = _compare(ours, reference, images)
  print(f"FID Inception parity (75 x 75, no resize): max abs error {error:.2e}, relative {relative:.2e}")
  assert relative < TOLERANCE


@pytest.mark.slow
def test_the_fid_extractor_matches_the_reference_with_the_resize_to_299(tmp_path):
  """uint8 frames of any size through InceptionExtractor (its own jitted resize, one compiled network)."""
  from handi_jax.evaluation import extractors

  _, reference = _inception_pair(resize_input=True)
  core.write_safetensors(tmp_path / "pt_inception.safetensors", _numpy_state(reference))
  extractor = extractors.InceptionExtractor.from_file(str(tmp_path / "pt_inception.safetensors"), batch_size=2)
  frames = np.random.default_rng(1).integers(0, 256, (3, 64, 112, 3), np.uint8)
  with torch.no_grad():
    theirs = reference(torch.from_numpy(frames.astype(np.float32) / 255).permute(0, 3, 1, 2)).numpy()
  error = np.abs(extractor.features(frames) - theirs).max()
  print(f"FID Inception parity (64 x 112 -> 299): max abs error {error:.2e}, relative "
        f"{error / np.abs(theirs).max():.2e}")
  assert error / np.abs(theirs).max() < TOLERANCE


def test_fid_inception_weights_without_the_architecture_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.evaluate.inception"):
    convert_inception.load_pretrained(tmp_path / "missing.pth")


def test_i3d_matches_the_pytorch_i3d_reference_on_a_small_clip():
  from handi_jax.convert import i3d as convert_i3d

  torch.manual_seed(0)
  # 8 frames of 32 x 32: T 8 -> 4 -> 2 -> 1 and 32 -> 1 px before the pool, so a (1, 1, 1) pool window.
  reference = reference_torch.randomize_batchnorm(reference_torch.InceptionI3dReference(avg_pool=(1, 1, 1)), 2)
  ours = convert_i3d.from_state_dict(_numpy_state(reference), avg_pool=(1, 1, 1))
  videos = np.random.default_rng(3).uniform(-1, 1, (2, 8, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = reference(torch.from_numpy(videos).permute(0, 4, 1, 2, 3)).mean(dim=2).numpy()
  mine = _forward(ours, videos)
  error = np.abs(mine - theirs).max()
  print(f"I3D parity (8 x 32 x 32): max abs error {error:.2e}, relative {error / np.abs(theirs).max():.2e}")
  assert error / np.abs(theirs).max() < TOLERANCE


@pytest.mark.parametrize("avg_pool", [(2, 7, 7), (1, 1, 1)])
def test_i3d_minimum_frames_are_the_fewest_that_leave_a_time_step_to_average(avg_pool):
  """Shapes only (jax.eval_shape on an abstract model): no weights, nothing compiled."""
  import jax.numpy as jnp

  from handi_jax.evaluation import extractors
  from handi_jax.models.i3d import INPUT_SIZE, InceptionI3d

  model = nnx.eval_shape(lambda: InceptionI3d(avg_pool=avg_pool, rngs=nnx.Rngs(0)))
  fewest = extractors.I3dExtractor(model).minimum_frames
  graph, state = nnx.split(model)
  time_steps = {frames: jax.eval_shape(lambda s, v: nnx.merge(graph, s).features(v), state, jax.ShapeDtypeStruct(
      (1, frames, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)).shape[1] for frames in (fewest - 1, fewest)}
  assert fewest == {(2, 7, 7): 9, (1, 1, 1): 1}[avg_pool] and time_steps == {fewest - 1: 0, fewest: 1}
