"""The models a run does not train, as one pytree: the VAE, the text encoder, (stage 2 with the Hand Refinement
Loss) MediaPipe's hand landmark network, and the empty prompt's token ids.

Training passes FrozenModels to its jitted step as an argument (never as constants), generation and the app sample
with it, the compile report lays it out abstractly. Weights come from config.model.pretrained (a diffusers pipeline
directory or a Hugging Face repo id: convert.hub); without it the VAE is the fixed block-mean autoencoder
(config.model.vae_without_weights) and the text encoder is random from `common.component_key`, so training,
generation and export see the same models.
"""

import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from handi_jax import sharding, tokenizers
from handi_jax.components import common
from handi_jax.convert import clip_text as convert_clip_text
from handi_jax.convert import hub
from handi_jax.convert import vae as convert_vae
from handi_jax.hand_landmarks import network as landmarks_lib
from handi_jax.models import clip_text
from handi_jax.models import vae as vae_lib


@struct.dataclass
class FrozenModels:
  """One jit argument: the graph definitions are static, the states, landmark params and token ids its leaves."""

  vae_graphdef: nnx.GraphDef = struct.field(pytree_node=False)
  text_graphdef: nnx.GraphDef = struct.field(pytree_node=False)
  vae: nnx.State
  text_encoder: nnx.State
  landmarks: Any          # hand landmark params (stage 2, eta > 0) or None
  uncond_ids: jax.Array   # (1, 77) token ids of config.sampling.negative_prompt

  def vae_module(self) -> vae_lib.AutoencoderKL:
    return nnx.merge(self.vae_graphdef, self.vae)

  def text_encoder_module(self) -> clip_text.CLIPTextModel:
    return nnx.merge(self.text_graphdef, self.text_encoder)


def needs_hand_landmarks(config) -> bool:
  """Whether training uses the landmark network: stage 2 with the Hand Refinement Loss."""
  return config.stage == 2 and bool(config.loss.eta_hand)


def load_vae_and_text_encoder(config, tokenizer_dir: str | os.PathLike | None = None):
  """(vae, text_encoder, tokenizer) from config.model.pretrained, checked against config.model.vae and
  .text_encoder; without it the weight-free VAE, a random text encoder and the demo tokenizer (written to
  `tokenizer_dir`, default a temporary directory)."""
  model, dtypes = config.model, common.model_dtypes(config)
  root = hub.pretrained_pipeline(config)
  if root:
    vae = convert_vae.load_pretrained(os.path.join(root, "vae"), expected_config=model.vae, **dtypes)
    text_encoder = convert_clip_text.load_pretrained(os.path.join(root, "text_encoder"),
                                                     expected_config=model.text_encoder, **dtypes)
    return vae, text_encoder, tokenizers.load_tokenizer(os.path.join(root, "tokenizer"))
  if model.vae_without_weights not in ("block_mean", "random"):
    raise ValueError(f"config.model.vae_without_weights={model.vae_without_weights!r}: use block_mean or random")
  logging.warning("config.model.pretrained is empty: the VAE is %s, the text encoder is randomly initialised "
                  "and the tokenizer is the demo tokenizer (outputs show the pipeline, not real videos)",
                  "random" if model.vae_without_weights == "random" else "a fixed block-mean autoencoder")
  build_vae = lambda: vae_lib.AutoencoderKL(model.vae, rngs=nnx.Rngs(common.component_key(config, "vae")), **dtypes)
  if model.vae_without_weights == "block_mean":
    vae = vae_lib.block_mean_weights(nnx.eval_shape(build_vae))  # every weight is set: no random init to discard
  else:
    vae = build_vae()
  text_rngs = nnx.Rngs(common.component_key(config, "text_encoder"))
  text_encoder = clip_text.CLIPTextModel(model.text_encoder, rngs=text_rngs, **dtypes)
  return vae, text_encoder, tokenizers.demo_tokenizer(tokenizer_dir)


def _weights_in_compute_dtype(model: nnx.Module) -> nnx.Module:
  """Store the kernels and embeddings of Linear, Conv and Embed layers in the layer's compute dtype: the layer
  casts them to it anyway, so the outputs are the same and bf16 halves their bytes. Norms keep their params."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.Linear, nnx.Conv, nnx.Embed)) and node.dtype is not None:
      for name in ("kernel", "bias", "embedding"):
        variable = getattr(node, name, None)
        if isinstance(variable, nnx.Param):
          variable.value = variable.value.astype(node.dtype)
  return model


def _frozen_models(vae, text_encoder, landmarks, uncond_ids) -> FrozenModels:
  vae_graphdef, vae_state = common.canonical_split(_weights_in_compute_dtype(vae))
  text_graphdef, text_state = common.canonical_split(_weights_in_compute_dtype(text_encoder))
  return FrozenModels(vae_graphdef, text_graphdef, vae_state, text_state, landmarks, uncond_ids)


def load_frozen_models(config, tokenizer_dir: str | os.PathLike | None = None,
                       hand_landmarks: bool | None = None) -> tuple[FrozenModels, Any]:
  """(FrozenModels on the default device, the tokenizer). The landmark network comes with them when
  `hand_landmarks` (default: when training needs it)."""
  vae, text_encoder, tokenizer = load_vae_and_text_encoder(config, tokenizer_dir)
  if hand_landmarks is None:
    hand_landmarks = needs_hand_landmarks(config)
  landmarks = landmarks_lib.load_hand_landmark_params() if hand_landmarks else None
  uncond_ids = jnp.asarray(tokenizers.tokenize(tokenizer, [config.sampling.negative_prompt]))
  return _frozen_models(vae, text_encoder, landmarks, uncond_ids), tokenizer


def abstract_frozen_models(config) -> FrozenModels:
  """load_frozen_models(config)'s pytree as shapes and dtypes, without reading or initialising any weight."""
  dtypes = common.model_dtypes(config)

  def build():
    vae = vae_lib.AutoencoderKL(config.model.vae, rngs=nnx.Rngs(0), **dtypes)
    text_encoder = clip_text.CLIPTextModel(config.model.text_encoder, rngs=nnx.Rngs(0), **dtypes)
    landmarks = landmarks_lib.load_hand_landmark_params() if needs_hand_landmarks(config) else None
    return _frozen_models(vae, text_encoder, landmarks, jnp.zeros((1, tokenizers.CONTEXT_LENGTH), jnp.int32))

  return jax.eval_shape(build)


def frozen_shardings(frozen: FrozenModels, mesh, config) -> FrozenModels:
  """NamedShardings of the (abstract) frozen models: the text encoder by the UNet's logical-axis rules and
  config.sharding_min_size; the VAE, the landmark params and the token ids replicated.

  The VAE stays whole: its activations are far larger than its weights (0.17 GB in bf16), and with FSDP-sharded
  weights XLA reshards the decoder's activations to follow them (the compile report measured 97 GiB of
  all-gather per device and step on v5p-64 for the pixel loss) instead of gathering the weights once.
  """
  shardings = sharding.param_shardings(frozen, mesh, config.sharding_rules, config.sharding_min_size)
  replicated = NamedSharding(mesh, PartitionSpec())
  return shardings.replace(vae=jax.tree.map(lambda _: replicated, shardings.vae))


def place_frozen_models(config, mesh) -> tuple[FrozenModels, FrozenModels, Any]:
  """(frozen models on the mesh, their shardings, the tokenizer)."""
  frozen, tokenizer = load_frozen_models(config)
  frozen_sh = frozen_shardings(frozen, mesh, config)
  return jax.device_put(frozen, frozen_sh), frozen_sh, tokenizer
