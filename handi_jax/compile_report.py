"""--mode=compile_report: lower and compile the train step and the sampler for a target, run nothing, and report
per-device memory, FLOPs, collective bytes and the step-time bounds they give (<workdir>/compile_report.json).

    python -m handi_jax.main --config=configs/stage2.py:paper,tpu_v5p_64 --mode=compile_report --workdir=runs/cr \\
        --config.compile_report.target=tpu:v5p:2x4x4 --config.multihost=False --config.model.attention=xla

config.compile_report.target: "devices" (the devices that exist), "cpu:N" (simulated CPU devices: set
XLA_FLAGS=--xla_force_host_platform_device_count=N), or "tpu:<topology>" (e.g. tpu:v5p:2x4x4: libtpu's
compile-only client; needs `pip install "jax[tpu]==0.7.1"`, ALLOW_MULTIPLE_LIBTPU_LOAD=1 when another process holds
libtpu, and no TPU_ACCELERATOR_TYPE). Nothing full-size is allocated: weights, optimizer state and batches are
abstract (jax.eval_shape + jax.ShapeDtypeStruct with the shardings training gives them).

Programs:
- train_step: train.make_train_step jitted as train.train_and_evaluate jits it (state shardings from
  train_state.state_shardings, state donated). config.compile_report.parts="pixel_loss" compiles it as two
  measured parts instead: "unet_step" (the same step with the pixel-loss weight 0: encode, UNet forward and
  backward, AdamW) and "pixel_loss" (the stage's pixel loss and its gradient with respect to x0: decode, landmarks
  or mIoU). The whole step's FLOPs are the parts' sum (the pixel loss's gradient enters the UNet's backward as one
  more cotangent add); its peak memory lies between max(peaks) and unet_step peak + pixel_loss temp + outputs (the
  pixel loss's temporaries live on top of everything the UNet step holds at its peak: an upper bound).
  parts="blocks" (needs model.remat="full") splits finer, into programs of a few minutes each: "pixel_loss",
  "frozen_forward" (VAE encode, text encoder), "optimizer" (AdamW on the sharded state) and "unet_<block>", the
  forward + backward of each UNet block (transformer_in, down_blocks.i, mid_block, up_blocks.i) at its real input
  shapes, batch-split, parameters sharded as in training. FLOPs = the parts' sum (the UNet stem, conv_in / conv_out
  / time embedding, is left out: under 1% at full size). Peak memory estimate = the step's sharded arguments +
  the gradients (one more copy of the trainable parameters) + the block inputs full remat keeps for the backward
  + the largest temp of any part; it is not a proof: XLA may overlap or keep more than this model of the step.
- sampler_<H>x<W>: diffusion.video.sample_video_jit (all config.sampling.num_inference_steps CFG steps in one scan)
  for one sample on one device of the target, per config.compile_report.sampler_sizes.

Programs measured before are not compiled again: each figure set records its program_key (the sha256 of the target
and the lowered program), and a program whose key is in <workdir>/compile_report.json or in a report listed in
config.compile_report.reuse takes those figures ("reused_from"). A report stopped part-way (memory, preemption)
resumes where it stopped; stage 1 reuses stage 2's UNet blocks, AdamW and encode, which lower to the same programs.

Figures: memory from compiled.memory_analysis() (per device; on simulated CPU devices the CPU compiler's buffers,
and "state_bytes", the sharded arguments counted from the arrays, which hold on any platform); FLOPs per device
from xla_stats.compiled_flops (loop bodies at their trip counts); useful FLOPs from the unoptimised graphs of the
UNet forward, one VAE decode / encode and one landmark crop (Lowered.cost_analysis, loop-free graphs) times the
counts and the factors the step implies; collective bytes from the compiled HLO; bounds = FLOPs / peak FLOP/s and
ring bytes / interconnect bandwidth of handi_jax.chips.
"""

import copy
import functools
import hashlib
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from handi_jax import checkpoints, chips, fileio, generate, losses, sharding, train, train_state, xla_stats
from handi_jax.data import input_pipeline
from handi_jax.diffusion import guided_sampling as video_sampling
from handi_jax.hand_landmarks import network as landmarks_lib
from handi_jax.models import vae as vae_lib

PROGRAMS = ("train_step", "sampler")
PARTS = ("none", "pixel_loss", "blocks")  # config.compile_report.parts
REPORT_FILE = "compile_report.json"
_TPU_INSTALL = 'pip install "jax[tpu]==0.7.1"'


def target_devices(target: str) -> list:
  """The devices config.compile_report.target names (see the module docstring)."""
  if target == "devices":
    return jax.devices()
  if target.startswith("cpu:"):
    count = int(target.partition(":")[2])
    devices = jax.devices("cpu")
    if len(devices) < count:
      raise ValueError(f"compile_report target {target!r} needs {count} CPU devices, {len(devices)} exist; set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before starting")
    return devices[:count]
  if target.startswith("tpu:"):
    if "TPU_ACCELERATOR_TYPE" in os.environ:
      raise ValueError("compile_report for a TPU topology: unset TPU_ACCELERATOR_TYPE (with it libtpu aborts the "
                       "process when asked for the cost analysis)")
    from jax.experimental import topologies

    try:
      return list(topologies.get_topology_desc(platform="tpu", topology_name=target[4:]).devices)
    except Exception as e:  # noqa: BLE001 - libtpu missing or an unknown topology: both answered in one line
      raise ValueError(f"compile_report target {target!r}: no TPU compiler for topology {target[4:]!r} ({e}); "
                       f"it needs libtpu ({_TPU_INSTALL}) and a topology such as v5p:2x4x4") from e
  raise ValueError(f"config.compile_report.target={target!r}; expected 'devices', 'cpu:N' or 'tpu:<topology>' "
                   "(e.g. cpu:8, tpu:v5p:2x4x4)")


def target_chip(report_config, devices) -> chips.Chip | None:
  if report_config.chip:
    return chips.chip_named(report_config.chip)
  return chips.chip_of(devices[0])


def _abstract(tree, shardings):
  """ShapeDtypeStructs of `tree` with the shardings of `shardings` (a prefix tree of NamedShardings)."""
  return jax.tree.map(
      lambda sh, sub: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), sub),
      shardings, tree)


def _replicated_abstract(tree, mesh):
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)


def _model_dtypes(config) -> dict:
  return dict(dtype=jnp.dtype(config.model.dtype), param_dtype=jnp.dtype(config.model.param_dtype))


def abstract_train_inputs(config, mesh):
  """(unet graphdef, state shardings, frozen-model shardings, abstract args of the train step), laid out as
  train.train_and_evaluate lays them out (train_state.state_shardings, train.frozen_shardings)."""
  unet = nnx.eval_shape(lambda: checkpoints.build_unet(config))
  graphdef, params, frozen_params, rng_state = train_state.split_unet(unet, config)
  abstract_state = jax.eval_shape(functools.partial(train_state.initial_state, config), params, frozen_params)
  state_sh = train_state.state_shardings(abstract_state, mesh, config.sharding_rules, config.sharding_min_size)
  frozen = train.abstract_frozen_models(config)
  frozen_sh = train.frozen_shardings(frozen, mesh, config)
  batch_sh = sharding.batch_sharding(mesh, 1)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
           for k, v in input_pipeline.batch_shapes(config, with_input_ids=True, mesh=mesh).items()}
  args = (_abstract(abstract_state, state_sh), _replicated_abstract(rng_state, mesh), _abstract(frozen, frozen_sh),
          batch, _replicated_abstract(jax.eval_shape(lambda: jax.random.key(0)), mesh))
  return graphdef, state_sh, frozen_sh, args


def train_step_program(config, mesh):
  """(lower function, abstract args) of train.jit_train_step, the step as training compiles it."""
  unet_graphdef, state_sh, frozen_sh, args = abstract_train_inputs(config, mesh)
  return train.jit_train_step(config, mesh, unet_graphdef, state_sh, frozen_sh).lower, args


def _without_pixel_loss(config):
  config = copy.deepcopy(config)
  with config.unlocked():
    config.loss.alpha_miou = 0.0
    config.loss.eta_hand = 0.0
  return config


def pixel_loss_program(config, mesh):
  """(lower function of the pixel loss + its gradient with respect to x0, abstract args): the part of the step
  that decodes, with the frozen models and the batch laid out as in training."""
  _, _, frozen_sh, (_, _, frozen, batch, key) = abstract_train_inputs(config, mesh)
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
  _, _, frozen_sh, (_, _, frozen, batch, _) = abstract_train_inputs(config, mesh)

  def frozen_forward(frozen, batch):
    vae = nnx.merge(frozen.vae_graphdef, frozen.vae)
    text_encoder = nnx.merge(frozen.text_graphdef, frozen.text_encoder)
    return vae_lib.encode_video(vae, batch["frames"]), text_encoder(batch["input_ids"]), text_encoder(
        frozen.uncond_ids)

  jitted = jax.jit(frozen_forward, in_shardings=(frozen_sh, sharding.batch_sharding(mesh, 1)))
  return jitted.lower, (frozen, batch)


def optimizer_program(config, mesh):
  """(lower function, abstract args) of the step's AdamW update: (state, gradients) -> state, state donated."""
  _, state_sh, _, (state, *_) = abstract_train_inputs(config, mesh)
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
  unet = nnx.eval_shape(lambda: checkpoints.build_unet(config))
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
    args = (_abstract(params, params_sh), _replicated_abstract(rest, mesh), _batch_split(arrays, mesh),
            _batch_split(output, mesh))
    programs[f"unet_{name}"] = (jax.jit(block_step).lower, args)
  return programs


def _batch_split(tree, mesh):
  return jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding.batch_sharding(mesh, leaf.ndim)),
      tree)


def activation_bytes(args) -> int:
  """Bytes one device holds of a block program's inputs: what full remat keeps of the block for the backward."""
  return sharded_bytes(args[2])


def sampler_sizes(report_config) -> list[tuple[int, int]]:
  sizes = []
  for item in report_config.sampler_sizes.split(","):
    height, _, width = item.strip().partition("x")
    if not (height.isdigit() and width.isdigit()) or int(height) % 8 or int(width) % 8:
      raise ValueError(f"config.compile_report.sampler_sizes item {item!r}: expected HEIGHTxWIDTH in pixels, both "
                       "multiples of 8, e.g. 384x680,512x512")
    sizes.append((int(height), int(width)))
  return sizes


def sampler_program(config, mesh, height: int, width: int):
  """(lower function of the 25-step CFG sampling loop, abstract args) for one sample of height x width pixels on
  the one device of `mesh`."""
  unet = nnx.eval_shape(lambda: checkpoints.build_unet(config))
  unet_graphdef, unet_state = nnx.split(unet)
  _, plan = generate.sampling_plan(config)
  latent = (height // 8, width // 8)
  channels = config.model.unet.out_channels
  context_dim = config.model.text_encoder.hidden_size
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  args = (unet_state, plan, f32(1, 1, *latent, channels), f32(1, 77, context_dim), f32(1, 77, context_dim),
          f32(1, *latent, 1), f32(1) if config.model.unet.motion_strength else None, f32(),
          jax.eval_shape(lambda: jax.random.key(0)))
  lower = functools.partial(video_sampling.sample_video_jit.lower, unet_graphdef,
                            num_frames=int(config.data.num_frames), init=config.sampling.init)
  return lower, _replicated_abstract(args, mesh)


def sharded_bytes(args) -> int:
  """Bytes one device holds of abstract arguments (the largest shard of each array)."""
  total = 0
  for leaf in jax.tree.leaves(args):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    total += int(np.prod(shape)) * leaf.dtype.itemsize
  return total


def target_identity(target: str, devices) -> str:
  """The target as far as it decides a compile: its name, device kind and count, jax's and the compiler's versions."""
  return " ".join((target, devices[0].device_kind, str(len(devices)), jax.__version__,
                   str(getattr(devices[0].client, "platform_version", ""))))


def program_key(lowered_text: str, target: str) -> str:
  """Two programs with the same key compile to the same executable: the same lowered program for the same target
  (target_identity)."""
  return hashlib.sha256(f"{target}\n{lowered_text}".encode()).hexdigest()


def measured_programs(reports) -> dict:
  """program_key -> (figures, report path) of every program measured in these compile_report.json files."""
  known = {}
  for path in map(pathlib.Path, reports):
    try:
      programs = json.loads(path.read_text())["programs"]
    except (OSError, ValueError, KeyError) as e:
      raise ValueError(f"config.compile_report.reuse: {path} is not a readable compile report ({e}); give the "
                       f"path of a {REPORT_FILE} that --mode=compile_report wrote") from e
    known.update({p["program_key"]: (p, str(path)) for p in programs.values() if "program_key" in p})
  return known


def measure(name: str, lower, args, chip: chips.Chip | None, known: dict | None = None, target: str = "") -> dict:
  """Lower (lower(*args), e.g. a jitted function's .lower) and compile one program; its per-device figures and
  bounds. A program already in `known` (measured_programs) for the same `target` (target_identity) is not
  compiled again: its figures are reused."""
  logging.info("compile report: lowering %s", name)
  started = time.perf_counter()
  lowered = lower(*args)
  lowered_at = time.perf_counter()
  key = program_key(lowered.as_text(), target)
  if known and key in known:
    figures, source = known[key]
    logging.info("compile report: %s is a program measured in %s; its figures are reused", name, source)
    return dict(figures, reused_from=source, chip_bounds=bounds(figures, chip) if chip else None)
  logging.info("compile report: compiling %s (lowered in %.1f s)", name, lowered_at - started)
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  text = compiled.as_text()
  counts = xla_stats.count_hlo(text)
  flops = xla_stats.xla_flops(compiled) + counts.flops - counts.flops_loops_once
  result = dict(
      lower_seconds=round(lowered_at - started, 1), compile_seconds=round(compiled_at - lowered_at, 1),
      memory=xla_stats.memory(compiled), state_bytes=sharded_bytes(args),
      flops_per_device=flops, xla_flops_loops_once=xla_stats.xla_flops(compiled),
      unknown_trip_counts=counts.unknown_trip_counts,
      collectives=xla_stats.collectives(compiled, counts), hlo=xla_stats.hlo_size(text),
      lowered_characters=len(lowered.as_text()), program_key=key)
  result["bounds"] = {key: bounds(result, c) for key, c in chips.CHIPS.items()}
  result["chip_bounds"] = bounds(result, chip) if chip else None
  return result


def bounds(figures: dict, chip: chips.Chip) -> dict:
  """Step-time lower bounds on `chip`: compute at peak FLOP/s, collectives at the interconnect bandwidth."""
  link = sum(c["link_bytes"] for c in figures["collectives"].values())
  compute = figures["flops_per_device"] / chip.peak_bf16_flops
  communication = link / chip.interconnect_bytes_per_s
  return dict(chip=chip.name, compute_seconds=compute, collective_seconds=communication,
              step_seconds=max(compute, communication), fits_hbm=figures["memory"]["peak"] <= chip.hbm_bytes,
              hbm_bytes=chip.hbm_bytes)


def _forward_flops(fn, *args) -> float:
  """FLOPs of the unoptimised, loop-free graph of fn (global; cheap: nothing is compiled)."""
  analysis = jax.jit(fn).lower(*args).cost_analysis()
  return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


def unit_flops(config, height: int, width: int, frames: int) -> dict:
  """FLOPs of one UNet forward of one clip (frames + the context frame), one VAE decode and encode of one
  frame, and the landmark network on one crop; counted on this host's backend, with `xla` attention (the same
  arithmetic as the target's kernel, which may not lower here)."""
  dtypes = _model_dtypes(config)
  counted = copy.deepcopy(config)
  counted.model.attention = "xla"
  unet_graphdef, unet_state = nnx.split(nnx.eval_shape(lambda: checkpoints.build_unet(counted)))
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


def compile_report(config, workdir) -> dict:
  """--mode=compile_report: see the module docstring. Returns the report; writes <workdir>/compile_report.json."""
  report_config = config.compile_report
  programs = [p.strip() for p in report_config.programs.split(",") if p.strip()]
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown:
    raise ValueError(f"config.compile_report.programs has {unknown}; valid: {', '.join(PROGRAMS)}")
  if report_config.parts not in PARTS:
    raise ValueError(f"config.compile_report.parts={report_config.parts!r}; expected one of {', '.join(PARTS)}")
  own_report = pathlib.Path(workdir) / REPORT_FILE
  reuse = [r.strip() for r in report_config.reuse.split(",") if r.strip()]
  known = measured_programs(reuse + ([own_report] if own_report.is_file() else []))
  devices = target_devices(report_config.target)
  chip = target_chip(report_config, devices)
  measure_here = functools.partial(measure, chip=chip, known=known,
                                   target=target_identity(report_config.target, devices))
  mesh = sharding.make_mesh(config, devices)
  report = dict(target=report_config.target, device_kind=devices[0].device_kind, num_devices=len(devices),
                mesh=dict(mesh.shape), chip=chip.name if chip else None, stage=config.stage,
                attention=config.model.attention, remat=config.model.remat, dtype=config.model.dtype,
                programs={})
  units = unit_flops(config, config.data.height, config.data.width, config.data.num_frames)
  report["unit_flops"] = units
  with jax.set_mesh(mesh):  # tpu_flash's shard_map takes the mesh from here
    if "train_step" in programs:
      global_batch = sharding.global_batch_size(config.train, mesh.shape["data"] * mesh.shape["fsdp"])
      report["global_batch_size"] = global_batch
      report["useful_train_flops"] = useful_train_flops(config, units, global_batch)
      for name, (lower, args) in train_step_parts(config, mesh, report_config.parts).items():
        report["programs"][name] = measure_here(name, lower, args)
        if name.startswith("unet_") and report_config.parts == "blocks":
          report["programs"][name]["kept_activation_bytes"] = activation_bytes(args)
        _write(workdir, report)  # a long report keeps what it has measured
      if report_config.parts == "pixel_loss":
        report["programs"]["train_step"] = combine_parts(report["programs"], chip)
      elif report_config.parts == "blocks":
        _, _, _, step_args = abstract_train_inputs(config, mesh)
        report["programs"]["train_step"] = combine_blocks(
            report["programs"], sharded_bytes(step_args), sharded_bytes(step_args[0].params), chip)
  if "sampler" in programs:
    steps = config.sampling.num_inference_steps
    one_device = jax.sharding.Mesh(np.array(devices[:1]), ("one",))
    for height, width in sampler_sizes(report_config):
      lower, args = sampler_program(config, one_device, height, width)
      name = f"sampler_{height}x{width}"
      with jax.set_mesh(one_device):  # tpu_flash takes the target platform from the set mesh
        report["programs"][name] = figures = measure_here(name, lower, args)
      forward = unit_flops(config, height, width, config.data.num_frames)["unet_forward"]
      figures["useful_flops"] = 2 * steps * forward  # classifier-free guidance: 2 UNet passes per step
      _write(workdir, report)
  for name, figures in report["programs"].items():
    if name.startswith("sampler_"):
      figures["useful_ratio"] = figures["useful_flops"] / figures["flops_per_device"]
  if "train_step" in report["programs"]:
    whole = report["programs"]["train_step"]
    useful = report["useful_train_flops"]
    per_device = len(devices)
    whole["useful_flops_per_device"] = useful["model_flops"] / per_device
    whole["useful_ratio"] = useful["model_flops"] / per_device / whole["flops_per_device"]
    whole["recompute_ratio"] = useful["with_recompute"] / per_device / whole["flops_per_device"]
  _write(workdir, report)
  print(format_table(report))
  return report


def train_step_parts(config, mesh, parts: str) -> dict:
  """name -> (lower function, abstract args) of the programs config.compile_report.parts splits the step into."""
  if parts == "none":
    return dict(train_step=train_step_program(config, mesh))
  if parts == "pixel_loss":
    return dict(pixel_loss=pixel_loss_program(config, mesh),
                unet_step=train_step_program(_without_pixel_loss(config), mesh))
  pixel = dict(pixel_loss=pixel_loss_program(config, mesh)) if pixel_loss_frames(config) else {}
  if parts == "blocks":
    if config.model.remat != "full":
      raise ValueError(f"config.compile_report.parts='blocks' bounds the step's memory by what full remat keeps; "
                       f"config.model.remat is {config.model.remat!r}: set it to 'full' or use parts='pixel_loss'")
    return dict(**unet_block_programs(config, mesh), optimizer=optimizer_program(config, mesh),
                frozen_forward=frozen_forward_program(config, mesh), **pixel)
  raise ValueError(f"config.compile_report.parts={parts!r}; expected one of {', '.join(PARTS)}")


def _summed_collectives(parts) -> dict:
  collectives = {}
  for part in parts:
    for kind, figures in part["collectives"].items():
      total = collectives.setdefault(kind, dict(count=0, bytes=0.0, link_bytes=0.0))
      for key in total:
        total[key] += figures[key]
  return collectives


def combine_blocks(programs: dict, step_argument_bytes: int, gradient_bytes: int, chip: chips.Chip | None) -> dict:
  """The whole step's figures from the parts of parts='blocks' (rules in the module docstring)."""
  parts = [p for name, p in programs.items() if name != "train_step"]
  kept = sum(p.get("kept_activation_bytes", 0) for p in parts)
  largest_temp = max(p["memory"]["temp"] for p in parts)
  whole = dict(
      from_parts=True, flops_per_device=sum(p["flops_per_device"] for p in parts),
      collectives=_summed_collectives(parts), state_bytes=step_argument_bytes,
      memory=dict(peak=step_argument_bytes + gradient_bytes + kept + largest_temp, arguments=step_argument_bytes,
                  gradients=gradient_bytes, kept_activations=kept, temp=largest_temp,
                  rule="peak = step arguments + gradients + block inputs kept by remat + largest part temp"),
      compile_seconds=sum(p["compile_seconds"] for p in parts))
  whole["bounds"] = {key: bounds(whole, c) for key, c in chips.CHIPS.items()}
  whole["chip_bounds"] = bounds(whole, chip) if chip else None
  return whole


def combine_parts(parts: dict, chip: chips.Chip | None) -> dict:
  """The whole step's figures from the unet_step and pixel_loss parts (rules in the module docstring)."""
  unet, pixel = parts["unet_step"], parts["pixel_loss"]
  peak_upper = unet["memory"]["peak"] + pixel["memory"]["temp"] + pixel["memory"]["outputs"]
  whole = dict(
      from_parts=True, flops_per_device=unet["flops_per_device"] + pixel["flops_per_device"],
      collectives=_summed_collectives((unet, pixel)), state_bytes=unet["state_bytes"],
      memory=dict(peak=peak_upper, peak_lower=max(unet["memory"]["peak"], pixel["memory"]["peak"]),
                  temp=unet["memory"]["temp"] + pixel["memory"]["temp"], arguments=unet["memory"]["arguments"],
                  rule="peak = unet_step peak + pixel_loss temp + outputs (upper bound); peak_lower = max of peaks"),
      compile_seconds=unet["compile_seconds"] + pixel["compile_seconds"])
  whole["bounds"] = {key: bounds(whole, c) for key, c in chips.CHIPS.items()}
  whole["chip_bounds"] = bounds(whole, chip) if chip else None
  return whole


def _write(workdir, report: dict) -> None:
  fileio.write_text(pathlib.Path(workdir) / REPORT_FILE, json.dumps(report, indent=2, sort_keys=True) + "\n")


def format_table(report: dict) -> str:
  """The report as a console table: one row per program."""
  gib, tera = 2.0 ** 30, 1e12
  chip = report["chip"] or "no chip"
  lines = [f"compile report: stage {report['stage']}, target {report['target']} ({report['num_devices']} x "
           f"{report['device_kind']}), mesh {report['mesh']}, bounds on {chip}",
           f"{'program':<22}{'compile s':>10}{'args GiB':>10}{'temp GiB':>10}{'peak GiB':>10}{'TFLOP/dev':>11}"
           f"{'useful':>8}{'AG GiB':>8}{'RS GiB':>8}{'AR GiB':>8}{'compute s':>11}{'comm s':>9}"]
  for name, p in report["programs"].items():
    coll = lambda kind, p=p: p["collectives"].get(kind, {}).get("bytes", 0.0) / gib
    b = p["chip_bounds"] or {}
    useful = f"{p['useful_ratio']:.2f}" if "useful_ratio" in p else "-"
    compiled = "reused" if "reused_from" in p else f"{p['compile_seconds']:.0f}"
    lines.append(
        f"{name:<22}{compiled:>10}{p['memory'].get('arguments', 0) / gib:>10.2f}"
        f"{p['memory']['temp'] / gib:>10.2f}{p['memory']['peak'] / gib:>10.2f}{p['flops_per_device'] / tera:>11.2f}"
        f"{useful:>8}{coll('all-gather'):>8.2f}{coll('reduce-scatter'):>8.2f}{coll('all-reduce'):>8.2f}"
        f"{b.get('compute_seconds', float('nan')):>11.3f}{b.get('collective_seconds', float('nan')):>9.3f}")
  return "\n".join(lines)
