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
from absl import logging
from flax import nnx

from handi_jax import conditioning, fileio, mask_cleanup, prompts, tokenizers
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
                            key, num_frames: int, init: str):
  """video.sample_video_jit with a host callback after each step's UNet call (one per step), so that a caller
  of Generator.run sees the steps go by; the loop is still one compiled scan."""
  unet = nnx.merge(graphdef, state)

  def reporting_unet(*args, **kwargs):
    out = unet(*args, **kwargs)
    jax.debug.callback(_step_done, out[(0,) * out.ndim])  # depends on the output: runs after the step
    return out

  return guided_sampling.sample_video(reporting_unet, plan, context_latent, text, uncond_text, mask, motion,
                                     guidance_scale, key, num_frames, init)


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


class Generator:
  """The models and the sampling plan; `run` produces one sample's outputs. A stage's UNet that was not handed in
  is loaded on first use as config.generate names it (load_stage_unet); one handed in is the one training with
  this config, so its training size is config.data's."""

  def __init__(self, config, frozen_models: frozen.FrozenModels, tokenizer,
               unets: dict[int, nnx.Module] | None = None):
    self.config = config
    self.frozen = frozen_models
    self.tokenizer = tokenizer
    self.settings, self.plan = sampling_plan(config)
    self.uncond = self._text(config.sampling.negative_prompt)
    self._unets = {stage: common.canonical_split(unet) for stage, unet in (unets or {}).items()}
    self._training_sizes = {stage: train_state.TrainingSize.of_config(config) for stage in self._unets}
    self._size_warnings = set()

  @classmethod
  def from_config(cls, config, workdir: str | pathlib.Path) -> "Generator":
    """The frozen models of config.model (the demo tokenizer, if needed, written into <workdir>/demo_tokenizer)."""
    frozen_models, tokenizer = frozen.load_frozen_models(config, fileio.as_path(workdir) / "demo_tokenizer",
                                                         hand_landmarks=False)
    return cls(config, frozen_models, tokenizer)

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

  def _sample(self, stage: int, context_latent, text, latent_mask, key, progress=None) -> np.ndarray:
    """One stage: sample the latent video and decode it -> (F, H, W, 3) float32 in about [-1, 1]."""
    config = self.config
    motion = jnp.array([config.sampling.motion_strength], jnp.float32) if config.model.unet.motion_strength else None
    graphdef, state = self.unet(stage)
    args = (graphdef, state, self.plan, context_latent, text, self.uncond, latent_mask, motion,
            jnp.float32(config.sampling.guidance_scale), key)
    options = dict(num_frames=int(config.data.num_frames), init=config.sampling.init)
    if progress is None:
      latents = guided_sampling.sample_video_jit(*args, **options)
    else:
      progress(f"stage {stage}", 0, self.plan.num_steps)
      with _listening(functools.partial(progress, f"stage {stage}"), self.plan.num_steps):
        latents = _sample_video_reporting(*args, **options).block_until_ready()
    frames = _decode(self.frozen.vae_graphdef, self.frozen.vae, latents, int(config.model.frame_chunk))
    return np.asarray(frames[0], np.float32)

  def run(self, sample: prompts.Sample, out_dir: pathlib.Path, mode: str = "generate", progress=None) -> "Result":
    """All outputs of one sample into out_dir (`mode` "predict_masks" stops after the mask). `progress`, if
    given, is called as progress(phase, done, total): "encoding", "stage 1" / "stage 2" per sampling step,
    "clean-up", "writing files"."""
    config = self.config
    report = progress or (lambda phase, done, total: None)
    report("encoding", 0, 1)
    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    key = jax.random.fold_in(jax.random.key(config.seed), sample.index)
    stage1_key, stage2_key = jax.random.split(key)
    image = media_files.load_image(sample.image)
    stages = (1,) * (sample.mask is None) + (2,) * (mode == "generate")
    height, width = self.model_size(image.size, stages)
    pixels = media_files.image_to_model_input(image, height, width)
    context_latent = _encode_image(self.frozen.vae_graphdef, self.frozen.vae, jnp.asarray(pixels))
    text = self._text(sample.prompt)
    record = dict(prompt=sample.prompt, image=str(sample.image), height=height, width=width,
                  sampler=self.settings.sampler, steps=self.plan.num_steps,
                  guidance_scale=float(config.sampling.guidance_scale))

    if sample.mask is not None:
      mask = media_files.load_mask(sample.mask, height, width, binary=True, image_size=image.size) > 0
      record["mask_source"] = str(sample.mask)
    else:
      prior = (media_files.load_mask(config.generate.prior_mask, height, width, binary=False)
               if config.generate.prior_mask else np.ones((height, width), np.float32))
      mask_frames = self._sample(1, context_latent, text, self._latent_mask(prior), stage1_key, progress)
      report("clean-up", 0, 1)
      mask = mask_cleanup.clean_mask_video_from_config(mask_frames[1:], config.mask_cleanup)
      media_files.write_mp4(out_dir / "mask_video.mp4", media_files.to_uint8(mask_frames), config.generate.fps)
      record["mask_source"] = "stage 1"
      if not mask.any():
        logging.warning("sample %s: the stage-1 mask is empty after clean-up", sample.name)
    media_files.write_png(out_dir / "mask.png", mask.astype(np.uint8) * 255)
    record["mask_fraction"] = float(mask.mean())

    frames = None
    if mode == "generate":
      generated = self._sample(2, context_latent, text, self._latent_mask(mask.astype(np.float32)), stage2_key,
                               progress)
      report("writing files", 0, 1)
      frames = compose_video(generated, pixels, mask, bool(config.sampling.replace_background),
                             bool(config.generate.release_frames))
      media_files.write_mp4(out_dir / "video.mp4", frames, config.generate.fps)
      media_files.write_gif(out_dir / "video.gif", frames, config.generate.fps)
      flow = media_files.motion_flow_map(frames, float(config.generate.flow_threshold))
      media_files.write_png(out_dir / "flow.png", media_files.flow_heatmap(frames[0], flow))
      record["mean_flow"] = float(flow.mean())
    record["seconds"] = round(time.time() - start, 2)
    done = out_dir / prompts.DONE_FILE[mode]
    fileio.write_json(done, record)
    return Result(frames=frames, mask=mask, context=media_files.to_uint8(pixels), record=record)

  @staticmethod
  def _latent_mask(pixel_mask: np.ndarray) -> jax.Array:
    """(H, W) pixel mask -> (1, h, w, 1) latent-grid mask, soft edges kept as in the release's inference."""
    return conditioning.latent_mask(jnp.asarray(pixel_mask, jnp.float32)[None, :, :, None], threshold=None)
