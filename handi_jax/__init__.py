"""handi-jax: HANDI hand-centric video generation in JAX / Flax NNX."""

import flax

# Parameters carry logical axis names; handi_jax.sharding places them on the mesh explicitly, so
# creating a model must not require an ambient mesh (it does by default in flax 0.12).
flax.config.update("flax_always_shard_variable", False)
