"""The FID Inception and the FVD I3D against their PyTorch references (pytorch-fid's and pytorch-i3d's
architectures, tests/reference_torch.py) on random weights; the weights files' SHA-256 they report; the EgoVLP and
BLIP scores' known answers on tiny random weights (tests/test_egovlp.py's and tests/test_blip.py's); and the
weights files of every extractor that tests/test_evaluate.py's end-to-end evaluation reads through the config."""

import hashlib
import pathlib

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from handi_jax.convert import core
from handi_jax.convert import egovlp as convert_egovlp
from handi_jax.convert import inception as convert_inception
from handi_jax.evaluation import blip, extractors
from handi_jax.evaluation.egovlp import EgoVlpScorer
from tests import reference_torch, test_blip, test_egovlp

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


# ---------------------------------------------------------------------------------------------------
# Weights files of every extractor, tiny where the architecture allows (the Inception and the I3D have fixed sizes).


def _input_dependent(module: torch.nn.Module) -> torch.nn.Module:
  """Convolutions drawn as He et al. do (variance 2 / fan-in), so activations keep their scale through the ReLUs:
  with torch's default draws the features are nearly the same for any input (two frames' Inception features differ
  by ~1e-9), and so is any FID / FVD."""
  torch.manual_seed(0)
  for layer in module.modules():
    if isinstance(layer, (torch.nn.Conv2d, torch.nn.Conv3d)):
      torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
  return module


def write_inception_weights(path: pathlib.Path) -> pathlib.Path:
  reference = reference_torch.randomize_batchnorm(reference_torch.FidInceptionV3(resize_input=True), 1)
  core.write_safetensors(path, _numpy_state(_input_dependent(reference)))
  return path


def write_i3d_weights(path: pathlib.Path) -> pathlib.Path:
  reference = reference_torch.randomize_batchnorm(reference_torch.InceptionI3dReference(), 2)
  core.write_safetensors(path, _numpy_state(_input_dependent(reference)))
  return path


# tests/test_egovlp.py's tiny tower with the release's 12 heads (not in the weights): config.evaluate.egovlp loads it.
EGOVLP_WITH_RELEASE_HEADS = dict(test_egovlp.TINY, dim=48, heads=12)


def write_egovlp_checkpoint(path: pathlib.Path) -> pathlib.Path:
  """The release's state dict (`module.` prefix, text tower beside the video tower) as safetensors."""
  torch.manual_seed(0)
  model = reference_torch.EgoVlpVideoReference(**EGOVLP_WITH_RELEASE_HEADS)
  reference_torch.randomize(model, 0)
  core.write_safetensors(path, test_egovlp._release_state_dict(model))
  return path


def write_blip_directory(directory: pathlib.Path) -> pathlib.Path:
  """config.evaluate.blip's layout: tests/test_blip.py's tiny captioner (end tokens likely, so captions of several
  lengths) and EgoVLP text tower."""
  test_blip._write_captioner(directory / "captioner", seed=13, end_bias=4.0)
  test_blip._write_text_encoder(directory / "text_encoder")
  return directory


def test_weights_loaded_from_a_file_are_named_by_their_sha256(tmp_path):
  path = write_i3d_weights(tmp_path / "i3d.safetensors")
  protocol = extractors.I3dExtractor.from_file(str(path)).protocol()
  assert protocol["weights"] == str(path)
  assert protocol["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
  assert (protocol["resolution"], protocol["input_range"]) == ("224 x 224", "RGB in [-1, 1]")
  assert "400 Kinetics logits" in protocol["network"]


# ---------------------------------------------------------------------------------------------------
# Known answers of the EgoVLP and BLIP scores on tiny random weights.


def _moving_video(frames: int = 6) -> np.ndarray:
  """A bright square crossing a fixed textured background, 8 px a frame (40 x 57)."""
  background = np.random.default_rng(5).integers(0, 160, (40, 57, 3), np.uint8)
  video = np.repeat(background[None], frames, axis=0)
  for index in range(frames):
    video[index, 12:24, 4 + 8 * index:16 + 8 * index] = 255
  return video


@pytest.fixture(scope="module")
def egovlp_scorer():
  model = convert_egovlp.from_state_dict(test_egovlp._release_state_dict(test_egovlp._reference()),
                                         num_heads=test_egovlp.TINY["heads"])
  return EgoVlpScorer(model, num_frames=2)


def test_egovlp_score_known_answers(egovlp_scorer):
  """The cosine of two video embeddings: 1 exactly for the same sampled frames in the same order, below 1 when
  what the tower sees differs (other pixels, no motion, another order), and symmetric."""
  score = egovlp_scorer.score
  video = _moving_video()
  noise = np.random.default_rng(6).integers(0, 256, video.shape, np.uint8)
  unsampled = video.copy()  # EgoVLP's uniform sampling of 2 frames of 6 reads frames 1 and 4 only
  unsampled[[0, 2, 3, 5]] = noise[[0, 2, 3, 5]]
  shifted = np.roll(video, 14, axis=2)
  still = np.repeat(video[:1], len(video), axis=0)
  values = dict(itself=score(video, video), unsampled_frames_changed=score(unsampled, video),
                shifted=score(shifted, video), still=score(still, video), reversed=score(video[::-1], video))
  print("EgoVLP known answers: " + ", ".join(f"{k} {v:.6f}" for k, v in values.items()))
  assert values["itself"] == pytest.approx(1.0, abs=1e-6)
  assert values["unsampled_frames_changed"] == pytest.approx(1.0, abs=1e-6)
  assert values["shifted"] < 1 - 1e-4          # the same motion elsewhere in the frame
  assert values["still"] < 1 - 1e-4            # a moving video against its first frame held still
  assert values["reversed"] < 1 - 1e-4         # the same frames in the other order: temporal positions differ
  assert score(video, shifted) == pytest.approx(values["shifted"], abs=1e-6)
  assert score(still, still) == pytest.approx(1.0, abs=1e-6)  # a still video against its still copy: itself


@pytest.fixture(scope="module")
def blip_scorer(tmp_path_factory):
  return blip.BlipScorer.from_directory(write_blip_directory(tmp_path_factory.mktemp("blip_score")), batch_size=4)


def test_blip_score_known_answers(blip_scorer):
  """The mean over frames of the cosine between a frame's caption and the prompt: 1 exactly when every frame's
  caption is the prompt (a still clip scored against its own caption); the mean of the frames' own scores, so
  blind to their order (a time-shifted copy scores the same) and a still copy scores as its one frame does."""
  video = _moving_video(4)
  prompt = "the hand picks up the egg"
  still = np.repeat(video[:1], 3, axis=0)
  (caption,) = blip_scorer.captions(video[:1])
  per_frame = [blip_scorer.score(frame[None], prompt) for frame in video]
  values = dict(video=blip_scorer.score(video, prompt), shifted=blip_scorer.score(np.roll(video, 1, axis=0), prompt),
                still=blip_scorer.score(still, prompt), still_against_its_caption=blip_scorer.score(still, caption))
  print(f"BLIP known answers (caption of frame 0: {caption!r}, per frame {np.round(per_frame, 6).tolist()}): "
        + ", ".join(f"{k} {v:.6f}" for k, v in values.items()))
  assert values["still_against_its_caption"] == pytest.approx(1.0, abs=1e-6)
  assert values["video"] == pytest.approx(np.mean(per_frame), abs=1e-6)
  assert values["shifted"] == pytest.approx(values["video"], abs=1e-6)
  assert values["still"] == pytest.approx(per_frame[0], abs=1e-6)
  assert max(per_frame) < 1 - 1e-4  # so the 1 above is the caption matching, not a score stuck at 1
