"""Useful FLOPs, the work the model needs, counted apart from what XLA compiles: the unoptimised graphs of one UNet
forward, one VAE decode / encode and one landmark crop, times the counts and factors a train step implies."""

import copy

import jax
import jax.numpy as jnp
from flax import nnx

from handi_jax.components import common
from handi_jax.components import unet as unet_lib
from handi_jax.hand_landmarks import network as landmarks_lib
from handi_jax.models import vae as vae_lib


def _forward_flops(fn, *args) -> float:
  """FLOPs of the unoptimised, loop-free graph of fn (global; cheap: nothing is compiled)."""
  analysis = jax.jit(fn).lower(*args).cost_analysis()
  return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


def unit_flops(config, height: int, width: int, frames: int) -> dict:
  """FLOPs of one UNet forward of one clip (frames + the context frame), one VAE decode and encode of one
  frame, and the landmark network on one crop; counted on this host's backend, with `xla` attention (the same
  arithmetic as the target's kernel, which may not lower here)."""
  dtypes = common.model_dtypes(config)
  counted = copy.deepcopy(config)
  counted.model.attention = "xla"
  unet_graphdef, unet_state = nnx.split(unet_lib.abstract_unet(counted))
  vae_graphdef, vae_state = nnx.split(
      nnx.eval_shape(lambda: vae_lib.AutoencoderKL(config.model.vae, rngs=nnx.Rngs(0), **dtypes)))
  h, w, c = height // 8, width // 8, config.model.unet.out_channels
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)

  def unet_forward(state, x, context, text, mask):
    return nnx.merge(unet_graphdef, state)(x, jnp.full((1,), 500), text, context, mask=mask,
                                           motion=jnp.ones((1,)) if config.model.unet.motion_strength else None)

  units = dict(unet_forward=_forward_flops(
      unet_forward, unet_state, f32(1, frames, h, w, c), f32(1, 1, h, w, c),
      f32(1, 77, config.model.unet.cross_attention_dim), f32(1, h, w, 1)))
  units["vae_decode_frame"] = _forward_flops(lambda s, z: nnx.merge(vae_graphdef, s).decode(z), vae_state,
                                             f32(1, h, w, c))
  units["vae_encode_frame"] = _forward_flops(lambda s, x: nnx.merge(vae_graphdef, s).encode(x), vae_state,
                                             f32(1, height, width, 3))
  if config.stage == 2:
    params = landmarks_lib.load_hand_landmark_params()
    size = landmarks_lib.INPUT_SIZE
    units["landmarks_crop"] = _forward_flops(landmarks_lib.hand_landmarks, params, f32(1, size, size, 3))
  return units


def pixel_loss_frames(config) -> int:
  """Generated frames per clip that the stage's pixel loss decodes and scores (config.loss.miou_frames /
  hand_frames of them; 0 = all)."""
  generated = config.data.num_frames - 1  # frame 0 is the context image
  weight, subset = ((config.loss.alpha_miou, config.loss.miou_frames) if config.stage == 1
                    else (config.loss.eta_hand, config.loss.hand_frames))
  if not weight:
    return 0
  return generated if subset == 0 else min(subset, generated)


def useful_train_flops(config, units: dict, global_batch: int) -> dict:
  """Analytic FLOPs of one train step (global): forward x 3 for forward + backward, x 4 where remat recomputes."""
  batch, frames = global_batch, config.data.num_frames
  unet_factor = 4 if config.model.remat != "none" else 3
  pixel_frames = batch * pixel_loss_frames(config)
  decode_factor = 4 if config.loss.remat_decoder else 3
  terms = dict(unet=batch * units["unet_forward"] * 3, vae_encode=batch * frames * units["vae_encode_frame"],
               vae_decode=pixel_frames * units["vae_decode_frame"] * 3)
  recomputed = dict(unet=batch * units["unet_forward"] * unet_factor,
                    vae_decode=pixel_frames * units["vae_decode_frame"] * decode_factor)
  if "landmarks_crop" in units:
    crops = pixel_frames * 2  # two hand slots per frame
    terms["landmarks"] = crops * units["landmarks_crop"] * 3
    recomputed["landmarks"] = crops * units["landmarks_crop"] * (4 if config.loss.remat_landmarks else 3)
  model = sum(terms.values())
  executed = model + sum(recomputed[k] - terms[k] for k in recomputed)
  pixel_share = (terms["vae_decode"] + terms.get("landmarks", 0.0)) / model
  return dict(terms=terms, model_flops=model, with_recompute=executed, pixel_loss_share=pixel_share,
              pixel_loss_frames_per_clip=pixel_loss_frames(config))
