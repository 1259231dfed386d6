"""`make demo` end to end, and the measure it prints of how close the generated clip is to the true one."""

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from configs import common
from configs import stage1 as stage1_config
from handi_jax import demo
from tests.conftest import REPO_ROOT
from tests.helpers import tiny_train_config


def test_distance_inside_mask_by_hand():
  clip = np.zeros((3, 2, 2, 3), np.uint8)
  clip[1:, 0, 0] = 100                      # the true clip moves at pixel (0, 0) only
  video = clip.copy()
  video[1, 0, 0] = 90                       # off by 10 levels in frame 1, exact in frame 2; frame 0 not counted
  video[:, 1, 1] = 255                      # outside the mask: not counted
  mask = np.array([[True, False], [False, False]])
  assert demo.distance_inside_mask(video, clip, mask) == 5.0


def test_the_demo_trains_stage_1_from_its_stage_2_config_with_config_stage1_train(tmp_path):
  config = common.get_config(stage=2)   # the demo variant
  stage1 = stage1_config.as_stage1(config.copy_and_resolve_references())
  assert stage1.stage == 1 and stage1.data.conditioning_mask == "prior" and not stage1.train.freeze_background
  assert (stage1.train.num_steps, stage1.train.learning_rate) == (config.stage1_train.num_steps,
                                                                   config.stage1_train.learning_rate)
  assert stage1.train.num_steps != config.train.num_steps and stage1.loss.alpha_miou > 0
  assert stage1.to_dict() == stage1_config.get_config().to_dict()   # what configs/stage1.py gives
  with pytest.raises(ValueError, match="takes the stage-2 config"):
    demo.run_demo(stage1, str(tmp_path))


@pytest.mark.slow
def test_demo_trains_both_stages_generates_from_the_image_and_text_and_exports(tmp_path, capsys):
  config = tiny_train_config(stage=2, steps=1)
  config.stage1_train.num_steps = 1
  config.data.num_frames = 4
  config.sampling.num_inference_steps = 2
  demo.run_demo(config, str(tmp_path))
  summary = json.loads((tmp_path / "demo_summary.json").read_text())
  frames = iio.imread(summary["gif"], index=None)
  assert frames.shape[1:3] == (32, 32)   # the size both stages trained at: no size was asked for
  assert json.loads((tmp_path / "generate" / demo.FROM_TEXT / "done.json").read_text())["mask_source"] == "stage 1"
  assert (tmp_path / "generate" / demo.FROM_TEXT / "mask_video.mp4").is_file()
  assert (tmp_path / "generate" / demo.WITH_TRUE_MASK / "video.mp4").is_file()
  assert (tmp_path / "export" / "unet" / "config.json").is_file()
  assert (tmp_path / "checkpoints" / "1").is_dir() and (tmp_path / "stage1" / "checkpoints" / "1").is_dir()
  distance = summary["distance_to_true_clip_inside_mask"]
  assert set(distance) == {demo.FROM_TEXT, demo.WITH_TRUE_MASK, "still_first_frame"}
  console = capsys.readouterr().out
  assert "stage 2: trained to step 1" in console and "stage 1: trained to step 1" in console
  assert f"{distance[demo.FROM_TEXT]}  from the image and text alone" in console
  assert f"{distance[demo.WITH_TRUE_MASK]}  with the clip's true mask" in console


@pytest.mark.slow
def test_the_demo_learns_the_motion_of_its_clips(tmp_path):
  """`--mode=demo` on the default config, as `make demo` runs it (about 4 minutes here, on one CPU device): the
  generated clip is closer to the true one inside the mask than the first frame held still is."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-m", "handi_jax.main", "--config=configs/stage2.py", f"--workdir={tmp_path}",
                  "--mode=demo"], cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=900)
  distance = json.loads((tmp_path / "demo_summary.json").read_text())["distance_to_true_clip_inside_mask"]
  assert distance[demo.WITH_TRUE_MASK] < distance["still_first_frame"], distance
