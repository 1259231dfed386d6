"""Stage 1: the motion-area mask video (frame 0 = RGB context, frames 1..L = masks tripled to RGB).

Conditioned on the dataset's prior mask; loss L_noise + alpha * L_mIoU.
Usage: --config=configs/stage1.py[:variant,variant...]; variants in configs/common.py.
"""

from configs import common


def get_config(arg=None):
  config = common.get_config(stage=1, arg=arg)
  config.data.conditioning_mask = "prior"
  # The mask video is the target everywhere; the soft prior is no motion area to freeze outside of.
  config.train.freeze_background = False
  return config
