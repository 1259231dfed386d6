import pytest

import configs
from configs import common
from tests.conftest import REPO_ROOT


def _load(spec):
  return configs.load(str(REPO_ROOT / "configs" / spec))


def test_default_is_demo_with_tiny_models():
  config = _load("stage2.py")
  assert config.stage == 2
  assert config.model.unet.block_out_channels == (32, 64)
  assert config.mesh.to_dict() == {"data": -1, "fsdp": 1, "tensor": 1}
  assert (config.diffusion.prediction_type, config.loss.eta_hand) == ("sample", 0.0)  # the demo's fast learning
  assert config.model.vae_without_weights == "block_mean"


def test_paper_variant_has_release_hyperparameters():
  config = _load("stage1.py:paper")
  assert config.stage == 1 and config.data.conditioning_mask == "prior"
  assert config.model.unet.block_out_channels == (320, 640, 1280, 1280)
  assert config.model.text_encoder.num_hidden_layers == 23
  assert (config.train.learning_rate, config.train.global_batch_size) == (5e-5, 48)
  assert (config.loss.alpha_miou, config.loss.eta_hand) == (0.1, 0.1)
  assert (config.sampling.num_inference_steps, config.sampling.guidance_scale) == (25, 9.0)
  assert config.data.num_frames == 16 and config.diffusion.prediction_type == "epsilon"
  assert _load("stage2.py:demo,paper").to_dict() == _load("stage2.py:paper").to_dict()


def test_variants_compose_left_to_right():
  config = _load("stage2.py:paper,h100x8")
  assert config.model.unet.block_out_channels[0] == 320  # from paper
  assert config.mesh.to_dict() == {"data": 1, "fsdp": 8, "tensor": 1}  # from h100x8
  assert config.model.dtype == "bfloat16" and config.model.attention == "cudnn"
  pod = _load("stage2.py:paper,tpu_v5p_64")
  assert pod.multihost is True and pod.num_devices_expected == 32


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="unknown config variant 'h100x4'.*valid variants: demo"):
    common.get_config(2, "paper,h100x4")


# Every combination README and launch/ name: the devices it runs on (the demo: make demo's one CPU; `paper` alone:
# one 8-device host), the processes (v5p-64: 8 hosts of 4 chips) and the global batch it trains with.
DOCUMENTED = [
    ("demo", 1, 1, 2), ("paper", 8, 1, 48), ("h100x8", 8, 1, 48), ("tpu_v5p_64", 32, 8, 64),
    ("paper,h100x8", 8, 1, 48), ("paper,tpu_v5p_64", 32, 8, 64),
]


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("variants, devices, processes, global_batch", DOCUMENTED)
def test_documented_variants_resolve_mesh_and_batch_without_devices(stage, variants, devices, processes,
                                                                    global_batch):
  from jax.sharding import AbstractMesh

  from handi_jax import sharding
  from handi_jax.data import input_pipeline

  config = common.get_config(stage, variants)
  shape = sharding.mesh_shape(config.mesh, devices, config.num_devices_expected)
  assert shape.num_devices == devices
  mesh = AbstractMesh(shape.values(), sharding.MESH_AXES)
  assert sharding.global_batch_size(config.train, shape.batch_devices) == global_batch
  per_host = input_pipeline.per_host_batch_size(config, mesh, processes)
  assert per_host * processes == global_batch
  assert per_host % (shape.num_devices // processes) == 0  # each host fills whole shards of its own devices
  shapes = input_pipeline.batch_shapes(config, mesh=mesh, with_input_ids=True)
  assert {v.shape[0] for v in shapes.values()} == {global_batch}


def test_batch_that_does_not_split_names_both_numbers_and_the_fix():
  from jax.sharding import AbstractMesh

  from handi_jax import sharding
  from handi_jax.data import input_pipeline

  config = common.get_config(2, "paper,tpu_v5p_64")
  config.train.per_device_batch_size = 0  # back to the paper's 48 clips on 32 chips
  mesh = AbstractMesh((2, 16, 1), sharding.MESH_AXES)
  with pytest.raises(ValueError, match=r"global batch 48 does not split over the 32 devices .* and 8 process\(es\): "
                     r"set --config.train.global_batch_size to a multiple of 32 \(e.g. 64\) or "
                     r"--config.train.per_device_batch_size=N \(global batch N x 32\)"):
    input_pipeline.per_host_batch_size(config, mesh, 8)
