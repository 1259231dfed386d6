"""Video writers keep every frame written, and to_uint8's two roundings, on values computed by hand."""

import numpy as np
import pytest

from handi_jax.media import files as media_files

# Solid frames of one grey level each: a GIF palette holds them exactly, H.264 nearly.
STILL_LEVELS = [90] * 8
PART_STILL_LEVELS = [10, 60, 60, 60, 60, 120, 180, 180]   # a still middle stretch and a still end


def _solid_video(levels: list[int]) -> np.ndarray:
  return np.stack([np.full((16, 24, 3), level, np.uint8) for level in levels])


@pytest.mark.parametrize("levels", [STILL_LEVELS, PART_STILL_LEVELS], ids=["still", "part_still"])
@pytest.mark.parametrize("suffix", ["gif", "mp4"])
def test_still_stretches_read_back_with_every_frame(tmp_path, suffix, levels):
  video = _solid_video(levels)
  path = tmp_path / f"video.{suffix}"
  writer = media_files.write_gif if suffix == "gif" else media_files.write_mp4
  writer(path, video, 8)
  decoded = media_files.read_video(path)
  assert decoded.shape == video.shape
  # GIF: exact (a few grey levels fit any palette); mp4: H.264 in yuv420p moves a flat level by at most 1.
  np.testing.assert_allclose(decoded, video, atol=0 if suffix == "gif" else 1)


def test_gif_keeps_the_repeated_frames_of_a_real_clip(tmp_path, shared_data):
  clip = media_files.read_video(shared_data / "clips" / "36.gif")
  repeats = sum(np.array_equal(a, b) for a, b in zip(clip[:-1], clip[1:], strict=True))
  assert repeats > 0, "the clip was chosen for its repeated frames"
  media_files.write_gif(tmp_path / "36.gif", clip, 8)
  # Its frames already fit a 256-colour palette each, so they come back exactly, repeats included.
  np.testing.assert_array_equal(media_files.read_video(tmp_path / "36.gif"), clip)


def test_to_uint8_rounds_or_truncates_as_computed_by_hand():
  values = np.array([-3.0, -1.0, -0.999, -0.5, 0.0, 0.5, 0.99, 1.0, 2.0], np.float32)
  # (x / 2 + 0.5) clipped to [0, 1], times 255: 0, 0, 0.1275, 63.75, 127.5, 191.25, 253.725, 255, 255.
  assert media_files.to_uint8(values).tolist() == [0, 0, 0, 64, 128, 191, 254, 255, 255]
  assert media_files.to_uint8(values, rounding="truncate").tolist() == [0, 0, 0, 63, 127, 191, 253, 255, 255]
  with pytest.raises(ValueError, match="rounding must be one of"):
    media_files.to_uint8(values, rounding="floor")


def test_only_rounding_gives_an_image_its_own_levels_back():
  levels = np.arange(256, dtype=np.uint8)
  model_input = levels.astype(np.float32) / 127.5 - 1.0   # as image_to_model_input
  np.testing.assert_array_equal(media_files.to_uint8(model_input), levels)
  # Truncation loses a level wherever float32 lands just below it: why a pasted context image is rounded.
  assert (media_files.to_uint8(model_input, rounding="truncate") != levels).any()
