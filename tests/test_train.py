"""Training end to end on demo data: a tiny model, 8 simulated devices, checkpoints, resume, restore."""

import logging

import jax
import numpy as np
import pytest
from flax import nnx

from configs import common
from data_prep import demo_data
from handi_jax import checkpoints, train, train_state
from tests.helpers import tiny_train_config


def test_release_trainable_subset_matches_the_release_rule():
  config = common.get_config(2, "paper")
  config.train.trainable = "release"
  config.model.unet.in_channels = 5  # as the release's checkpoints are saved
  unet = nnx.eval_shape(lambda: checkpoints.build_unet(config))
  _, trainable, frozen, _ = train_state.split_unet(unet, config)
  count = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  # reference_spec.md 3.3: 643,846,976 of 1,413,404,420 parameters are trainable.
  assert count(trainable) == 643_846_976
  assert count(trainable) + count(frozen) == 1_413_404_420


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  """The demo dataset at the tiny training size, written once (the same for both stages)."""
  return str(demo_data.write_demo_dataset(tmp_path_factory.mktemp("demo_data"), tiny_train_config()))


@pytest.mark.parametrize("stage", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_train_checkpoints_resumes_and_restores(tmp_path, stage, caplog, demo_dir):
  caplog.set_level(logging.INFO)
  config = tiny_train_config(stage=stage, steps=2)
  config.data.dir = demo_dir
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
  first_params = jax.device_get(state.params)
  leaves = jax.tree.leaves(first_params)
  assert all(np.isfinite(x).all() for x in leaves)

  # Resume: two more steps continue from step 2 and its input position, not from scratch.
  config.train.num_steps = 4
  resumed = train.train_and_evaluate(config, str(tmp_path))
  assert int(resumed.step) == 4
  assert (tmp_path / "checkpoints" / "4").is_dir()
  changed = [not np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(jax.device_get(resumed.params)),
                                                      strict=True)]
  assert any(changed)
  assert "resumed from step 2 (input position 2)" in caplog.text
  # 2 + 2 resumed steps equal 4 uninterrupted ones: the optimizer state and the data position came back.
  config_straight = tiny_train_config(stage=stage, steps=4)
  config_straight.data.dir = demo_dir
  straight = train.train_and_evaluate(config_straight, str(tmp_path / "straight"))
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.params)), jax.tree.leaves(jax.device_get(resumed.params)),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

  # The checkpointed UNet loads for generation and export with exactly the trained parameters.
  unet = checkpoints.restore_unet(config, str(tmp_path))
  restored = nnx.state(unet, nnx.Param)
  assert not jax.tree.leaves(resumed.frozen_params)  # trainable = "all"
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(jax.device_get(resumed.params)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
