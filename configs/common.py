"""Shared defaults and the variants every stage config accepts.

`get_config(stage, arg)` builds the config for one stage. `arg` is the `:suffix` of
`--config=configs/stage2.py:paper,h100x8`: a comma-separated list of variants applied left to right.
The default (empty suffix) is `demo`. Every hyper-parameter of handi-jax lives here and nowhere else.
"""

import ml_collections


def unet_config(full_size: bool) -> ml_collections.ConfigDict:
  """The HANDI UNet (ModelScope text-to-video 3D UNet + AnimateAnything extension); diffusers names.

  The tiny one has two levels: XLA:CPU's compile time grows with the number of blocks (the demo's noise-only step
  compiled in about a third of the time of four levels), and the demo's 8 x 8 latents need no deeper pyramid.

  temporal_norm_num_groups: GroupNorm groups of transformer_in and the temporal convs; None = norm_num_groups, as
  diffusers builds them. The release's class always uses 32, so both configs keep norm_num_groups=32: then the
  release's class and diffusers' UNet3DConditionModel both load an export and compute the same.
  """
  if full_size:
    return ml_collections.ConfigDict(dict(
        in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        attention_head_dim=64, cross_attention_dim=1024, norm_num_groups=32, norm_eps=1e-5,
        temporal_norm_num_groups=ml_collections.config_dict.placeholder(int),
        transformer_in_heads=8, mask_channels=1, motion_strength=True, sample_size=32))
  return ml_collections.ConfigDict(dict(
      in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
      attention_head_dim=8, cross_attention_dim=32, norm_num_groups=32, norm_eps=1e-5,
      temporal_norm_num_groups=ml_collections.config_dict.placeholder(int),
      transformer_in_heads=8, mask_channels=1, motion_strength=True, sample_size=8))


def vae_config(full_size: bool) -> ml_collections.ConfigDict:
  """SD 1.5 AutoencoderKL; diffusers names."""
  if full_size:
    return ml_collections.ConfigDict(dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, norm_num_groups=32, scaling_factor=0.18215, sample_size=512))
  return ml_collections.ConfigDict(dict(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
      layers_per_block=1, norm_num_groups=4, scaling_factor=0.18215, sample_size=64))


def text_encoder_config(full_size: bool) -> ml_collections.ConfigDict:
  """transformers CLIPTextModel; 23 x 1024 is the ModelScope/OpenCLIP-H tower (SD 1.5: 12 x 768)."""
  if full_size:
    return ml_collections.ConfigDict(dict(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0))
  return ml_collections.ConfigDict(dict(
      vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="gelu",
      bos_token_id=49406, eos_token_id=49407, pad_token_id=0))


def get_config(stage: int, arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  _add_run_settings(config, stage)
  _add_device_settings(config)
  config.model = _model_config()
  config.diffusion = _diffusion_config()
  config.sampling = _sampling_config()
  config.mask_cleanup = _mask_cleanup_config()
  config.generate = _generate_config()
  config.evaluate = _evaluate_config()
  config.data = _data_config()
  config.train = _train_config()
  config.loss = _loss_config()
  config.compile_report = _compile_report_config()
  # config.train fields that stage 1 trains with instead (configs/stage1.py applies them), so that one config
  # describes the training of both stages: --mode=demo trains both from the stage-2 config it is given.
  config.stage1_train = ml_collections.ConfigDict()
  apply_variants(config, arg)
  return config


def _add_run_settings(config: ml_collections.ConfigDict, stage: int) -> None:
  config.stage = stage
  config.seed = 0
  # XLA's persistent compilation cache (a second run of the same graphs skips compiling); empty = off.
  config.compilation_cache_dir = "~/.cache/handi_jax/xla"
  # XLA:CPU: compile the train step at LLVM optimisation level 1 without its expensive passes (the demo's step: 63 s
  # instead of 92 s, 4% slower steps; handi_jax.train.compiler_options). Ignored on GPUs and TPUs.
  config.cpu_fast_compile = True


def _add_device_settings(config: ml_collections.ConfigDict) -> None:
  # Axis sizes of the (data, fsdp, tensor) mesh; one of them may be -1 = all remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Logical axis name -> mesh axes (None = replicated). Models annotate parameters with logical names.
  config.sharding_rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),       # model width / input features of a projection
      ("heads", "tensor"),     # attention projection outputs (heads x head_dim)
      ("mlp", "tensor"),       # feed-forward hidden width
      ("conv_in", None),       # input channels of a conv kernel
      ("conv_out", "fsdp"),    # output channels of a conv kernel
      ("norm", None),          # norm scales and biases: small, replicated
      ("vocab", None),
  )
  # Arrays of fewer elements stay replicated (big_vision's FSDP keeps small arrays whole too). 2**16: on the
  # full-size UNet this skips 290 of 865 all-gathers per step (biases, norms, small convs) for +0.3% per-device
  # bytes over fsdp 16; 2**18 would cost +12% there.
  config.sharding_min_size = 2**16
  # Multi-host: None = decide from the environment (JAX_COORDINATOR_ADDRESS, TPU/SLURM variables).
  config.multihost = ml_collections.config_dict.placeholder(bool)
  # Processes started by hand (Kubernetes, ssh): empty / -1 = JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  # JAX_PROCESS_ID from the environment, else what SLURM or the TPU runtime tell JAX.
  config.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=-1, process_id=-1))
  config.num_devices_expected = 0  # 0 = whatever exists; variants that target hardware set it


def _model_config() -> ml_collections.ConfigDict:
  """`pretrained` is a diffusers pipeline directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/); empty =
  random init from the configs below (tests, demo)."""
  model = ml_collections.ConfigDict()
  model.pretrained = ""
  model.unet = unet_config(full_size=False)
  model.vae = vae_config(full_size=False)
  model.text_encoder = text_encoder_config(full_size=False)
  # The VAE when `pretrained` is empty: block_mean (fixed weights: latents are 8 x 8 block means of the image,
  # decoded bilinearly, so generated videos can be looked at) | random.
  model.vae_without_weights = "block_mean"
  model.param_dtype = "float32"
  model.dtype = "float32"      # compute dtype; bf16 on accelerators
  model.attention = "xla"      # xla | cudnn | tpu_flash (spatial attention only)
  model.remat = "none"         # none | full | dots_saveable (per UNet block)
  model.frame_chunk = 4        # frames per VAE call: decoding in generation, decode + loss in training
  return model


def _diffusion_config() -> ml_collections.ConfigDict:
  """The training schedule: the release's DDPMScheduler config."""
  return ml_collections.ConfigDict(dict(
      num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
      prediction_type="epsilon",
      # The release sets rescale_schedule but it is a silent no-op there; off = what it trained with.
      rescale_zero_terminal_snr=False))


def _sampling_config() -> ml_collections.ConfigDict:
  """DPM-Solver++ 2M (or DDIM), classifier-free guidance."""
  return ml_collections.ConfigDict(dict(
      sampler="dpmsolver++", num_inference_steps=25, guidance_scale=9.0,
      timestep_spacing="linspace", steps_offset=0, lower_order_final=True,
      # DPM-Solver++: "sigma_min" ends at sigma(t=0) as the release's diffusers 0.24 did; "zero" is the
      # diffusers >= 0.26 default (and forces a first-order last step).
      solver_order=2, final_sigmas_type="sigma_min", lambda_min_clipped=-float("inf"),
      eta=0.0, clip_sample=False, set_alpha_to_one=False,   # DDIM (ModelScope's scheduler values)
      # A diffusers scheduler_config.json whose keys override these and config.diffusion; empty = the one
      # in <model.pretrained>/scheduler/ when that exists.
      scheduler_config="",
      init="noised_context",          # noised_context (the release) | noise
      motion_strength=3.0, negative_prompt="",
      replace_background=True,        # paper: pixels outside the mask = context image
      # The size generation runs at: height x width when both are > 0; else the image's aspect ratio at
      # target_area pixels (sides multiples of 8); target_area 0 = the area the UNet was trained at (recorded
      # with its checkpoint or export), or fallback_area for a UNet that records none (the release's area).
      target_area=0, fallback_area=512 * 512, height=0, width=0))


def _mask_cleanup_config() -> ml_collections.ConfigDict:
  """Stage 1's mask video -> the motion-area mask."""
  return ml_collections.ConfigDict(dict(threshold=0.5, min_component_fraction=0.002, closing_kernel=7))


def _generate_config() -> ml_collections.ConfigDict:
  """--mode=generate, python -m handi_jax.generate: one image + prompt, or a JSON-lines file of
  {"source", "target", "prompt"} rows (the release's format). A mask (file or mask_dir/<stem>[_mask].png) skips
  stage 1. Pretrained stage dirs: a diffusers unet/ dir or a training workdir; empty = random init."""
  return ml_collections.ConfigDict(dict(
      image="", prompt="", mask="", prompts_file="", image_dir="", mask_dir="", output_dir="",
      stage1_pretrained="", stage2_pretrained="",
      prior_mask="",                  # stage-1 conditioning mask PNG; empty = all ones (the release's rule)
      flow_threshold=1.0,             # motion-flow map: optical-flow magnitude (pixels) that counts as motion
      # True: frames written as the release writes them (with sampling.replace_background=False, its files):
      # frame 0 as decoded, not the context image; levels truncated as diffusers' tensor2vid, not rounded.
      release_frames=False,
      fps=8,
      batch_size=1))                  # samples sampled at once per device (samples of one size share a batch)


def _evaluate_config() -> ml_collections.ConfigDict:
  """--mode=evaluate, python -m handi_jax.evaluate; handi_jax/evaluate.py documents inputs/outputs.

  Clips: the release's prompts file + source images + ground-truth videos, or a TFRecord split. Runs:
  "name=folder,..." of generated videos; empty = generate them with the checkpoint (config.generate's models).
  Extractor weights: empty = "not configured" in the report (never a made-up number)."""
  return ml_collections.ConfigDict(dict(
      prompts_file="", image_dir="", gt_dir="", mask_dir="",  # release layout: {"source","target","prompt"} rows
      data_dir="", split="test",                               # or a TFRecord split (used when prompts_file is empty)
      runs="", output_dir="", max_clips=0,                     # output_dir empty = <workdir>/evaluate
      clip="", inception="", i3d="",                           # transformers CLIPModel dir, pytorch-fid / I3D weights
      # EgoVLP checkpoint (egovlp.pth, epic_mir_plus.pth or a safetensors export) and the frames it samples of a
      # clip: 4 for egovlp.pth (Ego4D, as LEGO scores it), 16 for epic_mir_plus.pth (EpicKitchens).
      egovlp="", egovlp_frames=4,
      blip="",                                                 # BLIP-score dir: captioner/ + text_encoder/
      batch_size=16,                  # frames per feature-extraction step, split over the process's devices
      hand_workers=0,                 # MediaPipe (HS-Err) processes per host; 0 or 1 = in the scoring process
      motion_intensive_fraction=0.1, contact_sheet_clips=4))


def _data_config() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.dir = ""                # TFRecord dataset directory (--mode=demo writes demo data when empty)
  data.split = "train"
  data.num_frames = 16         # frame 0 = context image, L = num_frames - 1 targets
  data.height = 64
  data.width = 64
  data.shuffle_buffer = 64
  data.conditioning_mask = "union"   # stage 2: union (paper M_gen target) | prior
  data.build = ml_collections.ConfigDict(dict(  # python -m data_prep.build
      detector="solutions",           # solutions (bundled mediapipe models) | a path to a .task file
      max_num_hands=2, model_complexity=1, min_detection_confidence=0.1,
      min_tracking_confidence=0.1, static_image_mode=True,
      mask_rule="per_hand_hull",      # per_hand_hull (paper) | joint_hull (the release)
      keep_handless_clips=False, frames_per_shard=256, motion_intensive_fraction=0.1))
  data.demo = ml_collections.ConfigDict(dict(num_clips=2, seed=0))  # procedural clips (--mode=demo)
  return data


def _train_config() -> ml_collections.ConfigDict:
  """Batch: per_device_batch_size > 0 (the hardware variants) makes the global batch per_device_batch_size x the
  devices of the mesh's batch axes (data x fsdp) and global_batch_size is then not used; 0 = global_batch_size,
  which must split evenly over those devices and the hosts."""
  return ml_collections.ConfigDict(dict(
      global_batch_size=2, per_device_batch_size=0, learning_rate=5e-5, warmup_steps=20, weight_decay=0.0,
      adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, grad_clip_norm=1.0, num_steps=4,
      uncond_prob=0.15, log_every=1, checkpoint_every=2, keep_checkpoints=2,
      eval_every=0,                   # > 0: --mode=evaluate's metrics every N steps (config.evaluate)
      profile_start_step=0,           # > 0: trace the profile_num_steps steps after this one into <workdir>/profile
      profile_num_steps=3,
      transfer_guard="allow",
      trainable="all",             # all | release (the release's module subset: 643.8M of 1.41B)
      freeze_background=True))     # outside the mask every target frame = the context latent (release)


def _loss_config() -> ml_collections.ConfigDict:
  """Pixel losses decode x0 in-graph model.frame_chunk frames at a time (lax.map); remat_* recompute the decoder /
  landmark network activations in the backward pass; decode_fn should compute in decode_dtype.

  miou_frames / hand_frames: k random generated frames per clip and step are decoded and scored (uniform without
  replacement, sums scaled by L / k: unbiased); 0 = all L frames, the exact loss. Cost grows linearly with k; the
  estimate's standard deviation per clip as sqrt((L - k) / (k (L - 1))), and it averages down over the batch's
  clips. The demo scores 2 frames without remat: the landmark network dominates a tiny step on a CPU (3 frames
  with remat took 7 s a step, 2 without 3 s); the full-size variants recompute (`paper`)."""
  return ml_collections.ConfigDict(dict(
      alpha_miou=0.1, eta_hand=0.1, miou_frames=2, hand_frames=2, decode_dtype="float32",
      remat_decoder=False, remat_landmarks=False, hand_presence_weight=0.0))


def _compile_report_config() -> ml_collections.ConfigDict:
  """--mode=compile_report, handi_jax/compile_report.py: lower and compile the train step and the sampler for a
  target without running them -> per-device memory, FLOPs, collectives, step-time bounds."""
  return ml_collections.ConfigDict(dict(
      target="devices",               # devices | cpu:N (simulated) | tpu:<topology>, e.g. tpu:v5p:2x4x4
      chip="",                        # handi_jax.chips name for the bounds (e.g. h100); empty = the target's kind
      programs="train_step,sampler",  # comma-separated: train_step, sampler
      parts="none",                   # none | pixel_loss (+ unet_step) | blocks: the train step compiled in parts
      sampler_sizes="384x680,512x512",  # HEIGHTxWIDTH pixels: the release's 680 x 384 and 512 x 512
      # Comma-separated compile_report.json files whose programs are not compiled again: a program that lowers to
      # the same text for the same target takes their figures. The workdir's own report always counts (a stopped
      # report resumes where it stopped).
      reuse=""))


def apply_variants(config: ml_collections.ConfigDict, arg: str | None) -> None:
  names = [a.strip() for a in (arg or "demo").split(",") if a.strip()]
  for name in names:
    if name not in VARIANTS:
      raise ValueError(f"unknown config variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    VARIANTS[name](config)


def _variant_demo(config):
  """Tiny model, demo data, whatever devices exist: a run of both stages that visibly learns in minutes on a 2-core
  CPU.

  With the block-mean VAE, 200 steps fit the procedural hands' motion (the generated clip is closer to the true
  one inside the mask than a still first frame is). What makes that possible: predicting the clean sample (with
  epsilon, 400 steps still sampled noise: x0 = (x_t - sigma eps) / alpha magnifies a young model's errors tenfold
  at high noise), 8 frames of 2 clips, a high learning rate, and a step without the Hand Refinement Loss (its
  landmark network made a step 5x slower; the default test suite runs the step with it).
  """
  config.data.num_frames = 8
  config.diffusion.prediction_type = "sample"
  config.loss.eta_hand = 0.0
  config.train.update(num_steps=200, learning_rate=2e-3, log_every=25, checkpoint_every=200)
  # Stage 1 (configs/stage1.py; --mode=demo trains it after stage 2): its step also decodes 2 frames for the soft
  # mIoU loss and costs 2.5x a stage-2 step, so 40 steps. With the mIoU at weight 1 (only stage 1 reads it) and lr
  # 4e-3 they place demo clip 0's motion area at IoU 0.49 with the true one; at 0.1 and 2e-3, 0.18.
  config.loss.alpha_miou = 1.0
  config.stage1_train.update(num_steps=40, learning_rate=4e-3, log_every=10, checkpoint_every=40)
  config.sampling.guidance_scale = 1.0


def _variant_paper(config):
  """The paper's and the release's hyper-parameters, full-size models."""
  config.model.unet = unet_config(full_size=True)
  config.model.vae = vae_config(full_size=True)
  config.model.text_encoder = text_encoder_config(full_size=True)
  config.data.num_frames = 16
  config.data.height = config.data.width = 256
  # The paper: 48 clips a step (bf16 on 6 H100, 8 a GPU); the release's yaml: 12 a process, no accumulation.
  config.train.global_batch_size = 48
  config.train.learning_rate = 5e-5
  config.train.num_steps = 50_000
  config.train.log_every = 50
  config.train.checkpoint_every = 2000
  config.train.transfer_guard = "disallow"
  config.stage1_train = ml_collections.ConfigDict()  # stage 1 trains with config.train's fields, as the release
  config.diffusion.prediction_type = "epsilon"
  config.loss.alpha_miou = 0.1
  config.loss.eta_hand = 0.1
  # 4 of the 15 generated frames: the pixel losses take 23% of a stage-2 step's FLOPs (31.5 TFLOP a sample)
  # instead of 54% (51.9 TFLOP) with all 15.
  config.loss.miou_frames = config.loss.hand_frames = 4
  config.loss.remat_decoder = config.loss.remat_landmarks = True  # decoder / landmark activations: GBs a clip
  config.sampling.num_inference_steps = 25
  config.sampling.guidance_scale = 9.0
  config.model.remat = "full"


def _variant_h100x8(config):
  """One host with 8 H100: FSDP over the 8 GPUs, bf16 compute, cuDNN attention."""
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1))
  config.num_devices_expected = 8
  config.multihost = False
  config.train.per_device_batch_size = 6   # 48 clips on 8 GPUs: the paper's batch
  config.model.dtype = "bfloat16"
  config.model.attention = "cudnn"


def _variant_tpu_v5p_64(config):
  """A v5p-64 slice: 32 chips on 8 hosts; data x fsdp over all chips, multi-host."""
  config.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=16, tensor=1))
  config.num_devices_expected = 32
  config.multihost = True
  config.train.per_device_batch_size = 2   # 64 clips: the paper's 48 does not split over 32 chips
  config.model.dtype = "bfloat16"
  config.model.attention = "tpu_flash"


VARIANTS = {"demo": _variant_demo, "paper": _variant_paper, "h100x8": _variant_h100x8,
            "tpu_v5p_64": _variant_tpu_v5p_64}
