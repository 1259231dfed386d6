"""Differentiable hand crops with MediaPipe's own region-of-interest rule.

MediaPipe finds the landmarks of a hand inside a rotated square around it. In tracking mode that square
comes from the previous landmarks (graph HandLandmarkLandmarksToRoi of mediapipe 0.10.21):
1. HandLandmarksToRectCalculator, on the 12 "stable" joints (wrist, thumb CMC/MCP/IP, and the MCP and PIP
   joints of the four fingers): the rotation makes the vector from the wrist to the middle-finger base
   (the mean of the index and ring MCPs, averaged with the middle MCP) point up; the rectangle is the
   bounding box of those joints in that rotated frame.
2. RectTransformationCalculator with scale_x = scale_y = 2, shift_y = -0.1 (towards the fingers),
   square_long = true (the long side in pixels, so the square is square in pixels).
The crop is ImageToTensorCalculator's: the square's corners map onto the corners of a 224 x 224 tensor
(OpenCV warpPerspective, bilinear, replicated border), pixel centres at integer coordinates.

Here the ROI comes from ground-truth keypoints, the crop is a bilinear gather that is differentiable with
respect to the frame's pixels, and `crop_to_frame` is MediaPipe's LandmarkProjectionCalculator.
Coordinates: normalised (x, y) in [0, 1] of the frame, as MediaPipe reports them and the data pipeline stores.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from handi_jax.hand_landmarks.network import INPUT_SIZE, normalized_landmarks

# The 12 joints HandLandmarksToRectCalculator uses (its "partial landmarks").
ROI_JOINTS = (0, 1, 2, 3, 5, 6, 9, 10, 13, 14, 17, 18)
WRIST, INDEX_MCP, MIDDLE_MCP, RING_MCP = 0, 5, 9, 13
# RectTransformationCalculator options of HandLandmarkLandmarksToRoi.
ROI_SCALE = 2.0
ROI_SHIFT_Y = -0.1


class Roi(NamedTuple):
  """MediaPipe's NormalizedRect: centre, width and height as fractions of the frame, rotation in radians."""

  x_center: jax.Array
  y_center: jax.Array
  width: jax.Array
  height: jax.Array
  rotation: jax.Array


def _real(x) -> jax.Array:
  """At least float32 (float64 stays float64: the finite-difference tests run in it)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _normalize_radians(angle):
  return angle - 2 * jnp.pi * jnp.floor((angle + jnp.pi) / (2 * jnp.pi))


def _rotate(x, y, angle):
  c, s = jnp.cos(angle), jnp.sin(angle)
  return x * c - y * s, x * s + y * c


def landmarks_to_roi(keypoints: jax.Array, image_size: tuple[int, int]) -> Roi:
  """MediaPipe's hand ROI from 21 keypoints (..., 21, 2) in normalised frame coordinates.

  image_size is (height, width) in pixels; the result has the keypoints' leading shape.
  """
  if keypoints.shape[-2:] != (21, 2):
    raise ValueError(f"landmarks_to_roi: keypoints must be (..., 21, 2) normalised (x, y), got {keypoints.shape}")
  height, width = image_size
  kp = _real(keypoints)
  x, y = kp[..., 0], kp[..., 1]
  # Rotation: wrist -> middle-finger base, pointing up after rotation (kTargetAngle = pi / 2).
  x0, y0 = x[..., WRIST] * width, y[..., WRIST] * height
  x1 = ((x[..., INDEX_MCP] + x[..., RING_MCP]) / 2 + x[..., MIDDLE_MCP]) / 2 * width
  y1 = ((y[..., INDEX_MCP] + y[..., RING_MCP]) / 2 + y[..., MIDDLE_MCP]) / 2 * height
  rotation = _normalize_radians(jnp.pi / 2 - jnp.arctan2(-(y1 - y0), x1 - x0))

  px, py = x[..., ROI_JOINTS], y[..., ROI_JOINTS]
  center_x = (px.max(-1) + px.min(-1)) / 2
  center_y = (py.max(-1) + py.min(-1)) / 2
  # Bounding box in the rotated frame, in pixels.
  rx, ry = _rotate((px - center_x[..., None]) * width, (py - center_y[..., None]) * height, -rotation[..., None])
  box_x = (rx.max(-1) + rx.min(-1)) / 2
  box_y = (ry.max(-1) + ry.min(-1)) / 2
  offset_x, offset_y = _rotate(box_x, box_y, rotation)
  rect_x = center_x + offset_x / width
  rect_y = center_y + offset_y / height
  rect_w = (rx.max(-1) - rx.min(-1)) / width
  rect_h = (ry.max(-1) - ry.min(-1)) / height

  # RectTransformationCalculator: shift along the rotated y axis, square on the long side, scale.
  shift_x, shift_y = _rotate(0.0, rect_h * height * ROI_SHIFT_Y, rotation)
  long_side = jnp.maximum(rect_w * width, rect_h * height)
  return Roi(x_center=rect_x + shift_x / width, y_center=rect_y + shift_y / height,
             width=long_side / width * ROI_SCALE, height=long_side / height * ROI_SCALE, rotation=rotation)


def sampling_grid(roi: Roi, image_size: tuple[int, int], output_size: int = INPUT_SIZE) -> jax.Array:
  """Source pixel coordinates (..., S, S, 2) as (x, y) of each crop pixel (OpenCV convention)."""
  height, width = image_size
  dtype = _real(roi.x_center).dtype
  steps = jnp.arange(output_size, dtype=dtype) / output_size - 0.5
  u = steps[None, :]  # crop column -> x in the rect
  v = steps[:, None]  # crop row -> y in the rect
  expand = lambda a: jnp.asarray(a, dtype)[..., None, None]
  dx, dy = u * expand(roi.width) * width, v * expand(roi.height) * height
  rx, ry = _rotate(dx, dy, expand(roi.rotation))
  return jnp.stack([expand(roi.x_center) * width + rx, expand(roi.y_center) * height + ry], axis=-1)


def bilinear_sample(image: jax.Array, points: jax.Array) -> jax.Array:
  """image (H, W, C) at points (..., 2) = (x, y) pixel coordinates; replicated border, like cv2.BORDER_REPLICATE."""
  height, width = image.shape[:2]
  x, y = points[..., 0], points[..., 1]
  x0, y0 = jnp.floor(x), jnp.floor(y)
  wx, wy = (x - x0)[..., None], (y - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  xs = jnp.clip(jnp.stack([x0, x0 + 1]), 0, width - 1)
  ys = jnp.clip(jnp.stack([y0, y0 + 1]), 0, height - 1)
  top = image[ys[0], xs[0]] * (1 - wx) + image[ys[0], xs[1]] * wx
  bottom = image[ys[1], xs[0]] * (1 - wx) + image[ys[1], xs[1]] * wx
  return top * (1 - wy) + bottom * wy


def crop_hands(frames: jax.Array, roi: Roi, output_size: int = INPUT_SIZE) -> jax.Array:
  """Rotated square crops: frames (N, H, W, C) and an ROI of shape (N, K) -> (N, K, S, S, C).

  Bilinear in the frame's pixels, so gradients flow from the crops back to the frames.
  """
  if frames.ndim != 4:
    raise ValueError(f"crop_hands: frames must be (N, H, W, C), got {frames.shape}")
  if jnp.shape(roi.x_center)[:1] != frames.shape[:1] or jnp.ndim(roi.x_center) != 2:
    raise ValueError(f"crop_hands: the ROI must have shape (N, K) with N = {frames.shape[0]} frames, "
                     f"got {jnp.shape(roi.x_center)}")
  grid = sampling_grid(roi, frames.shape[1:3], output_size)  # (N, K, S, S, 2)
  return jax.vmap(bilinear_sample)(frames, grid)


def crop_to_frame(landmarks: jax.Array, roi: Roi) -> jax.Array:
  """Landmarks in 224 x 224 crop pixels (..., J, 3) -> normalised frame coordinates (..., J, 3), as MediaPipe.

  LandmarkProjectionCalculator: x, y relative to the crop centre, rotated by the ROI's rotation, scaled by its
  normalised width and height; z (after MediaPipe's z normalisation) scaled like x, by the width.
  """
  local = normalized_landmarks(_real(landmarks))
  expand = lambda a: jnp.asarray(a, local.dtype)[..., None]
  x, y = _rotate(local[..., 0] - 0.5, local[..., 1] - 0.5, expand(roi.rotation))
  return jnp.stack([x * expand(roi.width) + expand(roi.x_center), y * expand(roi.height) + expand(roi.y_center),
                    local[..., 2] * expand(roi.width)], axis=-1)
