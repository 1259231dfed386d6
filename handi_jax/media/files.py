"""Images and videos on disk: loading and sizing inputs, writing mp4/gif/png outputs, motion-flow maps.

Frames are uint8 (F, H, W, 3) RGB on the host. Every writer goes through a temporary file and a rename, so an
interrupted run never leaves a half-written output that a resumed run would take for a finished one.
"""

import math
import os
import pathlib

import cv2
import imageio.v2 as imageio
import numpy as np
from PIL import Image, UnidentifiedImageError

from handi_jax import fileio

VAE_FACTOR = 8


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
  """A PIL image converted to `mode`; a clear error when the file is missing or not an image."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"image {path} does not exist; check the path (or config.generate.image_dir)")
  try:
    with Image.open(path) as image:
      return image.convert(mode)
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"cannot read {path} as an image ({e}); expected a PNG or JPEG file") from e


def model_size(width: int, height: int, target_area: int, fixed_height: int = 0, fixed_width: int = 0):
  """(height, width) the models run at: the release's aspect-preserving rule (area ~ target_area, each side
  rounded to a multiple of 8), or a fixed size when both fixed sides are > 0."""
  if fixed_height > 0 and fixed_width > 0:
    if fixed_height % VAE_FACTOR or fixed_width % VAE_FACTOR:
      raise ValueError(f"config.sampling.height/width = {fixed_height}x{fixed_width} must be multiples of "
                       f"{VAE_FACTOR}")
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


def load_mask(path: str | os.PathLike, height: int, width: int, binary: bool = True) -> np.ndarray:
  """(H, W) float32 mask: resized as the release does (PIL bicubic on mode L); binary: every non-zero -> 1,
  else the grey level / 255 (a soft prior mask)."""
  resized = np.asarray(load_image(path, mode="L").resize((width, height), Image.BICUBIC), np.float32)
  return (resized > 0).astype(np.float32) if binary else resized / 255.0


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 as diffusers' tensor2vid: (x / 2 + 0.5) clipped to [0, 1], times 255."""
  return np.round(np.clip(np.asarray(frames, np.float32) / 2.0 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


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
  """Looping GIF at 1000 / fps ms a frame (125 ms at 8 fps, as the release). Pillow stores identical
  consecutive frames once with their durations summed, so a still stretch plays the same but decodes shorter."""
  images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
  with fileio.atomic_path(path) as tmp:
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def read_video(path: str | os.PathLike) -> np.ndarray:
  """All frames of an mp4 or gif as uint8 (F, H, W, 3)."""
  return np.stack([np.asarray(frame)[..., :3] for frame in imageio.mimread(path, memtest=False)])


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
