"""UNet checkpoints both ways: the release's keys and diffusers' stock keys, bit-exact round trips, errors for
mismatches, and the full-size model's parameter count and key set (abstract shapes, no memory)."""

import json
import pathlib

import diffusers
import numpy as np
import pytest
from flax import nnx

from configs.common import unet_config
from handi_jax.convert import core
from handi_jax.convert import unet as convert_unet
from handi_jax.models.unet3d import UNet3DConditionModel
from tests.helpers import tiny_unet_config, unet_inputs
from tests.reference_torch import HandiReference, torch_unet

KEYS_FILE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "docs" / "original_unet_keys.tsv"
# A tiny model the release's class can build: its temporal norms have 32 groups, whatever norm_num_groups says.
RELEASE_TINY = tiny_unet_config(block_out_channels=(32, 64), temporal_norm_num_groups=32)


def assert_state_dicts_equal(ours, reference):
  assert set(ours) == set(reference)
  for key in reference:
    assert ours[key].shape == reference[key].shape, key
    np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)


def write_original_checkpoint(directory, state, config):
  core.write_model_dir(directory, convert_unet.to_pretrained_config(config, "original"), state,
                       convert_unet.WEIGHTS_NAME)


def test_original_keys_round_trip_bit_exact(tmp_path):
  state = HandiReference(torch_unet(RELEASE_TINY)).state_dict_numpy()
  write_original_checkpoint(tmp_path / "in", state, RELEASE_TINY)
  model = convert_unet.load_pretrained(tmp_path / "in")
  assert model.config == RELEASE_TINY
  convert_unet.save_pretrained(model, tmp_path / "out", key_format="original")
  assert_state_dicts_equal(core.read_state_dict(tmp_path / "out"), state)
  saved = json.loads((tmp_path / "out" / "config.json").read_text())
  assert saved["motion_mask"] is True and saved["motion_strength"] is True and saved["in_channels"] == 4


def test_stock_diffusers_checkpoint_needs_the_explicit_option(tmp_path):
  reference = torch_unet(tiny_unet_config())   # diffusers, with time_cond_proj_dim: no conv_in2 / motion_embedding
  reference.save_pretrained(tmp_path / "stock")
  with pytest.raises(core.CheckpointMismatchError, match="conv_in2.weight, conv_in2.bias, motion_embedding.0.weight"
                     r".*init_missing_handi_params=True \(`python -m handi_jax.convert import "
                     r"--init_missing_handi_params`\).*handi_extension=False \(--stock_unet\)"):
    convert_unet.load_pretrained(tmp_path / "stock")
  model = convert_unet.load_pretrained(tmp_path / "stock", init_missing_handi_params=True)
  conv_in2 = np.asarray(model.conv_in2.kernel.value)
  np.testing.assert_array_equal(conv_in2[:, :, 0], 0)  # mask column
  np.testing.assert_array_equal(conv_in2[:, :, 1:], np.asarray(model.conv_in.kernel.value))
  np.testing.assert_array_equal(np.asarray(model.motion_embedding[2].kernel.value), 0)

  convert_unet.save_pretrained(model, tmp_path / "export", key_format="diffusers")
  reloaded = diffusers.UNet3DConditionModel.from_pretrained(tmp_path / "export")  # stock diffusers loader
  assert_state_dicts_equal({k: v.numpy() for k, v in reloaded.state_dict().items()},
                           {k: v.numpy() for k, v in reference.state_dict().items()})


def test_plain_diffusers_model_round_trip_bit_exact(tmp_path):
  """A UNet3DConditionModel without any HANDI part (handi_extension=False), legacy .bin weights in."""
  reference = torch_unet(tiny_unet_config(mask_channels=0, motion_strength=False), seed=5)
  reference.save_pretrained(tmp_path / "stock", safe_serialization=False)
  assert (tmp_path / "stock" / "diffusion_pytorch_model.bin").is_file()
  model = convert_unet.load_pretrained(tmp_path / "stock", handi_extension=False)
  assert getattr(model, "conv_in2", None) is None and getattr(model.time_embedding, "cond_proj", None) is None
  convert_unet.save_pretrained(model, tmp_path / "export")
  reloaded = diffusers.UNet3DConditionModel.from_pretrained(tmp_path / "export")
  assert_state_dicts_equal({k: v.numpy() for k, v in reloaded.state_dict().items()},
                           {k: v.numpy() for k, v in reference.state_dict().items()})


def test_config_that_disagrees_with_the_checkpoint_is_an_error(tmp_path):
  state = HandiReference(torch_unet(RELEASE_TINY)).state_dict_numpy()
  write_original_checkpoint(tmp_path / "ckpt", state, RELEASE_TINY)
  with pytest.raises(core.CheckpointMismatchError, match="temporal_norm_num_groups: checkpoint 32, config 4"):
    convert_unet.load_pretrained(tmp_path / "ckpt", expected_config=dict(RELEASE_TINY, temporal_norm_num_groups=None))
  write_original_checkpoint(tmp_path / "bad", state, dict(RELEASE_TINY, in_channels=5))
  with pytest.raises(core.CheckpointMismatchError,
                     match=r"shape mismatch for conv_in.kernel: checkpoint \(3, 3, 4, 32\), model \(3, 3, 5, 32\)"):
    convert_unet.load_pretrained(tmp_path / "bad")
  config = json.loads((tmp_path / "bad" / "config.json").read_text())
  (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "attention_head_dim": [8, 8]}))
  with pytest.raises(ValueError, match="attention_head_dim"):
    convert_unet.load_pretrained(tmp_path / "bad")


def test_release_checkpoint_with_five_channel_conv_in(tmp_path):
  """The release's training code re-creates conv_in with 5 inputs; conv_in2 carries the mask path anyway."""
  state = HandiReference(torch_unet(RELEASE_TINY)).state_dict_numpy()
  state["conv_in.weight"] = np.concatenate([np.zeros_like(state["conv_in.weight"][:, :1]), state["conv_in.weight"]], 1)
  write_original_checkpoint(tmp_path / "ckpt", state, dict(RELEASE_TINY, in_channels=5))
  model = convert_unet.load_pretrained(tmp_path / "ckpt")
  assert model.conv_in.kernel.value.shape == (3, 3, 5, 32)
  x = unet_inputs()
  with pytest.raises(ValueError, match="pass a mask"):
    model(x["sample"], x["timesteps"], x["text"], x["condition"])
  convert_unet.save_pretrained(model, tmp_path / "out", key_format="original")
  assert_state_dicts_equal(core.read_state_dict(tmp_path / "out"), state)


def test_conv_in2_wider_than_the_release_needs_a_config_that_asks_for_it(tmp_path):
  """The release's conv_in2 takes 5 channels (mask + 4 latents); 6 would silently be 2 mask channels."""
  state = HandiReference(torch_unet(RELEASE_TINY)).state_dict_numpy()
  state["conv_in2.weight"] = np.concatenate([state["conv_in2.weight"][:, :1], state["conv_in2.weight"]], 1)
  write_original_checkpoint(tmp_path / "ckpt", state, RELEASE_TINY)
  with pytest.raises(core.CheckpointMismatchError, match=r"conv_in2.weight takes 6 input channels, expected 5 = 4 "
                     r"latent \+ 1 mask .*; for 2 mask channels set config.model.unet.mask_channels=2"):
    convert_unet.load_pretrained(tmp_path / "ckpt")
  model = convert_unet.load_pretrained(tmp_path / "ckpt", expected_config=dict(RELEASE_TINY, mask_channels=2))
  assert model.config["mask_channels"] == 2 and model.conv_in2.kernel.value.shape == (3, 3, 6, 32)


def test_export_of_a_model_without_handi_parts_to_original_keys_is_refused(tmp_path):
  model = UNet3DConditionModel(dict(RELEASE_TINY, mask_channels=0), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="key_format='original' needs"):
    convert_unet.save_pretrained(model, tmp_path, key_format="original")


def test_exports_refuse_temporal_norms_the_target_class_builds_otherwise():
  """The release's class gives the temporal norms 32 groups, diffusers' norm_num_groups."""
  with pytest.raises(ValueError, match="temporal_norm_num_groups=4: the release's UNet3DConditionModel .* 32 GroupNorm "
                     "groups .* export key_format='diffusers'"):
    convert_unet.to_pretrained_config(tiny_unet_config(), "original")
  with pytest.raises(ValueError, match="temporal_norm_num_groups=32: diffusers' UNet3DConditionModel .* "
                     "norm_num_groups=4 GroupNorm groups .* export key_format='original'"):
    convert_unet.to_pretrained_config(RELEASE_TINY, "diffusers")
  assert convert_unet.to_pretrained_config(RELEASE_TINY, "original")["norm_num_groups"] == 4
  assert convert_unet.to_pretrained_config(tiny_unet_config(), "diffusers")["norm_num_groups"] == 4


def test_release_keys_on_channels_the_release_cannot_build_are_refused(tmp_path):
  """16 channels take no 32-group GroupNorm: no release model has them (an old handi-jax export might)."""
  state = HandiReference(torch_unet(tiny_unet_config())).state_dict_numpy()
  write_original_checkpoint(tmp_path / "ckpt", state, tiny_unet_config(temporal_norm_num_groups=32))
  with pytest.raises(core.CheckpointMismatchError, match=r"block_out_channels \[16, 32\].* no release model wrote it"):
    convert_unet.load_pretrained(tmp_path / "ckpt")


def abstract_flat_params(config):
  abstract = nnx.eval_shape(lambda: UNet3DConditionModel(config, rngs=nnx.Rngs(0)))
  return {".".join(map(str, path)): v.value for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def test_full_size_parameter_counts_and_release_key_set():
  if not KEYS_FILE.is_file():
    pytest.skip(f"{KEYS_FILE} (the release's key list, in the shared docs) not found")
  config = unet_config(full_size=True)
  params = abstract_flat_params(config)
  assert sum(int(np.prod(v.shape)) for v in params.values()) == 1_413_401_540
  placeholders = {k: np.broadcast_to(np.zeros((), v.dtype), v.shape) for k, v in params.items()}
  exported = {k: tuple(v.shape) for k, v in convert_unet.export_state_dict(placeholders, config, "original").items()}
  expected = {}
  for line in KEYS_FILE.read_text().splitlines():
    if line and not line.startswith("#"):
      key, shape = line.split("\t")
      expected[key] = tuple(json.loads(shape))
  assert len(expected) == 1487
  assert exported == expected
  diffusers_keys = convert_unet.export_state_dict(placeholders, config, "diffusers")
  assert set(expected) - set(diffusers_keys) == {k for k in convert_unet.HANDI_KEYS if "cond_proj" not in k}

  config.in_channels = 5
  params = abstract_flat_params(config)
  assert sum(int(np.prod(v.shape)) for v in params.values()) == 1_413_404_420
