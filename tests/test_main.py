"""The entry point as a user runs it: a subprocess with a clean environment."""

import os
import subprocess
import sys

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
