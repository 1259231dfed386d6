"""Stage 2: the RGB video, conditioned on the motion-area mask; loss L_noise + eta * L_HR.

Usage: --config=configs/stage2.py[:variant,variant...]; variants in configs/common.py.
"""

from configs import common


def get_config(arg=None):
  return common.get_config(stage=2, arg=arg)
