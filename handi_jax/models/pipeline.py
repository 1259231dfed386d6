"""The frozen components (VAE, text encoder, tokenizer) as training, generation and export all load them.

From `config.model.pretrained` (a diffusers pipeline directory) when set; otherwise randomly initialised from
the config with keys derived from `config.seed` here, so a demo run's training, generation and export see the
same random VAE and text encoder.
"""

import pathlib

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from handi_jax.models import clip_text, tokenizers
from handi_jax.models import vae as vae_lib

_COMPONENTS = ("unet", "vae", "text_encoder")


def component_key(config, component: str) -> jax.Array:
  """The random key a component is initialised from when no pretrained weights are given."""
  return jax.random.fold_in(jax.random.key(config.seed), _COMPONENTS.index(component))


def load_frozen_components(config, tokenizer_dir: str | pathlib.Path | None = None):
  """(vae, text_encoder, tokenizer). Without pretrained weights the demo tokenizer is written to
  `tokenizer_dir` (default: a temporary directory)."""
  model = config.model
  kwargs = dict(dtype=jnp.dtype(model.dtype), param_dtype=jnp.dtype(model.param_dtype))
  if model.pretrained:
    root = pathlib.Path(model.pretrained)
    vae = vae_lib.AutoencoderKL.from_pretrained(root / "vae", expected_config=model.vae, **kwargs)
    text_encoder = clip_text.CLIPTextModel.from_pretrained(root / "text_encoder",
                                                           expected_config=model.text_encoder, **kwargs)
    return vae, text_encoder, clip_text.load_tokenizer(root / "tokenizer")
  logging.warning("config.model.pretrained is empty: the VAE and the text encoder are randomly initialised and "
                  "the tokenizer is the demo tokenizer (outputs show the pipeline, not real videos)")
  vae = vae_lib.AutoencoderKL(model.vae, rngs=nnx.Rngs(component_key(config, "vae")), **kwargs)
  text_encoder = clip_text.CLIPTextModel(model.text_encoder, rngs=nnx.Rngs(component_key(config, "text_encoder")),
                                         **kwargs)
  return vae, text_encoder, tokenizers.demo_tokenizer(tokenizer_dir)
