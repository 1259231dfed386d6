"""Generation: one image + an action text -> a hand video, with HANDI's two stages.

    python -m handi_jax.generate --image=kitchen.png --prompt="julienne the carrot" --output_dir=out
    python -m handi_jax.generate --prompts_file=prompt.json --image_dir=frames --output_dir=out --size=384x680
    python -m handi_jax.main --config=configs/stage2.py:paper --mode=generate --workdir=runs/g \\
        --config.generate.prompts_file=prompt.json --config.model.pretrained=/path/to/pipeline

Input: `config.generate.image` + `.prompt` (optionally `.mask`, which skips stage 1), or `.prompts_file`, a
JSON-lines file in the original release's format (`{"source": "source/1.png", "target": ..., "prompt": ...}`
per line; images at `image_dir/source`, or `image_dir/<file name>`; masks, if `mask_dir` is set, at
`mask_dir/<stem>_mask.png` or `<stem>.png`). A batch resumes: a sample whose `done.json` exists is skipped.

Devices and processes: with several processes (multi-host, or processes started by hand), the sample at global
index i (its line in the prompts file) belongs to process i % process_count, which alone generates and writes it;
each process logs the names of the samples it owns. A process samples config.generate.batch_size samples per local
device at once (samples of one model size share a batch). A sample's video depends only on its inputs, config.seed
and its global index, not on how many devices or processes ran the job. Processes write into one output_dir: a
shared (or bucket) path when they run on different hosts.

Per sample, in `output_dir/<image stem>/` (default output_dir: `<workdir>/generate`):
  video.mp4, video.gif   config.data.num_frames frames at config.generate.fps; frame 0 is the context image itself
  mask.png               the binary motion-area mask stage 2 used (stage 1's, cleaned; or the user's)
  mask_video.mp4         stage 1's decoded mask video (only when stage 1 ran)
  flow.png               motion-flow map: per pixel, the share of the L consecutive-frame pairs whose
                         Farneback flow exceeds config.generate.flow_threshold px, as a heat map on the image
  done.json              written last: prompt, sizes, mask source, seconds

Size: by default the area the UNet was trained at, in the image's aspect ratio (a square image gets the training
size itself; handi_jax.pipeline says where the size is recorded). `--size=HEIGHTxWIDTH` fixes the size
(config.sampling.height and width); `--size=S` asks for an area of S x S pixels in the image's aspect ratio
(config.sampling.target_area = S * S). Sides are multiples of 8.

The pipeline itself (sizes, stages, sampling, where the models come from) is handi_jax.pipeline.
"""

import pathlib
import re

from handi_jax import command_line, fileio, pipeline, prompts


def generate_samples(config, workdir, samples: list[prompts.Sample], out_root: pathlib.Path,
                     mode: str = "generate") -> list[pathlib.Path]:
  """pipeline.generate_owned with config's models; returns the output folders of this process's samples."""
  owned = pipeline.generate_owned(lambda: pipeline.Generator.from_config(config, workdir), samples, out_root, mode)
  return [out_root / s.name for s in owned]


def _run_all(config, workdir, mode: str) -> list[pathlib.Path]:
  default_dir = "generate" if mode == "generate" else "masks"
  out_root = fileio.as_path(config.generate.output_dir or fileio.as_path(workdir) / default_dir)
  return generate_samples(config, workdir, prompts.samples_from_config(config), out_root, mode)


def generate_from_config(config, workdir) -> list[pathlib.Path]:
  """--mode=generate: every sample of config.generate (this process's share); returns their output folders."""
  return _run_all(config, workdir, "generate")


def predict_masks_from_config(config, workdir) -> list[pathlib.Path]:
  """--mode=predict_masks: stage 1 and the clean-up only (mask.png, mask_video.mp4 per sample)."""
  return _run_all(config, workdir, "predict_masks")


def set_size(sampling, size: str) -> None:
  """--size into config.sampling (see the module docstring); empty leaves it as it is."""
  if not size:
    return
  match = re.fullmatch(r"(\d+)(?:x(\d+))?", size.strip())
  if match is None:
    raise ValueError(f"--size={size!r}: expected HEIGHTxWIDTH (e.g. 384x680) or S for an area of S x S px in the "
                     "image's aspect ratio (e.g. 256)")
  side, width = match.groups()
  if width:
    sampling.height, sampling.width = int(side), int(width)
  else:
    sampling.target_area, sampling.height, sampling.width = int(side) ** 2, 0, 0


def _print_folders(config, workdir, size: str) -> None:
  set_size(config.sampling, size)
  for folder in generate_from_config(config, workdir):
    print(folder)


if __name__ == "__main__":
  command_line.run("generate", ("image", "prompt", "mask", "prompts_file", "image_dir", "mask_dir", "output_dir",
                                "stage1_pretrained", "stage2_pretrained"),
                   "runs/generate", "Working directory (default output_dir, demo tokenizer).", _print_folders,
                   options=(command_line.Option(
                       "size", "", "HEIGHTxWIDTH (e.g. 384x680), or S for an area of S x S px in the image's aspect "
                       "ratio (e.g. 256); default: the area the UNet was trained at."),))
