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


def assert_state_dicts_equal(ours, reference):
  assert set(ours) == set(reference)
  for key in reference:
    assert ours[key].shape == reference[key].shape, key
    np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)


def write_original_checkpoint(directory, state, config):
  core.write_model_dir(directory, convert_unet.to_pretrained_config(config, "original"), state,
                       convert_unet.WEIGHTS_NAME)


def test_original_keys_round_trip_bit_exact(tmp_path):
  state = HandiReference(torch_unet(tiny_unet_config())).state_dict_numpy()
  write_original_checkpoint(tmp_path / "in", state, tiny_unet_config())
  model = convert_unet.load_pretrained(tmp_path / "in")
  assert model.config == {**tiny_unet_config(), "block_out_channels": (16, 32)}
  convert_unet.save_pretrained(model, tmp_path / "out", key_format="original")
  assert_state_dicts_equal(core.read_state_dict(tmp_path / "out"), state)
  saved = json.loads((tmp_path / "out" / "config.json").read_text())
  assert saved["motion_mask"] is True and saved["motion_strength"] is True and saved["in_channels"] == 4


def test_stock_diffusers_checkpoint_needs_the_explicit_option(tmp_path):
  reference = torch_unet(tiny_unet_config())   # diffusers, with time_cond_proj_dim: no conv_in2 / motion_embedding
  reference.save_pretrained(tmp_path / "stock")
  with pytest.raises(core.CheckpointMismatchError, match="conv_in2.weight, conv_in2.bias, motion_embedding.0.weight"):
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
  state = HandiReference(torch_unet(tiny_unet_config())).state_dict_numpy()
  write_original_checkpoint(tmp_path / "bad", state, tiny_unet_config(in_channels=5))
  with pytest.raises(core.CheckpointMismatchError,
                     match=r"shape mismatch for conv_in.kernel: checkpoint \(3, 3, 4, 16\), model \(3, 3, 5, 16\)"):
    convert_unet.load_pretrained(tmp_path / "bad")
  config = json.loads((tmp_path / "bad" / "config.json").read_text())
  (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "attention_head_dim": [8, 8]}))
  with pytest.raises(ValueError, match="attention_head_dim"):
    convert_unet.load_pretrained(tmp_path / "bad")


def test_release_checkpoint_with_five_channel_conv_in(tmp_path):
  """The release's training code re-creates conv_in with 5 inputs; conv_in2 carries the mask path anyway."""
  state = HandiReference(torch_unet(tiny_unet_config())).state_dict_numpy()
  state["conv_in.weight"] = np.concatenate([np.zeros_like(state["conv_in.weight"][:, :1]), state["conv_in.weight"]], 1)
  write_original_checkpoint(tmp_path / "ckpt", state, tiny_unet_config(in_channels=5))
  model = convert_unet.load_pretrained(tmp_path / "ckpt")
  assert model.conv_in.kernel.value.shape == (3, 3, 5, 16)
  x = unet_inputs()
  with pytest.raises(ValueError, match="pass a mask"):
    model(x["sample"], x["timesteps"], x["text"], x["condition"])
  convert_unet.save_pretrained(model, tmp_path / "out", key_format="original")
  assert_state_dicts_equal(core.read_state_dict(tmp_path / "out"), state)


def test_export_of_a_model_without_handi_parts_to_original_keys_is_refused(tmp_path):
  model = UNet3DConditionModel(tiny_unet_config(mask_channels=0), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="key_format='original' needs"):
    convert_unet.save_pretrained(model, tmp_path, key_format="original")


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
