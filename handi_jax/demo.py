"""`make demo`: the whole job on the embedded default, on CPU in minutes, with no weights and no dataset.

It does what a user would, in order:
1. writes the procedural demo dataset (handi_jax.data.demo_clips) through the real TFRecord writer, unless
   config.data.dir names a dataset;
2. trains the tiny stage-2 UNet on it for config.train.num_steps steps (the `demo` variant's settings), with
   checkpoints;
3. generates a video from the trained checkpoint for demo clip 0's first frame and caption, conditioned on
   that clip's motion-area mask (a user mask skips stage 1, which the demo does not train), and measures how
   far it is from the true clip inside the mask;
4. exports the trained pipeline to a diffusers/PyTorch directory.
The UNet and text encoder start random and the VAE is the fixed block-mean autoencoder (8 x 8 pixel blocks), so
the video is blurry: what it shows is the hand's motion learned from the demo clips, not realistic hands.
"""

import pathlib
import time

import numpy as np
from PIL import Image

from handi_jax import export, fileio, generate, prompts, train
from handi_jax.data import demo_clips
from handi_jax.evaluation import during_training
from handi_jax.media import files as media_files
from handi_jax.media import hand_masks as masks


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


def distance_inside_mask(video: np.ndarray, clip_frames: np.ndarray, mask: np.ndarray) -> dict:
  """How far a generated video (F, H, W, 3) is from the true clip inside the (H, W) mask: the mean absolute
  difference in 0-255 levels over frames 1.., and the same for the first frame held still (what an untrained
  model that only keeps the context would score)."""
  truth = clip_frames[1:].astype(np.float32)
  still = np.broadcast_to(clip_frames[:1], truth.shape).astype(np.float32)
  inside = lambda frames: float(np.abs(frames - truth)[:, mask].mean())
  return dict(generated=round(inside(video[1:].astype(np.float32)), 2), still_first_frame=round(inside(still), 2))


def run_demo(config, workdir: str) -> dict:
  """The four phases below, each timed; prints where the outputs are. Returns the summary it writes."""
  workdir = pathlib.Path(workdir)
  seconds = {}
  started = time.perf_counter()
  data_dir = config.data.dir or str(demo_clips.write_demo_dataset(workdir / "demo_data", config, progress=True))
  # What a user would pass as flags, set once before any job runs: the data, and generation from this run's
  # checkpoint at the size it trained at.
  config = config.copy_and_resolve_references()
  config.data.dir = data_dir
  config.generate.stage2_pretrained = str(workdir)
  config.sampling.height, config.sampling.width = config.data.height, config.data.width
  seconds["data"] = time.perf_counter() - started

  started = time.perf_counter()
  evaluators = during_training.evaluators_from_config(config, workdir)
  train.train_and_evaluate(config, str(workdir), evaluators)  # compiling the step is part of this phase
  seconds["train"] = time.perf_counter() - started

  started = time.perf_counter()
  image, mask, clip, inside = _demo_sample(config, workdir)
  caption = clip["caption"]
  sample = prompts.Sample(0, image.stem, image, caption, mask)
  (sample_dir,) = generate.generate_samples(config, str(workdir), [sample], workdir / "generate")
  # The mp4 as a viewer decodes it: its compression adds about 2 levels everywhere.
  distance = distance_inside_mask(media_files.read_video(sample_dir / "video.mp4"), clip["frames"], inside)
  seconds["generate"] = time.perf_counter() - started

  started = time.perf_counter()
  export_dir = export.export_from_config(config, str(workdir))
  seconds["export"] = time.perf_counter() - started

  summary = dict(prompt=caption, checkpoints=str(workdir / "checkpoints"), video=str(sample_dir / "video.mp4"),
                 gif=str(sample_dir / "video.gif"), mask=str(sample_dir / "mask.png"),
                 flow_map=str(sample_dir / "flow.png"), pytorch_export=str(export_dir),
                 distance_to_true_clip_inside_mask=distance, seconds={k: round(v, 1) for k, v in seconds.items()})
  fileio.write_json(workdir / "demo_summary.json", summary)
  times = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
  paths = "\n".join(f"  {k}: {v}" for k, v in summary.items() if isinstance(v, str))
  print(f"demo finished ({times}):\n{paths}\n  inside the mask, the video differs from the true clip by "
        f"{distance['generated']} levels of 255 on average (the first frame held still: "
        f"{distance['still_first_frame']})")
  return summary
