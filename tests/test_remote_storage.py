"""Every path a user gives on a remote filesystem: data preparation, training, generation, evaluation and export
read their inputs from, and write their outputs to, an emulated bucket through the commands' own entry points.

The emulated bucket is TensorFlow's `ram://` filesystem. tf.io.gfile serves it, so what TensorFlow reads itself
(tf.data's TFRecordDataset, TFDS's metadata) and what handi_jax.fileio reads and writes through etils.epath's
TensorFlow backend (the backend epath uses for gs:// when TensorFlow is installed) reach the same storage, as
they reach a gs:// bucket, with no network or credentials to fake. It is not the local disk, so fileio commits to
it by its object-store rule. Its limits, and how these tests live with them:
- it lives in this process's memory: the commands run in this process through their entry points
  (handi_jax.main.run_mode, what `python -m handi_jax.main --mode=...` runs once its flags are parsed, and
  data_prep.build.build), and data_prep's local build runs with one worker (a worker process has a memory of
  its own);
- orbax writes checkpoint arrays through TensorStore, whose own drivers reach a local disk, gs:// and s3://, not
  tf.io.gfile's other schemes: a training workdir stays local here (with it export's <workdir>/export in the
  chained test; the export test writes one into the bucket from a workdir without checkpoints), and a ram://
  training workdir is refused with a message that says so. gs:// checkpoints are orbax's own path.
"""

import json
import pathlib
import uuid

import numpy as np
import pytest

from configs import common
from data_prep import build
from handi_jax import fileio, main, pipeline, tokenizers
from handi_jax.components import frozen, train_state
from handi_jax.components import unet as unet_lib
from handi_jax.convert import core
from handi_jax.data import demo_clips, schema
from handi_jax.evaluation import scoring
from handi_jax.media import files as media_files
from tests import test_evaluate_extractors as weights_files
from tests.helpers import tiny_train_config
from tests.test_data_build import _config as build_config
from tests.test_data_scale import _files, two_clips  # noqa: F401 - two_clips is a fixture used here
from tests.test_generate import FRAMES, HEIGHT, WIDTH
from tests.test_generate import _config as generation_config


@pytest.fixture
def bucket():
  yield f"ram://bucket-{uuid.uuid4().hex[:12]}"
  # A path handled as a local one would have made a folder named "ram:" in the working directory.
  assert not pathlib.Path("ram:").exists()


def _upload(local: pathlib.Path, remote: str) -> None:
  """A plain copy into the bucket, as `gsutil cp` makes one (no commit marker)."""
  fileio.as_path(remote).parent.mkdir(parents=True, exist_ok=True)
  fileio.as_path(remote).write_bytes(local.read_bytes())


def _tree(remote) -> dict[str, bytes]:
  """Every file under `remote`, by path relative to it."""
  files, root = {}, fileio.as_path(remote)
  pending = [root]
  while pending:
    for child in pending.pop().iterdir():
      if child.is_dir():
        pending.append(child)
      else:
        files[str(child)[len(str(root)) + 1:]] = child.read_bytes()
  return files


def _upload_generation_inputs(shared_data, bucket: str) -> None:
  frames = shared_data / "ek_frames"
  lines = (frames / "prompt.json").read_text().splitlines()[:2]
  fileio.as_path(f"{bucket}/prompt.json").write_text("\n".join(lines) + "\n")
  for stem in ("1", "2"):
    _upload(frames / f"{stem}.png", f"{bucket}/frames/{stem}.png")
    _upload(frames / f"{stem}_mask.png", f"{bucket}/masks/{stem}_mask.png")


def test_data_prep_builds_into_a_bucket_from_videos_and_captions_there(two_clips, bucket):  # noqa: F811
  """The local build and the Beam build, from a bucket into a bucket, write what the local build writes on
  disk, byte for byte (the rejected clip's message names where its video was looked for); a rerun reuses every
  shard the bucket holds."""
  for name in ("31.mp4", "816.mp4", "captions.json"):
    _upload(two_clips / name, f"{bucket}/videos/{name}")
  reference = {name: data.replace(str(two_clips).encode(), f"{bucket}/videos".encode())
               for name, data in _files(two_clips / "local").items()}
  summary = build.build(build_config(), f"{bucket}/videos/captions.json", f"{bucket}/data", workers=1,
                        progress=False)
  assert (summary.num_clips, summary.num_rejected) == (2, 1)
  assert _tree(f"{bucket}/data") == reference
  again = build.build(build_config(), f"{bucket}/videos/captions.json", f"{bucket}/data", workers=1, progress=False)
  assert again.shards_reused == again.num_shards == 2
  build.build(build_config(), f"{bucket}/videos/captions.json", f"{bucket}/beam", runner="DirectRunner")
  assert _tree(f"{bucket}/beam") == reference


def test_training_reads_its_dataset_from_a_bucket(bucket, tmp_path):
  """test_train's tiny stage-2 config: the two share one compiled train step."""
  config = tiny_train_config(steps=2)
  config.data.dir = f"{bucket}/data"
  demo_clips.write_demo_dataset(config.data.dir, config)
  assert fileio.is_committed(f"{bucket}/data/{schema.MANIFEST}") and schema.split_files(config.data.dir, "train")
  main.run_mode(config, str(tmp_path / "run"), "train")
  assert train_state.checkpoint_manager(config, tmp_path / "run").latest_step() == 2
  with pytest.raises(ValueError, match=r"orbax stores them on a local disk, gs:// or s3:// only"):
    train_state.checkpoint_directory(f"{bucket}/run")


def test_generation_reads_images_prompts_and_masks_from_a_bucket_and_writes_there(shared_data, bucket, monkeypatch,
                                                                                 tmp_path):
  """test_generate's tiny models and sizes (its compiled sampler is reused), every path in the bucket."""
  _upload_generation_inputs(shared_data, bucket)
  config = generation_config(tmp_path, prompts_file=f"{bucket}/prompt.json", image_dir=f"{bucket}/frames",
                             mask_dir=f"{bucket}/masks", output_dir="")
  main.run_mode(config, f"{bucket}/g", "generate")
  for stem in ("1", "2"):
    out = fileio.as_path(f"{bucket}/g/generate/{stem}")
    assert fileio.is_committed(out / "done.json")
    assert json.loads((out / "done.json").read_text())["mask_source"] == f"{bucket}/masks/{stem}_mask.png"
    assert media_files.read_video(out / "video.mp4").shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert media_files.read_video(out / "video.gif").shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert sorted(p.name for p in out.iterdir()) == ["done.json", "flow.png", "mask.png", "video.gif", "video.mp4"]
  # A rerun resumes from the bucket's done markers: nothing is left to generate, so no model is built.
  monkeypatch.setattr(pipeline.Generator, "from_config", lambda *a, **k: pytest.fail("regenerated a done sample"))
  main.run_mode(config, f"{bucket}/g", "generate")


def _upload_evaluation_inputs(shared_data, root: str) -> None:
  """Two clips in the release's layout and a run whose videos are the ground truth, 6 frames each."""
  rows = []
  for name, prompt in (("31", "julienne the carrot"), ("816", "knit the fabric")):
    gt = media_files.read_video(shared_data / "clips" / f"{name}.gif")
    gt = gt[np.round(np.linspace(0, len(gt) - 1, 6)).astype(int)]
    media_files.write_gif(f"{root}/gt/{name}.gif", gt, 8)
    media_files.write_gif(f"{root}/same/{name}/video.gif", gt, 8)
    fileio.write_bytes(f"{root}/source/{name}.png", (shared_data / "clips" / f"{name}.png").read_bytes())
    rows.append(json.dumps(dict(source=f"source/{name}.png", target=f"target/{name}.gif", prompt=prompt)))
  fileio.write_text(f"{root}/prompt.json", "\n".join(rows) + "\n")


def _evaluate(root: str) -> dict:
  config = common.get_config(2)
  config.evaluate.update(prompts_file=f"{root}/prompt.json", image_dir=f"{root}/source", gt_dir=f"{root}/gt",
                         runs=f"same={root}/same", output_dir=f"{root}/out")
  main.run_mode(config, f"{root}/work", "evaluate")
  return json.loads(fileio.as_path(f"{root}/out/summary.json").read_text())


def test_evaluation_of_runs_in_a_bucket_writes_its_report_there_and_equals_the_local_one(shared_data, bucket,
                                                                                           tmp_path):
  _upload_evaluation_inputs(shared_data, bucket)
  _upload_evaluation_inputs(shared_data, str(tmp_path))
  remote = _evaluate(bucket)
  assert remote == _evaluate(str(tmp_path))
  assert remote["runs"]["same"]["all"]["full"]["clips"] == 2
  for name in ("summary.json", "report.md", "metrics.csv", "metrics.png", "hs_err.png", "config.json"):
    assert fileio.is_committed(f"{bucket}/out/{name}"), name


def test_evaluation_weights_in_a_bucket_load_as_the_local_files_do(bucket, tmp_path):
  """config.evaluate.egovlp (a file) and .blip (a folder with tokenizers) in the bucket: test_evaluate_extractors'
  tiny weights, the same models as from the local disk."""
  weights_files.write_egovlp_checkpoint(tmp_path / "egovlp.safetensors")
  weights_files.write_blip_directory(tmp_path / "blip")
  for file in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
    _upload(file, f"{bucket}/{file.relative_to(tmp_path).as_posix()}")

  def loaded(root: str) -> list[dict]:
    config = common.get_config(2)
    config.evaluate.update(egovlp=f"{root}/egovlp.safetensors", egovlp_frames=3, blip=f"{root}/blip")
    found = scoring.extractors_from_config(config)
    tokens = [tokenizer("cut the carrot")["input_ids"]
              for tokenizer in (found.blip.captioner_tokenizer, found.blip.text_tokenizer)]
    return tokens, [core.flat_params(m) for m in (found.egovlp.model, found.blip.captioner, found.blip.text_encoder)]

  (remote_tokens, remote), (local_tokens, local) = loaded(bucket), loaded(str(tmp_path))
  assert remote_tokens == local_tokens and all(len(ids) > 2 for ids in local_tokens)
  for ours, theirs in zip(remote, local, strict=True):
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in theirs)


def test_export_writes_a_pipeline_into_a_bucket_that_loads_back(bucket):
  """A workdir without checkpoints exports the random initialisation training starts from; the bucket's copy
  then loads as config.model.pretrained (a pipeline directory in the bucket), with the same weights."""
  config = tiny_train_config()
  main.run_mode(config, f"{bucket}/run", "export")
  export = fileio.as_path(f"{bucket}/run/export")
  assert fileio.is_committed(export)
  assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"} <= {
      p.name for p in export.iterdir()}
  exported = (unet_lib.build_unet(config), *frozen.load_vae_and_text_encoder(config)[:2])
  config.model.pretrained = str(export)
  vae, text_encoder, tokenizer = frozen.load_vae_and_text_encoder(config)
  for loaded, expected in zip((unet_lib.load_unet(config, export), vae, text_encoder), exported, strict=True):
    loaded, expected = core.flat_params(loaded), core.flat_params(expected)
    assert loaded.keys() == expected.keys()
    assert all(np.array_equal(loaded[k], expected[k]) for k in expected)
  assert tokenizers.tokenize(tokenizer, "cut")[0, :5].tolist() == [512, 99, 117, 256 + 116, 513]  # the demo one


@pytest.mark.slow
def test_train_generate_evaluate_export_with_every_path_but_the_checkpoints_in_a_bucket(shared_data, bucket,
                                                                                       tmp_path):
  """The chain as a pod runs it: data in the bucket -> train 2 steps -> generate with the trained UNet from images,
  prompts and masks in the bucket into it -> evaluate that run against ground truth in the bucket -> export."""
  config = tiny_train_config(steps=2)
  config.data.dir = f"{bucket}/data"
  demo_clips.write_demo_dataset(config.data.dir, config)
  run = str(tmp_path / "run")
  main.run_mode(config, run, "train")
  _upload_generation_inputs(shared_data, bucket)
  config.sampling.num_inference_steps = 2
  config.generate.update(prompts_file=f"{bucket}/prompt.json", image_dir=f"{bucket}/frames",
                         mask_dir=f"{bucket}/masks", stage2_pretrained=run, output_dir=f"{bucket}/generated")
  main.run_mode(config, f"{bucket}/g", "generate")
  for stem in ("1", "2"):  # the prompts file names target/<stem>.mp4: the run's own videos stand in for them
    fileio.write_bytes(f"{bucket}/gt/{stem}.mp4", fileio.as_path(f"{bucket}/generated/{stem}/video.mp4").read_bytes())
  config.evaluate.update(prompts_file=f"{bucket}/prompt.json", image_dir=f"{bucket}/frames", gt_dir=f"{bucket}/gt",
                         runs=f"trained={bucket}/generated", output_dir=f"{bucket}/eval")
  main.run_mode(config, f"{bucket}/e", "evaluate")
  summary = json.loads(fileio.as_path(f"{bucket}/eval/summary.json").read_text())
  assert summary["runs"]["trained"]["all"]["full"]["clips"] == 2
  main.run_mode(config, run, "export")
  assert (tmp_path / "run" / "export" / "unet" / unet_lib.TRAINING_SIZE_FILE).is_file()
