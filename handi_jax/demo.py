"""`make demo`: the whole job on the embedded default, on CPU in minutes, with no weights and no dataset.

It does what a user would, in order:
1. writes the procedural demo dataset (handi_jax.data.demo_clips) through the real TFRecord writer, unless
   config.data.dir names a dataset;
2. trains the tiny stage-2 UNet on it for config.train.num_steps steps (the `demo` variant's settings), then the
   stage-1 UNet on the same data (configs/stage1.py's fields over this config: config.stage1_train's steps and
   batch, soft mIoU loss), each with checkpoints (stage 1's under <workdir>/stage1);
3. generates, from the trained checkpoints at the size they were trained at, two videos for demo clip 0's first
   frame and caption: the main one from the image and text alone (stage 1 predicts the motion-area mask from the
   dataset's prior mask, stage 2 the video) and one conditioned on the clip's true mask (stage 2 alone); and
   measures how far each is from the true clip inside the true mask;
4. exports the trained stage-2 pipeline to a diffusers/PyTorch directory.
The UNets and text encoder start random and the VAE is the fixed block-mean autoencoder (8 x 8 pixel blocks), so
the videos are blurry: what they show is the motion area and the hand's motion learned from the demo clips, not
realistic hands.
"""

import concurrent.futures
import contextlib
import pathlib
import time

import numpy as np
import tqdm
from PIL import Image

from configs import stage1 as stage1_config
from handi_jax import export, fileio, generate, prompts, train
from handi_jax.components import train_state
from handi_jax.data import demo_clips, input_pipeline, schema
from handi_jax.evaluation import during_training
from handi_jax.media import files as media_files
from handi_jax.media import hand_masks as masks

FROM_TEXT, WITH_TRUE_MASK = "image_and_text", "true_mask"  # the two generated samples' folders


def _demo_sample(config, workdir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, dict, np.ndarray]:
  """First frame and motion-area mask of demo clip 0 as files generation reads, the clip and its (H, W) mask."""
  clip = demo_clips.synthesize_clip(0, config)
  _, union = masks.clip_masks(clip["keypoints"], clip["presence"].astype(bool), config.data.height,
                              config.data.width, config.data.build.mask_rule)
  folder = workdir / "demo_sample"
  folder.mkdir(parents=True, exist_ok=True)
  image, mask = folder / "context.png", folder / "mask.png"
  Image.fromarray(clip["frames"][0]).save(image)
  Image.fromarray(union).save(mask)
  return image, mask, clip, union > 0


def has_steps_left(config, workdir: pathlib.Path) -> bool:
  """Whether training `config` in `workdir` has steps to run: none after the stage's last checkpoint (a rerun)."""
  with contextlib.closing(train_state.checkpoint_manager(config, workdir)) as manager:
    latest = manager.latest_step()
  return latest is None or latest < config.train.num_steps


def distance_inside_mask(video: np.ndarray, clip_frames: np.ndarray, mask: np.ndarray) -> float:
  """How far a video (F, H, W, 3) is from the true clip inside the (H, W) mask: the mean absolute difference in
  0-255 levels over frames 1.."""
  difference = np.abs(video[1:].astype(np.float32) - clip_frames[1:].astype(np.float32))
  return round(float(difference[:, mask].mean()), 2)


def run_demo(config, workdir: str) -> dict:
  """The four phases below, each timed; prints where the outputs are. Returns the summary it writes."""
  if config.stage != 2:
    raise ValueError("--mode=demo takes the stage-2 config (configs/stage2.py); it trains stage 1 from it")
  workdir = pathlib.Path(workdir)
  stage1_dir = workdir / "stage1"
  seconds = {}
  started = time.perf_counter()
  data_dir = config.data.dir or str(demo_clips.write_demo_dataset(workdir / "demo_data", config, progress=True))
  # What a user would pass as flags, set once before any job runs: the data, and generation from this run's
  # checkpoints, stage 1 conditioned on the prior mask it trained with.
  config = config.copy_and_resolve_references()
  config.data.dir = data_dir
  config.generate.stage1_pretrained, config.generate.stage2_pretrained = str(stage1_dir), str(workdir)
  config.generate.prior_mask = str(pathlib.Path(data_dir) / input_pipeline.PRIOR_SPLIT / schema.PRIOR_MASK_PNG)
  seconds["data"] = time.perf_counter() - started

  stages = {2: (config, workdir), 1: (stage1_config.as_stage1(config.copy_and_resolve_references()), stage1_dir)}
  # Tracing holds the GIL and compiling does not, so the work is ordered for the 2 cores: stage 2's step is traced
  # first, alone; then two threads compile it and trace and compile stage 1's, while stage 2 initialises and
  # trains. Compiling either step counts in its stage's phase; a stage trained already (a rerun) compiles nothing.
  started = time.perf_counter()
  compiled_steps = {}
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    if has_steps_left(*stages[2]):
      with tqdm.tqdm(total=1, desc="trace stage-2 train step") as tracing:
        stage2_lowered = train.lower_train_step(config)
        tracing.update()
      compiled_steps[2] = pool.submit(train.compile_train_step, config, stage2_lowered)
    if has_steps_left(*stages[1]):
      compiled_steps[1] = pool.submit(train.compile_train_step, stages[1][0])
    for stage, (stage_config, stage_dir) in stages.items():
      evaluators = during_training.evaluators_from_config(stage_config, stage_dir)
      train.train_and_evaluate(stage_config, str(stage_dir), evaluators, compiled_step=compiled_steps.get(stage))
      seconds[f"train stage {stage}"] = time.perf_counter() - started
      started = time.perf_counter()

  image, mask, clip, inside = _demo_sample(config, workdir)
  caption = clip["caption"]
  # One seed for both: the true-mask video is the one stage 2 alone made before the demo trained stage 1.
  samples = [prompts.Sample(0, FROM_TEXT, image, caption, None),
             prompts.Sample(0, WITH_TRUE_MASK, image, caption, mask)]
  from_text, with_true_mask = generate.generate_samples(config, str(workdir), samples, workdir / "generate")
  # The mp4s as a viewer decodes them: their compression adds about 2 levels everywhere.
  distance = {name: distance_inside_mask(media_files.read_video(folder / "video.mp4"), clip["frames"], inside)
              for name, folder in ((FROM_TEXT, from_text), (WITH_TRUE_MASK, with_true_mask))}
  distance["still_first_frame"] = distance_inside_mask(np.broadcast_to(clip["frames"][:1], clip["frames"].shape),
                                                       clip["frames"], inside)
  seconds["generate"] = time.perf_counter() - started

  started = time.perf_counter()
  export_dir = export.export_from_config(config, str(workdir))
  seconds["export"] = time.perf_counter() - started

  summary = dict(prompt=caption, stage1_checkpoints=str(stage1_dir / "checkpoints"),
                 stage2_checkpoints=str(workdir / "checkpoints"), video=str(from_text / "video.mp4"),
                 gif=str(from_text / "video.gif"), mask=str(from_text / "mask.png"),
                 mask_video=str(from_text / "mask_video.mp4"), flow_map=str(from_text / "flow.png"),
                 video_with_true_mask=str(with_true_mask / "video.mp4"), pytorch_export=str(export_dir),
                 distance_to_true_clip_inside_mask=distance, seconds={k: round(v, 1) for k, v in seconds.items()})
  fileio.write_json(workdir / "demo_summary.json", summary)
  times = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
  paths = "\n".join(f"  {k}: {v}" for k, v in summary.items() if isinstance(v, str))
  print(f"demo finished ({times}):\n{paths}\n  inside the clip's true motion area, the videos differ from the true "
        f"clip by, in levels of 255 on average:\n"
        f"    {distance[FROM_TEXT]}  from the image and text alone (stage 1's mask, then stage 2): video\n"
        f"    {distance[WITH_TRUE_MASK]}  with the clip's true mask (stage 2 alone): video_with_true_mask\n"
        f"    {distance['still_first_frame']}  the first frame held still")
  return summary
