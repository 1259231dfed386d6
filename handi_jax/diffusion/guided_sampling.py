"""Sampling a latent video from HANDI's UNet: the release's conditioning and classifier-free guidance.

The start point is the context latent repeated over the frames and noised to the first timestep of the grid
(config.sampling.init = "noised_context", the release; "noise" starts from pure noise). Every step runs the
UNet once on the doubled batch, each sample's unconditional and conditional rows side by side (empty negative
prompt by default), with the clean context latent as the prepended frame, the mask through conv_in2 and the optional
motion strength, then mixes eps_u + g (eps_c - eps_u). The mask is never re-applied between steps, as in the release.

Every sample of a batch has its own random key, so its video does not depend on the batch it is sampled in, nor on
how the batch is split over devices (the doubled rows of a sample stay on the device that holds the sample).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from handi_jax.diffusion import samplers

INITS = ("noised_context", "noise")


def split_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(B,) keys -> (B,) keys of the start latents, (B,) keys of the sampler's steps."""
  split = jax.vmap(jax.random.split)(keys)
  return split[:, 0], split[:, 1]


def initial_latents(plan: samplers.SamplerPlan, context_latent: jax.Array, num_frames: int, keys: jax.Array,
                    init: str) -> jax.Array:
  """(B, 1, h, w, C) context latent and (B,) keys -> (B, F, h, w, C) start latents."""
  if init not in INITS:
    raise ValueError(f"config.sampling.init must be one of {INITS}, got {init!r}")
  _, _, height, width, channels = context_latent.shape
  noise = jax.vmap(lambda key: jax.random.normal(key, (num_frames, height, width, channels), jnp.float32))(keys)
  if init == "noise":
    return noise
  repeated = jnp.broadcast_to(context_latent, noise.shape).astype(jnp.float32)
  return samplers.add_initial_noise(plan, repeated, noise)


def _doubled(array):
  """Each row twice, side by side (the unconditional and conditional rows of a sample); arrays of batch 1 broadcast
  in the UNet."""
  return array if array is None or array.shape[0] == 1 else jnp.repeat(array, 2, axis=0)


def sample_video(unet, plan: samplers.SamplerPlan, context_latent: jax.Array, text: jax.Array,
                 uncond_text: jax.Array, mask: jax.Array | None, motion: jax.Array | None, guidance_scale,
                 keys: jax.Array, num_frames: int, init: str = "noised_context") -> jax.Array:
  """Latent video (B, F, h, w, C) from the context latent (B, 1, h, w, C), text (B, 77, D) and the
  unconditional text (1 or B, 77, D), mask (1 or B, h, w, 1) latent-grid mask or None, motion (1,)/(B,)/None,
  one random key per sample (B,)."""
  init_keys, step_keys = split_keys(keys)
  x_init = initial_latents(plan, context_latent, num_frames, init_keys, init)
  batch = context_latent.shape[0]
  texts = jnp.stack([jnp.broadcast_to(uncond_text, text.shape), text], axis=1).reshape((2 * batch,) + text.shape[1:])
  contexts = jnp.repeat(context_latent, 2, axis=0)
  masks, motions = _doubled(mask), _doubled(motion)

  def guided_eps(x, t):
    eps = unet(jnp.repeat(x, 2, axis=0), jnp.broadcast_to(t, (2 * batch,)), texts, contexts, mask=masks,
               motion=motions)
    # Rows (uncond, cond) of a sample side by side: split them along a new axis, which keeps a batch split over
    # devices local (a stride-2 slice of the split axis made XLA gather and all-reduce every sample's eps).
    eps_uncond, eps_cond = jnp.moveaxis(eps.reshape((batch, 2) + eps.shape[1:]), 1, 0)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

  return samplers.sample(guided_eps, plan, x_init, key=step_keys)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_frames", "init"))
def sample_video_jit(graphdef, state, plan, context_latent, text, uncond_text, mask, motion, guidance_scale, keys,
                     num_frames: int, init: str = "noised_context") -> jax.Array:
  """`sample_video` compiled once per (UNet structure, shapes): the UNet enters as nnx.split(unet) parts."""
  return sample_video(nnx.merge(graphdef, state), plan, context_latent, text, uncond_text, mask, motion,
                      guidance_scale, keys, num_frames, init)
