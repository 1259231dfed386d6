"""`python -m handi_jax.convert` and `--mode=export`: whole tiny pipelines PyTorch -> JAX -> PyTorch, bit-exact;
clear errors."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import diffusers
import huggingface_hub
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs import common
from handi_jax import export
from handi_jax import pipeline as generation
from handi_jax.convert import cli, core, hub, pipeline
from handi_jax.convert import unet as convert_unet
from handi_jax.models.unet3d import UNet3DConditionModel
from tests.conftest import REPO_ROOT
from tests.helpers import write_tiny_tokenizer
from tests.reference_torch import diffusers_vae
from tests.test_main import logging_restored_afterwards

SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
             "prediction_type": "epsilon"}
# The demo UNet with the 8 temporal heads PyTorch's UNet3DConditionModel hard-codes (needed for export).
UNET = dict(common.unet_config(full_size=False), transformer_in_heads=8)


def _stock_diffusers_unet():
  torch.manual_seed(3)
  down, up = convert_unet.block_types(len(UNET["block_out_channels"]))
  return diffusers.UNet3DConditionModel(
      down_block_types=down, up_block_types=up, sample_size=8, in_channels=4, out_channels=4,
      block_out_channels=UNET["block_out_channels"], layers_per_block=1,
      attention_head_dim=8, cross_attention_dim=32, norm_num_groups=32).eval()


def _write_random_handi_unet(directory):
  """Random parameters in the release's key format, written without running any initialiser (slow on a CPU)."""
  rng = np.random.default_rng(5)
  abstract = nnx.state(nnx.eval_shape(lambda: UNet3DConditionModel(UNET, rngs=nnx.Rngs(0))), nnx.Param)
  params = {".".join(map(str, path)): (0.05 * rng.standard_normal(v.value.shape)).astype(np.float32)
            for path, v in nnx.to_flat_state(abstract)}
  state = convert_unet.export_state_dict(params, UNET, "original")
  core.write_model_dir(directory, convert_unet.to_pretrained_config(UNET, "original"), state, convert_unet.WEIGHTS_NAME)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
  """Two tiny pipelines sharing VAE, text encoder, tokenizer and scheduler: a stock diffusers UNet and a HANDI one."""
  root = tmp_path_factory.mktemp("pipelines")
  stock = root / "stock"
  diffusers_vae(common.vae_config(full_size=False)).save_pretrained(stock / "vae")
  torch.manual_seed(4)
  transformers.CLIPTextModel(transformers.CLIPTextConfig(**common.text_encoder_config(full_size=False))).save_pretrained(
      stock / "text_encoder")
  write_tiny_tokenizer(stock / "tokenizer")
  (stock / "scheduler").mkdir()
  (stock / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
  (stock / "model_index.json").write_text(json.dumps(pipeline.MODEL_INDEX))
  _stock_diffusers_unet().save_pretrained(stock / "unet")
  handi = root / "handi"
  shutil.copytree(stock, handi, ignore=shutil.ignore_patterns("unet"))
  _write_random_handi_unet(handi / "unet")
  return dict(stock=stock, handi=handi)


def _assert_same_weights(a, b, component):
  """Same tensors; text encoder names compared without the `text_model.` prefix transformers 5 leaves out."""

  def read(directory):
    return {k.removeprefix("text_model."): v for k, v in core.read_state_dict(directory / component).items()}

  left, right = read(a), read(b)
  assert sorted(left) == sorted(right), component
  for key in left:
    assert left[key].dtype == right[key].dtype, key
    np.testing.assert_array_equal(left[key], right[key], err_msg=f"{component}: {key}")


def _assert_same_files(a, b):
  files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
  for file in files:
    assert (a / file).read_bytes() == (b / file).read_bytes(), file


def test_stock_pipeline_round_trip_through_the_cli_is_bit_exact(pipelines, tmp_path, capsys):
  """Legacy .bin weights in, safetensors out: every tensor bit-exact, and the libraries load the result."""
  source = tmp_path / "legacy"
  shutil.copytree(pipelines["stock"], source)
  diffusers.UNet3DConditionModel.from_pretrained(source / "unet").save_pretrained(source / "unet",
                                                                                   safe_serialization=False)
  (source / "unet" / "diffusion_pytorch_model.safetensors").unlink()
  with logging_restored_afterwards():
    cli.main(["import", str(source), str(tmp_path / "out"), "--stock_unet", f"--workdir={tmp_path / 'run'}"])
  assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
  for component in pipeline.MODELS:
    _assert_same_weights(source, tmp_path / "out", component)
  for name in ("tokenizer", "scheduler"):
    _assert_same_files(source / name, tmp_path / "out" / name)
  assert (tmp_path / "out" / "model_index.json").read_bytes() == (source / "model_index.json").read_bytes()
  unet = diffusers.UNet3DConditionModel.from_pretrained(tmp_path / "out" / "unet")
  reference = _stock_diffusers_unet()
  for key, value in reference.state_dict().items():
    assert torch.equal(unet.state_dict()[key], value), key
  diffusers.AutoencoderKL.from_pretrained(tmp_path / "out" / "vae")
  transformers.CLIPTextModel.from_pretrained(tmp_path / "out" / "text_encoder")
  transformers.CLIPTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
  out = capsys.readouterr().out
  count = sum(p.numel() for p in reference.parameters())
  assert f"unet: {len(reference.state_dict())} tensors, {count:,} parameters" in out
  with logging_restored_afterwards():
    cli.main(["inspect", str(tmp_path / "out"), f"--workdir={tmp_path / 'run'}"])
  out = capsys.readouterr().out
  assert f"unet: {len(reference.state_dict())} tensors" in out and f"full log in {tmp_path / 'run' / 'logs'}" in out


@pytest.mark.slow
def test_stock_unet_becomes_a_handi_unet_that_training_loads(pipelines, tmp_path):
  with pytest.raises(core.CheckpointMismatchError, match="lacks the HANDI parameters"):
    pipeline.normalize_pipeline(pipelines["stock"], tmp_path / "out")  # needs --init_missing_handi_params
  with logging_restored_afterwards():
    cli.main(["import", str(pipelines["stock"]), str(tmp_path / "out"), "--init_missing_handi_params",
              f"--workdir={tmp_path / 'run'}"])
  saved = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
  assert saved["motion_mask"] is True  # the release's keys: conv_in2 and motion_embedding are kept
  unet = convert_unet.load_pretrained(tmp_path / "out" / "unet")
  assert "conv_in2.kernel" in core.flat_params(unet)


def test_export_from_config_writes_the_pretrained_models_back(pipelines, tmp_path):
  config = common.get_config(2)
  config.model.unet.transformer_in_heads = 8
  config.model.pretrained = str(pipelines["handi"])
  destination = export.export_from_config(config, tmp_path / "run")
  assert destination == tmp_path / "run" / "export"
  for component in pipeline.MODELS:
    _assert_same_weights(pipelines["handi"], destination, component)
  _assert_same_files(pipelines["handi"] / "tokenizer", destination / "tokenizer")
  assert json.loads((destination / "unet" / "config.json").read_text())["motion_mask"] is True  # original keys


def test_bad_directories_give_clear_errors_and_leave_nothing_behind(pipelines, tmp_path, capsys):
  broken = tmp_path / "broken"
  shutil.copytree(pipelines["stock"], broken, ignore=shutil.ignore_patterns("text_encoder"))
  workdir = f"--workdir={tmp_path / 'run'}"
  with logging_restored_afterwards(), pytest.raises(SystemExit) as exited:
    cli.main(["import", str(broken), str(tmp_path / "out"), workdir])
  error = capsys.readouterr().err.splitlines()
  assert exited.value.code == 1 and len(error) == 2 and error[1] == "(--traceback shows where)"
  assert error[0].startswith(f"error: pipeline directory {broken} lacks text_encoder/; expected unet/, vae/, "
                             "text_encoder/")
  with logging_restored_afterwards(), pytest.raises(SystemExit):
    cli.main(["inspect", str(tmp_path / "nope"), workdir])
  assert f"error: pipeline directory {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
  with logging_restored_afterwards(), pytest.raises(FileNotFoundError, match="does not exist"):
    cli.main(["inspect", str(tmp_path / "nope"), workdir, "--traceback"])
  # A conversion that fails half-way (the VAE is read, the text encoder does not fit its config) leaves no
  # destination and no temporary folder.
  shutil.copytree(pipelines["stock"], tmp_path / "bad")
  config_file = tmp_path / "bad" / "text_encoder" / "config.json"
  config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "intermediate_size": 48}))
  with pytest.raises(core.CheckpointMismatchError, match=r"shape mismatch for text_model.encoder.layers.0.mlp.fc1"):
    pipeline.normalize_pipeline(tmp_path / "bad", tmp_path / "out", stock_unet=True)
  assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------
# Hugging Face repo ids: a cache laid out as huggingface_hub 2.x writes it, read under HF_HUB_OFFLINE=1.

REPO = "handi-test/tiny-pipeline"
MAIN, V1 = "a" * 40, "b" * 40   # commits: main has safetensors only, tag v1 a text encoder in .bin only


def _git_blob_id(data: bytes) -> str:
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _write_hub_snapshot(cache, repo_id, commit, source, refs, listed_only=()):
  """models--<org>--<name>/{blobs/<hash>, snapshots/<commit>/<path> -> ../../blobs/<hash>, refs/<ref>, trees/
  <commit>.json}: weights are LFS files (blob named by SHA-256), others git blobs (SHA-1). `listed_only`: files
  of the commit on the hub that the cache does not hold (the tree listing names them)."""
  repo = cache / f"models--{repo_id.replace('/', '--')}"
  (repo / "blobs").mkdir(parents=True, exist_ok=True)
  tree = {}
  for file in sorted(p for p in source.rglob("*") if p.is_file()):
    data, name = file.read_bytes(), file.relative_to(source).as_posix()
    lfs = file.suffix in (".safetensors", ".bin")
    blob = hashlib.sha256(data).hexdigest() if lfs else _git_blob_id(data)
    (repo / "blobs" / blob).write_bytes(data)
    link = repo / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    tree[name] = dict(size=len(data), blob_id=_git_blob_id(data), **(dict(lfs_sha256=blob, lfs_size=len(data))
                                                                     if lfs else {}))
  for name in listed_only:
    tree[name] = dict(size=1, blob_id=_git_blob_id(name.encode()))
  (repo / "trees").mkdir(exist_ok=True)
  (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
  (repo / "refs").mkdir(exist_ok=True)
  for ref in refs:
    (repo / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(pipelines, tmp_path_factory):
  """The HANDI pipeline as REPO: main in safetensors (the hub also holds files no part needs, which the cache
  lacks: fetching them would fail offline), v1 with the text encoder only as pytorch_model.bin."""
  cache = tmp_path_factory.mktemp("hf") / "hub"
  _write_hub_snapshot(cache, REPO, MAIN, pipelines["handi"], refs=("main",), listed_only=(
      "README.md", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
      "text_encoder/pytorch_model.bin", "vae/diffusion_pytorch_model.fp16.bin", "samples/video.mp4"))
  legacy = tmp_path_factory.mktemp("legacy") / "pipeline"
  shutil.copytree(pipelines["handi"], legacy)
  weights = legacy / "text_encoder" / "model.safetensors"
  torch.save({k: torch.from_numpy(v.copy()) for k, v in core.read_safetensors(weights).items()},
             legacy / "text_encoder" / "pytorch_model.bin")
  weights.unlink()
  _write_hub_snapshot(cache, REPO, V1, legacy, refs=("v1",))
  return cache


def test_hub_patterns_fetch_each_part_once_safetensors_first():
  """A ModelScope-like repo's files: the pipeline's parts in safetensors, .bin only on request, no variants."""
  files = ["model_index.json", "README.md", "samples/video.mp4", "scheduler/scheduler_config.json",
           "tokenizer/vocab.json", "tokenizer/merges.txt", "unet/config.json", "unet/training_size.json",
           "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
           "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.bin",
           "text_encoder/config.json", "text_encoder/model-00001-of-00002.safetensors",
           "text_encoder/model-00002-of-00002.safetensors", "text_encoder/model.safetensors.index.json",
           "text_encoder/model.fp16-00001-of-00001.safetensors", "config.json", "diffusion_pytorch_model.safetensors"]
  fetched = lambda *args: sorted(huggingface_hub.utils.filter_repo_objects(files, allow_patterns=hub.allow_patterns(
      *args)))
  assert fetched(hub.PIPELINE_MODELS, hub.PIPELINE_FILES) == sorted([
      "model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
      "unet/config.json", "unet/training_size.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
      "text_encoder/config.json", "text_encoder/model-00001-of-00002.safetensors",
      "text_encoder/model-00002-of-00002.safetensors", "text_encoder/model.safetensors.index.json"])
  assert fetched(hub.UNET_MODELS, (), "bin") == ["config.json", "model_index.json", "unet/config.json",
                                                  "unet/diffusion_pytorch_model.bin", "unet/training_size.json"]
  assert hub.parse_repo_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
  assert hub.parse_repo_id("org/name") == ("org/name", None)
  for not_an_id in ("name", "/abs/path", "a/b/c", "org/name@", "org--x/name", "runs/../x"):
    assert hub.parse_repo_id(not_an_id) is None, not_an_id


def test_pretrained_repo_id_loads_from_the_offline_hub_cache(pipelines, hub_cache, tmp_path, monkeypatch):
  """config.model.pretrained and the stage UNets by repo id (@ branch, tag or commit); clear errors."""
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  listed = {f.path for f in huggingface_hub.get_cached_repo_tree(REPO, cache_dir=hub_cache)}
  assert "unet/diffusion_pytorch_model.bin" in listed  # the library reads the listing: excluded files are checked
  snapshot = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
  config = common.get_config(2)
  config.model.unet.transformer_in_heads = 8
  config.model.pretrained = REPO
  destination = export.export_from_config(config, tmp_path / "run")  # VAE, text encoder, UNet and tokenizer
  for component in pipeline.MODELS:
    _assert_same_weights(pipelines["handi"], destination, component)
  _assert_same_files(pipelines["handi"] / "tokenizer", destination / "tokenizer")
  assert generation.stage_unet_source(config, 2) == str(snapshot / MAIN / "unet")   # falls back to <pretrained>/unet
  config.generate.stage1_pretrained = f"{REPO}@v1"
  assert generation.stage_unet_source(config, 1) == str(snapshot / V1)
  assert hub.resolve(f"{REPO}@{V1}", "x") == str(snapshot / V1)
  assert hub.resolve(str(pipelines["handi"]), "x") == str(pipelines["handi"])  # a path stays a path
  config.generate.stage2_pretrained = "handi-test/absent"
  with pytest.raises(FileNotFoundError, match=r"config.generate.stage2_pretrained='handi-test/absent' is not a "
                     r"local path, and the Hugging Face repo could not be fetched into the cache .* \(HF_HUB_OFFLINE "
                     r"is set\): "):
    generation.stage_unet_source(config, 2)
  config.model.pretrained = str(tmp_path / "no" / "such" / "dir")
  with pytest.raises(FileNotFoundError, match=f"config.model.pretrained='{config.model.pretrained}' is neither an "
                     "existing path nor a Hugging Face repo id: give a directory, or a repo id as namespace/name or "
                     "namespace/name@revision"):
    export.export_from_config(config, tmp_path / "run2")


def test_convert_import_takes_a_repo_id_from_the_environments_offline_cache(pipelines, hub_cache, tmp_path):
  """The command as a user runs it, HF_HUB_CACHE and HF_HUB_OFFLINE=1 in its environment: v1's text encoder is
  fetched as .bin (it has no safetensors) and written as safetensors, every tensor as in the source."""
  env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1", XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "handi_jax.convert", "import", f"{REPO}@v1", str(tmp_path / "out"),
                           f"--workdir={tmp_path / 'run'}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "out" / "text_encoder" / "model.safetensors").is_file()
  for component in pipeline.MODELS:
    _assert_same_weights(pipelines["handi"], tmp_path / "out", component)
