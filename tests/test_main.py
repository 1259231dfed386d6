"""The entry point as a user runs it: a subprocess with a clean environment."""

import logging as std_logging
import os
import pathlib
import subprocess
import sys

from absl import logging

from handi_jax import main
from tests.conftest import REPO_ROOT


def _run(*args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "handi_jax.main", *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_describe_explains_missing_devices():
  result = _run("--config=configs/stage2.py:paper,h100x8", "--mode=describe")
  assert result.returncode == 0, result.stderr
  assert "block_out_channels" in result.stdout
  assert "mesh axes ('data', 'fsdp', 'tensor') -> shape (1, 8, 1)" in result.stdout
  assert "wants 8 devices" in result.stdout and "1 cpu device(s) exist here" in result.stdout


def test_pod_variant_describes_on_one_host_and_train_says_how_to_start_hosts(tmp_path):
  described = _run("--config=configs/stage2.py:paper,tpu_v5p_64", "--mode=describe")
  assert described.returncode == 0, described.stderr
  assert "global batch 64 clips a step over 32 batch device(s)" in described.stdout
  trained = _run("--config=configs/stage2.py:paper,tpu_v5p_64", f"--workdir={tmp_path}", "--mode=train")
  lines = [line for line in trained.stderr.strip().splitlines() if line.strip()]
  assert trained.returncode != 0 and len(lines) == 1, trained.stderr
  assert lines[0].startswith("error: multi-host start-up") and "--config.multihost=False" in lines[0]


def test_unknown_override_is_one_line_error():
  result = _run("--config=configs/stage2.py", "--config.nope=1", "--mode=describe")
  assert result.returncode != 0
  lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
  assert lines[0].startswith("error: bad override '--config.nope=1'") and "Valid keys near it" in lines[0]


def test_wrong_type_override_is_one_line_error():
  result = _run("--config=configs/stage1.py", "--config.train.learning_rate=fast", "--mode=describe")
  assert result.returncode != 0
  lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and "train.learning_rate" in lines[0], result.stderr


def test_input_errors_of_a_mode_are_one_line(tmp_path):
  result = _run("--config=configs/stage2.py", "--mode=generate", f"--workdir={tmp_path}",
                "--config.generate.image=/does/not/exist.png", "--config.generate.prompt=cut the onion")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "error: image /does/not/exist.png does not exist" in result.stderr


def _record(level, path, message):
  return std_logging.LogRecord("absl", level, str(path), 1, message, None, None)


def test_console_shows_our_warnings_once_and_errors_but_not_library_notices():
  console = main._ConsoleFilter()
  ours = REPO_ROOT / "handi_jax" / "checkpoints.py"
  library = pathlib.Path(sys.prefix) / "lib" / "site-packages" / "tensorflow_datasets" / "feature.py"
  assert console.filter(_record(std_logging.WARNING, ours, "random weights"))
  assert not console.filter(_record(std_logging.WARNING, ours, "random weights"))  # the same warning again
  assert console.filter(_record(std_logging.WARNING, ours, "another warning"))
  assert not console.filter(_record(std_logging.WARNING, library, "`FeatureConnector.dtype` is deprecated"))
  assert console.filter(_record(std_logging.ERROR, library, "a library failed"))


def test_the_log_file_gets_everything(tmp_path, capfd):
  handler = logging.get_absl_handler()
  level, filters, root_handlers = handler.level, list(handler.filters), list(std_logging.getLogger().handlers)
  jax_handlers = {h: list(h.filters) for h in std_logging.getLogger("jax").handlers}
  root_level = std_logging.getLogger().level
  try:
    log_file = main.setup_logging(str(tmp_path), "train")
    logging.info("an info line")
    std_logging.getLogger("some_library").warning("a library's deprecation notice")
    # jax logs through a stderr handler of its own (e.g. on every machine without a TPU).
    std_logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
    for h in std_logging.getLogger().handlers:
      h.flush()
    text = log_file.read_text()
  finally:
    handler.setLevel(level)
    handler.filters[:] = filters
    std_logging.getLogger().handlers[:] = root_handlers
    for h, kept in jax_handlers.items():
      h.filters[:] = kept
    std_logging.getLogger().setLevel(root_level)
  assert log_file.parent == tmp_path / "logs"
  assert "an info line" in text and "a library's deprecation notice" in text
  assert "Unable to initialize backend 'tpu'" in text
  assert "Unable to initialize backend" not in capfd.readouterr().err
