"""EgoVLP's video tower and the EgoVLP score against the PyTorch reference (tests/reference_torch.py) on tiny random
weights: embed 32, 2 blocks of 2 heads, 2 frames of 32 x 32 in 16-px patches, a 16-d projection."""

import argparse
import collections
import pathlib
import sys
import types

import numpy as np
import pytest
import torch
from flax import nnx

from handi_jax.convert import core
from handi_jax.convert import egovlp as convert_egovlp
from handi_jax.evaluation.egovlp import EgoVlpScorer, uniform_frame_indices
from tests import reference_torch

TOLERANCE = 1e-5  # absolute, on embeddings of magnitude ~1 and on the cosine
TINY = dict(image=32, patch=16, dim=32, depth=2, heads=2, hidden=64, frames=2, projection=16)


def _reference(seed=0):
  torch.manual_seed(seed)
  model = reference_torch.EgoVlpVideoReference(**TINY)
  reference_torch.randomize(model, seed)
  return model.eval()


def _release_state_dict(model) -> dict[str, np.ndarray]:
  """The reference's weights as egovlp.pth holds them: `module.` prefixed, beside a (here random) text tower."""
  state = {f"module.{k}": v.detach().numpy() for k, v in model.state_dict().items()}
  rng = np.random.default_rng(0)
  state["module.text_model.embeddings.word_embeddings.weight"] = rng.standard_normal((10, 8), np.float32)
  state["module.txt_proj.1.weight"] = rng.standard_normal((TINY["projection"], 8), np.float32)
  return state


def _videos(seed=1):
  """A generated video and its ground truth (5 frames of 40 x 57: resized to 32 x 45, an x.5 crop offset)."""
  rng = np.random.default_rng(seed)
  reference = rng.integers(0, 256, (5, 40, 57, 3), np.uint8)
  generated = np.clip(reference.astype(int) + rng.integers(-60, 61, reference.shape), 0, 255).astype(np.uint8)
  return generated, reference


@nnx.jit
def _forward(model, videos):
  return model(videos)


def test_frame_sampling_is_egovlps_uniform_rule():
  assert uniform_frame_indices(15, 4).tolist() == [1, 4, 8, 12] == reference_torch.egovlp_frame_indices(15, 4)
  assert uniform_frame_indices(3, 4).tolist() == [0, 1, 2]
  assert uniform_frame_indices(16, 16).tolist() == list(range(16))


def test_the_video_embedding_matches_the_reference():
  reference = _reference()
  ours = convert_egovlp.from_state_dict(_release_state_dict(reference), num_heads=TINY["heads"])
  videos = np.random.default_rng(2).standard_normal((2, 2, 32, 32, 3)).astype(np.float32)
  for frames in (2, 1):  # the full frame count, and fewer (the first temporal positions)
    with torch.no_grad():
      theirs = reference(torch.from_numpy(videos[:, :frames]).permute(0, 1, 4, 2, 3)).numpy()
    mine = np.asarray(_forward(ours, videos[:, :frames]))
    error = np.abs(mine - theirs).max()
    print(f"EgoVLP video embedding parity ({frames} frame(s)): max abs error {error:.2e}, "
          f"max |embedding| {np.abs(theirs).max():.2f}")
    assert error <= TOLERANCE


def test_the_preprocessing_matches_the_reference():
  """Landscape and portrait (odd crop offsets), an exact fit, upsampling, and fewer frames than the model takes."""
  scorer = EgoVlpScorer(convert_egovlp.from_state_dict(_release_state_dict(_reference()), num_heads=TINY["heads"]),
                        num_frames=2)
  rng = np.random.default_rng(4)
  for shape in ((3, 40, 57), (5, 57, 40), (2, 32, 32), (1, 20, 30)):
    frames = rng.integers(0, 256, shape + (3,), np.uint8)
    theirs = reference_torch.egovlp_reference_input(frames, 2, TINY["image"]).permute(0, 2, 3, 1).numpy()
    error = np.abs(scorer.preprocess(frames) - theirs).max()
    assert error <= TOLERANCE, (shape, error)


def _save_release_checkpoint(path: pathlib.Path, state: dict, monkeypatch) -> None:
  """torch.save of the release trainer's dict, its "config" an object of a module the loader cannot import."""
  module = types.ModuleType("parse_config")

  class ConfigParser:
    pass

  ConfigParser.__module__, ConfigParser.__qualname__ = module.__name__, "ConfigParser"
  module.ConfigParser = ConfigParser
  config = ConfigParser()
  config.__dict__.update(_config=collections.OrderedDict(name="EgoClip_4f"), _save_dir=pathlib.PurePosixPath("/r"),
                         args=argparse.Namespace(config="configs/pt/egoclip.json"))
  checkpoint = dict(arch="FrozenInTime", epoch=1, monitor_best=0.0, config=config,
                    state_dict=collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state.items()),
                    optimizer=dict(state={0: dict(exp_avg=torch.zeros(3))}, param_groups=[dict(lr=3e-5)]))
  with monkeypatch.context() as patch:
    patch.setitem(sys.modules, module.__name__, module)
    torch.save(checkpoint, path)
  with pytest.raises(Exception, match="parse_config"):  # what a plain weights_only load makes of it
    torch.load(path, weights_only=True)


def test_the_score_from_the_release_checkpoint_matches_the_reference(tmp_path, monkeypatch):
  reference = _reference()
  state = _release_state_dict(reference)
  _save_release_checkpoint(tmp_path / "egovlp.pth", state, monkeypatch)
  scorer = EgoVlpScorer.from_file(str(tmp_path / "egovlp.pth"), num_frames=2, num_heads=TINY["heads"])
  generated, truth = _videos()
  for name, pair in (("5-frame pair", (generated, truth)), ("1 frame vs 5", (generated[:1], truth))):
    theirs = reference_torch.egovlp_reference_score(reference, *pair, num_frames=2, size=TINY["image"])
    mine = scorer.score(*pair)
    print(f"EgoVLP score parity ({name}): ours {mine:.7f}, reference {theirs:.7f}, error {abs(mine - theirs):.1e}")
    assert abs(mine - theirs) <= TOLERANCE
  assert scorer.score(truth, truth) == pytest.approx(1.0, abs=1e-6)

  # The same weights exported to safetensors (video tower only, no prefix) give the same score.
  video_only = {k.removeprefix("module."): v for k, v in state.items()
                if not k.startswith(("module.text_model.", "module.txt_proj."))}
  core.write_safetensors(tmp_path / "egovlp.safetensors", video_only)
  exported = EgoVlpScorer.from_file(str(tmp_path / "egovlp.safetensors"), num_frames=2, num_heads=TINY["heads"])
  assert exported.score(generated, truth) == pytest.approx(scorer.score(generated, truth), abs=1e-7)


def test_more_frames_than_the_checkpoint_zero_fill_its_temporal_positions():
  state = _release_state_dict(_reference())
  model = convert_egovlp.from_state_dict(state, num_frames=4, num_heads=TINY["heads"])
  temporal = np.asarray(model.video_model.temporal_embed.value)
  np.testing.assert_array_equal(temporal[:, :2], state["module.video_model.temporal_embed"])
  np.testing.assert_array_equal(temporal[:, 2:], 0)
  assert convert_egovlp.from_state_dict(state, num_frames=1, num_heads=TINY["heads"]).config.num_frames == 1


def test_checkpoint_mismatches_are_named(tmp_path):
  state = _release_state_dict(_reference())
  del state["module.video_model.blocks.1.timeattn.qkv.bias"]
  with pytest.raises(core.CheckpointMismatchError, match=r"missing in checkpoint: video_model\.blocks\.1\.timeattn"):
    convert_egovlp.from_state_dict(state, num_heads=TINY["heads"])
  with pytest.raises(core.CheckpointMismatchError, match="no `video_model"):
    convert_egovlp.from_state_dict({"text_model.embeddings.weight": np.zeros((2, 2), np.float32)})
  unexpected = {**_release_state_dict(_reference()), "module.video_model.head.weight": np.zeros((3, 32), np.float32)}
  with pytest.raises(core.CheckpointMismatchError, match=r"unexpected in checkpoint: video_model\.head\.kernel"):
    convert_egovlp.from_state_dict(unexpected, num_heads=TINY["heads"])
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    convert_egovlp.from_state_dict(_release_state_dict(_reference()), num_heads=5)
  with pytest.raises(FileNotFoundError, match="config.evaluate.egovlp"):
    EgoVlpScorer.from_file(str(tmp_path / "missing.pth"))


@pytest.mark.slow
def test_the_release_size_model_matches_the_reference():
  """ViT-B/16 at 224 px, 16 temporal positions fitted to 4 frames (LEGO's Ego4D setting), a 15-frame pair (~2 min)."""
  torch.manual_seed(0)
  reference = reference_torch.EgoVlpVideoReference(image=224, patch=16, dim=768, depth=12, heads=12, hidden=3072,
                                                   frames=16, projection=256)
  reference_torch.randomize(reference, 0)
  reference.eval()
  scorer = EgoVlpScorer(convert_egovlp.from_state_dict(_release_state_dict(reference), num_frames=4), num_frames=4)
  rng = np.random.default_rng(0)
  truth = rng.integers(0, 256, (15, 64, 96, 3), np.uint8)
  generated = np.clip(truth.astype(int) + rng.integers(-80, 81, truth.shape), 0, 255).astype(np.uint8)
  with torch.no_grad():
    theirs = reference(reference_torch.egovlp_reference_input(generated, 4, 224)[None]).numpy()
  error = np.abs(scorer.video_embeddings(generated) - theirs).max()
  mine = scorer.score(generated, truth)
  expected = reference_torch.egovlp_reference_score(reference, generated, truth, 4, 224)
  print(f"EgoVLP at release size: embedding max abs error {error:.2e}, score {mine:.7f} vs {expected:.7f}")
  assert error <= TOLERANCE and abs(mine - expected) <= TOLERANCE
