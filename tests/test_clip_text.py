"""CLIP text encoder and tokenizer: parity with transformers, two-way conversion, full-size parameter counts."""


import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs import common
from handi_jax import sharding
from handi_jax.convert import clip_text as convert_clip_text
from handi_jax.convert import core
from handi_jax.models.clip_text import CLIPTextModel
from handi_jax.tokenizers import load_tokenizer, tokenize
from tests.helpers import write_tiny_tokenizer

TINY = common.text_encoder_config(full_size=False)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _transformers_encoder(config, seed=0):
  """transformers' CLIPTextModel with every parameter random (LayerNorm scales and biases too)."""
  torch.manual_seed(seed)
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**dict(config), attn_implementation="eager"))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "layer_norm" in name:
        param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(param))
  return model.eval()


def _state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_tokenize_matches_clip_tokenizer_and_hand_computed_ids(tmp_path):
  vocab = write_tiny_tokenizer(tmp_path)
  tokenizer = load_tokenizer(tmp_path)
  ids = tokenize(tokenizer, ["Cut a hand", "hand " * 100])
  assert ids.dtype == np.int32 and ids.shape == (2, 77)
  expected = [vocab[BOS], vocab["cut</w>"], vocab["a</w>"], vocab["hand</w>"], vocab[EOS]] + [0] * 72
  assert ids[0].tolist() == expected
  assert ids[1].tolist() == [vocab[BOS]] + [vocab["hand</w>"]] * 75 + [vocab[EOS]]  # truncated, EOS kept
  reference = tokenizer(["Cut a hand", "hand " * 100], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.numpy()
  np.testing.assert_array_equal(ids, reference)


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_last_hidden_state_matches_transformers(tmp_path, hidden_act):
  config = dict(TINY, hidden_act=hidden_act)
  reference = _transformers_encoder(config)
  reference.save_pretrained(tmp_path / "text_encoder")
  write_tiny_tokenizer(tmp_path / "tokenizer")
  ids = tokenize(load_tokenizer(tmp_path / "tokenizer"), ["cut the carrot", "a hand"])
  ids[1, 10:20] = np.arange(40000, 40010)  # ids from the whole vocabulary, not only the tiny tokenizer's
  encoder = convert_clip_text.load_pretrained(tmp_path / "text_encoder")
  mine = np.asarray(jax.jit(lambda ids: encoder(ids))(ids))
  with torch.no_grad():
    expected = reference(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  error = float(np.max(np.abs(mine - expected)))
  print(f"max abs error vs transformers ({hidden_act}): {error:.3g} (max |value| {np.abs(expected).max():.3g})")
  assert mine.shape == (2, 77, 32)
  assert error <= 2e-5 * max(1.0, float(np.abs(expected).max()))


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_torch_jax_torch_round_trip_is_bit_exact(tmp_path, safe_serialization):
  reference = _transformers_encoder(TINY)
  reference.save_pretrained(tmp_path / "in")
  if not safe_serialization:  # transformers 5 writes only safetensors: make the legacy (v4) .bin by hand
    state = {"text_model." + k: v for k, v in reference.state_dict().items()}
    torch.save(state, tmp_path / "in" / "pytorch_model.bin")
    (tmp_path / "in" / "model.safetensors").unlink()
  convert_clip_text.save_pretrained(convert_clip_text.load_pretrained(tmp_path / "in"), tmp_path / "out")
  exported = core.read_state_dict(tmp_path / "out")
  assert all(key.startswith("text_model.") for key in exported)  # the names every transformers version loads
  back = transformers.CLIPTextModel.from_pretrained(tmp_path / "out")
  original, returned = _state(reference), _state(back)
  assert set(original) == set(returned)
  for key in original:
    np.testing.assert_array_equal(returned[key], original[key], err_msg=key)
  for field in TINY:
    assert getattr(back.config, field) == getattr(reference.config, field), field


def test_older_checkpoint_layout_with_position_ids_buffer_loads(tmp_path):
  state = {"text_model." + k: v for k, v in _state(_transformers_encoder(TINY)).items()}
  state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  core.write_model_dir(tmp_path, convert_clip_text.config_to_transformers(TINY), state, "model.safetensors")
  params = core.flat_params(convert_clip_text.load_pretrained(tmp_path))
  np.testing.assert_array_equal(params["text_model.embeddings.position_embedding.embedding"],
                                state["text_model.embeddings.position_embedding.weight"])


@pytest.mark.parametrize("name,overrides", [
    ("openclip_h_23x1024", {}),
    ("sd15_12x768", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         hidden_act="quick_gelu", pad_token_id=1)),
])
def test_full_size_parameter_counts_equal_transformers(name, overrides):
  config = dict(common.text_encoder_config(full_size=True), **overrides)
  model = nnx.eval_shape(lambda: CLIPTextModel(config, rngs=nnx.Rngs(0)))
  mine = sum(int(np.prod(v.value.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  with torch.device("meta"):
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
  expected = sum(p.numel() for p in reference.parameters())
  print(f"{name}: {mine} parameters")
  assert mine == expected
  if name == "sd15_12x768":
    assert mine == 123_060_480


def test_every_parameter_has_logical_axes_that_shard_on_a_mesh():
  encoder = nnx.eval_shape(lambda: CLIPTextModel(common.text_encoder_config(full_size=True), rngs=nnx.Rngs(0)))
  config = common.get_config(2)
  valid = {name for name, _ in config.sharding_rules}
  for path, variable in nnx.to_flat_state(nnx.state(encoder, nnx.Param)):
    names = variable.get_metadata().get("sharding_names")
    assert names is not None and len(names) == variable.value.ndim, path
    assert set(names) - {None} <= valid, (path, names)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
  shardings = sharding.param_shardings(nnx.state(encoder, nnx.Param), sharding.make_mesh(config),
                                       config.sharding_rules)
  layer = shardings["text_model"]["encoder"]["layers"][0]
  assert layer["self_attn"]["q_proj"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert layer["mlp"]["fc2"]["kernel"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_bad_inputs_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist: expected a transformers CLIPTextModel folder"):
    convert_clip_text.load_pretrained(tmp_path / "nope")
  _transformers_encoder(TINY).save_pretrained(tmp_path / "text_encoder")
  with pytest.raises(core.CheckpointMismatchError, match="num_hidden_layers: checkpoint 2, config 3"):
    convert_clip_text.load_pretrained(tmp_path / "text_encoder", expected_config=dict(TINY, num_hidden_layers=3))
  with pytest.raises(FileNotFoundError, match="has no vocab.json"):
    load_tokenizer(tmp_path)
  with pytest.raises(ValueError, match="hidden_act='relu' is not supported"):
    nnx.eval_shape(lambda: CLIPTextModel(dict(TINY, hidden_act="relu"), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"input_ids: expected \(batch, length <= 77\)"):
    nnx.eval_shape(lambda: CLIPTextModel(TINY, rngs=nnx.Rngs(0)))(np.zeros((1, 78), np.int32))
