"""The programs a compile report compiles, with abstract arguments laid out as training lays them out: the train
step whole or in parts (pixel loss, frozen-model forward, AdamW update, each UNet block's forward + backward) and
the sampler."""

import copy
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from handi_jax import losses, pipeline, sharding, train_step
from handi_jax.compile_report import measure, useful_flops
from handi_jax.components import common, train_state
from handi_jax.components import unet as unet_lib
from handi_jax.diffusion import guided_sampling
from handi_jax.models import vae as vae_lib

PARTS = ("none", "pixel_loss", "blocks")  # config.compile_report.parts


def train_step_program(config, mesh):
  """(lower function, abstract args) of train_step.jit_train_step, the step as training compiles it."""
  unet_graphdef, state_sh, frozen_sh, args = train_step.abstract_train_inputs(config, mesh)
  return train_step.jit_train_step(config, mesh, unet_graphdef, state_sh, frozen_sh).lower, args


def _without_pixel_loss(config):
  config = copy.deepcopy(config)
  with config.unlocked():
    config.loss.alpha_miou = 0.0
    config.loss.eta_hand = 0.0
  return config


def pixel_loss_program(config, mesh):
  """(lower function of the pixel loss + its gradient with respect to x0, abstract args): the part of the step
  that decodes, with the frozen models and the batch laid out as in training."""
  _, _, frozen_sh, (_, _, frozen, batch, key) = train_step.abstract_train_inputs(config, mesh)
  x0_shape = batch["frames"].shape[:-1][:2] + (config.data.height // 8, config.data.width // 8,
                                              config.model.unet.out_channels)
  x0 = jax.ShapeDtypeStruct(x0_shape, jnp.float32, sharding=batch["frames"].sharding)

  def pixel_loss(x0, frozen, batch, key):
    decode = functools.partial(vae_lib.decode_video, nnx.merge(frozen.vae_graphdef, frozen.vae))
    zeros = jnp.zeros_like(x0)  # L_noise = 0 here: only the pixel term and its gradient remain

    def loss(x0):
      if config.stage == 1:
        return losses.stage1_loss(zeros, zeros, x0, batch, decode, config.loss, config.model.frame_chunk, key)[0]
      return losses.stage2_loss(zeros, zeros, x0, batch, decode, frozen.landmarks, config.loss,
                                config.model.frame_chunk, key)[0]

    return jax.value_and_grad(loss)(x0)

  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(pixel_loss, in_shardings=(x0.sharding, frozen_sh, sharding.batch_sharding(mesh, 1), replicated),
                   out_shardings=(replicated, x0.sharding))
  return jitted.lower, (x0, frozen, batch, key)


def frozen_forward_program(config, mesh):
  """(lower function, abstract args) of the step's frozen-model forward: the VAE encode of the batch's frames and
  the text encoder on the prompts and the empty prompt."""
  _, _, frozen_sh, (_, _, frozen, batch, _) = train_step.abstract_train_inputs(config, mesh)

  def frozen_forward(frozen, batch):
    vae = nnx.merge(frozen.vae_graphdef, frozen.vae)
    text_encoder = nnx.merge(frozen.text_graphdef, frozen.text_encoder)
    return vae_lib.encode_video(vae, batch["frames"]), text_encoder(batch["input_ids"]), text_encoder(
        frozen.uncond_ids)

  jitted = jax.jit(frozen_forward, in_shardings=(frozen_sh, sharding.batch_sharding(mesh, 1)))
  return jitted.lower, (frozen, batch)


def optimizer_program(config, mesh):
  """(lower function, abstract args) of the step's AdamW update: (state, gradients) -> state, state donated."""
  _, state_sh, _, (state, *_) = train_step.abstract_train_inputs(config, mesh)
  tx = train_state.make_optimizer(config)

  def update(state, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)

  jitted = jax.jit(update, in_shardings=(state_sh, state_sh.params), out_shardings=state_sh, donate_argnums=(0,))
  return jitted.lower, (state, state.params)


def unet_blocks(config, unet, global_batch: int) -> list[tuple[str, nnx.Module, tuple, dict]]:
  """(name, block, abstract inputs, static arguments) of every block UNet3DConditionModel._run runs in one forward
  at the step's shapes (transformer_in, down_blocks.i, mid_block, up_blocks.i), in call order."""
  named = ([("transformer_in", unet.transformer_in)]
           + [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)] + [("mid_block", unet.mid_block)]
           + [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)])
  calls = []
  run = type(unet)._run

  def recording_run(self, block, *arrays, **static):
    calls.append((jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), arrays), static))
    return run(self, block, *arrays, **static)

  frames, h, w = config.data.num_frames, config.data.height // 8, config.data.width // 8
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  motion = f32(global_batch) if config.model.unet.motion_strength else None
  type(unet)._run = recording_run  # the forward's own control flow yields each block's input shapes
  try:
    nnx.eval_shape(lambda m, *a: m(*a[:4], mask=a[4], motion=a[5]), unet,
                   f32(global_batch, frames, h, w, config.model.unet.out_channels), f32(global_batch),
                   f32(global_batch, 77, config.model.unet.cross_attention_dim),
                   f32(global_batch, 1, h, w, config.model.unet.out_channels), f32(global_batch, h, w, 1), motion)
  finally:
    type(unet)._run = run
  if len(calls) != len(named):
    raise ValueError(f"the UNet forward ran {len(calls)} blocks through _run, expected {len(named)} "
                     f"({', '.join(n for n, _ in named)})")
  return [(name, block, arrays, static) for (name, block), (arrays, static) in zip(named, calls, strict=True)]


def unet_block_programs(config, mesh) -> dict:
  """name -> (lower function, abstract args) of each UNet block's forward + backward as the step runs it: the
  block rematerialised as config.model.remat asks, its parameters sharded as in training, its inputs (and the
  output cotangent) split over the batch axes; returns the block's output, the parameter gradients and the
  inputs' cotangents (the text context, a stop_gradient input of the step, gets none)."""
  global_batch = sharding.global_batch_size(config.train, mesh.shape["data"] * mesh.shape["fsdp"])
  unet = unet_lib.abstract_unet(config)
  unet.train()
  text_shape = (77, config.model.unet.cross_attention_dim)
  programs = {}
  for name, block, arrays, static in unet_blocks(config, unet, global_batch):
    graphdef, params, rest = nnx.split(block, train_state.trainable_filter(config), ...)
    params_sh = sharding.param_shardings(params, mesh, config.sharding_rules, config.sharding_min_size)
    is_text = [leaf.shape[1:] == text_shape for leaf in jax.tree.leaves(arrays)]

    def block_step(params, rest, arrays, cotangent, graphdef=graphdef, static=static, is_text=is_text):
      leaves, treedef = jax.tree.flatten(arrays)

      def forward(params, differentiable):
        inputs = iter(differentiable)
        full = [leaf if text else next(inputs) for leaf, text in zip(leaves, is_text, strict=True)]
        return unet._run(nnx.merge(graphdef, params, rest), *jax.tree.unflatten(treedef, full), **static)

      differentiable = [leaf for leaf, text in zip(leaves, is_text, strict=True) if not text]
      output, vjp = jax.vjp(forward, params, differentiable)
      return output, vjp(cotangent)  # the output feeds the next block: its forward is part of the step

    output = nnx.eval_shape(lambda b, *a, static=static: unet._run(b, *a, **static), block, *arrays)
    args = (common.with_shardings(params, params_sh), common.with_shardings(rest, NamedSharding(mesh, PartitionSpec())),
            _batch_split(arrays, mesh), _batch_split(output, mesh))
    programs[f"unet_{name}"] = (jax.jit(block_step).lower, args)
  return programs


def _batch_split(tree, mesh):
  return jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding.batch_sharding(mesh, leaf.ndim)),
      tree)


def activation_bytes(args) -> int:
  """Bytes one device holds of a block program's inputs: what full remat keeps of the block for the backward."""
  return measure.sharded_bytes(args[2])


def train_step_parts(config, mesh, parts: str) -> dict:
  """name -> (lower function, abstract args) of the programs config.compile_report.parts splits the step into."""
  if parts == "none":
    return dict(train_step=train_step_program(config, mesh))
  if parts == "pixel_loss":
    return dict(pixel_loss=pixel_loss_program(config, mesh),
                unet_step=train_step_program(_without_pixel_loss(config), mesh))
  pixel = dict(pixel_loss=pixel_loss_program(config, mesh)) if useful_flops.pixel_loss_frames(config) else {}
  if parts == "blocks":
    if config.model.remat != "full":
      raise ValueError(f"config.compile_report.parts='blocks' bounds the step's memory by what full remat keeps; "
                       f"config.model.remat is {config.model.remat!r}: set it to 'full' or use parts='pixel_loss'")
    return dict(**unet_block_programs(config, mesh), optimizer=optimizer_program(config, mesh),
                frozen_forward=frozen_forward_program(config, mesh), **pixel)
  raise ValueError(f"config.compile_report.parts={parts!r}; expected one of {', '.join(PARTS)}")


def sampler_sizes(report_config) -> list[tuple[int, int]]:
  """(height, width) in pixels of each sampler program config.compile_report.sampler_sizes asks for."""
  sizes = []
  for item in report_config.sampler_sizes.split(","):
    height, _, width = item.strip().partition("x")
    if not (height.isdigit() and width.isdigit()) or int(height) % 8 or int(width) % 8:
      raise ValueError(f"config.compile_report.sampler_sizes item {item!r}: expected HEIGHTxWIDTH in pixels, both "
                       "multiples of 8, e.g. 384x680,512x512")
    sizes.append((int(height), int(width)))
  return sizes


def sampler_batch_size(config, num_devices: int) -> int:
  """Samples in one sampler batch as generation runs it (pipeline.Generator.batch_capacity): config.generate.batch_size
  per device."""
  return int(config.generate.batch_size) * num_devices


def sampler_program(config, devices, height: int, width: int):
  """(lower function of the CFG sampling loop of config.sampling.num_inference_steps steps, abstract args) for one
  batch of sampler_batch_size samples of height x width pixels laid out as pipeline.Generator._sample lays it out:
  the batch axis split over `devices` (sharding.batch_mesh), the UNet, the plan and the empty prompt replicated."""
  unet = unet_lib.abstract_unet(config)
  unet_graphdef, unet_state = nnx.split(unet)
  _, plan = pipeline.sampling_plan(config)
  mesh = sharding.batch_mesh(devices)
  batch = sampler_batch_size(config, len(devices))
  latent = (height // 8, width // 8)
  channels = config.model.unet.out_channels
  context_dim = config.model.text_encoder.hidden_size
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  replicated = NamedSharding(mesh, PartitionSpec())
  split = (f32(batch, 1, *latent, channels), f32(batch, 77, context_dim), f32(batch, *latent, 1),
           jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch)))
  context_latent, text, mask, keys = _batch_split(split, mesh)
  args = (common.with_shardings(unet_state, replicated), common.with_shardings(plan, replicated), context_latent, text,
          common.with_shardings(f32(1, 77, context_dim), replicated), mask,
          common.with_shardings(f32(1), replicated) if config.model.unet.motion_strength else None,
          common.with_shardings(f32(), replicated), keys)
  lower = functools.partial(guided_sampling.sample_video_jit.lower, unet_graphdef,
                            num_frames=int(config.data.num_frames), init=config.sampling.init)
  return lower, args
