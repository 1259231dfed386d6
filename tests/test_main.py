"""The entry points as a user runs them: subprocesses with a clean environment; and the scaffold they share
(handi_jax.command_line): flags, --help, one-line input errors, the console and the log file."""

import contextlib
import logging as std_logging
import os
import pathlib
import re
import subprocess
import sys

import pytest
from absl import flags, logging

import configs
from handi_jax import command_line
from tests.conftest import REPO_ROOT


def _run(*args, module="handi_jax.main"):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def _error_lines(result) -> list[str]:
  return [line for line in result.stderr.strip().splitlines() if line.strip()]


def test_describe_explains_missing_devices():
  result = _run("--config=configs/stage2.py:paper,h100x8", "--mode=describe")
  assert result.returncode == 0, result.stderr
  assert "block_out_channels" in result.stdout
  assert "mesh axes ('data', 'fsdp', 'tensor') -> shape (1, 8, 1)" in result.stdout
  assert "wants 8 devices" in result.stdout and "1 cpu device(s) exist here" in result.stdout


def test_without_config_main_describes_the_default_config():
  result = _run("--mode=describe")
  assert result.returncode == 0, result.stderr
  assert "stage: 2" in result.stdout and "num_steps: 200" in result.stdout  # configs/stage2.py, the demo variant
  assert "full log in" not in result.stdout  # describe only prints


def test_pod_variant_describes_on_one_host_and_train_says_how_to_start_hosts(tmp_path):
  described = _run("--config=configs/stage2.py:paper,tpu_v5p_64", "--mode=describe")
  assert described.returncode == 0, described.stderr
  assert "global batch 64 clips a step over 32 batch device(s)" in described.stdout
  trained = _run("--config=configs/stage2.py:paper,tpu_v5p_64", f"--workdir={tmp_path}", "--mode=train")
  lines = _error_lines(trained)
  assert trained.returncode != 0 and len(lines) == 1, trained.stderr
  assert lines[0].startswith("error: multi-host start-up") and "--config.multihost=False" in lines[0]
  log_file, = (tmp_path / "logs").glob("train-*.log")
  assert f"full log in {log_file}" in trained.stdout


@pytest.mark.parametrize("args, error", [
    (["--config.train.num_steps=ten"], "error: config.train.num_steps must be an integer, got 'ten'"),
    (["--config=configs/stage1.py", "--config.train.learnig_rate=1"],
     "error: unknown config key train.learnig_rate (in --config.train.learnig_rate=1). "
     "Did you mean train.learning_rate?")])
def test_a_bad_override_is_one_error_line(args, error):
  result = _run(*args, "--mode=describe")
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
  assert _error_lines(result) == [error, "(--traceback shows where)"]


def test_an_unknown_key_without_a_near_one_lists_the_keys_of_its_section():
  config = configs.load("configs/stage2.py")
  with pytest.raises(ValueError, match=r"^unknown config key nope \(in --config.nope=1\)\. Keys of the config: "
                                       r"compilation_cache_dir, compile_report, cpu_fast_compile, data, "):
    command_line._check_override_keys(["prog", "--config.nope=1"], config)
  with pytest.raises(ValueError, match=r"Keys of train: adam_b1, adam_b2, "):
    command_line._check_override_keys(["prog", "--config.train.zzz=1"], config)
  command_line._check_override_keys(["prog", "--config.train.num_steps=ten", "--noconfig.multihost"], config)


def test_input_errors_of_a_mode_are_one_line(tmp_path):
  result = _run("--config=configs/stage2.py", "--mode=generate", f"--workdir={tmp_path}",
                "--config.generate.image=/does/not/exist.png", "--config.generate.prompt=cut the onion")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "error: image /does/not/exist.png does not exist" in result.stderr


@pytest.mark.parametrize("module, own_flags", [
    ("handi_jax.main", ("--mode", "--config", "--workdir", "--traceback")),
    ("handi_jax.generate", ("--image", "--prompt", "--mask", "--prompts_file", "--config", "--workdir")),
    ("handi_jax.evaluate", ("--prompts_file", "--gt_dir", "--runs", "--traceback")),
    ("handi_jax.app", ("--port", "--host", "--config", "--workdir")),
])
def test_help_lists_the_flags_of_the_command(module, own_flags):
  result = _run("--help", module=module)
  assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
  for flag in own_flags:
    assert re.search(rf"^  --(\[no\])?{flag[2:]}:", result.stdout, re.MULTILINE), (flag, result.stdout)
  assert "--config.<field>=<value>" in result.stdout


def test_a_missing_input_file_is_one_error_line_and_traceback_shows_where(tmp_path):
  missing = tmp_path / "missing.json"
  result = _run(f"--prompts_file={missing}", f"--workdir={tmp_path}", module="handi_jax.evaluate")
  assert result.returncode == 1, result.stderr
  lines = _error_lines(result)
  assert len(lines) == 2 and lines[0].startswith("error: ") and str(missing) in lines[0], result.stderr
  assert lines[1] == "(--traceback shows where)" and "full log in" in result.stdout
  shown = _run(f"--prompts_file={missing}", f"--workdir={tmp_path}", "--traceback", module="handi_jax.evaluate")
  assert shown.returncode == 1 and "Traceback (most recent call last)" in shown.stderr
  assert shown.stderr.strip().splitlines()[-1].startswith("FileNotFoundError: ")


@contextlib.contextmanager
def logging_restored_afterwards():
  """command_line.setup_logging sets up the process's logging; a test runs it in here, which puts it back as it
  was. The console handlers write to the test's sys.stderr meanwhile (they hold pytest's of the collection
  phase), so enter it in the test itself, not in a fixture (whose sys.stderr is the setup phase's)."""
  console = logging.get_absl_handler()
  root = std_logging.getLogger()
  console_handlers = [console.python_handler, *std_logging.getLogger("jax").handlers]
  saved = (console.level, list(console.filters), list(root.handlers), root.level, logging.get_absl_logger().level,
           flags.FLAGS.is_parsed(), [(h.stream, h.formatter, list(h.filters)) for h in console_handlers])
  for handler in console_handlers:
    handler.setStream(sys.stderr)
  try:
    yield
  finally:
    level, filters, handlers, root_level, absl_level, parsed, console_settings = saved
    console.setLevel(level)
    console.filters[:] = filters
    for handler in set(root.handlers) - set(handlers):
      if isinstance(handler, std_logging.FileHandler):  # the log file; the console's stream is pytest's
        handler.close()
    root.handlers[:] = handlers
    root.setLevel(root_level)
    for handler, (stream, formatter, kept_filters) in zip(console_handlers, console_settings, strict=True):
      handler.setStream(stream)
      handler.setFormatter(formatter)
      handler.filters[:] = kept_filters
    std_logging.captureWarnings(False)
    if not parsed:
      flags.FLAGS.unparse_flags()
    # The absl logger's own level, not the verbosity flag's: before any parse it is unset (records pass to pytest's
    # capture), while setting the default verbosity back would fix it at WARNING.
    logging.get_absl_logger().setLevel(absl_level)


def _record(level, path, message, name="absl"):
  return std_logging.LogRecord(name, level, str(path), 1, message, None, None)


OURS = REPO_ROOT / "handi_jax" / "checkpoints.py"
LIBRARY = pathlib.Path(sys.prefix) / "lib" / "site-packages" / "tensorflow_datasets" / "feature.py"


def test_console_shows_our_warnings_once_and_errors_but_not_library_notices():
  console = command_line._ConsoleFilter()
  assert console.filter(_record(std_logging.WARNING, OURS, "random weights"))
  assert not console.filter(_record(std_logging.WARNING, OURS, "random weights"))  # the same warning again
  assert console.filter(_record(std_logging.WARNING, OURS, "another warning"))
  assert not console.filter(_record(std_logging.WARNING, LIBRARY, "`FeatureConnector.dtype` is deprecated"))
  assert console.filter(_record(std_logging.ERROR, LIBRARY, "a library failed"))


def test_the_console_says_warnings_plainly_and_the_log_file_gets_everything(tmp_path, capsys):
  with logging_restored_afterwards():
    log_file = command_line.setup_logging(str(tmp_path), "train")
    logging.info("an info line")
    logging.warning("a warning of ours")
    logging.warning("a warning of ours")
    library = std_logging.getLogger("some_library")
    library.handle(_record(std_logging.WARNING, LIBRARY, "a library's deprecation notice", library.name))
    library.handle(_record(std_logging.ERROR, LIBRARY, "a library failed", library.name))
    # jax logs through a stderr handler of its own (e.g. on every machine without a TPU).
    jax_logger = std_logging.getLogger("jax._src.xla_bridge")
    jax_logger.handle(_record(std_logging.INFO, LIBRARY, "Unable to initialize backend 'tpu'", jax_logger.name))
    for h in std_logging.getLogger().handlers:
      h.flush()
  text = log_file.read_text()
  assert log_file.parent == tmp_path / "logs" and log_file.name.startswith("train-")
  assert "an info line" in text and "a library's deprecation notice" in text
  assert "Unable to initialize backend 'tpu'" in text
  assert re.search(r"^W\d{4} [\d:.]+ +\d+ test_main.py:\d+\] a warning of ours$", text, re.MULTILINE), text
  assert capsys.readouterr().err.splitlines() == ["warning: a warning of ours", "error: a library failed"]


_NATIVE_OUTPUT = """
import os, subprocess, sys
from handi_jax import command_line

def job(config, workdir):
  os.write(2, b"W0000 00:00:1 1 inference_feedback_manager.cc:114] a C++ notice\\n")  # as MediaPipe writes it
  subprocess.run(["sh", "-c", "echo a child process notice >&2"], check=True)
  print("a line of ours on the console", file=sys.stderr)

command_line.run("native", (), "runs/native", "Working directory.", job)
"""


def test_what_cpp_libraries_print_themselves_goes_to_the_log_file(tmp_path):
  """MediaPipe and TensorFlow Lite write to file descriptor 2 from C++, past Python's logging."""
  result = subprocess.run([sys.executable, "-c", _NATIVE_OUTPUT, f"--workdir={tmp_path}"], cwd=REPO_ROOT,
                          env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert _error_lines(result) == ["a line of ours on the console"]
  (log_file,) = (tmp_path / "logs").glob("native-*.log")
  assert result.stdout.strip() == f"full log in {log_file}"
  log = log_file.read_text()
  assert "inference_feedback_manager.cc:114] a C++ notice\n" in log and "a child process notice\n" in log


def test_distributed_arguments_come_from_the_config_else_the_environment():
  from handi_jax import main

  config = configs.load("configs/stage2.py")
  environ = dict(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="4", JAX_PROCESS_ID="3")
  assert main.distributed_arguments(config, environ) == dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                                                             process_id=3)
  assert main.distributed_arguments(config, {}) == {}  # SLURM and TPU pods: JAX finds them itself
  config.distributed.update(coordinator_address="host:99", num_processes=2, process_id=0)
  assert main.distributed_arguments(config, environ) == dict(coordinator_address="host:99", num_processes=2,
                                                             process_id=0)
  with pytest.raises(ValueError, match="must be integers"):
    main.distributed_arguments(configs.load("configs/stage2.py"), dict(JAX_NUM_PROCESSES="two"))


_START_BY_HAND = """
import jax
import configs
from handi_jax import main
main._maybe_initialize_distributed(configs.load("configs/stage2.py"))
print("PROCESS", jax.process_index(), jax.process_count(), flush=True)
jax.distributed.shutdown()
"""


def test_two_processes_started_by_hand_form_one_job():
  """JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID alone start a two-process job (Kubernetes, ssh)."""
  import socket

  with socket.socket() as free:
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  processes = [subprocess.Popen([sys.executable, "-c", _START_BY_HAND], cwd=REPO_ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env, JAX_PROCESS_ID=str(i)))
               for i in range(2)]
  outputs = [p.communicate(timeout=120)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  assert sorted(line for out in outputs for line in out.splitlines() if line.startswith("PROCESS")) == [
      "PROCESS 0 2", "PROCESS 1 2"]
