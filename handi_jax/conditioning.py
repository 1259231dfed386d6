"""How the mask, the context frame and motion strength condition the UNet: one place for training and sampling.

Latents are channels-last video latents (B, F, h, w, C); pixel masks (B, H, W, 1) float {0, 1} with
H = 8h, W = 8w (the VAE's factor).
"""

import jax.numpy as jnp

VAE_FACTOR = 8


def latent_mask(pixel_mask: jnp.ndarray, threshold: float | None = 0.5) -> jnp.ndarray:
  """(B, H, W, 1) pixel mask -> (B, H/8, W/8, 1) latent-grid mask.

  Equals torch's bilinear resize with align_corners=False and no antialias at an exact x8 factor (each output
  samples at 8i + 3.5, the mean of the 2 x 2 centre pixels of its block), which the release uses. Training
  thresholds the result at 0.5; the release's inference keeps the soft edge values (threshold=None).
  """
  _, height, width, _ = pixel_mask.shape
  if height % VAE_FACTOR or width % VAE_FACTOR:
    raise ValueError(f"mask size {height}x{width} is not a multiple of {VAE_FACTOR}; resize the image first")
  half = VAE_FACTOR // 2
  centre = pixel_mask[:, half - 1::VAE_FACTOR] + pixel_mask[:, half::VAE_FACTOR]
  centre = (centre[:, :, half - 1::VAE_FACTOR] + centre[:, :, half::VAE_FACTOR]) / 4.0
  return centre if threshold is None else (centre >= threshold).astype(pixel_mask.dtype)


def freeze_background(latents: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Outside the mask every frame's target is the context (first-frame) latent, as the release trains.

  latents (B, F, h, w, C), mask (B, h, w, 1) latent-grid mask.
  """
  context = latents[:, :1]
  mask = mask[:, None]
  return context * (1.0 - mask) + latents * mask


def latent_motion(latents: jnp.ndarray) -> jnp.ndarray:
  """Motion strength of a latent video: 10 * sum over channels of the mean |frame difference|, shape (B,)."""
  diff = jnp.abs(latents[:, 1:] - latents[:, :-1])
  return 10.0 * jnp.sum(jnp.mean(diff, axis=(1, 2, 3)), axis=-1)
