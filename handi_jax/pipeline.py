"""HANDI's two-stage generation pipeline: image + action text -> motion-area mask -> hand video.

Pipeline: the image is resized (Lanczos) to config.sampling.height x width, or to about config.sampling.target_area
pixels keeping its aspect ratio (sides multiples of 8), and encoded to the context latent. With neither set (the
default: target_area 0), the area is the one the UNet was trained at (train_state.TrainingSize, recorded with its
checkpoint or export; stage 2's when both stages run), in the image's aspect ratio: a square image gets exactly
the training size. A UNet that records no size falls back to config.sampling.fallback_area. A size more than
FAR_FROM_TRAINING times the training area, or less than its 1 / FAR_FROM_TRAINING, gets a warning. Stage 1 samples
the mask video conditioned on the prior mask (config.generate.prior_mask; all ones when empty, the release's
no-mask rule), which is decoded and cleaned up (handi_jax.mask_cleanup) into the motion-area mask. Stage 2
samples the RGB video conditioned on that mask (conv_in2), decodes it and, with
config.sampling.replace_background (the paper's rule), replaces every pixel outside the mask by the context
image; frame 0 is the context image and levels are rounded, unless config.generate.release_frames (with
replace_background off: the release's written frames). Sampling: DPM-Solver++ 2M (or DDIM),
config.sampling.num_inference_steps steps, classifier-free guidance config.sampling.guidance_scale, all steps in
one compiled loop (handi_jax.diffusion.guided_sampling).

Batches: Generator.batches groups samples by model size (samples of different sizes cannot share a batch) in batches
of config.generate.batch_size per device; run_batch samples a batch split over the generator's devices (default:
this process's own), the models replicated. A sample's random key is derived from config.seed and its global
index alone, so its video does not depend on the batch, the devices or the processes that made it.

Models: VAE, text encoder, tokenizer and scheduler config from config.model.pretrained (a diffusers pipeline
directory); the stage UNets from config.generate.stage1_pretrained / stage2_pretrained (a diffusers `unet/`
directory or a training workdir with checkpoints/); each may be a Hugging Face repo id (convert.hub); stage 2 falls
back to <pretrained>/unet. Anything not given is randomly initialised from the (tiny) config, and a log line says
so; without a pretrained directory the tokenizer is handi_jax.tokenizers.demo_tokenizer(), written into
<workdir>/demo_tokenizer. All models come through handi_jax.components, as in training and export; training's
evaluator hands its models in memory.
"""

import contextlib
import copy
import dataclasses
import functools
import itertools
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from handi_jax import conditioning, fileio, mask_cleanup, prompts, sharding, tokenizers
from handi_jax.components import common, frozen, train_state
from handi_jax.components import unet as unet_lib
from handi_jax.convert import hub
from handi_jax.diffusion import guided_sampling, samplers, schedules
from handi_jax.media import files as media_files
from handi_jax.models import unet3d
from handi_jax.models import vae as vae_lib

# How many times the training area (or its inverse) a generation size may be before a warning: the UNet has not
# seen objects at that scale.
FAR_FROM_TRAINING = 2.0


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_text(graphdef, state, input_ids):
  return nnx.merge(graphdef, state)(input_ids)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_image(graphdef, state, image):
  return vae_lib.encode_video(nnx.merge(graphdef, state), image[None, None])


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _decode(graphdef, state, latents, chunk_size):
  return vae_lib.decode_video(nnx.merge(graphdef, state), latents, chunk_size)


# The listener of the per-step host callback compiled into `_sample_video_reporting`: a callback cannot carry a
# Python object, so the loop reports to whoever listens now (runs that report progress are sequential).
_step_listeners = []


def _step_done(_):
  for listener in _step_listeners:
    listener()


@contextlib.contextmanager
def _listening(report, total: int):
  """Calls report(done, total) after each sampling step while the block runs."""
  count = itertools.count(1)
  listener = lambda: report(next(count), total)
  _step_listeners.append(listener)
  try:
    yield
  finally:
    _step_listeners.remove(listener)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_frames", "init"))
def _sample_video_reporting(graphdef, state, plan, context_latent, text, uncond_text, mask, motion, guidance_scale,
                            keys, num_frames: int, init: str):
  """video.sample_video_jit with a host callback after each step's UNet call (one per step), so that a caller
  of Generator.run sees the steps go by; the loop is still one compiled scan."""
  unet = nnx.merge(graphdef, state)

  def reporting_unet(*args, **kwargs):
    out = unet(*args, **kwargs)
    jax.debug.callback(_step_done, out[(0,) * out.ndim])  # depends on the output: runs after the step
    return out

  return guided_sampling.sample_video(reporting_unet, plan, context_latent, text, uncond_text, mask, motion,
                                     guidance_scale, keys, num_frames, init)


def sampling_plan(config):
  """(settings, plan) of config.sampling, with the scheduler config of config.model.pretrained if it has one."""
  root = fileio.as_path(hub.pretrained_pipeline(config)) if config.model.pretrained else None
  scheduler_file = config.sampling.scheduler_config or (
      root / "scheduler" / "scheduler_config.json" if root and (root / "scheduler").is_dir() else "")
  scheduler_json = samplers.read_scheduler_config(scheduler_file) if scheduler_file else None
  settings, diffusion = samplers.settings_from_config(config, scheduler_json)
  plan = samplers.make_plan(settings, schedules.make_schedule(ml_collections.ConfigDict(diffusion)))
  logging.info("sampler %s, %d steps, timesteps %s", settings.sampler, plan.num_steps,
               np.asarray(plan.timesteps).tolist())
  return settings, plan


def stage_unet_source(config, stage: int) -> str:
  """Where the stage-1 or stage-2 UNet comes from (see the module docstring); empty: randomly initialised."""
  source = hub.stage_unet(config, stage)
  release_unet = fileio.as_path(hub.pretrained_pipeline(config)) / "unet" if config.model.pretrained else None
  if not source and stage == 2 and release_unet is not None and release_unet.is_dir():
    source = str(release_unet)
  return source


def load_stage_unet(config, stage: int) -> unet3d.UNet3DConditionModel:
  """The stage-1 or stage-2 UNet config.generate names (see the module docstring), or a random one."""
  return unet_lib.load_unet(config, stage_unet_source(config, stage), f"the stage-{stage} UNet")


@dataclasses.dataclass(frozen=True)
class Result:
  frames: np.ndarray | None   # (F, H, W, 3) uint8 as written (None in predict_masks mode)
  mask: np.ndarray            # (H, W) bool motion-area mask
  context: np.ndarray         # (H, W, 3) uint8 context image at the model size
  record: dict                # what done.json holds


def compose_video(generated: np.ndarray, context: np.ndarray, mask: np.ndarray, replace_background: bool,
                  release_frames: bool = False):
  """Decoded frames (F, H, W, 3) in [-1, 1] -> uint8 video: frame 0 is the context image itself (the slot the
  model reconstructs), and with `replace_background` every pixel outside the (H, W) mask is the context's.
  `release_frames` keeps the decoded frame 0 and truncates levels as the release's tensor2vid does."""
  frames = media_files.to_uint8(generated, "truncate" if release_frames else "round")
  context = media_files.to_uint8(context)  # rounded: a uint8 image through [-1, 1] comes back exactly
  if not release_frames:
    frames[0] = context
  if replace_background:
    frames = np.where(mask[None, :, :, None], frames, context[None])
  return frames


@dataclasses.dataclass
class _Job:
  """One sample of a batch between its stages."""
  sample: prompts.Sample
  out_dir: pathlib.Path
  pixels: np.ndarray           # (H, W, 3) model input in [-1, 1]
  context_latent: jax.Array    # (1, 1, h, w, C)
  text: jax.Array              # (1, 77, D)
  mask: np.ndarray | None      # (H, W) bool: the user's, then stage 1's
  record: dict


class Generator:
  """The models and the sampling plan; `run` produces one sample's outputs, `run_batch` a batch's. A stage's UNet
  that was not handed in is loaded on first use as config.generate names it (load_stage_unet); one handed in is the
  one training with this config, so its training size is config.data's. `devices` (default: this process's) are
  the ones a batch is split over."""

  def __init__(self, config, frozen_models: frozen.FrozenModels, tokenizer,
               unets: dict[int, nnx.Module] | None = None, devices=None):
    self.config = config
    self.devices = list(jax.local_devices() if devices is None else devices)
    self._placed = {}  # (id of a model's arrays, devices) -> those arrays on the devices
    self.frozen = frozen_models
    self.tokenizer = tokenizer
    self.settings, self.plan = sampling_plan(config)
    self.uncond = self._text(config.sampling.negative_prompt)
    self._unets = {stage: common.canonical_split(unet) for stage, unet in (unets or {}).items()}
    self._training_sizes = {stage: train_state.TrainingSize.of_config(config) for stage in self._unets}
    self._size_warnings = set()

  @classmethod
  def from_config(cls, config, workdir: str | pathlib.Path, devices=None) -> "Generator":
    """The frozen models of config.model (the demo tokenizer, if needed, written into <workdir>/demo_tokenizer)."""
    frozen_models, tokenizer = frozen.load_frozen_models(config, fileio.as_path(workdir) / "demo_tokenizer",
                                                         hand_landmarks=False)
    return cls(config, frozen_models, tokenizer, devices=devices)

  def with_config(self, config) -> "Generator":
    """These loaded models under another config's sampling and generate fields (steps, guidance, motion strength,
    seed, size): the app changes those per request without loading or compiling the models again. Randomly
    initialised models and the negative prompt stay those of the config this generator was made with."""
    other = copy.copy(self)
    other.config = config
    other.settings, other.plan = sampling_plan(config)
    other.unet = self.unet  # UNets load lazily, once, from this generator's config
    other.training_size = self.training_size
    return other

  def unet(self, stage: int):
    """(graphdef, state) of a stage's UNet, loaded on first use."""
    if stage not in self._unets:
      self._unets[stage] = common.canonical_split(load_stage_unet(self.config, stage))
    return self._unets[stage]

  def training_size(self, stage: int) -> train_state.TrainingSize | None:
    """The size a stage's UNet was trained at, where it records one (read on first use)."""
    if stage not in self._training_sizes:
      self._training_sizes[stage] = unet_lib.training_size(self.config, stage_unet_source(self.config, stage),
                                                           f"the stage-{stage} UNet")
    return self._training_sizes[stage]

  def model_size(self, image_size: tuple[int, int], stages: tuple[int, ...] = (1, 2)) -> tuple[int, int]:
    """(height, width) the `stages` run at for an image of (width, height) `image_size` (see the module
    docstring); warns, once a size, about a stage trained far from it."""
    sampling = self.config.sampling
    area = int(sampling.target_area)
    if not area:  # the training area of the stage that makes the output, in the image's aspect ratio
      recorded = [size for size in map(self.training_size, sorted(stages, reverse=True)) if size]
      area = recorded[0].area if recorded else int(sampling.fallback_area)
    height, width = media_files.model_size(*image_size, area, int(sampling.height), int(sampling.width))
    for stage in stages:
      self._warn_if_far_from_training(stage, height, width)
    return height, width

  def _warn_if_far_from_training(self, stage: int, height: int, width: int) -> None:
    trained = self.training_size(stage)
    if trained is None or (stage, height, width) in self._size_warnings:
      return
    ratio = height * width / trained.area
    if not 1 / FAR_FROM_TRAINING <= ratio <= FAR_FROM_TRAINING:
      self._size_warnings.add((stage, height, width))
      logging.warning("generating at %d x %d px, %.2g times the area the stage-%d UNet was trained at (%d x %d px): "
                      "expect worse videos; with config.sampling.target_area, height and width at 0 generation "
                      "runs at the training area", height, width, ratio, stage, trained.height, trained.width)

  def _text(self, prompt: str) -> jax.Array:
    ids = jnp.asarray(tokenizers.tokenize(self.tokenizer, [prompt]))
    return _encode_text(self.frozen.text_graphdef, self.frozen.text_encoder, ids)

  @property
  def batch_capacity(self) -> int:
    """Samples in a full batch: config.generate.batch_size per device."""
    return int(self.config.generate.batch_size) * len(self.devices)

  def _stages(self, sample: prompts.Sample, mode: str) -> tuple[int, ...]:
    return (1,) * (sample.mask is None) + (2,) * (mode == "generate")

  def batches(self, samples: list[prompts.Sample], mode: str = "generate") -> list[list[prompts.Sample]]:
    """`samples` grouped by model size, in their order within a size, cut into batches of batch_capacity."""
    by_size = {}
    for sample in samples:
      size = self.model_size(media_files.load_image(sample.image).size, self._stages(sample, mode))
      by_size.setdefault(size, []).append(sample)
    capacity = self.batch_capacity
    return [group[i:i + capacity] for group in by_size.values() for i in range(0, len(group), capacity)]

  def _place(self, tree, devices: tuple):
    """A model's arrays (or any pytree) on `devices`: as they are where they already span exactly those devices
    (training's sharded state, one device's arrays on that device), else replicated there, once."""
    key = (id(tree), devices)
    if key not in self._placed:
      replicated = NamedSharding(sharding.batch_mesh(devices), PartitionSpec())
      self._placed[key] = (tree, jax.tree.map(
          lambda x: x if getattr(x, "sharding", None) and x.sharding.device_set == set(devices)
          else jax.device_put(x, replicated), tree))
    return self._placed[key][1]

  def _sample(self, stage: int, context_latents, texts, latent_masks, keys, progress=None) -> np.ndarray:
    """One stage of a batch: sample the latent videos and decode them -> (B, F, H, W, 3) float32 in about [-1, 1].
    The batch is split over min(B, devices) devices, padded to a multiple of them by repeating its last sample."""
    config = self.config
    devices = tuple(self.devices[:min(len(keys), len(self.devices))])
    mesh = sharding.batch_mesh(devices)
    padding = -len(keys) % len(devices)

    def split(rows):
      rows = jnp.concatenate([rows, jnp.repeat(rows[-1:], padding, axis=0)]) if padding else rows
      return jax.device_put(rows, sharding.batch_sharding(mesh, rows.ndim))

    # Host values (numpy) go wherever the batch goes; device arrays made elsewhere (under training's mesh, say) are
    # placed on this batch's devices.
    motion = np.array([config.sampling.motion_strength], np.float32) if config.model.unet.motion_strength else None
    graphdef, state = self.unet(stage)
    args = (graphdef, self._place(state, devices), self._place(self.plan, devices), split(context_latents),
            split(texts), self._place(self.uncond, devices), split(latent_masks), motion,
            np.float32(config.sampling.guidance_scale), split(keys))
    options = dict(num_frames=int(config.data.num_frames), init=config.sampling.init)
    with jax.set_mesh(mesh):  # this batch's devices, also inside training's mesh (the training evaluator)
      if progress is None:
        latents = guided_sampling.sample_video_jit(*args, **options)
      else:
        progress(f"stage {stage}", 0, self.plan.num_steps)
        with _listening(functools.partial(progress, f"stage {stage}"), self.plan.num_steps):
          latents = _sample_video_reporting(*args, **options).block_until_ready()
      frames = _decode(self.frozen.vae_graphdef, self._place(self.frozen.vae, devices), latents,
                       int(config.model.frame_chunk))
    return np.asarray(frames, np.float32)[:len(keys)]

  def run(self, sample: prompts.Sample, out_dir: pathlib.Path, mode: str = "generate", progress=None) -> "Result":
    """All outputs of one sample into out_dir (`mode` "predict_masks" stops after the mask). `progress`, if
    given, is called as progress(phase, done, total): "encoding", "stage 1" / "stage 2" per sampling step,
    "clean-up", "writing files"."""
    return self.run_batch([sample], [out_dir], mode, progress)[0]

  def _prepare(self, sample: prompts.Sample, out_dir: pathlib.Path, mode: str) -> _Job:
    out_dir.mkdir(parents=True, exist_ok=True)
    image = media_files.load_image(sample.image)
    height, width = self.model_size(image.size, self._stages(sample, mode))
    pixels = media_files.image_to_model_input(image, height, width)
    record = dict(prompt=sample.prompt, image=str(sample.image), height=height, width=width,
                  sampler=self.settings.sampler, steps=self.plan.num_steps,
                  guidance_scale=float(self.config.sampling.guidance_scale))
    mask = None
    if sample.mask is not None:
      mask = media_files.load_mask(sample.mask, height, width, binary=True, image_size=image.size) > 0
      record["mask_source"] = str(sample.mask)
    context_latent = _encode_image(self.frozen.vae_graphdef, self.frozen.vae, jnp.asarray(pixels))
    return _Job(sample, out_dir, pixels, context_latent, self._text(sample.prompt), mask, record)

  def _stage(self, stage: int, jobs: list[_Job], pixel_masks: list[np.ndarray], keys: list[jax.Array],
             progress) -> np.ndarray:
    """_sample over `jobs` (each with its pixel mask and key)."""
    return self._sample(stage, jnp.concatenate([j.context_latent for j in jobs]),
                        jnp.concatenate([j.text for j in jobs]),
                        jnp.concatenate([self._latent_mask(m) for m in pixel_masks]), jnp.stack(keys), progress)

  def run_batch(self, samples: list[prompts.Sample], out_dirs: list[pathlib.Path], mode: str = "generate",
                progress=None) -> list["Result"]:
    """run() for samples of one model size (one of `batches`), each stage sampled for all of them at once."""
    config = self.config
    report = progress or (lambda phase, done, total: None)
    report("encoding", 0, 1)
    start = time.time()
    jobs = [self._prepare(sample, out_dir, mode) for sample, out_dir in zip(samples, out_dirs, strict=True)]
    sizes = {(j.record["height"], j.record["width"]) for j in jobs}
    if len(sizes) > 1:
      raise ValueError(f"a batch holds samples of sizes {sorted(sizes)}: group them with Generator.batches")
    stage_keys = {j.sample.name: jax.random.split(jax.random.fold_in(jax.random.key(config.seed), j.sample.index))
                  for j in jobs}

    stage1 = [j for j in jobs if j.mask is None]
    if stage1:
      height, width = sizes.pop()
      prior = (media_files.load_mask(config.generate.prior_mask, height, width, binary=False)
               if config.generate.prior_mask else np.ones((height, width), np.float32))
      all_mask_frames = self._stage(1, stage1, [prior] * len(stage1), [stage_keys[j.sample.name][0] for j in stage1],
                                    progress)
      report("clean-up", 0, 1)
      for job, mask_frames in zip(stage1, all_mask_frames, strict=True):
        job.mask = mask_cleanup.clean_mask_video_from_config(mask_frames[1:], config.mask_cleanup)
        media_files.write_mp4(job.out_dir / "mask_video.mp4", media_files.to_uint8(mask_frames), config.generate.fps)
        job.record["mask_source"] = "stage 1"
        if not job.mask.any():
          logging.warning("sample %s: the stage-1 mask is empty after clean-up", job.sample.name)
    for job in jobs:
      media_files.write_png(job.out_dir / "mask.png", job.mask.astype(np.uint8) * 255)
      job.record["mask_fraction"] = float(job.mask.mean())

    all_frames = [None] * len(jobs)
    if mode == "generate":
      generated = self._stage(2, jobs, [j.mask.astype(np.float32) for j in jobs],
                              [stage_keys[j.sample.name][1] for j in jobs], progress)
      report("writing files", 0, 1)
      for i, job in enumerate(jobs):
        frames = all_frames[i] = compose_video(generated[i], job.pixels, job.mask,
                                               bool(config.sampling.replace_background),
                                               bool(config.generate.release_frames))
        media_files.write_mp4(job.out_dir / "video.mp4", frames, config.generate.fps)
        media_files.write_gif(job.out_dir / "video.gif", frames, config.generate.fps)
        flow = media_files.motion_flow_map(frames, float(config.generate.flow_threshold))
        media_files.write_png(job.out_dir / "flow.png", media_files.flow_heatmap(frames[0], flow))
        job.record["mean_flow"] = float(flow.mean())
    results = []
    for job, frames in zip(jobs, all_frames, strict=True):
      job.record.update(seconds=round(time.time() - start, 2), batch=len(jobs))  # the batch's time
      fileio.write_json(job.out_dir / prompts.DONE_FILE[mode], job.record)
      results.append(Result(frames=frames, mask=job.mask, context=media_files.to_uint8(job.pixels),
                            record=job.record))
    return results

  @staticmethod
  def _latent_mask(pixel_mask: np.ndarray) -> jax.Array:
    """(H, W) pixel mask -> (1, h, w, 1) latent-grid mask, soft edges kept as in the release's inference."""
    return conditioning.latent_mask(jnp.asarray(pixel_mask, jnp.float32)[None, :, :, None], threshold=None)


def generate_owned(make_generator, samples: list[prompts.Sample], out_root: pathlib.Path,
                   mode: str = "generate") -> list[prompts.Sample]:
  """The samples this process owns (sharding.process_share) that are not yet done, generated in batches into
  out_root/<sample name>/ with make_generator()'s models (made only when one is left); returns the owned samples.
  Each process logs the names of the samples it owns."""
  owned = sharding.process_share(samples)
  logging.info("process %d of %d owns %d of %d samples: %s", jax.process_index(), jax.process_count(), len(owned),
               len(samples), " ".join(s.name for s in owned))
  todo = [s for s in owned if not fileio.is_committed(out_root / s.name / prompts.DONE_FILE[mode])]
  if len(todo) < len(owned):
    logging.info("resuming: %d of %d samples already done in %s", len(owned) - len(todo), len(owned), out_root)
  if todo:
    generator = make_generator()
    with tqdm.tqdm(total=len(todo), desc=mode, unit="sample") as bar:
      for batch in generator.batches(todo, mode):
        generator.run_batch(batch, [out_root / s.name for s in batch], mode)
        bar.update(len(batch))
  return owned
