"""Generation end to end with tiny random models on the release's test images (../shared/data/ek_frames)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import common
from handi_jax import export, generate, pipeline, prompts, sharding, tokenizers
from handi_jax.components import train_state
from handi_jax.components import unet as unet_lib
from handi_jax.convert import core
from handi_jax.diffusion import guided_sampling as video_sampling
from handi_jax.media import files as media_files
from handi_jax.models import unet3d
from tests.conftest import REPO_ROOT

FRAMES = 16
HEIGHT, WIDTH = 48, 88   # a 448 x 256 image at target area 64 * 64: scale 5.29 -> 88 x 48 (multiples of 8)


def _config(tmp_path, **generate_fields):
  config = common.get_config(stage=2)
  config.data.num_frames = FRAMES
  config.sampling.num_inference_steps = 2
  config.sampling.target_area = 64 * 64
  # A one-level UNet (its mid block still has cross-attention and every temporal layer): it compiles in a
  # fraction of the tiny default's time; tests/test_unet*.py cover the full block structure.
  config.model.unet.block_out_channels = (16,)
  config.model.unet.norm_num_groups = 8
  config.model.unet.transformer_in_heads = 2
  config.generate.output_dir = str(tmp_path / "out")
  config.generate.update(generate_fields)
  return config


def _prompts(shared_data):
  return [json.loads(line) for line in (shared_data / "ek_frames" / "prompt.json").read_text().splitlines()]


def test_model_size_follows_the_release_rule():
  assert media_files.model_size(448, 256, 512 * 512) == (384, 680)   # reference_spec.md section 5: latents 85 x 48
  assert media_files.model_size(448, 256, 64 * 64) == (HEIGHT, WIDTH)
  assert media_files.model_size(448, 256, 512 * 512, 256, 256) == (256, 256)
  with pytest.raises(ValueError, match="multiples of 8"):
    media_files.model_size(448, 256, 512 * 512, 250, 256)


def test_compose_video_keeps_the_context_or_writes_the_release_frames():
  # Levels computed by hand: (x / 2 + 0.5) * 255 = 100.6 for x = 2 * (100.6 / 255 - 0.5): 101 rounded, 100 truncated.
  x = 2 * (100.6 / 255 - 0.5)
  generated = np.full((2, 1, 2, 3), x, np.float32)
  context = np.stack([np.full((1, 3), -1.0), np.full((1, 3), 1.0)], axis=1).astype(np.float32)  # black | white
  mask = np.array([[True, False]])
  ours = pipeline.compose_video(generated, context, mask, replace_background=True)
  assert ours[0].tolist() == [[[0] * 3, [255] * 3]]               # frame 0: the context image
  assert ours[1].tolist() == [[[101] * 3, [255] * 3]]             # inside the mask: rounded; outside: context
  release = pipeline.compose_video(generated, context, mask, replace_background=False, release_frames=True)
  assert release.tolist() == [[[[100] * 3, [100] * 3]]] * 2       # frame 0 as decoded, every level truncated


def test_demo_tokenizer_is_byte_level_clip():
  ids = tokenizers.tokenize(tokenizers.demo_tokenizer(), ["Julienne it"])[0]
  # BOS, 'j' 'u' 'l' 'i' 'e' 'n' 'n' and word-final 'e</w>' (256 + 'e'), 'i', 't</w>', EOS, then EOS padding
  assert ids[:12].tolist() == [512, 106, 117, 108, 105, 101, 110, 110, 256 + 101, 105, 256 + 116, 513]
  assert ids.shape == (77,) and (ids[12:] == 513).all()


def test_stage1_cleanup_stage2_writes_all_outputs(tmp_path, shared_data):
  prompt = _prompts(shared_data)[0]["prompt"]
  config = _config(tmp_path, image=str(shared_data / "ek_frames" / "1.png"), prompt=prompt)
  generator = pipeline.Generator.from_config(config, tmp_path)
  compiled_before = video_sampling.sample_video_jit._cache_size()
  result = generator.run(prompts.samples_from_config(config)[0], tmp_path / "out" / "1")
  out = tmp_path / "out" / "1"
  for name in ("video.mp4", "video.gif", "mask_video.mp4"):
    decoded = media_files.read_video(out / name)
    assert decoded.shape == (FRAMES, HEIGHT, WIDTH, 3), name
  mask = np.asarray(Image.open(out / "mask.png"))
  assert mask.shape == (HEIGHT, WIDTH) and set(np.unique(mask)) <= {0, 255}
  np.testing.assert_array_equal(mask == 255, result.mask)
  assert np.asarray(Image.open(out / "flow.png")).shape == (HEIGHT, WIDTH, 3)
  record = json.loads((out / "done.json").read_text())
  assert record["mask_source"] == "stage 1" and record["prompt"] == prompt
  # Frame 0 is the context; outside the stage-1 mask every frame equals it exactly.
  np.testing.assert_array_equal(result.frames[0], result.context)
  assert (result.frames[:, ~result.mask] == result.context[~result.mask]).all()
  # Stage 1 and stage 2 (two UNets, one structure) ran through a single compilation of the sampling loop.
  assert video_sampling.sample_video_jit._cache_size() - compiled_before <= 1


def test_batch_mode_resumes_without_redoing_finished_samples(tmp_path, shared_data, monkeypatch):
  frames_dir = shared_data / "ek_frames"
  config = _config(tmp_path, prompts_file=str(frames_dir / "prompt.json"), image_dir=str(frames_dir),
                   mask_dir=str(frames_dir))
  monkeypatch.setattr(pipeline.Generator, "batch_capacity", 2)  # batches [1, 2], [3, 4], [5]
  real_run_batch = pipeline.Generator.run_batch
  calls = []

  def interrupted_run_batch(self, samples, out_dirs, mode="generate"):
    if len(calls) == 1:
      raise KeyboardInterrupt  # the user stops the job during the second batch
    calls.append([s.name for s in samples])
    return real_run_batch(self, samples, out_dirs, mode)

  monkeypatch.setattr(pipeline.Generator, "run_batch", interrupted_run_batch)
  with pytest.raises(KeyboardInterrupt):
    generate.generate_from_config(config, tmp_path)
  out = tmp_path / "out"
  assert sorted(p.name for p in out.iterdir() if (p / "done.json").is_file()) == ["1", "2"]
  finished = {name: (out / name / "done.json").stat().st_mtime_ns for name in ("1", "2")}

  results = []
  monkeypatch.setattr(pipeline.Generator, "run_batch",
                      lambda self, samples, out_dirs, mode="generate": results.extend(
                          real_run_batch(self, samples, out_dirs, mode)) or results)
  folders = generate.generate_from_config(config, tmp_path)
  assert [f.name for f in folders] == ["1", "2", "3", "4", "5"]
  assert [r.record["image"] for r in results] == [str(frames_dir / f"{i}.png") for i in (3, 4, 5)]
  assert {name: (out / name / "done.json").stat().st_mtime_ns for name in ("1", "2")} == finished
  for result in results:
    user_mask = media_files.load_mask(result.record["mask_source"], HEIGHT, WIDTH) > 0
    np.testing.assert_array_equal(result.mask, user_mask)
    assert 0 < user_mask.mean() < 0.5
    assert (result.frames[:, ~user_mask] == result.context[~user_mask]).all()
    assert not (out / pathlib.Path(result.record["image"]).stem / "mask_video.mp4").exists()  # no stage 1 ran
  assert media_files.read_video(out / "5" / "video.gif").shape == (FRAMES, HEIGHT, WIDTH, 3)
  # A finished batch is all skipped: no models are even loaded.
  monkeypatch.setattr(pipeline, "Generator", None)
  assert len(generate.generate_from_config(config, tmp_path)) == 5


def test_one_device_and_eight_devices_generate_the_same_videos(tmp_path, shared_data):
  """The release's five test images with a prompts file: stage 1 and stage 2 of each sample, one at a time on one
  device, then all in one batch split over the 8 devices. Each sample's key comes from its global index, so the
  files are the same."""
  frames_dir = shared_data / "ek_frames"
  outputs = {}
  for devices in (jax.local_devices()[:1], jax.local_devices()):
    config = _config(tmp_path / str(len(devices)), prompts_file=str(frames_dir / "prompt.json"),
                     image_dir=str(frames_dir))
    generator = pipeline.Generator.from_config(config, tmp_path, devices=devices)
    samples = prompts.samples_from_config(config)
    batches = generator.batches(samples)
    assert [len(b) for b in batches] == ([1] * 5 if len(devices) == 1 else [5])
    out = pathlib.Path(config.generate.output_dir)
    results = [r for batch in batches for r in generator.run_batch(batch, [out / s.name for s in batch])]
    outputs[len(devices)] = out, results
  (one_out, one), (eight_out, eight) = outputs[1], outputs[8]
  for a, b in zip(one, eight, strict=True):
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.frames.astype(float), b.frames.astype(float), atol=1)
  assert len({r.record["mask_fraction"] for r in one}) > 1  # five different samples, not one repeated
  for name in ("1", "2", "3", "4", "5"):
    for file in ("video.gif", "video.mp4", "mask.png", "mask_video.mp4", "flow.png"):
      assert (one_out / name / file).read_bytes() == (eight_out / name / file).read_bytes(), (name, file)


def test_predict_masks_mode_runs_stage1_only(tmp_path, shared_data):
  config = _config(tmp_path, image=str(shared_data / "ek_frames" / "4.png"), prompt="wash the sink")
  (folder,) = generate.predict_masks_from_config(config, tmp_path)
  assert sorted(p.name for p in folder.iterdir()) == ["mask.png", "mask_done.json", "mask_video.mp4"]
  assert media_files.read_video(folder / "mask_video.mp4").shape == (FRAMES, HEIGHT, WIDTH, 3)


def test_bad_inputs_name_the_problem(tmp_path, shared_data):
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  with pytest.raises(ValueError, match="broken.png as an image"):
    media_files.load_image(broken)
  config = _config(tmp_path, image=str(shared_data / "ek_frames" / "1.png"), prompt="  ")
  with pytest.raises(ValueError, match="empty prompt"):
    prompts.samples_from_config(config)
  with pytest.raises(ValueError, match="nothing to generate"):
    prompts.samples_from_config(_config(tmp_path))
  lines = tmp_path / "prompts.json"
  lines.write_text(json.dumps({"source": "source/9.png", "prompt": "cut"}) + "\n")
  with pytest.raises(FileNotFoundError, match="line 1: image 'source/9.png' not found"):
    prompts.samples_from_config(_config(tmp_path, prompts_file=str(lines), image_dir=str(tmp_path)))


def test_checkpoint_that_does_not_match_the_config_is_refused(tmp_path, shared_data):
  # The config.json of a four-level UNet, against this file's one-level config; the check reads it before any
  # weights.
  (tmp_path / "unet").mkdir()
  other = unet3d.unet_config_dict(common.get_config(stage=2).model.unet)
  (tmp_path / "unet" / "config.json").write_text(json.dumps(dict(other, block_out_channels=[32, 64, 64, 64])))
  config = _config(tmp_path, image=str(shared_data / "ek_frames" / "1.png"), prompt="cut",
                   stage1_pretrained=str(tmp_path / "unet"))
  with pytest.raises(core.CheckpointMismatchError, match="(?s)stage-1 UNet .* block_out_channels"):
    pipeline.load_stage_unet(config, 1)


@pytest.mark.slow
def test_command_line_generates_with_25_steps(tmp_path, shared_data):
  image = tmp_path / "kitchen.png"
  shutil.copy(shared_data / "ek_frames" / "2.png", image)
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "handi_jax.generate", f"--image={image}", "--prompt=wash the cucumber",
       f"--output_dir={tmp_path / 'out'}", f"--workdir={tmp_path}", "--config.sampling.target_area=4096",
       f"--config.data.num_frames={FRAMES}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((tmp_path / "out" / "kitchen" / "done.json").read_text())
  assert record["steps"] == 25 and record["mask_source"] == "stage 1"
  assert media_files.read_video(tmp_path / "out" / "kitchen" / "video.mp4").shape == (FRAMES, HEIGHT, WIDTH, 3)



def _size_config(tmp_path, **generate_fields):
  """_config with no size asked for, 4 frames and a UNet that exports: 32 channels in 32 groups (as the release's
  UNet class builds its temporal norms), 8 transformer_in heads (as diffusers hard-codes them)."""
  config = _config(tmp_path, **generate_fields)
  config.sampling.target_area = 0
  config.data.num_frames = 4
  config.model.unet.update(block_out_channels=(32,), norm_num_groups=32, transformer_in_heads=8)
  return config


@pytest.fixture(scope="module")
def training_workdirs(tmp_path_factory):
  """Two training workdirs of _size_config's untrained UNet: "trained" records a 32 x 32 training size, "old"
  records none, as checkpoints written before the record."""
  root = tmp_path_factory.mktemp("runs")
  config = _size_config(root)
  state, *_ = train_state.create_train_state(config, sharding.make_mesh(config), unet_lib.build_unet(config))
  for name, size in (("trained", train_state.TrainingSize(32, 32, 4)), ("old", None)):
    manager = train_state.checkpoint_manager(config, root / name)
    train_state.save_checkpoint(manager, 1, state, {"position": 1}, size)
    manager.wait_until_finished()
  return root


def _square_sample(tmp_path, shared_data):
  """A 64 x 64 crop of a release test image and a mask for it (a user mask: stage 2 alone runs)."""
  image = Image.open(shared_data / "ek_frames" / "1.png").convert("RGB").crop((100, 60, 228, 188)).resize((64, 64))
  image.save(tmp_path / "square.png")
  mask = np.zeros((64, 64), np.uint8)
  mask[16:48, 8:40] = 255
  Image.fromarray(mask).save(tmp_path / "square_mask.png")
  return prompts.Sample(0, "square", tmp_path / "square.png", "cut the carrot", tmp_path / "square_mask.png")


def test_generation_defaults_to_the_size_the_checkpoint_trained_at(tmp_path, training_workdirs, caplog):
  config = _size_config(tmp_path, stage2_pretrained=str(training_workdirs / "trained"))
  generator = pipeline.Generator.from_config(config, tmp_path)
  assert generator.training_size(2) == train_state.TrainingSize(32, 32, 4)
  assert generator.model_size((64, 64)) == (32, 32)      # a square image: the training size itself
  assert generator.model_size((448, 256)) == (24, 40)    # the training area in the image's aspect ratio
  # The random stage-1 UNet records no size: stage 1 alone runs at config.sampling.fallback_area.
  config.sampling.fallback_area = 16 * 16
  assert generator.with_config(config).model_size((64, 64), stages=(1,)) == (16, 16)
  assert "times the area" not in caplog.text

  # A size the user asks for wins; one far from the training size gets a warning, once.
  config.sampling.target_area = 40 * 40
  assert generator.with_config(config).model_size((64, 64)) == (40, 40)
  assert "times the area" not in caplog.text                                  # 1.6 x: near enough
  config.sampling.height, config.sampling.width = 48, 88
  for _ in range(2):
    assert generator.with_config(config).model_size((448, 256)) == (48, 88)
  warnings = [r.getMessage() for r in caplog.records if "times the area" in r.getMessage()]
  assert warnings == ["generating at 48 x 88 px, 4.1 times the area the stage-2 UNet was trained at (32 x 32 px): "
                      "expect worse videos; with config.sampling.target_area, height and width at 0 generation "
                      "runs at the training area"]


def test_checkpoint_without_a_size_record_still_loads(tmp_path, training_workdirs):
  config = _size_config(tmp_path)
  assert unet_lib.training_size(config, training_workdirs / "old") is None
  assert unet_lib.restore_unet(config, training_workdirs / "old") is not None


def test_export_records_the_training_size_and_generation_from_it_uses_it(tmp_path, training_workdirs, shared_data):
  import diffusers

  config = _size_config(tmp_path)
  run = tmp_path / "run"
  shutil.copytree(training_workdirs / "trained", run)
  export_dir = export.export_from_config(config, run)
  record = json.loads((export_dir / "unet" / unet_lib.TRAINING_SIZE_FILE).read_text())
  assert record == {"height": 32, "width": 32, "num_frames": 4}
  assert diffusers.UNet3DConditionModel.load_config(export_dir / "unet")["sample_size"] == 4  # latents of 32 px

  config.model.pretrained = str(export_dir)   # stage 2 from <pretrained>/unet
  result = pipeline.Generator.from_config(config, tmp_path).run(_square_sample(tmp_path, shared_data),
                                                                tmp_path / "out" / "square")
  assert (result.record["height"], result.record["width"]) == (32, 32)
  assert media_files.read_video(tmp_path / "out" / "square" / "video.mp4").shape == (4, 32, 32, 3)

def test_size_flag_sets_a_fixed_size_or_an_area():
  sampling = common.get_config(stage=2).sampling
  generate.set_size(sampling, "")
  assert (sampling.target_area, sampling.height, sampling.width) == (0, 0, 0)
  generate.set_size(sampling, "384x680")
  assert (sampling.height, sampling.width) == (384, 680)
  generate.set_size(sampling, "256")
  assert (sampling.target_area, sampling.height, sampling.width) == (256 * 256, 0, 0)
  with pytest.raises(ValueError, match="expected HEIGHTxWIDTH"):
    generate.set_size(sampling, "big")


def _main_generate(workdir, output_dir, frames_dir, cache_dir, env):
  """`python -m handi_jax.main --mode=generate` of the five test images (user masks: stage 2 only), tiny and fast."""
  args = ["--mode=generate", f"--workdir={workdir}", f"--config.generate.output_dir={output_dir}",
          f"--config.generate.prompts_file={frames_dir / 'prompt.json'}", f"--config.generate.image_dir={frames_dir}",
          f"--config.generate.mask_dir={frames_dir}", f"--config.data.num_frames={FRAMES}",
          "--config.sampling.num_inference_steps=2", "--config.sampling.target_area=4096",
          "--config.model.unet.block_out_channels=(16,)", "--config.model.unet.norm_num_groups=8",
          "--config.model.unet.transformer_in_heads=2", f"--config.compilation_cache_dir={cache_dir}"]
  return subprocess.Popen([sys.executable, "-m", "handi_jax.main", *args], cwd=REPO_ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _written(folder: pathlib.Path) -> dict[str, bytes]:
  """{relative path: bytes} of the files a generation wrote (done.json holds timings: its keys only)."""
  return {str(p.relative_to(folder)): json.dumps(sorted(json.loads(p.read_text()))).encode()
          if p.name == "done.json" else p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tiny_batch_config(tmp_path, output_dir, shared_data):
  """The five test images with their masks (stage 2 only): what _main_generate runs."""
  frames_dir = shared_data / "ek_frames"
  return _config(tmp_path, prompts_file=str(frames_dir / "prompt.json"), image_dir=str(frames_dir),
                 mask_dir=str(frames_dir), output_dir=str(output_dir))


def test_processes_split_the_samples_and_together_write_what_one_writes(tmp_path, shared_data, monkeypatch, caplog):
  """Two processes of one job, one after the other in this process (jax.process_index / process_count faked)."""
  caplog.set_level("INFO")
  monkeypatch.setattr(pipeline.Generator, "batch_capacity", 1)  # one compiled shape (devices: the test above)
  generate.generate_from_config(_tiny_batch_config(tmp_path, tmp_path / "one", shared_data), tmp_path)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    folders = generate.generate_from_config(_tiny_batch_config(tmp_path, tmp_path / "two", shared_data), tmp_path)
    assert [f.name for f in folders] == [["1", "3", "5"], ["2", "4"]][index]  # global index i -> process i % 2
    if index == 0:  # process 0 wrote its own samples only
      assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["1", "3", "5"]
  assert "process 0 of 2 owns 3 of 5 samples: 1 3 5" in caplog.text
  assert "process 1 of 2 owns 2 of 5 samples: 2 4" in caplog.text
  assert _written(tmp_path / "two") == _written(tmp_path / "one")


@pytest.mark.slow
def test_two_processes_started_by_hand_split_the_samples_and_write_what_one_writes(tmp_path, shared_data):
  frames_dir = shared_data / "ek_frames"
  generate.generate_from_config(_tiny_batch_config(tmp_path, tmp_path / "one", shared_data), tmp_path)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "JAX_"))}
  import socket

  with socket.socket() as free:
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
  processes = [_main_generate(tmp_path / f"w{i}", tmp_path / "two", frames_dir, tmp_path / "xla_cache",
                              dict(env, JAX_PROCESS_ID=str(i))) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  owned = {}
  for i in range(2):
    (log,) = (tmp_path / f"w{i}" / "logs").glob("generate-*.log")
    (line,) = [line for line in log.read_text().splitlines() if f"process {i} of 2 owns" in line]
    owned[i] = line.split(": ")[-1].split()
  assert owned == {0: ["1", "3", "5"], 1: ["2", "4"]}  # global index i -> process i % 2, disjoint
  assert _written(tmp_path / "two") == _written(tmp_path / "one")
