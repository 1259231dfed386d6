"""Frame chunking: run a per-frame computation on a video a few frames at a time to bound memory.

Used by the VAE's video encode/decode and by the in-graph pixel losses; config.model.frame_chunk sets the
chunk size for both.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def map_frame_chunks(fn: Callable, chunk_size: int | None, *videos: jax.Array, remat: bool = False):
  """fn over chunks of frames (axis 1 of every video), joined back along axis 1.

  fn takes one (B, c, ...) array per video and returns a pytree of (B, c, ...) arrays. The batch axis stays
  leading, so a batch sharded over the mesh stays sharded; chunks run one after another under `lax.map`, and
  with `remat` each chunk's activations are recomputed in the backward pass instead of stored. chunk_size
  None: all frames in one call.
  """
  frames = videos[0].shape[1]
  chunk = frames if chunk_size is None else int(chunk_size)
  if chunk < 1:
    raise ValueError(f"chunk_size must be a positive number of frames, got {chunk_size} "
                     "(set config.model.frame_chunk to e.g. 4)")
  chunk = min(chunk, frames)
  if remat:
    fn = jax.checkpoint(fn)
  num_full, rest = divmod(frames, chunk)
  stacked = [jnp.moveaxis(v[:, :num_full * chunk].reshape(v.shape[0], num_full, chunk, *v.shape[2:]), 1, 0)
             for v in videos]
  mapped = jax.lax.map(lambda xs: fn(*xs), stacked)  # leaves (num_full, B, c, ...)
  out = jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(y.shape[1], num_full * chunk, *y.shape[3:]), mapped)
  if rest:
    tail = fn(*[v[:, num_full * chunk:] for v in videos])
    out = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), out, tail)
  return out
