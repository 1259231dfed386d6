"""Where every model comes from: the one place that builds, loads and restores the pipeline's components.

Training, generation and export all call these, so they agree on where weights come from:
- nothing given: random initialisation from the (tiny) config, one key per component derived from config.seed
  (`component_key`), so a demo run's training, generation and export see the same random models; the VAE is
  the fixed block-mean autoencoder instead (config.model.vae_without_weights);
- a diffusers pipeline directory (config.model.pretrained), or a UNet directory inside one;
- a training workdir: the UNet of its latest orbax checkpoint.
"""

import os
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from handi_jax import tokenizers, train_state
from handi_jax.convert import clip_text as convert_clip_text
from handi_jax.convert import core
from handi_jax.convert import unet as convert_unet
from handi_jax.convert import vae as convert_vae
from handi_jax.models import clip_text, unet3d
from handi_jax.models import vae as vae_lib

COMPONENTS = ("unet", "vae", "text_encoder")


def component_key(config, component: str) -> jax.Array:
  """The random key a component is initialised from when no pretrained weights are given."""
  return jax.random.fold_in(jax.random.key(config.seed), COMPONENTS.index(component))


def _dtypes(config) -> dict:
  return dict(dtype=jnp.dtype(config.model.dtype), param_dtype=jnp.dtype(config.model.param_dtype))


def unet_rngs(config) -> nnx.Rngs:
  """Parameter and dropout streams of the UNet (the dropout stream is reseeded each training step)."""
  key = component_key(config, "unet")
  return nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1))


def build_unet(config, rngs: nnx.Rngs | None = None) -> unet3d.UNet3DConditionModel:
  """A UNet of config.model.unet, randomly initialised (from `unet_rngs(config)` unless `rngs` is given)."""
  return unet3d.UNet3DConditionModel(config.model.unet, attention=config.model.attention, remat=config.model.remat,
                                     rngs=rngs or unet_rngs(config), **_dtypes(config))


def load_unet(config, source: str | os.PathLike | None, what: str = "the UNet") -> unet3d.UNet3DConditionModel:
  """The UNet in `source`: a training workdir (its latest checkpoint), a pipeline directory (its unet/) or a
  diffusers UNet directory; empty `source` means a random initialisation. Checked against config.model.unet."""
  if not source:
    logging.warning("%s: no pretrained weights given, randomly initialised from config.model.unet", what)
    return build_unet(config)
  path = pathlib.Path(source)
  if (path / "checkpoints").is_dir():
    logging.info("%s: latest training checkpoint in %s", what, path)
    return restore_unet(config, path)
  if (path / "unet").is_dir():
    path = path / "unet"
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{what}: {path} is neither a training workdir (with checkpoints/), a pipeline "
                            "directory (with unet/) nor a diffusers UNet directory (with config.json)")
  logging.info("%s: %s", what, path)
  try:
    return convert_unet.load_pretrained(path, expected_config=config.model.unet, attention=config.model.attention,
                                        remat=config.model.remat, rngs=unet_rngs(config), **_dtypes(config))
  except core.CheckpointMismatchError as e:
    raise core.CheckpointMismatchError(f"{what} at {path}: {e}") from e


def restore_unet(config, workdir, step: int | None = None) -> unet3d.UNet3DConditionModel:
  """The UNet of the latest (or given) training checkpoint in `workdir`, in eval mode."""
  manager = train_state.checkpoint_manager(config, workdir)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no training checkpoint under {pathlib.Path(workdir) / 'checkpoints'}; "
                            "train first (--mode=train) or point config.model.pretrained at weights")
  graphdef, params, frozen_params, rng_state = train_state.split_unet(nnx.eval_shape(lambda: build_unet(config)),
                                                                      config)
  # The UNet's weights only: the AdamW moments (two thirds of the arrays) stay on disk.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  weights = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                         dict(params=params, frozen_params=frozen_params))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      weights, ocp.checkpoint_utils.construct_restore_args(weights), partial_restore=True)))
  unet = nnx.merge(graphdef, restored.state["params"], restored.state["frozen_params"], rng_state)
  unet.eval()
  return unet


def load_frozen_components(config, tokenizer_dir: str | os.PathLike | None = None):
  """(vae, text_encoder, tokenizer) from config.model.pretrained, checked against config.model.vae and
  .text_encoder; without it random ones and the demo tokenizer (written to `tokenizer_dir`, default a
  temporary directory)."""
  model = config.model
  if model.pretrained:
    root = pathlib.Path(model.pretrained)
    vae = convert_vae.load_pretrained(root / "vae", expected_config=model.vae, **_dtypes(config))
    text_encoder = convert_clip_text.load_pretrained(root / "text_encoder", expected_config=model.text_encoder,
                                                     **_dtypes(config))
    return vae, text_encoder, tokenizers.load_tokenizer(root / "tokenizer")
  if model.vae_without_weights not in ("block_mean", "random"):
    raise ValueError(f"config.model.vae_without_weights={model.vae_without_weights!r}: use block_mean or random")
  logging.warning("config.model.pretrained is empty: the VAE is %s, the text encoder is randomly initialised "
                  "and the tokenizer is the demo tokenizer (outputs show the pipeline, not real videos)",
                  "random" if model.vae_without_weights == "random" else "a fixed block-mean autoencoder")
  build_vae = lambda: vae_lib.AutoencoderKL(model.vae, rngs=nnx.Rngs(component_key(config, "vae")), **_dtypes(config))
  if model.vae_without_weights == "block_mean":
    vae = vae_lib.block_mean_weights(nnx.eval_shape(build_vae))  # every weight is set: no random init to discard
  else:
    vae = build_vae()
  text_encoder = clip_text.CLIPTextModel(model.text_encoder, rngs=nnx.Rngs(component_key(config, "text_encoder")),
                                         **_dtypes(config))
  return vae, text_encoder, tokenizers.demo_tokenizer(tokenizer_dir)
