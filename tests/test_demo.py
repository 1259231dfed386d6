"""`make demo` end to end, on a smaller model than the default so it fits the slow suite."""

import json

import imageio.v3 as iio
import pytest

from handi_jax import demo
from tests.helpers import tiny_train_config


@pytest.mark.slow
def test_demo_trains_generates_and_exports(tmp_path):
  config = tiny_train_config(stage=2, steps=1)
  config.data.num_frames = 4
  config.sampling.num_inference_steps = 2
  demo.run_demo(config, str(tmp_path))
  summary = json.loads((tmp_path / "demo_summary.json").read_text())
  frames = iio.imread(summary["gif"], index=None)
  assert frames.shape[1:3] == (32, 32)
  assert (tmp_path / "export" / "unet" / "config.json").is_file()
  assert (tmp_path / "checkpoints" / "1").is_dir()
