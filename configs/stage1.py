"""Stage 1: the motion-area mask video (frame 0 = RGB context, frames 1..L = masks tripled to RGB).

Conditioned on the dataset's prior mask; loss L_noise + alpha * L_mIoU.
Usage: --config=configs/stage1.py[:variant,variant...]; variants in configs/common.py.
"""

from configs import common


def get_config(arg=None):
  return as_stage1(common.get_config(stage=1, arg=arg))


def as_stage1(config):
  """Stage 1's own fields over a config of either stage (--mode=demo trains stage 1 from its stage-2 config)."""
  config.stage = 1
  config.data.conditioning_mask = "prior"
  # The mask video is the target everywhere; the soft prior is no motion area to freeze outside of.
  config.train.freeze_background = False
  config.train.update(config.stage1_train)
  return config
