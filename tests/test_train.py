"""Training end to end on demo data: a tiny model, 8 simulated devices, checkpoints, resume, restore."""

import logging

import jax
import numpy as np
import pytest
from flax import nnx

from configs import common
from handi_jax import train


def _tiny_config(stage=2, steps=2):
  config = common.get_config(stage)
  config.model.unet.update(block_out_channels=(16,), layers_per_block=1, attention_head_dim=8,
                           norm_num_groups=4, cross_attention_dim=32)
  config.model.vae.update(block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
  config.data.update(num_frames=3, height=32, width=32)
  config.data.demo.num_clips = 8
  config.train.update(global_batch_size=8, num_steps=steps, checkpoint_every=1, warmup_steps=1,
                      learning_rate=1e-3)
  config.loss.eta_hand = 0.0  # the landmark network's cost is covered by tests/test_losses.py
  return config


def test_release_trainable_subset_matches_the_release_rule():
  config = common.get_config(2, "paper")
  config.train.trainable = "release"
  config.model.unet.in_channels = 5  # as the release's checkpoints are saved
  unet = nnx.eval_shape(lambda: train.build_unet(config, nnx.Rngs(0)))
  _, trainable, frozen, _ = train.split_unet(unet, config)
  count = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  # reference_spec.md 3.3: 643,846,976 of 1,413,404,420 parameters are trainable.
  assert count(trainable) == 643_846_976
  assert count(trainable) + count(frozen) == 1_413_404_420


@pytest.mark.parametrize("stage", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_train_checkpoints_resumes_and_restores(tmp_path, stage, caplog):
  caplog.set_level(logging.INFO)
  config = _tiny_config(stage=stage, steps=2)
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
  config_straight = _tiny_config(stage=stage, steps=4)
  straight = train.train_and_evaluate(config_straight, str(tmp_path / "straight"))
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.params)), jax.tree.leaves(jax.device_get(resumed.params)),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

  # The checkpointed UNet loads for generation and export with exactly the trained parameters.
  unet = train.restore_unet(config, str(tmp_path))
  restored = nnx.state(unet, nnx.Param)
  assert not jax.tree.leaves(resumed.frozen_params)  # trainable = "all"
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(jax.device_get(resumed.params)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
