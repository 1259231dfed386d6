"""Images and videos on disk: loading and sizing inputs, writing mp4/gif/png outputs, motion-flow maps.

Frames are uint8 (F, H, W, 3) RGB on the host. Paths may be local or remote (`gs://...`; handi_jax.fileio). Every
writer goes through fileio's commit rule, so an interrupted run never leaves a half-written output that a resumed
run would take for a finished one.

Input images of any mode Pillow reads become 8-bit RGB the same way everywhere: 16-bit greyscale is scaled
(65535 -> 255), and transparency is composited on black (a transparent pixel is absent: black in an image,
outside the motion area in a mask). A user's mask must have its image's shape (`check_mask_size`).
"""

import math
import os

import cv2
import imageio.v2 as imageio
import numpy as np
from absl import logging
from PIL import GifImagePlugin, Image, UnidentifiedImageError

from handi_jax import fileio

VAE_FACTOR = 8
# A mask whose aspect ratio is within this fraction of its image's is the same shape at another resolution.
MASK_ASPECT_TOLERANCE = 0.01
# Pillow modes of 16-bit greyscale: PNGs of 16 bits open as I;16 (older Pillow: I).
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
ROUNDING_MODES = ("round", "truncate")


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
  """A PIL image converted to `mode` ("RGB" or "L") by the rules above; a clear error when the file is missing,
  not an image, or over Pillow's decompression-bomb limit (about 179 Mpx; a 6000 x 4000 photo is 24)."""
  path = fileio.as_path(path)
  if not path.is_file():
    raise FileNotFoundError(f"image {path} does not exist; check the path (or config.generate.image_dir)")
  try:
    with fileio.local_copy(path) as local, Image.open(local) as image:
      image.load()
  except Image.DecompressionBombError as e:
    raise ValueError(f"image {path} is too large to read safely ({e}); downscale it: the models run at about "
                     "512 x 512 px, so a few megapixels is plenty") from e
  except (UnidentifiedImageError, OSError, ValueError) as e:  # ValueError: e.g. a PNG cut short in its header
    raise ValueError(f"cannot read {path} as an image ({e}); expected a PNG or JPEG file") from e
  image = _opaque_8_bit(image)
  return image if image.mode == mode else image.convert(mode)


def _opaque_8_bit(image: Image.Image) -> Image.Image:
  """16-bit greyscale scaled to 8 bits; an image with transparency composited on black (Pillow's own conversion
  scales neither: 16-bit levels clip to white, and transparent pixels keep whatever colour they hide)."""
  if image.mode in SIXTEEN_BIT_MODES:
    levels = np.clip(np.asarray(image, np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.round(levels).astype(np.uint8))
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    rgba = np.asarray(image.convert("RGBA"), np.float64)
    return Image.fromarray(np.round(rgba[..., :3] * rgba[..., 3:] / 255.0).astype(np.uint8))
  return image


def model_size(width: int, height: int, target_area: int, fixed_height: int = 0, fixed_width: int = 0):
  """(height, width) the models run at: the release's aspect-preserving rule (area ~ target_area, each side
  rounded to a multiple of 8), or a fixed size when the fixed sides are set (both > 0)."""
  if fixed_height or fixed_width:
    if fixed_height <= 0 or fixed_width <= 0 or fixed_height % VAE_FACTOR or fixed_width % VAE_FACTOR:
      raise ValueError(f"config.sampling.height/width = {fixed_height}x{fixed_width}: set both, as multiples of "
                       f"{VAE_FACTOR}, or both 0 to use config.sampling.target_area")
    return fixed_height, fixed_width
  if target_area <= 0:
    raise ValueError(f"config.sampling.target_area must be > 0 (or set height and width), got {target_area}")
  scale = math.sqrt(width * height / target_area)
  new_height = round(height / scale / VAE_FACTOR) * VAE_FACTOR
  new_width = round(width / scale / VAE_FACTOR) * VAE_FACTOR
  if new_height < VAE_FACTOR or new_width < VAE_FACTOR:
    raise ValueError(f"a {width}x{height} image at target_area {target_area} gives {new_width}x{new_height}; "
                     "raise config.sampling.target_area")
  return new_height, new_width


def image_to_model_input(image: Image.Image, height: int, width: int) -> np.ndarray:
  """Lanczos resize (as diffusers' VaeImageProcessor) -> (H, W, 3) float32 in [-1, 1]."""
  resized = np.asarray(image.convert("RGB").resize((width, height), Image.LANCZOS), np.float32)
  return resized / 127.5 - 1.0


def check_mask_size(mask: str | os.PathLike, mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
  """The rule for a user's mask, (width, height) `mask_size`, against its image's, shared by generation and the
  app: the image's shape at another resolution (aspect ratios within 1%) is resized, with a warning; another
  shape is an error, as stretching it would move other pixels than the ones painted."""
  if tuple(mask_size) == tuple(image_size):
    return
  (mask_width, mask_height), (image_width, image_height) = mask_size, image_size
  if abs(mask_width * image_height / (mask_height * image_width) - 1) > MASK_ASPECT_TOLERANCE:
    raise ValueError(f"mask {mask} is {mask_width}x{mask_height} px but its image is {image_width}x{image_height} "
                     "px, another shape; give a mask of the image's size")
  logging.warning("mask %s is %dx%d px, its image %dx%d px: resized to the image", mask, mask_width, mask_height,
                  image_width, image_height)


def load_mask(path: str | os.PathLike, height: int, width: int, binary: bool = True,
              image_size: tuple[int, int] | None = None) -> np.ndarray:
  """(H, W) float32 mask, resized as the release does (PIL bicubic on mode L). A pixel's level is its brightest
  colour channel, so a grey mask keeps its levels and a mask painted in any colour on black counts. binary:
  every non-zero -> 1, and a mask with nothing left is an error (its video would be still); else the level / 255
  (a soft prior mask). `image_size` (width, height): the user mask's image, checked by `check_mask_size`."""
  levels = Image.fromarray(np.asarray(load_image(path)).max(axis=-1))
  if image_size is not None:
    check_mask_size(path, levels.size, image_size)
  resized = np.asarray(levels.resize((width, height), Image.BICUBIC), np.float32)
  if not binary:
    return resized / 255.0
  if not resized.any():
    raise ValueError(f"mask {path} is empty (all black at the model's {width}x{height}): nothing would move; paint "
                     "the area that moves white, or give no mask so that stage 1 predicts it")
  return (resized > 0).astype(np.float32)


def to_uint8(frames: np.ndarray, rounding: str = "round") -> np.ndarray:
  """[-1, 1] floats -> uint8: (x / 2 + 0.5) clipped to [0, 1], times 255, then "round" (to the nearest level:
  uint8 images through [-1, 1] come back exactly) or "truncate" (as diffusers' tensor2vid in the release, which
  casts to uint8: the release's written frames)."""
  if rounding not in ROUNDING_MODES:
    raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
  scaled = np.clip(np.asarray(frames, np.float32) / 2.0 + 0.5, 0.0, 1.0) * 255.0
  return (np.round(scaled) if rounding == "round" else scaled).astype(np.uint8)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
  with fileio.atomic_path(path) as tmp:
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
  """H.264 mp4 (yuv420p) through imageio-ffmpeg; sides must be even (multiples of 8 here)."""
  with fileio.atomic_path(path) as tmp, imageio.get_writer(
      tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8, macro_block_size=2,
      ffmpeg_log_level="error") as writer:
    for frame in frames:
      writer.append_data(np.asarray(frame, np.uint8))


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
  """Looping GIF at 1000 / fps ms a frame (125 ms at 8 fps, as the release), every frame kept. Each frame is
  quantised to its own adaptive palette and stored as Pillow's optimised GIF save does; that save itself always
  merges identical consecutive frames into one longer frame (no option turns it off), so a still stretch would
  decode shorter. Pillow's frame-level GIF functions (getheader, getdata) write the frames one by one instead."""
  duration = round(1000 / fps)
  paletted = [Image.fromarray(np.asarray(frame, np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
              for frame in frames]
  header, _ = GifImagePlugin.getheader(paletted[0], info={"loop": 0, "duration": duration})
  blocks, previous = [], None
  for frame in paletted:
    shown = np.asarray(frame.convert("RGB"))
    stored, offset, options = (frame, (0, 0), {}) if previous is None else _gif_update(frame, shown, previous)
    blocks += GifImagePlugin.getdata(stored, offset=offset, duration=duration, disposal=1, include_color_table=True,
                                     **options)
    previous = shown
  fileio.write_bytes(path, b"".join(header + blocks) + b";")  # ";": the GIF trailer


def _gif_update(frame: Image.Image, shown: np.ndarray, previous: np.ndarray):
  """(image, offset, getdata options) that turn the previous frame shown into `shown`, drawn over it (disposal 1):
  the box that changed, its unchanged pixels set to a free palette index made transparent (runs that compress to
  almost nothing). A repeated frame stores one transparent pixel, so that it stays a frame of its own."""
  unchanged = (previous == shown).all(axis=-1)
  rows, columns = np.nonzero(~unchanged)
  box = (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1) if rows.size else (0, 0, 1, 1)
  box = tuple(int(side) for side in box)
  stored = frame.crop(box)
  free = np.flatnonzero(np.bincount(np.asarray(frame).ravel(), minlength=256) == 0)
  if not free.size:
    return stored, box[:2], {}
  stored.paste(int(free[0]), mask=Image.fromarray(unchanged[box[1]:box[3], box[0]:box[2]]))
  return stored, box[:2], {"transparency": int(free[0])}


def read_video(path: str | os.PathLike) -> np.ndarray:
  """All frames of an mp4 or gif as uint8 (F, H, W, 3); a remote file is decoded from a local temporary copy."""
  with fileio.local_copy(path) as local:
    return np.stack([np.asarray(frame)[..., :3] for frame in imageio.mimread(local, memtest=False)])


def motion_flow_map(frames: np.ndarray, threshold: float) -> np.ndarray:
  """(H, W) float32 in [0, 1]: for each pixel, the number of consecutive-frame pairs whose Farneback optical-flow
  magnitude exceeds `threshold` pixels, divided by L = F - 1 (frame 0 is the context, frames 1..L generated)."""
  frames = np.asarray(frames, np.uint8)
  if frames.ndim != 4 or frames.shape[0] < 2:
    raise ValueError(f"motion_flow_map needs (F >= 2, H, W, 3) uint8 frames, got shape {frames.shape}")
  gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
  counts = np.zeros(gray[0].shape, np.float32)
  for previous, current in zip(gray[:-1], gray[1:], strict=True):
    flow = cv2.calcOpticalFlowFarneback(previous, current, None, pyr_scale=0.5, levels=3, winsize=15,
                                        iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
    counts += np.linalg.norm(flow, axis=-1) > threshold
  return counts / (len(gray) - 1)


def flow_heatmap(context: np.ndarray, flow_map: np.ndarray, opacity: float = 0.5) -> np.ndarray:
  """The motion-flow map as a JET heat map blended over the (H, W, 3) uint8 context image."""
  colours = cv2.applyColorMap(np.round(np.clip(flow_map, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
  colours = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB).astype(np.float32)
  return np.round((1 - opacity) * context.astype(np.float32) + opacity * colours).astype(np.uint8)
