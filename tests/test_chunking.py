"""Frame chunking: any chunk size, with or without a remainder chunk, gives the unchunked result and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from handi_jax import chunking


def _per_frame(a, b):  # (B, c, H, W), (B, c) -> a pytree of per-frame values
  return dict(weighted=jnp.sin(a) * b[..., None, None], total=jnp.sum(a ** 2, axis=(-2, -1)) + b)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 5, 7, 9])
def test_chunks_with_and_without_remainder_equal_the_whole(chunk_size):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 7, 3, 4)).astype(np.float32), rng.normal(size=(2, 7)).astype(np.float32)
  whole = _per_frame(a, b)
  chunked = chunking.map_frame_chunks(_per_frame, chunk_size, a, b)
  for key in whole:
    np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-6)

  loss = lambda a, remat: jnp.sum(chunking.map_frame_chunks(_per_frame, 3, a, b, remat=remat)["total"] ** 2)
  expected = jax.grad(lambda a: jnp.sum(_per_frame(a, b)["total"] ** 2))(a)
  for remat in (False, True):
    np.testing.assert_allclose(jax.grad(loss)(a, remat), expected, rtol=1e-5)


def test_bad_chunk_size_names_the_config_field():
  with pytest.raises(ValueError, match="config.model.frame_chunk"):
    chunking.map_frame_chunks(_per_frame, 0, np.zeros((1, 2, 1, 1)), np.zeros((1, 2)))
