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
- train_step: train_step.make_train_step jitted as training jits it (state shardings from
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
- sampler_<H>x<W>: diffusion.guided_sampling.sample_video_jit (all config.sampling.num_inference_steps CFG steps in
  one scan) per config.compile_report.sampler_sizes, as generation runs it: a batch of config.generate.batch_size
  samples per device of the target, the batch axis split over them (sharding.batch_mesh), the UNet replicated.
  Its figures: per device (memory, flops_per_device), per sample (flops_per_sample = flops_per_device x devices /
  batch, useful_flops, useful_ratio), and per slice (bounds' samples_per_second = batch / step seconds). Samples
  are independent, so with batch_size 1 each device runs the one-sample program: its per-device figures are one
  sample's on one device (target cpu:1 compiles exactly that), and samples per second = devices / one sample's
  step seconds.

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

Modules:
  targets       the target's devices, the chip of the bounds, the target's identity in program keys
  programs      the programs to compile and their abstract arguments (train step whole or in parts, sampler)
  measure       compile one program and measure it, reuse a program measured before, the report file
  useful_flops  the analytic FLOP counts the compiled FLOPs are compared with
  whole_step    the whole train step's figures from its parts
  table         the console table
"""

import functools

import jax

from handi_jax import sharding, train_step
from handi_jax.compile_report import measure, programs, table, targets, useful_flops, whole_step
from handi_jax.compile_report.measure import REPORT_FILE
from handi_jax.compile_report.programs import PARTS

__all__ = ["PARTS", "PROGRAMS", "REPORT_FILE", "compile_report"]

PROGRAMS = ("train_step", "sampler")  # config.compile_report.programs


def compile_report(config, workdir) -> dict:
  """--mode=compile_report: see the module docstring. Returns the report; writes <workdir>/compile_report.json."""
  report_config = config.compile_report
  wanted = _programs_wanted(report_config)
  known = measure.known_programs(report_config.reuse, workdir)
  devices = targets.target_devices(report_config.target)
  chip = targets.target_chip(report_config, devices)
  measure_here = functools.partial(measure.measure, chip=chip, known=known,
                                   target=targets.target_identity(report_config.target, devices))
  mesh = sharding.make_mesh(config, devices)
  report = _new_report(config, devices, mesh, chip)
  if "train_step" in wanted:
    _measure_train_step(config, mesh, chip, measure_here, report, workdir)
  if "sampler" in wanted:
    _measure_samplers(config, devices, measure_here, report, workdir)
  _add_useful_ratios(report, len(devices))
  measure.write_report(workdir, report)
  print(table.format_table(report))
  return report


def _programs_wanted(report_config) -> list[str]:
  """config.compile_report.programs, checked before anything is built, together with config.compile_report.parts."""
  wanted = [p.strip() for p in report_config.programs.split(",") if p.strip()]
  unknown = sorted(set(wanted) - set(PROGRAMS))
  if unknown:
    raise ValueError(f"config.compile_report.programs has {unknown}; valid: {', '.join(PROGRAMS)}")
  if report_config.parts not in PARTS:
    raise ValueError(f"config.compile_report.parts={report_config.parts!r}; expected one of {', '.join(PARTS)}")
  return wanted


def _new_report(config, devices, mesh, chip) -> dict:
  """The report's description of the target and the model, with the unit FLOPs at the training size."""
  report = dict(target=config.compile_report.target, device_kind=devices[0].device_kind, num_devices=len(devices),
                mesh=dict(mesh.shape), chip=chip.name if chip else None, stage=config.stage,
                attention=config.model.attention, remat=config.model.remat, dtype=config.model.dtype,
                programs={})
  report["unit_flops"] = useful_flops.unit_flops(config, config.data.height, config.data.width,
                                                 config.data.num_frames)
  return report


def _measure_train_step(config, mesh, chip, measure_here, report: dict, workdir) -> None:
  """The train step, whole or in config.compile_report.parts, into report["programs"] (the whole step's figures
  combined from the parts), and its useful FLOPs."""
  parts = config.compile_report.parts
  with jax.set_mesh(mesh):  # tpu_flash's shard_map takes the mesh from here
    global_batch = sharding.global_batch_size(config.train, mesh.shape["data"] * mesh.shape["fsdp"])
    report["global_batch_size"] = global_batch
    report["useful_train_flops"] = useful_flops.useful_train_flops(config, report["unit_flops"], global_batch)
    for name, (lower, args) in programs.train_step_parts(config, mesh, parts).items():
      report["programs"][name] = measure_here(name, lower, args)
      if name.startswith("unet_") and parts == "blocks":
        report["programs"][name]["kept_activation_bytes"] = programs.activation_bytes(args)
      measure.write_report(workdir, report)  # a long report keeps what it has measured
    if parts == "pixel_loss":
      report["programs"]["train_step"] = whole_step.combine_parts(report["programs"], chip)
    elif parts == "blocks":
      _, _, _, step_args = train_step.abstract_train_inputs(config, mesh)
      report["programs"]["train_step"] = whole_step.combine_blocks(
          report["programs"], measure.sharded_bytes(step_args), measure.sharded_bytes(step_args[0].params), chip)


def _measure_samplers(config, devices, measure_here, report: dict, workdir) -> None:
  """One sampler program per config.compile_report.sampler_sizes, a batch split over the target's devices as
  generation splits it, into report["programs"] with its per-sample figures and the slice's samples per second."""
  steps = config.sampling.num_inference_steps
  batch = programs.sampler_batch_size(config, len(devices))
  for height, width in programs.sampler_sizes(config.compile_report):
    lower, args = programs.sampler_program(config, devices, height, width)
    name = f"sampler_{height}x{width}"
    with jax.set_mesh(sharding.batch_mesh(devices)):  # tpu_flash takes the target platform from the set mesh
      figures = measure_here(name, lower, args)
    forward = useful_flops.unit_flops(config, height, width, config.data.num_frames)["unet_forward"]
    report["programs"][name] = _per_sample(figures, batch, len(devices), useful=2 * steps * forward)  # CFG: 2 passes
    measure.write_report(workdir, report)


def _per_sample(figures: dict, batch: int, num_devices: int, useful: float) -> dict:
  """A sampler batch's figures with its per-sample ones: FLOPs per sample (all devices' FLOPs over the batch), the
  useful FLOPs of one sample, and per bound the samples per second of the slice (the batch over its step time)."""
  figures.update(batch=batch, samples_per_device=batch // num_devices, useful_flops=useful,
                 flops_per_sample=figures["flops_per_device"] * num_devices / batch)
  for bound in [*figures["bounds"].values(), figures["chip_bounds"]]:
    if bound:
      bound["samples_per_second"] = batch / bound["step_seconds"]
  return figures


def _add_useful_ratios(report: dict, num_devices: int) -> None:
  """Useful FLOPs over compiled FLOPs of the samplers and the whole train step (and the step's with recompute)."""
  for name, figures in report["programs"].items():
    if name.startswith("sampler_"):
      figures["useful_ratio"] = figures["useful_flops"] / figures["flops_per_sample"]
  if "train_step" in report["programs"]:
    whole = report["programs"]["train_step"]
    useful = report["useful_train_flops"]
    whole["useful_flops_per_device"] = useful["model_flops"] / num_devices
    whole["useful_ratio"] = useful["model_flops"] / num_devices / whole["flops_per_device"]
    whole["recompute_ratio"] = useful["with_recompute"] / num_devices / whole["flops_per_device"]
