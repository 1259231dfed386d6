"""Odd inputs to generation, where they are read: each one works (converted, resized, truncated with a warning) or
is one clear error that names the file and the fix. No model is built here."""

import json
import logging
import math
import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from configs import common
from handi_jax import fileio, prompts, tokenizers
from handi_jax.media import files as media_files

# ---------------------------------------------------------------------------------------------------
# Images


def test_a_6000_by_4000_photo_loads_and_resizes(tmp_path):
  path = tmp_path / "large.jpg"
  Image.new("RGB", (6000, 4000), (30, 120, 210)).save(path, quality=95)
  with warnings.catch_warnings():
    warnings.simplefilter("error", Image.DecompressionBombWarning)   # 24 Mpx is under Pillow's 89 Mpx warning
    image = media_files.load_image(path)
  # scale = sqrt(24e6 / 512^2) = 9.5683: 4000 / 9.5683 / 8 = 52.26 -> 416, 6000 / 9.5683 / 8 = 78.38 -> 624.
  height, width = media_files.model_size(*image.size, 512 * 512)
  assert (height, width) == (416, 624)
  pixels = media_files.image_to_model_input(image, height, width)
  assert pixels.shape == (416, 624, 3)
  np.testing.assert_allclose(pixels[208, 312], np.array([30, 120, 210]) / 127.5 - 1, atol=2 / 127.5)


def test_an_image_over_pillows_pixel_limit_is_a_clear_error(tmp_path, monkeypatch):
  path = tmp_path / "huge.png"
  Image.new("RGB", (100, 100)).save(path)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 10,000 px is over twice the limit: Pillow refuses it
  with pytest.raises(ValueError, match="huge.png is too large to read safely .*downscale it"):
    media_files.load_image(path)


def test_a_png_cut_short_in_its_header_is_a_clear_error(tmp_path):
  header = b"\0\0\0\1"   # IHDR needs 13 bytes; Pillow raises a bare ValueError on it
  path = tmp_path / "cut.png"
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + b"IHDR" + header
                   + struct.pack(">I", zlib.crc32(b"IHDR" + header)))
  with pytest.raises(ValueError, match="cannot read .*cut.png as an image"):
    media_files.load_image(path)


def _palette_image(index_colour: tuple[int, int, int], transparent: bool) -> Image.Image:
  image = Image.new("P", (8, 8), 0)
  image.putpalette([*index_colour, 10, 200, 30])
  if transparent:
    image.info["transparency"] = 0
  return image


def _saved_with_pillow(image: Image.Image, name: str):
  def write(path):
    image.save(path / name)
    return path / name
  return write


def _saved_with_cv2(bgr: np.ndarray, name: str):
  def write(path):
    cv2.imwrite(str(path / name), bgr)
    return path / name
  return write


# (file writer, RGB expected everywhere in the loaded image, tolerance). Alpha is composited on black.
IMAGE_MODES = {
    # 16-bit grey PNG (opens as I;16): 40000 / 257 = 155.6 -> 156, where Pillow's own conversion clips to 255.
    "grey_16_bit": (_saved_with_cv2(np.full((8, 8), 40000, np.uint16), "g16.png"), (156, 156, 156), 0),
    # 16-bit RGB PNG (BGR for cv2): Pillow opens it as 8-bit RGB, 32896 / 257 = 128.
    "rgb_16_bit": (_saved_with_cv2(np.full((8, 8, 3), (0, 32896, 65535), np.uint16), "c16.png"), (255, 128, 0), 0),
    "palette": (_saved_with_pillow(_palette_image((255, 255, 255), False), "p.png"), (255, 255, 255), 0),
    # Index 0 is white but transparent: black, where Pillow's own conversion shows the hidden white.
    "palette_transparent": (_saved_with_pillow(_palette_image((255, 255, 255), True), "pt.png"), (0, 0, 0), 0),
    "grey": (_saved_with_pillow(Image.new("L", (8, 8), 77), "l.png"), (77, 77, 77), 0),
    # 200 * 128 / 255 = 100.4 -> 100.
    "grey_alpha": (_saved_with_pillow(Image.new("LA", (8, 8), (200, 128)), "la.png"), (100, 100, 100), 0),
    # 200, 100, 50 * 128 / 255 = 100.4, 50.2, 25.1.
    "rgba_half": (_saved_with_pillow(Image.new("RGBA", (8, 8), (200, 100, 50, 128)), "half.png"), (100, 50, 25), 0),
    "rgba_transparent_white": (_saved_with_pillow(Image.new("RGBA", (8, 8), (255, 255, 255, 0)), "clear.png"),
                               (0, 0, 0), 0),
    "rgba_opaque": (_saved_with_pillow(Image.new("RGBA", (8, 8), (1, 2, 3, 255)), "opaque.png"), (1, 2, 3), 0),
    # Naive CMYK: R = 255 (1 - C)(1 - K): cyan-free, full magenta and yellow = red; with C, M, Y, K = 0, 128, 255,
    # 64: 255 * 191/255 = 191, 255 * 127/255 * 191/255 = 95.1, 0. JPEG moves a flat colour by a level or two.
    "cmyk_red": (_saved_with_pillow(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "red.jpg"), (255, 0, 0), 3),
    "cmyk_orange": (_saved_with_pillow(Image.new("CMYK", (16, 16), (0, 128, 255, 64)), "or.jpg"), (191, 95, 0), 3),
}


@pytest.mark.parametrize("case", IMAGE_MODES)
def test_every_image_mode_becomes_the_expected_rgb(tmp_path, case):
  write, expected, tolerance = IMAGE_MODES[case]
  image = media_files.load_image(write(tmp_path))
  assert image.mode == "RGB"
  pixels = np.asarray(image, np.int16)
  assert np.abs(pixels - np.array(expected)).max() <= tolerance, pixels[0, 0]


# ---------------------------------------------------------------------------------------------------
# Masks (the ek_frames images and masks are 448 x 256)

IMAGE_SIZE = (448, 256)


def _mask_file(tmp_path, array: np.ndarray, name: str = "mask.png"):
  Image.fromarray(array).save(tmp_path / name)
  return tmp_path / name


def test_a_mask_of_another_shape_is_an_error_naming_both_sizes(tmp_path):
  square = _mask_file(tmp_path, np.full((256, 256), 255, np.uint8))
  with pytest.raises(ValueError, match="mask .*mask.png is 256x256 px but its image is 448x256 px"):
    media_files.load_mask(square, 64, 112, image_size=IMAGE_SIZE)


def test_a_mask_of_the_image_shape_at_half_resolution_is_resized_with_a_warning(tmp_path, shared_data, caplog):
  full = shared_data / "ek_frames" / "1_mask.png"
  half = tmp_path / "half.png"
  Image.open(full).resize((224, 128), Image.NEAREST).save(half)
  resized = media_files.load_mask(half, 64, 112, image_size=IMAGE_SIZE) > 0
  assert [r.getMessage() for r in caplog.records] == [f"mask {half} is 224x128 px, its image 448x256 px: resized "
                                                       "to the image"]
  reference = media_files.load_mask(full, 64, 112, image_size=IMAGE_SIZE) > 0
  assert (resized & reference).sum() / (resized | reference).sum() > 0.9


def test_mask_shapes_within_one_percent_of_the_image_aspect_count_as_the_same():
  media_files.check_mask_size("m.png", (450, 256), IMAGE_SIZE)   # aspect 0.45% off: resized
  with pytest.raises(ValueError, match="460x256 px but its image is 448x256 px"):
    media_files.check_mask_size("m.png", (460, 256), IMAGE_SIZE)   # 2.7% off


def test_a_mask_level_is_its_brightest_channel(tmp_path, shared_data):
  # Pure red at full strength is a full mask level, where luminance would give 76 / 255.
  red = np.zeros((256, 448, 3), np.uint8)
  red[..., 0] = 255
  np.testing.assert_array_equal(media_files.load_mask(_mask_file(tmp_path, red), 64, 112, binary=False), 1.0)
  # A grey mask keeps the release's reading: PIL mode L, bicubic, non-zero -> 1.
  real = shared_data / "ek_frames" / "2_mask.png"
  release = np.asarray(Image.open(real).convert("L").resize((112, 64), Image.BICUBIC)) > 0
  np.testing.assert_array_equal(media_files.load_mask(real, 64, 112, image_size=IMAGE_SIZE), release)


def test_a_mask_with_transparency_moves_only_its_opaque_strokes(tmp_path):
  strokes = np.zeros((256, 448, 4), np.uint8)
  strokes[..., :3] = 255                     # white everywhere, as editors often store transparent pixels
  strokes[64:128, 112:224, 3] = 255          # opaque only here
  mask = media_files.load_mask(_mask_file(tmp_path, strokes), 256, 448, image_size=IMAGE_SIZE)
  expected = np.zeros((256, 448), np.float32)
  expected[64:128, 112:224] = 1
  np.testing.assert_array_equal(mask, expected)


def test_an_all_black_mask_is_an_error_and_an_all_white_one_moves_everything(tmp_path):
  black = _mask_file(tmp_path, np.zeros((256, 448), np.uint8), "black.png")
  with pytest.raises(ValueError, match="mask .*black.png is empty .*nothing would move"):
    media_files.load_mask(black, 64, 112, image_size=IMAGE_SIZE)
  white = _mask_file(tmp_path, np.full((256, 448), 255, np.uint8), "white.png")
  np.testing.assert_array_equal(media_files.load_mask(white, 64, 112, image_size=IMAGE_SIZE), 1.0)


def test_a_fixed_size_needs_both_sides():
  with pytest.raises(ValueError, match="set both, as multiples of 8, or both 0"):
    media_files.model_size(448, 256, 512 * 512, fixed_height=256)


# ---------------------------------------------------------------------------------------------------
# Prompts


def test_a_500_word_prompt_is_truncated_with_one_warning(caplog, monkeypatch):
  tokenizer = tokenizers.demo_tokenizer()   # one token per character: "hand" is 4, with "</w>" on the last
  tokenizer.model_max_length = 77            # as a real CLIP tokenizer's, over which transformers warns too
  monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)   # so caplog would see that warning
  prompt = "hand " * 500
  ids = tokenizers.tokenize(tokenizer, [prompt, "cut"])
  # 2000 tokens + BOS + EOS = 2002; CLIP reads 77, so 1925 are dropped.
  assert [r.getMessage() for r in caplog.records] == [
      f"the prompt {prompt[:60] + '...'!r} is 2002 tokens with BOS and EOS, CLIP reads 77: its last 1925 tokens "
      "are dropped"]
  hand = [tokenizer.convert_tokens_to_ids(t) for t in ("h", "a", "n", "d</w>")]
  assert ids.shape == (2, 77) and ids[0, 1:76].tolist() == (hand * 19)[:75] and ids[0, 76] == tokenizer.eos_token_id


def _generate_config(**fields):
  config = common.get_config(stage=2)
  config.generate.update(fields)
  return config


def test_a_prompts_file_that_is_not_utf8_names_the_file_and_line(tmp_path, shared_data):
  path = tmp_path / "prompts.json"
  path.write_bytes(json.dumps({"source": "1.png", "prompt": "cut"}).encode() + b"\n"
                   + '{"source": "2.png", "prompt": "saut\u00e9 the onion"}'.encode("latin-1") + b"\n")
  with pytest.raises(ValueError, match=r"prompts.json line 2 is not UTF-8 text \(byte 0xe9 at byte 36 of the line\); "
                                       "save config.generate.prompts_file as UTF-8"):
    prompts.samples_from_config(_generate_config(prompts_file=str(path), image_dir=str(shared_data / "ek_frames")))


def test_a_utf8_prompts_file_reads_with_a_byte_order_mark_and_any_character(tmp_path, shared_data):
  # U+2028 (line separator) is allowed raw in a JSON string: it must not end the line.
  rows = [{"source": "1.png", "prompt": "saut\u00e9 the onion"}, {"source": "2.png", "prompt": "cut\u2028it"},
          {"source": "3.png", "prompt": "hand " * 500}]
  path = tmp_path / "prompts.json"
  path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode())
  samples = prompts.samples_from_config(_generate_config(prompts_file=str(path),
                                                         image_dir=str(shared_data / "ek_frames")))
  assert [(s.name, s.prompt) for s in samples] == [("1", rows[0]["prompt"]), ("2", rows[1]["prompt"]),
                                                    ("3", rows[2]["prompt"])]


def test_a_prompt_that_is_not_a_string_is_a_clear_error(tmp_path, shared_data):
  path = tmp_path / "prompts.json"
  path.write_text(json.dumps({"source": "1.png", "prompt": 42}) + "\n")
  with pytest.raises(ValueError, match="prompts.json line 1: 'prompt' must be a string"):
    prompts.samples_from_config(_generate_config(prompts_file=str(path), image_dir=str(shared_data / "ek_frames")))


# ---------------------------------------------------------------------------------------------------
# JSON outputs


def _strict_json(text: str):
  def refuse(constant):
    raise AssertionError(f"{constant} is not JSON")
  return json.loads(text, parse_constant=refuse)


def test_write_json_writes_nan_and_infinity_as_null_and_text_as_utf8(tmp_path):
  path = tmp_path / "summary.json"
  fileio.write_json(path, {"fid": math.nan, "ratios": (1.5, -math.inf, np.float64("inf")),
                           "run": {"prompt": "saut\u00e9 the onion", "clips": 3}})
  assert _strict_json(path.read_text(encoding="utf-8")) == {
      "fid": None, "ratios": [1.5, None, None], "run": {"prompt": "saut\u00e9 the onion", "clips": 3}}
  assert "saut\u00e9".encode() in path.read_bytes()                  # readable, not \u00e9
  assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]   # no temporary file left behind
