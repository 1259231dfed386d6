import pytest

import configs
from configs import common
from tests.conftest import REPO_ROOT


def _load(spec):
  return configs.load(str(REPO_ROOT / "configs" / spec))


def test_default_is_demo_with_tiny_models():
  config = _load("stage2.py")
  assert config.stage == 2
  assert config.model.unet.block_out_channels == (32, 64, 64, 64)
  assert config.mesh.to_dict() == {"data": -1, "fsdp": 1, "tensor": 1}


def test_paper_variant_has_release_hyperparameters():
  config = _load("stage1.py:paper")
  assert config.stage == 1 and config.data.conditioning_mask == "prior"
  assert config.model.unet.block_out_channels == (320, 640, 1280, 1280)
  assert config.model.text_encoder.num_hidden_layers == 23
  assert (config.train.learning_rate, config.train.global_batch_size) == (5e-5, 48)
  assert (config.loss.alpha_miou, config.loss.eta_hand) == (0.1, 0.1)
  assert (config.sampling.num_inference_steps, config.sampling.guidance_scale) == (25, 9.0)
  assert config.data.num_frames == 16


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
