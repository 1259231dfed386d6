"""Stage-1 mask clean-up on a synthetic mask video whose right answer is known pixel by pixel."""

import numpy as np

from configs import common
from handi_jax import mask_cleanup

HEIGHT, WIDTH, FRAMES = 64, 96, 15


def _synthetic_video():
  """A 20 x 20 'hand area' sliding right 2 px a frame with a fixed 3 x 3 hole, 2 x 2 noise specks (one frame
  each), a soft below-threshold haze, and one real 6 x 6 blob in a single frame."""
  rng = np.random.default_rng(0)
  probability = np.zeros((FRAMES, HEIGHT, WIDTH), np.float32)
  for f in range(FRAMES):
    probability[f, 20:40, 10 + 2 * f:30 + 2 * f] = 0.9
    probability[f, 29:32, 33:36] = 0.1                 # hole at the same place in every frame
    y, x = rng.integers(45, 60), rng.integers(5, 90)
    probability[f, y:y + 2, x:x + 2] = 1.0             # noise speck: 4 px < 0.002 * 64 * 96 = 12.3 px
    probability[f, 2:10, 70:90] = 0.45                 # haze below the 0.5 threshold
  probability[7, 2:8, 2:8] = 0.8                       # a real 36 px component, kept
  expected = np.zeros((HEIGHT, WIDTH), bool)
  expected[20:40, 10:58] = True                        # the union of the squares, hole closed
  expected[2:8, 2:8] = True
  frames = np.repeat(probability[..., None] * 2.0 - 1.0, 3, axis=-1)
  return frames, expected


def test_cleanup_removes_specks_fills_holes_and_unites_frames():
  frames, expected = _synthetic_video()
  cleaned = mask_cleanup.clean_mask_video_from_config(frames, common.get_config(stage=1).mask_cleanup)
  assert cleaned.shape == (HEIGHT, WIDTH) and cleaned.dtype == bool
  np.testing.assert_array_equal(cleaned, expected)


def test_each_step_is_needed():
  frames, expected = _synthetic_video()
  no_denoise = mask_cleanup.clean_mask_video(frames, 0.5, 0.0, 7)
  assert no_denoise.sum() > expected.sum()             # the specks survive without the component filter
  no_closing = mask_cleanup.clean_mask_video(frames, 0.5, 0.002, 1)
  assert not no_closing[29:32, 33:36].any() and no_closing.sum() == expected.sum() - 9
  low_threshold = mask_cleanup.clean_mask_video(frames, 0.4, 0.002, 7)
  assert low_threshold[2:10, 70:90].all()              # the haze counts once the threshold is below it


def test_probability_maps_rgb_range():
  frames = np.stack([np.full((2, 2, 3), -1.0), np.full((2, 2, 3), 1.0), np.full((2, 2, 3), 0.0)])
  np.testing.assert_allclose(mask_cleanup.mask_probability(frames)[:, 0, 0], [0.0, 1.0, 0.5])
