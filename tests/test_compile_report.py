"""--mode=compile_report at tiny size: the devices here, 8 simulated CPU devices, a TPU topology; the launch
scripts' dry runs."""

import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import configs
from handi_jax import chips, compile_report
from handi_jax.compile_report import measure, programs, targets, useful_flops, whole_step
from handi_jax.components import unet as unet_lib
from tests import helpers
from tests.conftest import REPO_ROOT


def _tiny_config(stage=1, remat="none", **report):
  config = helpers.tiny_train_config(stage=stage)
  config.model.remat = remat
  config.data.update(num_frames=2, height=16, width=16)
  config.sampling.num_inference_steps = 3
  config.compile_report.update({**dict(programs="sampler", sampler_sizes="16x24", chip="h100"), **report})
  return config


def _check_program(figures: dict, chip: chips.Chip):
  memory = figures["memory"]
  assert memory["peak"] >= memory["temp"] > 0 and figures["flops_per_device"] > 0
  bound = figures["chip_bounds"]
  assert bound["compute_seconds"] == pytest.approx(figures["flops_per_device"] / chip.peak_bf16_flops)
  link = sum(c["link_bytes"] for c in figures["collectives"].values())
  assert bound["collective_seconds"] == pytest.approx(link / chip.interconnect_bytes_per_s)
  assert set(figures["bounds"]) == set(chips.CHIPS)


@pytest.mark.slow
def test_tiny_sampler_report_on_the_devices_here(tmp_path, capsys):
  """Through compile_report() in this process (3.5 min on the loaded 2-core machine: a UNet scan compile)."""
  config = _tiny_config()
  report = compile_report.compile_report(config, tmp_path)
  assert json.loads((tmp_path / compile_report.REPORT_FILE).read_text()) == json.loads(json.dumps(report))
  sampler = report["programs"]["sampler_16x24"]
  _check_program(sampler, chips.CHIPS["h100"])
  # 3 steps in one scan: the loop body (2 UNet passes, CFG) at its trip count; XLA's own count has it once.
  assert sampler["unknown_trip_counts"] == 0
  assert sampler["flops_per_device"] > 2.5 * sampler["xla_flops_loops_once"]
  assert sampler["useful_flops"] == 2 * 3 * useful_flops.unit_flops(config, 16, 24, 2)["unet_forward"]
  # Above 1 is possible: XLA hoists loop-invariant work (such as projections of the fixed text) out of the loop.
  assert 0.5 < sampler["useful_ratio"] <= 1.2
  assert report["num_devices"] == jax.device_count() and report["chip"] == "NVIDIA H100 SXM"
  # Run again in the same workdir: the sampler lowers to the same program, so it is not compiled again.
  capsys.readouterr()
  again = compile_report.compile_report(config, tmp_path)["programs"]["sampler_16x24"]
  assert capsys.readouterr().out.splitlines()[-1].split()[:2] == ["sampler_16x24", "reused"]
  assert again["reused_from"] == str(tmp_path / compile_report.REPORT_FILE)
  assert again["flops_per_device"] == sampler["flops_per_device"] and again["useful_ratio"] == sampler["useful_ratio"]


def test_the_sampler_batch_is_split_over_the_devices_at_one_sample_s_cost(tmp_path):
  """The sampler as generation runs it: config.generate.batch_size samples per device, the batch split over the
  target's devices; per sample it costs what the one-sample program on one device costs."""
  def report(target, batch_size):
    config = _tiny_config(target=target, sampler_sizes="16x16")
    config.sampling.num_inference_steps = 1
    config.generate.batch_size = batch_size
    return compile_report.compile_report(config, tmp_path / target.replace(":", "_"))["programs"]["sampler_16x16"]

  one = report("cpu:1", 1)
  split = report("cpu:4", 2)
  _, args = programs.sampler_program(_tiny_config(), jax.devices()[:4], 16, 16)  # batch 4: batch_size 1 x 4
  batch_args = [args[i] for i in (2, 3, 5, 8)]  # context latent, text, mask, keys
  assert {a.shape[0] for a in batch_args} == {4} and {a.sharding.shard_shape(a.shape)[0] for a in batch_args} == {1}
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(args[:2]))  # UNet and plan
  assert (one["batch"], one["samples_per_device"], split["batch"], split["samples_per_device"]) == (1, 1, 8, 2)
  assert split["flops_per_sample"] == pytest.approx(one["flops_per_sample"], rel=0.02)
  assert split["flops_per_device"] == pytest.approx(2 * one["flops_per_device"], rel=0.02)
  assert split["useful_flops"] == one["useful_flops"] and not split["collectives"]  # samples are independent
  # The slice's bound: 8 samples in one batch step, each device computing its 2.
  bound = split["chip_bounds"]
  assert bound["samples_per_second"] == pytest.approx(8 / bound["step_seconds"])
  assert bound["samples_per_second"] == pytest.approx(4 * one["chip_bounds"]["samples_per_second"], rel=0.02)


def test_a_program_measured_before_is_not_compiled_again(tmp_path, monkeypatch):
  mesh = jax.make_mesh((1,), ("d",), devices=jax.devices()[:1])
  x = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
  lower = jax.jit(lambda a: jnp.tanh(a @ a.T)).lower
  target = targets.target_identity("devices", jax.devices()[:1])
  first = measure.measure("p", lower, (x,), chips.CHIPS["h100"], target=target)
  report = tmp_path / compile_report.REPORT_FILE
  report.write_text(json.dumps({"programs": {"p": first}}))
  known = measure.measured_programs([report])

  monkeypatch.setattr(jax.stages.Lowered, "compile", lambda *args, **kwargs: pytest.fail("compiled again"))
  again = measure.measure("q", lower, (x,), chips.CHIPS["v5p"], known, target)
  assert again["reused_from"] == str(report) and again["flops_per_device"] == first["flops_per_device"] > 0
  assert again["chip_bounds"]["chip"] == "TPU v5p"  # bounds for this report's chip
  # Another program, or the same program for another target, is compiled.
  with pytest.raises(pytest.fail.Exception, match="compiled again"):
    measure.measure("r", jax.jit(lambda a: a @ a.T).lower, (x,), None, known, target)
  with pytest.raises(pytest.fail.Exception, match="compiled again"):
    measure.measure("p", lower, (x,), None, known, target + " v2")
  with pytest.raises(ValueError, match="missing.json is not a readable compile report"):
    measure.measured_programs([tmp_path / "missing.json"])


@pytest.mark.slow
def test_the_pixel_loss_part_costs_what_its_decodes_cost():
  config = _tiny_config()
  config.loss.remat_decoder = True
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    lower, args = programs.pixel_loss_program(config, mesh)
    figures = measure.measure("pixel_loss", lower, args, chips.CHIPS["v5p"])
  units = useful_flops.unit_flops(config, 16, 16, 2)
  frames = config.train.global_batch_size * useful_flops.pixel_loss_frames(config)
  # decode forward, its recomputation (remat_decoder) and a backward of about twice the forward
  assert figures["flops_per_device"] == pytest.approx(4 * frames * units["vae_decode_frame"], rel=0.25)


def test_parts_combine_into_the_whole_step():
  def part(flops, peak, temp, outputs, gathered):
    return dict(flops_per_device=flops, memory=dict(peak=peak, temp=temp, outputs=outputs, arguments=1),
                collectives={"all-gather": dict(count=1, bytes=gathered, link_bytes=gathered / 2)},
                state_bytes=7, compile_seconds=1.0)

  parts = dict(unet_step=part(10e12, 50, 20, 5, 4e9), pixel_loss=part(3e12, 30, 25, 2, 1e9))
  whole = whole_step.combine_parts(parts, chips.CHIPS["v5p"])
  assert whole["flops_per_device"] == 13e12
  assert whole["memory"]["peak"] == 50 + 25 + 2 and whole["memory"]["peak_lower"] == 50
  assert whole["collectives"]["all-gather"] == dict(count=2, bytes=5e9, link_bytes=2.5e9)
  assert whole["chip_bounds"]["compute_seconds"] == pytest.approx(13e12 / 459e12)
  assert whole["chip_bounds"]["collective_seconds"] == pytest.approx(2.5e9 / 600e9)


def test_unet_blocks_are_the_forward_s_blocks_at_the_step_s_shapes():
  config = _tiny_config(stage=2, remat="full")
  unet = nnx.eval_shape(lambda: unet_lib.build_unet(config))
  blocks = programs.unet_blocks(config, unet, global_batch=8)
  assert [name for name, *_ in blocks] == ["transformer_in", "down_blocks.0", "mid_block", "up_blocks.0"]
  assert blocks[1][1] is unet.down_blocks[0] and all(static["num_frames"] == 3 for *_, static in blocks)
  rows = 8 * 3  # clips x (2 frames + the context frame)
  hidden, temb, text = (rows, 2, 2, 32), (rows, 4 * 32), (rows, 77, 32)  # 16 px / 8 = 2 latent px; 32 channels
  shapes = {name: [leaf.shape for leaf in jax.tree.leaves(arrays)] for name, _, arrays, _ in blocks}
  assert shapes == {"transformer_in": [hidden], "down_blocks.0": [hidden, temb, text],
                    "mid_block": [hidden, temb, text], "up_blocks.0": [hidden, hidden, hidden, temb, text]}


@pytest.mark.slow
def test_the_blocks_cost_four_unet_forwards_under_full_remat():
  """Lowered (unoptimised) FLOPs of the block programs: forward + recomputed forward + backward (2 forwards) of
  every block, i.e. 4 UNet forwards less the stem (conv_in / conv_out / time embedding: 6% at this tiny size)."""
  config = _tiny_config(stage=2, remat="full")
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    block_programs = programs.unet_block_programs(config, mesh)
    flops = sum(lower(*args).cost_analysis()["flops"] for lower, args in block_programs.values())
  forward = config.train.global_batch_size * useful_flops.unit_flops(config, 16, 16, 2)["unet_forward"]
  assert 0.9 * 4 * forward < flops < 4 * forward
  with pytest.raises(ValueError, match="remat is 'none'"):
    programs.train_step_parts(_tiny_config(stage=2, remat="none"), mesh, "blocks")


@pytest.mark.slow
def test_useful_flops_are_counted_with_xla_attention_for_any_target_kernel():
  """tpu_flash does not lower on this CPU backend; the unit counts use xla attention, the same arithmetic
  (27 s on the loaded machine: four unoptimised graphs)."""
  config = _tiny_config(stage=1)
  flash = _tiny_config(stage=1)
  flash.model.attention = "tpu_flash"
  assert useful_flops.unit_flops(flash, 16, 16, 2) == useful_flops.unit_flops(config, 16, 16, 2)


def test_blocks_combine_into_the_whole_step():
  def part(flops, temp, kept=None):
    figures = dict(flops_per_device=flops, memory=dict(temp=temp), compile_seconds=2.0,
                   collectives={"all-gather": dict(count=1, bytes=8.0, link_bytes=7.0)})
    return figures if kept is None else dict(figures, kept_activation_bytes=kept)

  parts = dict(pixel_loss=part(3e12, 40), optimizer=part(1e9, 5), unet_down_blocks_0=part(5e12, 30, kept=11),
               unet_up_blocks_0=part(6e12, 20, kept=13))
  whole = whole_step.combine_blocks(parts, step_argument_bytes=100, gradient_bytes=17, chip=chips.CHIPS["v5p"])
  assert whole["flops_per_device"] == 3e12 + 1e9 + 5e12 + 6e12 and whole["compile_seconds"] == 8.0
  assert whole["memory"]["peak"] == 100 + 17 + (11 + 13) + 40
  assert whole["collectives"]["all-gather"] == dict(count=4, bytes=32.0, link_bytes=28.0)
  assert whole["chip_bounds"]["compute_seconds"] == pytest.approx(whole["flops_per_device"] / 459e12)


def test_useful_train_flops_follow_the_step():
  config = configs.load("configs/stage2.py:paper")
  units = dict(unet_forward=5.0, vae_decode_frame=0.5, vae_encode_frame=0.25, landmarks_crop=0.125)
  useful = useful_flops.useful_train_flops(config, units, global_batch=2)
  k = config.loss.hand_frames  # frames scored per clip
  assert useful["terms"] == dict(unet=2 * 5.0 * 3, vae_encode=2 * 16 * 0.25, vae_decode=2 * k * 0.5 * 3,
                                 landmarks=2 * k * 2 * 0.125 * 3)
  assert useful["with_recompute"] - useful["model_flops"] == 2 * 5.0 + 2 * k * 0.5 + 2 * k * 2 * 0.125
  config.loss.hand_frames = 0
  assert useful_flops.pixel_loss_frames(config) == 15


def test_bad_targets_and_sizes_are_one_line_errors():
  with pytest.raises(ValueError, match="expected 'devices', 'cpu:N' or 'tpu:<topology>'"):
    targets.target_devices("gpu:8")
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count=4096"):
    targets.target_devices("cpu:4096")
  with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
    programs.sampler_sizes(_tiny_config(sampler_sizes="512x500").compile_report)
  with pytest.raises(ValueError, match="parts='True'; expected one of none, pixel_loss, blocks"):
    compile_report.compile_report(_tiny_config(parts="True"), "/nonexistent")  # the old boolean, from a flag


@pytest.mark.slow
def test_tiny_train_step_report_on_8_simulated_cpu_devices(tmp_path):
  """The train step whole and in parts, through main.py, on cpu:8 with the h100x8 mesh (minutes: two train-step
  compiles)."""
  script = tmp_path / "config.py"
  script.write_text("from tests import helpers\n\ndef get_config(arg=None):\n"
                    "  config = helpers.tiny_train_config(stage=2)\n"
                    "  config.data.update(num_frames=2, height=16, width=16)\n"
                    "  config.mesh.update(data=1, fsdp=8)\n"
                    "  config.compile_report.update(target='cpu:8', chip='h100', programs='train_step')\n"
                    "  return config\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO_ROOT))
  reports = {}
  for parts in ("none", "pixel_loss"):
    workdir = tmp_path / f"parts_{parts}"
    done = subprocess.run(
        [sys.executable, "-m", "handi_jax.main", f"--config={script}", "--mode=compile_report",
         f"--workdir={workdir}", f"--config.compile_report.parts={parts}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compile report: stage 2, target cpu:8 (8 x cpu)" in done.stdout
    reports[parts] = json.loads((workdir / compile_report.REPORT_FILE).read_text())
  whole, combined = reports["none"]["programs"]["train_step"], reports["pixel_loss"]["programs"]["train_step"]
  _check_program(whole, chips.CHIPS["h100"])
  assert combined["from_parts"] and set(reports["pixel_loss"]["programs"]) == {"train_step", "unet_step", "pixel_loss"}
  # The parts add up to the whole step (the tiny config has no pixel loss: eta_hand = 0) within XLA's fusion noise.
  assert combined["flops_per_device"] == pytest.approx(whole["flops_per_device"], rel=0.05)
  assert "reduce-scatter" in whole["collectives"] or "all-reduce" in whole["collectives"]
  assert whole["memory"]["peak"] <= combined["memory"]["peak"]


@pytest.mark.slow
def test_tiny_report_for_a_tpu_topology(tmp_path):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip('libtpu is not installed (pip install "jax[tpu]==0.7.1" adds the TPU compiler)')
  script = tmp_path / "config.py"
  script.write_text("from tests import helpers\n\ndef get_config(arg=None):\n"
                    "  config = helpers.tiny_train_config(stage=1)\n"
                    "  config.data.update(num_frames=2, height=16, width=16)\n"
                    "  config.sampling.num_inference_steps = 2\n"
                    "  config.compile_report.update(target='tpu:v5p:2x2x1', programs='sampler', "
                    "sampler_sizes='16x16')\n"
                    "  return config\n")
  env = dict(os.environ, JAX_PLATFORMS="", PYTHONPATH=str(REPO_ROOT), TPU_WORKER_HOSTNAMES="localhost",
             ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env.pop("TPU_ACCELERATOR_TYPE", None)
  done = subprocess.run(
      [sys.executable, "-m", "handi_jax.main", f"--config={script}", "--mode=compile_report",
       f"--workdir={tmp_path}", "--config.multihost=False"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads((tmp_path / compile_report.REPORT_FILE).read_text())
  assert report["device_kind"] == "TPU v5" and report["num_devices"] == 4 and report["chip"] == "TPU v5p"
  _check_program(report["programs"]["sampler_16x16"], chips.CHIPS["v5p"])


@pytest.mark.parametrize("script, args, variant", [
    ("launch/tpu_pod.sh", ["my-tpu", "us-east5-a", "2", "gs://bucket/s2"], "paper,tpu_v5p_64"),
    ("launch/slurm_h100.sbatch", ["1", "/checkpoints/s1"], "paper,h100x8")])
def test_launch_dry_runs_print_the_configs_the_report_measured(script, args, variant):
  done = subprocess.run(["bash", script, "--dry-run", *args, "--config.train.num_steps=7"], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=30, env=dict(os.environ, PATH="/usr/bin:/bin"))
  assert done.returncode == 0, done.stderr
  words = [w for line in done.stdout.splitlines() for part in shlex.split(line) for w in part.split()]
  specs = [w.partition("=")[2] for w in words if w.startswith("--config=")]
  stage = args[-2]
  assert specs == [f"configs/stage{stage}.py:{variant}"] and "--config.train.num_steps=7" in words
  assert "--mode=train" in words
  config = configs.load(str(REPO_ROOT / specs[0]))
  assert config.stage == int(stage) and config.model.unet.block_out_channels == (320, 640, 1280, 1280)
  assert pathlib.Path(REPO_ROOT / script).stat().st_mode & 0o111


def _pod_evaluation_dry_run(*flags, **env):
  done = subprocess.run(["bash", "launch/tpu_pod_evaluate.sh", "--dry-run", "my-tpu", "us-east5-a", "2",
                         "gs://bucket/s2", *flags], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
                        env=dict(os.environ, PATH="/usr/bin:/bin", **env))
  assert done.returncode == 0, done.stderr
  return done.stdout.splitlines()


def test_pod_evaluation_dry_run_prints_each_host_s_command():
  lines = _pod_evaluation_dry_run("--config.evaluate.runs=ours=gs://bucket/my videos", HOSTS="3")
  assert lines[0::2] == [f"# host {i} of 3: clips {i}, {i + 3}, {i + 6}, ..." for i in range(3)]
  for host, line in enumerate(lines[1::2]):
    ssh = shlex.split(line)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and f"--worker={host}" in ssh
    remote = shlex.split(ssh[ssh.index("--command") + 1])  # what the worker's shell runs
    assert remote[:3] == ["cd", "~/handi-jax", "&&"] and remote[3:6] == ["python3", "-m", "handi_jax.main"]
    assert remote[6:] == ["--config=configs/stage2.py:paper,tpu_v5p_64", "--workdir=gs://bucket/s2",
                          "--mode=evaluate", "--config.evaluate.runs=ours=gs://bucket/my videos"]
  # By default one command per host of the v5p-64 the config expects (4 chips a host).
  config = configs.load(str(REPO_ROOT / "configs/stage2.py:paper,tpu_v5p_64"))
  assert config.multihost and len(_pod_evaluation_dry_run()) == 2 * config.num_devices_expected // 4
