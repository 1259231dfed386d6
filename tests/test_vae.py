"""AutoencoderKL: parity with diffusers, two-way conversion, full-size parameter counts, in-graph video decoding."""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from configs import common
from handi_jax import sharding
from handi_jax.convert import core
from handi_jax.convert import vae as convert_vae
from handi_jax.models.vae import AutoencoderKL, block_mean_weights, decode_video, encode_video
from tests.reference_torch import diffusers_vae

TINY = common.vae_config(full_size=False)
# Two blocks (x2 down-sampling): the in-graph video helpers compile in seconds on a CPU.
MICRO = common.vae_config(full_size=False)
MICRO.update(block_out_channels=(8, 8), norm_num_groups=4)


@pytest.fixture(scope="module")
def torch_vae():
  return diffusers_vae(TINY)


@pytest.fixture(scope="module")
def vae_dir(torch_vae, tmp_path_factory):
  directory = tmp_path_factory.mktemp("vae")
  torch_vae.save_pretrained(directory)
  return directory


def _state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["micro", pytest.param("demo", marks=pytest.mark.slow)])
def test_encode_and_decode_match_diffusers(tmp_path, name):
  config, size = (MICRO, 8) if name == "micro" else (TINY, 32)
  torch_vae = diffusers_vae(config)
  torch_vae.save_pretrained(tmp_path)
  vae = convert_vae.load_pretrained(tmp_path)
  latent_size = size // 2 ** (len(config.block_out_channels) - 1)
  images = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  latents = np.random.default_rng(1).standard_normal((2, latent_size, latent_size, 4)).astype(np.float32)
  mean, logvar = jax.jit(lambda x: vae.encode(x))(images)
  decoded = jax.jit(lambda z: vae.decode(z))(latents)
  with torch.no_grad():
    posterior = torch_vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
    ref_decoded = torch_vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1)
  ref_mean = posterior.mean.permute(0, 2, 3, 1).numpy()
  ref_logvar = posterior.logvar.permute(0, 2, 3, 1).numpy()
  references = dict(mean=ref_mean, logvar=ref_logvar, decode=ref_decoded.numpy())
  errors = {key: float(np.max(np.abs(np.asarray(mine) - references[key])))
            for key, mine in (("mean", mean), ("logvar", logvar), ("decode", decoded))}
  print(f"max abs error vs diffusers ({name}):", errors)
  assert decoded.shape == (2, size, size, 3) and mean.shape == (2, latent_size, latent_size, 4)
  for key, ref in references.items():
    assert errors[key] <= 2e-5 * max(1.0, float(np.max(np.abs(ref)))), (key, errors[key])


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_torch_jax_torch_round_trip_is_bit_exact(torch_vae, tmp_path, safe_serialization):
  torch_vae.save_pretrained(tmp_path / "in", safe_serialization=safe_serialization)
  assert (tmp_path / "in" / ("diffusion_pytorch_model." + ("safetensors" if safe_serialization else "bin"))).is_file()
  convert_vae.save_pretrained(convert_vae.load_pretrained(tmp_path / "in"), tmp_path / "out")
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", convert_vae.WEIGHTS_NAME]
  back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out")
  original, returned = _state(torch_vae), _state(back)
  assert set(original) == set(returned)
  for key in original:
    np.testing.assert_array_equal(returned[key], original[key], err_msg=key)
  for field in ("block_out_channels", "layers_per_block", "norm_num_groups", "scaling_factor", "latent_channels"):
    assert tuple(np.atleast_1d(back.config[field])) == tuple(np.atleast_1d(torch_vae.config[field]))


def test_legacy_attention_names_are_imported(torch_vae, tmp_path):
  state = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in _state(torch_vae).items()}
  assert any(".proj_attn." in k for k in state)
  core.write_model_dir(tmp_path, convert_vae.config_to_diffusers(TINY), state, convert_vae.WEIGHTS_NAME)
  loaded = core.flat_params(convert_vae.load_pretrained(tmp_path))
  expected = core.to_flax(_state(torch_vae), convert_vae.RULES)
  assert set(loaded) == set(expected)
  np.testing.assert_array_equal(loaded["encoder.mid_block.attentions.0.to_out.0.kernel"],
                                expected["encoder.mid_block.attentions.0.to_out.0.kernel"])


def test_full_size_parameter_count_equals_diffusers():
  config = common.vae_config(full_size=True)
  model = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
  mine = sum(int(np.prod(v.value.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  with torch.device("meta"):
    reference = diffusers.AutoencoderKL(**convert_vae.config_to_diffusers(config))
  assert mine == sum(p.numel() for p in reference.parameters()) == 83_653_863


def test_decode_video_in_jit_and_grad_chunked_equals_unchunked():
  vae = AutoencoderKL(MICRO, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(vae)
  latents = jax.random.normal(jax.random.key(0), (2, 5, 4, 4, 4))
  decode = jax.jit(lambda state, latents, chunk: decode_video(nnx.merge(graphdef, state), latents, chunk),
                   static_argnums=2)
  frames = np.asarray(decode(state, latents, 2))  # two chunks of 2 frames per clip, then the remaining one
  assert frames.shape == (2, 5, 8, 8, 3)
  decode_images = jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z))
  unchunked = decode_images(state, latents.reshape(10, 4, 4, 4) / MICRO.scaling_factor).reshape(2, 5, 8, 8, 3)
  np.testing.assert_allclose(frames, np.asarray(unchunked), atol=1e-5, rtol=0)

  grad = jax.jit(jax.grad(lambda latents: jnp.mean(decode_video(nnx.merge(graphdef, state), latents, 2) ** 2)))
  gradient = grad(latents)
  assert gradient.shape == latents.shape and bool(jnp.all(jnp.isfinite(gradient)))
  assert float(jnp.abs(gradient).max()) > 0


@pytest.mark.slow
def test_decode_video_remat_gives_the_same_gradient():
  vae = AutoencoderKL(MICRO, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(vae)
  latents = jax.random.normal(jax.random.key(0), (1, 3, 4, 4, 4))

  def loss(latents, remat):
    return jnp.mean(decode_video(nnx.merge(graphdef, state), latents, 2, remat=remat) ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  np.testing.assert_allclose(np.asarray(grad(latents, True)), np.asarray(grad(latents, False)), rtol=1e-4, atol=1e-7)


def test_encode_video_scales_the_mean_or_samples_the_posterior():
  vae = AutoencoderKL(MICRO, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(vae)
  frames = jax.random.uniform(jax.random.key(1), (1, 3, 8, 8, 3), minval=-1, maxval=1)
  mean, logvar = jax.jit(lambda state, x: nnx.merge(graphdef, state).encode(x))(state, frames[0])
  key = jax.random.key(2)

  @jax.jit
  def both(state, frames):
    vae = nnx.merge(graphdef, state)
    return encode_video(vae, frames, chunk_size=2), encode_video(vae, frames, key)

  latents, sampled = both(state, frames)
  np.testing.assert_allclose(np.asarray(latents[0]), np.asarray(mean) * 0.18215, atol=1e-6)
  noise = (sampled[0] / 0.18215 - mean) / jnp.exp(0.5 * logvar)
  np.testing.assert_allclose(np.asarray(noise), np.asarray(jax.random.normal(key, (1, 3, 4, 4, 4))[0]), atol=2e-3)


def test_every_parameter_has_logical_axes_that_shard_on_a_mesh():
  vae = nnx.eval_shape(lambda: AutoencoderKL(common.vae_config(full_size=True), rngs=nnx.Rngs(0)))
  config = common.get_config(2)
  valid = {name for name, _ in config.sharding_rules}
  for path, variable in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
    names = variable.get_metadata().get("sharding_names")
    assert names is not None and len(names) == variable.value.ndim, path
    assert set(names) - {None} <= valid, (path, names)
  config.mesh.data, config.mesh.fsdp = 1, 8
  shardings = sharding.param_shardings(nnx.state(vae, nnx.Param), sharding.make_mesh(config), config.sharding_rules)
  spec = shardings["decoder"]["up_blocks"][0]["resnets"][0]["conv1"]["kernel"].spec
  assert spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")


def test_bad_directories_and_configs_give_clear_errors(vae_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist: expected a diffusers AutoencoderKL folder"):
    convert_vae.load_pretrained(tmp_path / "nope")
  hf_config = json.loads((vae_dir / "config.json").read_text())
  with pytest.raises(ValueError, match="act_fn='gelu' is not supported"):
    convert_vae.config_from_diffusers({**hf_config, "act_fn": "gelu"})
  (tmp_path / "wide").mkdir()
  (tmp_path / "wide" / "config.json").write_text(json.dumps({**hf_config, "block_out_channels": [16, 32, 32, 48]}))
  (tmp_path / "wide" / convert_vae.WEIGHTS_NAME).symlink_to(vae_dir / convert_vae.WEIGHTS_NAME)
  with pytest.raises(core.CheckpointMismatchError, match=r"shape mismatch for decoder.conv_in.kernel: "
                     r"checkpoint \(3, 3, 4, 32\), model \(3, 3, 4, 48\)"):
    convert_vae.load_pretrained(tmp_path / "wide")
  with pytest.raises(core.CheckpointMismatchError, match="layers_per_block: checkpoint 1, config 2"):
    convert_vae.load_pretrained(vae_dir, expected_config=dict(TINY, layers_per_block=2))
  with pytest.raises(ValueError, match="chunk_size must be a positive number"):
    decode_video(AutoencoderKL(MICRO, rngs=nnx.Rngs(0)), jnp.zeros((1, 2, 4, 4, 4)), 0)


def _bilinear_x2(image):
  """Nearest x2 then [1, 2, 1] / 4 per axis with zero padding, by hand."""
  up = image.repeat(2, axis=0).repeat(2, axis=1)
  padded = np.pad(up, ((1, 1), (1, 1), (0, 0)))
  taps = (0.25, 0.5, 0.25)
  rows = sum(t * padded[i:i + up.shape[0]] for i, t in enumerate(taps))
  return sum(t * rows[:, i:i + up.shape[1]] for i, t in enumerate(taps))


def test_block_mean_weights_encode_block_means_and_decode_them_bilinearly(shared_data):
  frame = shared_data / "ek_frames" / "1.png"
  image = np.asarray(Image.open(frame).convert("RGB").resize((64, 48)), np.float32) / 127.5 - 1.0
  vae = block_mean_weights(nnx.eval_shape(lambda: AutoencoderKL(TINY, rngs=nnx.Rngs(0))))
  latents = np.asarray(encode_video(vae, jnp.asarray(image)[None, None]))[0, 0]
  block_means = image.reshape(6, 8, 8, 8, 3).mean(axis=(1, 3))
  assert latents.shape == (6, 8, 4)
  np.testing.assert_allclose(latents[..., :3], 3.0 * block_means, atol=1e-4)  # _LATENT_GAIN
  np.testing.assert_array_equal(latents[..., 3], 0.0)
  decoded = np.asarray(decode_video(vae, jnp.asarray(latents)[None, None]))[0, 0]
  np.testing.assert_allclose(decoded, _bilinear_x2(_bilinear_x2(_bilinear_x2(block_means))), atol=1e-4)


def test_block_mean_weights_refuse_a_config_without_room_for_them():
  with pytest.raises(ValueError, match="4 channels a norm group.*pretrained VAE weights"):
    block_mean_weights(AutoencoderKL(MICRO, rngs=nnx.Rngs(0)))
