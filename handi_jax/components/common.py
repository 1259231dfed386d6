"""What every component shares: the dtype rule, random keys, abstract trees and shared graph definitions."""

import jax
import jax.numpy as jnp
from flax import nnx

COMPONENTS = ("unet", "vae", "text_encoder")
_GRAPHDEFS = {}


def model_dtypes(config) -> dict:
  """The one dtype rule: compute in config.model.dtype, store parameters in config.model.param_dtype."""
  return dict(dtype=jnp.dtype(config.model.dtype), param_dtype=jnp.dtype(config.model.param_dtype))


def component_key(config, component: str) -> jax.Array:
  """The random key a component is initialised from when no pretrained weights are given: a demo run's training,
  generation and export see the same random models."""
  return jax.random.fold_in(jax.random.key(config.seed), COMPONENTS.index(component))


def with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or abstract) with the shardings of `shardings`: a prefix tree of
  NamedShardings (one per nnx.Variable, as sharding rules give them), or one sharding for the whole tree."""
  return jax.tree.map(
      lambda sharding, subtree: jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), subtree), shardings, tree)


def canonical_split(module: nnx.Module):
  """nnx.split, but modules of one structure share one graphdef object, so functions jitted with the graphdef
  as a static argument compile once for all of them (the stage-1 and stage-2 UNets, a second generator's VAE).
  A graphdef holds the module's initializer closures, which differ per instance, so two fresh graphdefs never
  compare equal."""
  graphdef, state = nnx.split(module)
  # Static attributes (feature counts) live in the graphdef: modules share one only when every shape agrees.
  shapes = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(state))
  return _GRAPHDEFS.setdefault((type(module), jax.tree.structure(state), shapes), graphdef), state
