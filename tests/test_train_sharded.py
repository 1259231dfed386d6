"""The real train step laid out as training lays it out (train_step.jit_train_step: state, frozen models and batch
sharded over a data x fsdp mesh) equals the same step on one device, under jax.transfer_guard("disallow");
the frozen models in their compute dtype and their per-device bytes on the hardware variants' meshes."""

import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from configs import common
from handi_jax import train_step
from handi_jax.components import frozen as frozen_lib
from handi_jax.components import train_state
from handi_jax.components import unet as unet_lib
from tests.helpers import tiny_train_config

SHARDED_MESH = dict(data=2, fsdp=4, tensor=1)


class TextConvDenoiser(nnx.Module):
  """The UNet's call signature and logical axis names over two 3 x 3 convs and a text projection: the real UNet
  compiles for minutes here (its sharded forward: test_unet_sharding.py); the text encoder stays in the graph."""

  def __init__(self, config, rngs: nnx.Rngs):
    width, text = 32, config.model.text_encoder.hidden_size
    conv = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, "conv_in", "conv_out"))
    self.conv_in = nnx.Conv(4, width, (3, 3), kernel_init=conv, rngs=rngs)
    self.text_proj = nnx.Linear(text, width, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ("embed", "mlp")), rngs=rngs)
    self.conv_out = nnx.Conv(width, 4, (3, 3), kernel_init=conv, rngs=rngs)

  def __call__(self, sample, timesteps, encoder_hidden_states, condition_latent, mask=None, motion=None):
    frames = sample.reshape(-1, *sample.shape[2:])
    text = jnp.repeat(self.text_proj(encoder_hidden_states.mean(axis=1)), sample.shape[1], axis=0)
    return self.conv_out(nnx.silu(self.conv_in(frames) + text[:, None, None])).reshape(sample.shape)


def tiny_landmark_graph():
  """A TFLite program with the landmark network's input and outputs (one stride-8 conv, a mean, dense heads):
  MediaPipe's network takes minutes to compile and run differentiated on 8 simulated devices here."""
  from handi_jax.hand_landmarks import tflite_graph as tg

  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-2]))
  ops = [tg.Op("conv_2d_0", "CONV_2D", (0,), 1, strides=(8, 8), padding="VALID", activation="RELU"),
         tg.Op("mean_0", "MEAN", (1,), 2, axes=(1, 2))]
  params = {"conv_2d_0": dict(kernel=normal(8, 8, 3, 8), bias=jnp.zeros(8))}
  for index, width in enumerate((63, 1, 1, 63)):  # landmarks, hand flag, handedness, world landmarks
    ops.append(tg.Op(f"fully_connected_{index}", "FULLY_CONNECTED", (2,), 3 + index))
    params[f"fully_connected_{index}"] = dict(kernel=normal(8, width) * (100.0 if width == 63 else 1.0),
                                              bias=jnp.full(width, 112.0 if width == 63 else 0.0))
  ops += [tg.Op("logistic_0", "LOGISTIC", (4,), 7), tg.Op("logistic_1", "LOGISTIC", (5,), 8)]
  program = tg.Program(ops=tuple(ops), inputs=(0,), input_shapes=((1, 224, 224, 3),), outputs=(3, 7, 8, 6),
                       output_names=("landmarks", "hand_flag", "handedness", "world_landmarks"))
  return tg.TFLiteGraph(params=params, program=program)


def _batch(config):
  """Demo clips as the input pipeline delivers them (frames in [-1, 1], masks in {0, 1}), as numpy."""
  from handi_jax.data import demo_clips
  from handi_jax.media import hand_masks as masks

  clips = [demo_clips.synthesize_clip(i, config) for i in range(config.train.global_batch_size)]
  per_frame = [masks.clip_masks(c["keypoints"], c["presence"].astype(bool), config.data.height, config.data.width,
                                config.data.build.mask_rule) for c in clips]
  return dict(
      frames=(np.stack([c["frames"] for c in clips]) / 127.5 - 1.0).astype(np.float32),
      mask=(np.stack([union for _, union in per_frame])[..., None] / 255.0).astype(np.float32),
      target_masks=(np.stack([m[1:] for m, _ in per_frame]) / 255.0).astype(np.float32),
      keypoints=np.stack([c["keypoints"] for c in clips]).astype(np.float32),
      presence=np.stack([c["presence"] for c in clips]).astype(np.float32),
      input_ids=np.zeros((config.train.global_batch_size, 77), np.int32))


def _is_split(array) -> bool:
  return array.sharding.shard_shape(array.shape) != array.shape


def compare_sharded_and_single_device_step(stage: int, stand_ins: bool) -> dict:
  """One step, sharded (data 2 x fsdp 4) and on one device; the largest differences. stand_ins: the UNet replaced
  by a small stand-in (else the tiny real UNet); the caller replaces the landmark network (tiny_landmark_graph).
  On the 8 CPU devices of tests/conftest.py (test_sharded_train_step_equals_single_device_step)."""
  from handi_jax import sharding

  config = tiny_train_config(stage=stage, steps=1)
  config.mesh.update(SHARDED_MESH)
  config.loss.update(alpha_miou=0.1, eta_hand=0.1, miou_frames=1, hand_frames=1)
  unet = TextConvDenoiser(config, nnx.Rngs(0)) if stand_ins else unet_lib.build_unet(config)
  if stand_ins:
    config.loss.update(remat_decoder=False, remat_landmarks=False)  # the same values, a quarter less compile time
  config.sharding_min_size = 256  # tiny models: conv kernels and embeddings split, biases and norms whole
  mesh = sharding.make_mesh(config)
  replicated = NamedSharding(mesh, PartitionSpec())
  with mesh:
    state, graphdef, rng_state, state_sh = train_state.create_train_state(config, mesh, unet)
    frozen, frozen_sh, _ = frozen_lib.place_frozen_models(config, mesh)
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in _batch(config).items()}
    key = jax.device_put(jax.random.key(7), replicated)
    one = jax.devices()[0]
    single_args = jax.device_put((state, rng_state, frozen, batch, key), one)  # copies: `state` is donated below
    sharded_step = train_step.jit_train_step(config, mesh, graphdef, state_sh, frozen_sh).lower(
        state, rng_state, frozen, batch, key)
    single_step = jax.jit(train_step.make_train_step(config, graphdef)).lower(*single_args)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # XLA compiles outside the GIL: both cores
      sharded_step, single_step = pool.map(lambda lowered: lowered.compile(), (sharded_step, single_step))
    split = dict(frozen=sum(map(_is_split, jax.tree.leaves(frozen))), unet=sum(map(_is_split, jax.tree.leaves(state))),
                 batch=sum(map(_is_split, jax.tree.leaves(batch))))
    with jax.transfer_guard("disallow"):
      expected_state, expected_metrics = single_step(*single_args)
      new_state, metrics = sharded_step(state, rng_state, frozen, batch, key)
    assert {a.sharding.device_set == {one} for a in jax.tree.leaves((expected_state, expected_metrics))} == {True}
    expected_state, expected_metrics, new_state, metrics = jax.device_get(
        (expected_state, expected_metrics, new_state, metrics))

  def relative_difference(ours, theirs):
    """Largest |ours - theirs| over the largest |theirs|, over all leaves."""
    pairs = list(zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True))
    scale = max(float(np.abs(np.asarray(b)).max()) for _, b in pairs)
    return max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in pairs) / max(scale, 1e-30)

  # The step's learning rate is 0 (warm-up starts at 0): the gradient shows in AdamW's moments, mu = 0.1 g.
  mu = lambda state: state.opt_state[1][0].mu
  zero_leaves = lambda tree: [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(tree)
                              if not np.any(g != 0)]
  return dict(split=split, metrics={k: float(v) for k, v in metrics.items()},
              metrics_relative={k: abs(float(metrics[k]) - float(v)) / max(abs(float(v)), 1e-30)
                                for k, v in expected_metrics.items()},
              params_relative=relative_difference(new_state.params, expected_state.params),
              gradient_relative=relative_difference(mu(new_state), mu(expected_state)),
              zero_gradient_leaves=zero_leaves(mu(new_state)),
              zero_gradient_leaves_expected=zero_leaves(mu(expected_state)),
              gradient_leaves=len(jax.tree.leaves(mu(expected_state))))


@pytest.mark.parametrize("stand_ins", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_sharded_train_step_equals_single_device_step(stand_ins, monkeypatch):
  """Both stages, alpha and eta > 0, on 8 CPU devices: params, AdamW moments and metrics agree. (With the real tiny
  UNet and MediaPipe's network this took 15 minutes here, hence the stand-ins by default.) In this process: a child
  would import JAX and TF again for nothing (conftest.py gives this one 8 devices)."""
  assert jax.device_count() == 8
  if stand_ins:  # where load_frozen_models would load the real landmark network
    monkeypatch.setattr(frozen_lib.landmarks_lib, "load_hand_landmark_params", tiny_landmark_graph)
  reports = {str(s): compare_sharded_and_single_device_step(s, stand_ins) for s in (1, 2)}
  for stage, report in reports.items():
    print(stage, report)
    assert report["split"]["frozen"] > 0 and report["split"]["unet"] > 0, report["split"]
    assert report["split"]["batch"] == 6  # every batch array split over data x fsdp
    pixel_loss = "miou_loss" if stage == "1" else "hand_loss"
    assert report["metrics"][pixel_loss] > 0 and report["metrics"]["grad_norm"] > 0
    assert report["zero_gradient_leaves"] == report["zero_gradient_leaves_expected"]
    if stand_ins:
      assert not report["zero_gradient_leaves"]
    else:  # at step 0 the zero-initialised last conv of every temporal conv block, and the zero-initialised
      # time_embedding.cond_proj, stop the gradient to the layers before them; conv_in is unused (conv_in2 takes
      # the masked input)
      assert all(any(part in leaf for part in ("temp_convs", "motion_embedding", "['conv_in']"))
                 for leaf in report["zero_gradient_leaves"]), report["zero_gradient_leaves"]
      assert len(report["zero_gradient_leaves"]) < report["gradient_leaves"] / 2
    assert max(report["metrics_relative"].values()) < 1e-5, report["metrics_relative"]
    assert report["gradient_relative"] < 1e-5 and report["params_relative"] < 1e-6, report


def test_frozen_weights_in_compute_dtype_compute_the_same():
  """bf16 compute: kernels and embeddings stored in bf16, norms in fp32, and the layers' outputs unchanged."""

  config = tiny_train_config(stage=1)
  config.model.dtype = "bfloat16"
  frozen, _ = frozen_lib.load_frozen_models(config)
  vae, text_encoder, _ = frozen_lib.load_vae_and_text_encoder(config)  # the same weights, as loaded
  dtypes = {"/".join(map(str, p)): v.value.dtype for p, v in nnx.to_flat_state(frozen.text_encoder)}
  assert dtypes["text_model/embeddings/token_embedding/embedding"] == jnp.bfloat16
  assert dtypes["text_model/encoder/layers/0/mlp/fc1/kernel"] == jnp.bfloat16
  assert dtypes["text_model/final_layer_norm/scale"] == jnp.float32
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 49408, (2, 77)), jnp.int32)
  encode = nnx.jit(lambda model, ids: model(ids))
  ours = encode(nnx.merge(frozen.text_graphdef, frozen.text_encoder), ids)
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(encode(text_encoder, ids), np.float32))
  ours_vae = nnx.merge(frozen.vae_graphdef, frozen.vae)
  assert ours_vae.encoder.conv_in.kernel.value.dtype == jnp.bfloat16
  assert ours_vae.encoder.conv_norm_out.scale.value.dtype == jnp.float32
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(ours_vae.encoder.conv_in(images), np.float32),
                                np.asarray(vae.encoder.conv_in(images), np.float32))


@pytest.mark.parametrize("variant, fsdp", [("paper,h100x8", 8), ("paper,tpu_v5p_64", 16)])
def test_full_size_frozen_models_per_device_bytes(variant, fsdp):
  """From abstract shapes: the VAE and text encoder in bf16, the text encoder split over fsdp; the VAE and the
  landmark network replicated."""
  from handi_jax import sharding

  config = common.get_config(2, variant)
  shape = sharding.mesh_shape(config.mesh, 0, config.num_devices_expected)
  mesh = AbstractMesh(shape.values(), sharding.MESH_AXES)
  frozen = frozen_lib.abstract_frozen_models(config)
  shardings = frozen_lib.frozen_shardings(frozen, mesh, config)

  def nbytes(part, per_device):
    leaves = zip(jax.tree.leaves(getattr(frozen, part)), jax.tree.leaves(getattr(shardings, part)), strict=True)
    return sum(int(np.prod(s.shard_shape(x.shape) if per_device else x.shape)) * x.dtype.itemsize for x, s in leaves)

  encoders = nbytes("vae", False) + nbytes("text_encoder", False)
  fp32_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves((frozen.vae, frozen.text_encoder)))
  per_device = {part: nbytes(part, True) for part in ("vae", "text_encoder", "landmarks", "uncond_ids")}
  print(f"{variant}: frozen models per device {4 * fp32_params / 2**30:.2f} GiB as fp32 replicated (VAE + text "
        f"encoder) -> {sum(per_device.values()) / 2**20:.1f} MiB: " +
        ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in per_device.items()))
  assert encoders < 0.52 * 4 * fp32_params  # bf16 but for the norms
  assert per_device["text_encoder"] < 1.05 * nbytes("text_encoder", False) / fsdp
  assert per_device["vae"] == nbytes("vae", False)  # replicated: see frozen_lib.frozen_shardings
  assert per_device["landmarks"] == nbytes("landmarks", False)  # 11 MB, no logical names: replicated
