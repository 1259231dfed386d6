"""`make demo`: the whole job on the embedded default, on CPU in minutes, with no weights and no dataset.

It does what a user would, in order:
1. writes the procedural demo dataset (data_prep.demo_data) through the real TFRecord writer, unless
   config.data.dir names a dataset;
2. trains the tiny stage-2 model on it for config.train.num_steps steps (noise + Hand Refinement Loss with
   the real MediaPipe landmark network), with checkpoints;
3. generates a video from the trained checkpoint for one demo clip's first frame and caption, conditioned on
   that clip's motion-area mask (a user mask skips stage 1, which the demo does not train);
4. exports the trained pipeline to a diffusers/PyTorch directory.
The models are tiny and randomly initialised: the outputs show the pipeline working, not realistic videos.
"""

import json
import pathlib
import time

from PIL import Image

from data_prep import demo_data, masks
from handi_jax import export, fileio, generate, train


def _demo_sample(config, workdir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, str]:
  """First frame, motion-area mask and caption of demo clip 0, as files generation reads."""
  clip = demo_data.synthesize_clip(0, config)
  _, union = masks.clip_masks(clip["keypoints"], clip["presence"].astype(bool), config.data.height,
                              config.data.width, config.data.build.mask_rule)
  folder = workdir / "demo_sample"
  folder.mkdir(parents=True, exist_ok=True)
  image, mask = folder / "context.png", folder / "mask.png"
  Image.fromarray(clip["frames"][0]).save(image)
  Image.fromarray(union).save(mask)
  return image, mask, clip["caption"]


def run_demo(config, workdir: str) -> dict:
  """The four phases below, each timed; prints where the outputs are. Returns the summary it writes."""
  workdir = pathlib.Path(workdir)
  seconds = {}
  started = time.perf_counter()
  if not config.data.dir:
    with config.unlocked():
      config.data.dir = str(demo_data.write_demo_dataset(workdir / "demo_data", config, progress=True))
  seconds["data"] = time.perf_counter() - started

  started = time.perf_counter()
  train.train_and_evaluate(config, str(workdir))  # compiling the step is part of this phase
  seconds["train"] = time.perf_counter() - started

  started = time.perf_counter()
  image, mask, caption = _demo_sample(config, workdir)
  with config.unlocked():
    config.generate.update(image=str(image), mask=str(mask), prompt=caption, stage2_pretrained=str(workdir),
                           output_dir=str(workdir / "generate"))
    config.sampling.height, config.sampling.width = config.data.height, config.data.width
  (sample_dir,) = generate.generate_from_config(config, str(workdir))
  seconds["generate"] = time.perf_counter() - started

  started = time.perf_counter()
  export_dir = export.export_from_config(config, str(workdir))
  seconds["export"] = time.perf_counter() - started

  summary = dict(prompt=caption, checkpoints=str(workdir / "checkpoints"), video=str(sample_dir / "video.mp4"),
                 gif=str(sample_dir / "video.gif"), mask=str(sample_dir / "mask.png"),
                 flow_map=str(sample_dir / "flow.png"), pytorch_export=str(export_dir),
                 seconds={k: round(v, 1) for k, v in seconds.items()})
  fileio.write_text(workdir / "demo_summary.json", json.dumps(summary, indent=2) + "\n")
  times = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
  print(f"demo finished ({times}); the models are tiny and random, so the video shows the pipeline, not hands:\n"
        + "\n".join(f"  {k}: {v}" for k, v in summary.items() if k != "seconds"))
  return summary
