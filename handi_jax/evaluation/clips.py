"""The clips to evaluate (a prompts file with ground-truth videos, or a TFRecord split) and the generated videos of
each run, found on disk or generated now with the pipeline."""

import dataclasses
import json
from collections.abc import Callable

import numpy as np

from handi_jax import fileio, pipeline, prompts, sharding
from handi_jax.data import schema
from handi_jax.media import files as media_files

VIDEO_NAMES = ("video.mp4", "video.gif")


@dataclasses.dataclass
class Clip:
  name: str
  prompt: str
  gt: np.ndarray | fileio.Path    # (F_src, H, W, 3) uint8 (frame 0 = the context image), or its video file
  mask: np.ndarray | None         # (H, W) bool ground-truth motion area; None = from the ground truth's hands
  image: fileio.Path | None       # the source image file (generation), None for TFRecord clips

  def frames(self) -> np.ndarray:
    """The ground-truth frames; a video file is read on use, so a long test set is never all in memory."""
    return self.gt if isinstance(self.gt, np.ndarray) else media_files.read_video(self.gt)


def clips_from_prompts_file(e) -> list[Clip]:
  clips = []
  for where, row in prompts.prompt_rows(fileio.as_path(e.prompts_file), ("source", "target", "prompt"),
                                         "config.evaluate.prompts_file"):
    image = prompts.find_input(e.image_dir, row["source"], f"{where}: source image", "config.evaluate.image_dir")
    video = prompts.find_input(e.gt_dir, row["target"], f"{where}: ground-truth video", "config.evaluate.gt_dir")
    mask = None
    if e.mask_dir:
      mask = np.asarray(media_files.load_image(prompts.find_mask(e.mask_dir, image.stem, "config.evaluate.mask_dir"),
                                            mode="L")) > 127
    clips.append(Clip(image.stem, row["prompt"], video, mask, image))
  return clips


def clips_from_tfrecords(e) -> list[Clip]:
  import tensorflow_datasets as tfds

  if not fileio.as_path(e.data_dir).is_dir():
    raise FileNotFoundError(f"config.evaluate.data_dir {e.data_dir} does not exist (a data_prep output folder)")
  builder = tfds.builder_from_directory(e.data_dir)
  if e.split not in builder.info.splits:
    raise ValueError(f"config.evaluate.split={e.split!r} is not in {e.data_dir}: splits {list(builder.info.splits)}")
  dataset = builder.as_dataset(split=e.split, shuffle_files=False)
  if e.max_clips:
    dataset = dataset.take(e.max_clips)
  return [Clip(record["clip_id"].decode(), record["caption"].decode(), record["frames"],
               record["union_mask"][..., 0] > 127, None) for record in tfds.as_numpy(dataset)]


def load_clips(config) -> list[Clip]:
  e = config.evaluate
  if e.prompts_file:
    clips = clips_from_prompts_file(e)
  elif e.data_dir:
    clips = clips_from_tfrecords(e)
  else:
    raise ValueError("nothing to evaluate: set config.evaluate.prompts_file (+ image_dir, gt_dir) or "
                     "config.evaluate.data_dir (+ split)")
  return clips[:e.max_clips] if e.max_clips else clips


def motion_intensive_from_data(config) -> set[str] | None:
  """The data's own motion_intensive.json clip ids, when evaluating a TFRecord split that has one."""
  e = config.evaluate
  index = fileio.as_path(e.data_dir) / e.split / schema.MOTION_INTENSIVE if e.data_dir and not e.prompts_file else None
  if index is None or not fileio.is_committed(index):
    return None
  return {c["clip_id"] for c in json.loads(index.read_text())["clips"]}


# ---------------------------------------------------------------------------------------------------
# Generated videos.


def parse_runs(runs: str) -> dict[str, fileio.Path]:
  parsed = {}
  for item in filter(None, (part.strip() for part in runs.split(","))):
    name, sep, folder = item.partition("=")
    if not sep or not name or not folder:
      raise ValueError(f"config.evaluate.runs: {item!r} is not name=folder (e.g. handi=runs/g/generate)")
    if not fileio.as_path(folder).is_dir():
      raise FileNotFoundError(f"config.evaluate.runs: folder {folder!r} of run {name!r} does not exist")
    parsed[name] = fileio.as_path(folder)
  return parsed


class UnusableVideo(ValueError):
  """A run's video of one clip that cannot be scored (missing, unreadable, too few or too many frames, another
  shape); evaluate_runs skips that clip for that run and reports this reason."""


def find_generated(folder: fileio.Path, name: str) -> fileio.Path:
  candidates = [folder / name / v for v in VIDEO_NAMES] + [folder / f"{name}{s}" for s in (".mp4", ".gif")]
  for candidate in candidates:
    if fileio.is_committed(candidate):
      return candidate
  raise UnusableVideo(f"missing: none of {', '.join(str(c.relative_to(folder)) for c in candidates)}")


def read_generated(folder: fileio.Path, name: str) -> np.ndarray:
  return media_files.read_video(find_generated(folder, name))


def read_checked(video: fileio.Path, minimum_frames: int) -> np.ndarray:
  """The frames of a run's video; UnusableVideo when it cannot be decoded or has fewer than minimum_frames."""
  try:
    frames = media_files.read_video(video)
  except Exception as e:  # whatever the decoder raises for this one file (OSError, ValueError, ...)
    first_line = (str(e).splitlines() or [""])[0]  # imageio's errors go on with install hints
    raise UnusableVideo(f"unreadable ({type(e).__name__}: {first_line})") from e
  if len(frames) < minimum_frames:
    raise UnusableVideo(f"{len(frames)} frames where at least {minimum_frames} are needed")
  return frames


def generate_run(make_generator: Callable[[], pipeline.Generator], clips: list[Clip],
                 out_dir: fileio.Path) -> fileio.Path:
  """Generate every clip this process owns that is not yet done in out_dir (stage 1 predicts the mask; clip i
  belongs to process i % process_count, pipeline.generate_owned); the generator is made only when a clip is left to
  generate. Every process must call this: the caller waits for the others before reading their videos."""
  samples = []
  for index, clip in enumerate(clips):
    image = clip.image
    if image is None:  # a TFRecord clip: its context frame becomes the source image
      image = out_dir / "sources" / f"{clip.name}.png"
    samples.append(prompts.Sample(index, clip.name, image, clip.prompt, None))
  for sample, clip in zip(sharding.process_share(samples), sharding.process_share(clips), strict=True):
    if clip.image is None and not fileio.is_committed(sample.image):
      sample.image.parent.mkdir(parents=True, exist_ok=True)
      media_files.write_png(sample.image, clip.frames()[0])
  pipeline.generate_owned(make_generator, samples, out_dir)
  return out_dir
