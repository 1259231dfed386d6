"""Evaluation during training: the evaluators handed to train.train_and_evaluate, built from the config.

The evaluator generates config.evaluate's clips with the UNet being trained as the stage-`config.stage` UNet (the
other stage as config.generate names it) and scores them into <workdir>/eval/step_<step>/. It samples with the
train state's own arrays and the frozen models training already holds: no checkpoint is read and no weight is
copied, so device memory holds one set of weights (sampling's activations at evaluation sizes are small next to the
train step's). With several processes those arrays span hosts that one process cannot read alone, so every process
restores the step's weights from the checkpoint training has just written onto its own devices; each generates and
scores the clips it owns (pipeline.generate_owned, scoring.evaluate_runs) and process 0 writes the report.
"""

import os

import jax
import numpy as np

from handi_jax import fileio, pipeline, sharding
from handi_jax.components import frozen as frozen_lib
from handi_jax.components import unet as unet_lib
from handi_jax.evaluation import clips as clips_lib
from handi_jax.evaluation import scoring
from handi_jax.media import files as media_files


class GenerationEvaluator:
  """evaluator(step, unet, frozen models, tokenizer) -> (scalars, images) for train.train_and_evaluate."""

  def __init__(self, config, workdir: str | os.PathLike):
    self.config = config
    self.workdir = fileio.as_path(workdir)
    self.clips = clips_lib.load_clips(config)  # read once: a bad prompts file fails before training starts

  def __call__(self, step: int, unet, frozen_models, tokenizer) -> tuple[dict, dict]:
    # Out of training's mesh, which spans every process: what the evaluation makes lives on this process's devices.
    with jax.set_mesh(sharding.batch_mesh(jax.local_devices())):
      return self._evaluate(step, unet, frozen_models, tokenizer)

  def _evaluate(self, step: int, unet, frozen_models, tokenizer) -> tuple[dict, dict]:
    if jax.process_count() > 1:
      unet = unet_lib.restore_unet(self.config, self.workdir, step)
      frozen_models, tokenizer = frozen_lib.load_frozen_models(self.config, hand_landmarks=False)
    out_dir = self.workdir / "eval" / f"step_{step}"
    generator = lambda: pipeline.Generator(self.config, frozen_models, tokenizer, {int(self.config.stage): unet})
    runs = {"generated": clips_lib.generate_run(generator, self.clips, out_dir / "generated")}
    sharding.wait_for_processes(f"evaluation at step {step}: generated")  # scoring reads every process's videos
    summary = scoring.evaluate_runs(self.config, self.clips, runs, out_dir)["generated"]
    sheets = sorted(out_dir.glob("contact_*.png"))
    images = {f"eval/{p.stem}": np.asarray(media_files.load_image(p))[None] for p in sheets}
    return scoring.training_scalars(summary), images


def evaluators_from_config(config, workdir) -> list[GenerationEvaluator]:
  """The evaluators config.train.eval_every asks for (none when it is 0)."""
  return [GenerationEvaluator(config, workdir)] if config.train.eval_every else []
