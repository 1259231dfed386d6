"""Training end to end on demo data (a tiny model, 8 simulated devices): what a pod user watches (throughput, MFU,
time to the next checkpoint, profiles), checkpoints, resuming, restoring, and surviving preemption: SIGTERM saves
at the next step boundary and the resumed run ends where an uninterrupted one does; a checkpoint written on 8
devices restores onto 4 with another mesh."""

import concurrent.futures
import gzip
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
from unittest import mock

import jax
import numpy as np
import pytest
from flax import nnx

from configs import common
from handi_jax import demo, sharding, train
from handi_jax.components import frozen as frozen_lib
from handi_jax.components import train_state
from handi_jax.components import unet as unet_lib
from handi_jax.data import demo_clips
from tests.conftest import REPO_ROOT
from tests.helpers import tiny_train_config

NUM_STEPS = 4


def test_throughput_scalars_and_steps_to_checkpoint_by_hand():
  # 2 steps/s of 8 clips at 3 TFLOP per device per step on a 100 TFLOP/s chip, 3 steps before the next save.
  assert train.throughput_scalars(2.0, 8, 3e12, 1e14, 3) == pytest.approx(
      {"examples_per_sec": 16.0, "tflops_per_sec_per_device": 6.0, "mfu": 0.06, "seconds_to_next_checkpoint": 1.5})
  assert "mfu" not in train.throughput_scalars(2.0, 8, 3e12, None, 3)
  assert train.peak_flops(types.SimpleNamespace(device_kind="TPU v5 lite")) == 197e12  # v5e, not v5p's "TPU v5"
  # Saves every 4 steps, evaluations (forced saves) every 6, the last at 10.
  train_config = tiny_train_config().train
  train_config.update(checkpoint_every=4, eval_every=6, num_steps=10)
  assert [train.steps_to_checkpoint(s, train_config) for s in (1, 4, 5, 6, 8, 9, 10)] == [3, 2, 1, 2, 2, 1, 0]


def test_progress_report_writes_rates_every_log_every_steps(caplog):
  caplog.set_level(logging.INFO)
  train_config = tiny_train_config().train
  train_config.update(log_every=2, num_steps=10, checkpoint_every=4, eval_every=0)
  writer = mock.MagicMock()
  report = train.ProgressReport(train_config, writer, examples_per_step=8, flops_per_device=1e12,
                                peak_flops=train.peak_flops(jax.devices()[0]))
  assert "MFU is not logged: handi_jax.chips has no peak FLOP/s for device kind 'cpu'" in caplog.text
  for step, t in [(1, 10.0), (2, 10.5), (3, 11.0), (4, 12.5)]:  # the first call only starts the clock
    report(step, t)
  written = {}
  for (step, scalars), _ in writer.write_scalars.call_args_list:
    written.setdefault(step, {}).update(scalars)
  assert sorted(written) == [2, 4]
  # Step 2: 1 step in 0.5 s; step 4: 2 steps in 2 s. Saves at 4 and 8.
  expected = {2: dict(steps_per_sec=2.0, examples_per_sec=16.0, tflops_per_sec_per_device=2.0,
                      seconds_to_next_checkpoint=1.0),
              4: dict(steps_per_sec=1.0, examples_per_sec=8.0, tflops_per_sec_per_device=1.0,
                      seconds_to_next_checkpoint=4.0)}
  for step, values in expected.items():
    assert set(written[step]) == {*values, "uptime"}
    assert {k: written[step][k] for k in values} == pytest.approx(values)


def test_sigterm_on_one_process_flags_the_next_step_boundary_and_the_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  manager = mock.MagicMock()
  with train.preemption_notice(manager) as preempted:
    assert not preempted(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preempted(2)
  assert signal.getsignal(signal.SIGTERM) is before
  manager.reached_preemption.assert_not_called()  # the multi-host path only


_HOST = textwrap.dedent("""
    import sys, time
    import jax
    process_id, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
    import orbax.checkpoint as ocp
    from handi_jax import train
    with train.preemption_notice(ocp.CheckpointManager(directory)) as preempted:
      for step in range(1, 3000):
        print(f"step {step}", flush=True)
        time.sleep(0.02 * (1 + process_id))  # the hosts run at different speeds
        if preempted(step):
          print(f"stop {step}", flush=True)
          break
""")


@pytest.mark.slow
def test_sigterm_on_one_of_two_hosts_stops_both_at_the_same_step(tmp_path):
  """Two jax.distributed processes on CPU: process 1 gets the signal, both stop at the step they agreed on."""
  with socket.socket() as free:
    free.bind(("localhost", 0))
    port = free.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  outputs = [tmp_path / f"host{i}.txt" for i in range(2)]
  with open(outputs[0], "w") as out0, open(outputs[1], "w") as out1:
    hosts = [subprocess.Popen([sys.executable, "-c", _HOST, str(i), str(port), str(tmp_path / "checkpoints")],
                              cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
             for i, out in enumerate((out0, out1))]
    try:
      deadline = time.monotonic() + 300
      while "step 5\n" not in outputs[1].read_text():
        assert all(h.poll() is None for h in hosts), outputs[1].read_text()[-3000:]
        assert time.monotonic() < deadline, "host 1 did not reach step 5 in 300 s"
        time.sleep(0.05)
      hosts[1].send_signal(signal.SIGTERM)
      assert [h.wait(timeout=120) for h in hosts] == [0, 0]
    finally:
      for host in hosts:
        if host.poll() is None:
          host.kill()
  stops = [re.findall(r"^stop (\d+)$", out.read_text(), re.M) for out in outputs]
  assert stops[0] == stops[1] and len(stops[0]) == 1 and int(stops[0][0]) > 5


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  """The demo dataset at the tiny training size."""
  return str(demo_clips.write_demo_dataset(tmp_path_factory.mktemp("demo_data"), tiny_train_config()))


def _train_config(demo_dir, stage=2):
  config = tiny_train_config(stage=stage, steps=NUM_STEPS)
  config.data.dir = demo_dir
  # orbax saves step 1 (a first checkpoint), then only the last: saves are slow on a loaded 2-core machine.
  config.train.checkpoint_every = NUM_STEPS
  return config


@pytest.fixture(scope="module")
def uninterrupted(demo_dir, tmp_path_factory):
  """(final state, workdir, scalars written per step) of NUM_STEPS uninterrupted steps, profiling step 2: what the
  interrupted and resumed runs below must end at.

  In this process: the compile lands in the session's persistent cache, which the training subprocess of the
  SIGTERM test then reads instead of compiling again."""
  config = _train_config(demo_dir)
  config.train.update(profile_start_step=1, profile_num_steps=1)
  workdir = tmp_path_factory.mktemp("uninterrupted")
  written = {}
  writer = mock.MagicMock()
  writer.write_scalars.side_effect = lambda step, scalars: written.setdefault(step, {}).update(scalars)
  with mock.patch.object(train.metric_writers, "create_default_writer", return_value=writer):
    state = train.train_and_evaluate(config, str(workdir))
  # Saved: the multiples of checkpoint_every and the last step; not the first step (orbax's own rule).
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(NUM_STEPS)]
  return state, workdir, written


def test_a_step_compiled_ahead_trains_as_the_step_training_compiles(demo_dir, uninterrupted, tmp_path, monkeypatch):
  """--mode=demo traces each stage's step from abstract inputs (train.lower_train_step) and compiles it in a thread
  (train.compile_train_step) while the run initialises; the run takes the Future and then neither traces nor
  compiles: it must train as training's own step."""
  straight, _, _ = uninterrupted
  config = _train_config(demo_dir)
  lowered = train.lower_train_step(config)
  compile_lowered = jax.stages.Lowered.compile
  monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self, *a, **k: pytest.fail("training compiled its step")
                      if self is not lowered else compile_lowered(self, *a, **k))
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    compiled = pool.submit(train.compile_train_step, config, lowered)
    state = train.train_and_evaluate(config, str(tmp_path), compiled_step=compiled)
  assert int(state.step) == NUM_STEPS
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.params)), jax.tree.leaves(jax.device_get(state.params)),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_a_rerun_of_the_demo_compiles_only_the_stages_with_steps_left(demo_dir, uninterrupted, tmp_path):
  _, workdir, _ = uninterrupted   # trained to NUM_STEPS
  config = _train_config(demo_dir)
  assert not demo.has_steps_left(config, workdir)
  config.train.num_steps = NUM_STEPS + 1
  assert demo.has_steps_left(config, workdir)
  assert demo.has_steps_left(config, tmp_path)   # no checkpoint yet


def _train_straight(stage, demo_dir, workdir):
  """NUM_STEPS uninterrupted steps of `stage` (the fixture above is stage 2's)."""
  return train.train_and_evaluate(_train_config(demo_dir, stage), str(workdir))


def test_training_logs_throughput_and_writes_the_profile(uninterrupted):
  _, workdir, written = uninterrupted
  # ReportProgress starts its clock at step 1 and reports every step after it (log_every=1).
  assert sorted(s for s, scalars in written.items() if "steps_per_sec" in scalars) == list(range(2, NUM_STEPS + 1))
  for step in range(2, NUM_STEPS + 1):
    scalars = written[step]
    assert scalars["examples_per_sec"] == pytest.approx(8 * scalars["steps_per_sec"])  # global batch 8
    assert scalars["tflops_per_sec_per_device"] > 0
    assert scalars["seconds_to_next_checkpoint"] == pytest.approx((NUM_STEPS - step) / scalars["steps_per_sec"])
    assert "mfu" not in scalars  # CPU: no peak in handi_jax.chips
  # One trace, taken inside the training loop (profile_start_step=1: from the end of step 1 to the end of step 2).
  assert len(list((workdir / "profile").rglob("*.xplane.pb"))) == 1
  (trace,) = (workdir / "profile").rglob("*.trace.json.gz")
  events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
  assert any(event.get("name", "").startswith("$train.py:") for event in events)


@pytest.mark.parametrize("stage", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_train_checkpoints_resumes_and_restores(tmp_path, stage, caplog, capsys, demo_dir, uninterrupted,
                                               monkeypatch):
  caplog.set_level(logging.INFO)
  config = tiny_train_config(stage=stage, steps=2)
  config.data.dir = demo_dir
  # Evaluation during training (its metrics are tested in test_evaluate.py): the evaluator training is given runs
  # at step 2 with the UNet being trained (eval mode, the train state's weights) and the checkpoint of step 2 on
  # disk; its scalars and images reach the metric writer.
  config.train.eval_every = 2
  evaluated = []

  def evaluator(step, unet, frozen, tokenizer):
    params = jax.tree.leaves(nnx.state(unet, nnx.Param))
    dropouts = [m for _, m in nnx.iter_graph(unet) if isinstance(m, nnx.Dropout)]
    eval_mode = bool(dropouts) and all(d.deterministic for d in dropouts)
    evaluated.append((step, train_state.checkpoint_manager(config, tmp_path).latest_step(), eval_mode, params))
    return {"eval/all/full/hs_err": 0.5}, {"eval/contact_generated": np.zeros((1, 4, 6, 3), np.uint8)}

  writers = []
  create_writer = train.metric_writers.create_default_writer
  monkeypatch.setattr(train.metric_writers, "create_default_writer",
                      lambda *a, **k: writers.append(mock.MagicMock(wraps=create_writer(*a, **k))) or writers[-1])
  state = train.train_and_evaluate(config, str(tmp_path), [evaluator])
  assert int(state.step) == 2
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
  ((step, on_disk, eval_mode, params),) = evaluated
  assert (step, on_disk, eval_mode) == (2, 2, True)
  for a, b in zip(params, jax.tree.leaves(state.params), strict=True):  # the step's weights, not a copy from disk
    assert a is b or np.array_equal(a, b)
  writers[0].write_scalars.assert_any_call(2, {"eval/all/full/hs_err": 0.5})
  ((step, images), _), = writers[0].write_images.call_args_list
  assert step == 2 and list(images) == ["eval/contact_generated"] and images["eval/contact_generated"].shape == (
      1, 4, 6, 3)
  config.train.eval_every = 0
  first_params = jax.device_get(state.params)
  leaves = jax.tree.leaves(first_params)
  assert all(np.isfinite(x).all() for x in leaves)

  # The console's closing line; every checkpoint records the size trained at.
  last_loss = [c.args[1]["loss"] for c in writers[0].write_scalars.call_args_list if "loss" in c.args[1]][-1]
  assert f"stage {stage}: trained to step 2, loss {last_loss:.4f}; checkpoint {tmp_path / 'checkpoints' / '2'}" in (
      capsys.readouterr().out)
  manager = train_state.checkpoint_manager(config, tmp_path)
  assert [train_state.recorded_training_size(manager, step) for step in (1, 2)] == [
      train_state.TrainingSize(height=32, width=32, num_frames=3)] * 2

  # Resume: two more steps continue from step 2 and its input position, not from scratch. The console says so,
  # and not that the UNet was randomly initialised (its weights come from the checkpoint).
  config.train.num_steps = 4
  caplog.clear()
  resumed = train.train_and_evaluate(config, str(tmp_path))
  console = capsys.readouterr().out
  assert f"stage {stage}: resumed from step 2 ({tmp_path / 'checkpoints' / '2'})" in console
  assert f"stage {stage}: trained to step 4, loss " in console
  assert "randomly initialised from config.model.unet" not in caplog.text
  assert int(resumed.step) == 4
  assert (tmp_path / "checkpoints" / "4").is_dir()
  changed = [not np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(jax.device_get(resumed.params)),
                                                      strict=True)]
  assert any(changed)
  assert "resumed from step 2 (input position 2)" in caplog.text
  # 2 + 2 resumed steps equal 4 uninterrupted ones: the optimizer state and the data position came back.
  straight = uninterrupted[0] if stage == 2 else _train_straight(stage, demo_dir, tmp_path / "straight")
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.params)), jax.tree.leaves(jax.device_get(resumed.params)),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

  # Run again when already finished (a second `make demo`): the checkpoint's state, and no model initialised.
  for module, name in ((train_state, "create_train_state"), (frozen_lib, "load_frozen_models")):
    monkeypatch.setattr(module, name, lambda *args, name=name, **kw: pytest.fail(f"{name} with nothing to train"))
  again = train.train_and_evaluate(config, str(tmp_path))
  assert int(again.step) == 4 and "nothing to train" in caplog.text
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The checkpointed UNet loads for generation and export with exactly the trained parameters.
  unet = unet_lib.restore_unet(config, str(tmp_path))
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(unet)))  # dropout streams too: no shapes
  restored = nnx.state(unet, nnx.Param)
  assert not jax.tree.leaves(resumed.frozen_params)  # trainable = "all"
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(jax.device_get(resumed.params)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _flags(config) -> list[str]:
  """--config.<key>=<value> for every field where `config` differs from configs/stage2.py's defaults."""
  default = common.get_config(2)
  flags = []

  def walk(node, reference, prefix):
    for key, value in node.items():
      if hasattr(value, "items"):
        walk(value, reference[key], f"{prefix}{key}.")
      elif value != reference[key]:
        flags.append(f"--config.{prefix}{key}={value}")

  walk(config, default, "")
  return flags


def _latest_log(workdir) -> str:
  logs = list((workdir / "logs").glob("train-*.log"))
  return max(logs, key=os.path.getmtime).read_text() if logs else ""


def test_sigterm_saves_at_the_next_step_and_the_resumed_run_equals_an_uninterrupted_one(demo_dir, uninterrupted,
                                                                                      tmp_path, caplog):
  straight, _, _ = uninterrupted
  config = _train_config(demo_dir)
  config.compilation_cache_dir = jax.config.jax_compilation_cache_dir  # this session's: the step is in it
  command = [sys.executable, "-m", "handi_jax.main", "--config=configs/stage2.py", f"--workdir={tmp_path}",
             "--mode=train", *_flags(config)]
  console = tmp_path / "console.txt"
  with open(console, "w") as out:
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
      # Step 1's metrics are logged just before its checkpoint (orbax's first save, seconds long): the signal lands
      # before step 2 ends, and the run must save the step it is at and stop there.
      deadline = time.monotonic() + 600
      while not re.search(r"\[1\] .*loss=", _latest_log(tmp_path)):
        assert process.poll() is None, f"training ended before step 1:\n{console.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no metrics of step 1 after 600 s"
        time.sleep(0.05)
      process.send_signal(signal.SIGTERM)
      assert process.wait(timeout=300) == 0, console.read_text()[-3000:]
    finally:
      if process.poll() is None:
        process.kill()
  saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert 1 <= saved < NUM_STEPS
  log = _latest_log(tmp_path)
  assert f"SIGTERM: stopped after step {saved} of {NUM_STEPS} and saved it to {tmp_path / 'checkpoints' / str(saved)}" \
         in log
  assert "train step compiled in" in log

  # Resumed as the same command would (its train mode is train_and_evaluate with this config), in this process:
  # the step is compiled here already.
  caplog.set_level(logging.INFO)
  resumed = train.train_and_evaluate(config, str(tmp_path))
  assert f"resumed from step {saved} (input position {saved})" in caplog.text

  manager = train_state.checkpoint_manager(config, tmp_path)
  state, data_state = train_state.restore_checkpoint(manager, NUM_STEPS, straight)
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed)), jax.tree.leaves(jax.device_get(state)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # what it returned is what it saved
  assert data_state == {"position": NUM_STEPS,
                        "training_size": {"height": config.data.height, "width": config.data.width,
                                          "num_frames": config.data.num_frames}}
  for a, b in zip(jax.tree.leaves(jax.device_get(straight)), jax.tree.leaves(jax.device_get(state)), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


_RESTORE_ON_4 = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from handi_jax import sharding
    from handi_jax.components import train_state
    from handi_jax.components import unet as unet_lib
    from tests.helpers import tiny_train_config

    workdir, out = sys.argv[1:3]
    config = tiny_train_config()
    config.mesh.update(data=2, fsdp=2, tensor=1)
    config.sharding_min_size = 0
    mesh = sharding.make_mesh(config)
    target, _ = train_state.abstract_train_state(config, mesh, unet_lib.abstract_unet(config))
    state, data = train_state.restore_checkpoint(train_state.checkpoint_manager(config, workdir), 3, target)
    leaves, targets = jax.tree.leaves(state), jax.tree.leaves(target)
    np.savez(out + "/restored.npz", *[np.asarray(x) for x in leaves])
    json.dump(dict(devices=jax.device_count(), mesh=dict(mesh.shape), data=data,
                   as_target=[x.sharding == t.sharding for x, t in zip(leaves, targets)],
                   shard_fractions=[x.sharding.shard_shape(x.shape) != x.shape and
                                    float(np.prod(x.sharding.shard_shape(x.shape)) / np.prod(x.shape))
                                    for x in leaves]), open(out + "/restored.json", "w"))
""")


def test_checkpoint_of_8_devices_restores_onto_4_with_another_mesh(tmp_path):
  """Saved with fsdp 8 on this process's 8 devices, restored in a 4-device process as data 2 x fsdp 2."""
  config = tiny_train_config()
  config.mesh.update(data=1, fsdp=8, tensor=1)
  config.sharding_min_size = 0  # shard the tiny model's arrays too
  mesh = sharding.make_mesh(config)
  _, params, frozen_params, _ = train_state.split_unet(unet_lib.build_unet(config), config)
  shapes = jax.eval_shape(lambda p, f: train_state.initial_state(config, p, f), params, frozen_params)
  optimizer = train_state.make_optimizer(config)

  def state_at_step_3(params, frozen_params):
    """The initial state after one AdamW update with the parameters as gradients: moments that differ element by
    element, like the parameters."""
    state = train_state.initial_state(config, params, frozen_params)
    return state.replace(step=state.step + 3, opt_state=optimizer.update(params, state.opt_state, params)[1])

  state = jax.jit(state_at_step_3, out_shardings=train_state.state_shardings(
      shapes, mesh, config.sharding_rules, config.sharding_min_size))(params, frozen_params)
  manager = train_state.checkpoint_manager(config, tmp_path)
  assert train_state.save_checkpoint(manager, 3, state, {"position": 3})
  manager.wait_until_finished()
  leaves = jax.tree.leaves(state)
  split_8 = [i for i, x in enumerate(leaves) if x.sharding.shard_shape(x.shape) != x.shape]
  assert split_8 and all(np.prod(leaves[i].sharding.shard_shape(leaves[i].shape)) * 8 == leaves[i].size
                         for i in split_8)

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  child = subprocess.run([sys.executable, "-c", _RESTORE_ON_4, str(tmp_path), str(tmp_path)], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
  assert child.returncode == 0, child.stderr[-3000:]
  info = json.loads((tmp_path / "restored.json").read_text())
  assert info["devices"] == 4 and info["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert info["data"] == {"position": 3}
  assert all(info["as_target"])
  # Every array split 8 ways here is split over fsdp 2 there (the data axis replicates parameters).
  assert all(info["shard_fractions"][i] == 0.5 for i in split_8)
  restored = np.load(tmp_path / "restored.npz")
  assert len(restored.files) == len(leaves)
  for i, leaf in enumerate(jax.device_get(leaves)):
    np.testing.assert_array_equal(restored[f"arr_{i}"], np.asarray(leaf))
