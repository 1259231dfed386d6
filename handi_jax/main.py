"""handi-jax entry point: `python -m handi_jax.main --config=configs/stage2.py --workdir=DIR --mode=MODE`.

Parses flags and the config, sets up JAX (multi-host when asked), then hands over to one mode.
"""

import difflib
import importlib
import logging as std_logging
import os
import pathlib
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

import configs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Config file with optional variants, e.g. configs/stage2.py:paper,h100x8. "
    "Override any field with --config.<field>=<value> (e.g. --config.train.learning_rate=1e-4).",
    lock_config=True)
flags.mark_flag_as_required("config")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, logs and outputs.")

def describe(config, workdir):
  """Print the resolved config and the device mesh it would build; build it when the devices exist."""
  import jax

  from handi_jax import sharding

  print(config)
  shape = sharding.mesh_shape(config.mesh, jax.device_count(), config.num_devices_expected)
  print(f"mesh axes {sharding.MESH_AXES} -> shape {tuple(shape.values())}")
  batch_devices = shape.data * shape.fsdp
  print(f"global batch {sharding.global_batch_size(config.train, batch_devices)} clips a step over "
        f"{batch_devices} batch device(s)")
  if shape.num_devices != jax.device_count():
    print(f"this config wants {shape.num_devices} devices ({config.num_devices_expected} expected by the "
          f"variant); {jax.device_count()} {jax.default_backend()} device(s) exist here, so the mesh is not "
          "built. On the target hardware it is; for a dry run on CPU set "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={shape.num_devices}.")
    return
  mesh = sharding.make_mesh(config)
  print(f"mesh built: {dict(mesh.shape)} over {mesh.devices.size} device(s)")


# mode -> function or "module:function" (imported on use); each takes (config, workdir).
MODES = {
    "describe": describe,
    "train": "handi_jax.train:train_and_evaluate",
    "generate": "handi_jax.generate:generate_from_config",
    "evaluate": "handi_jax.evaluate:evaluate",
    "export": "handi_jax.export:export_from_config",
    "predict_masks": "handi_jax.generate:predict_masks_from_config",
    "demo": "handi_jax.demo:run_demo",
    "compile_report": "handi_jax.compile_report:compile_report",
}
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback for input errors.")
_MODE = flags.DEFINE_enum("mode", "train", list(MODES), "What to run: " + ", ".join(MODES) + ".")


def _parse_flags(argv):
  """absl parsing, with one-line errors for bad --config overrides instead of a traceback."""
  if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]) and "--help" not in argv:
    sys.exit("error: --config is required, e.g. --config=configs/stage2.py (variants: configs/stage2.py:paper)")
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"error: {_explain_flag_error(e, argv)}")


def _explain_flag_error(error, argv) -> str:
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(...))
    error = error.args[0]
  text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  lines = [line.strip().strip("'") for line in text.splitlines() if line.strip()] or [type(error).__name__]
  # A config file that raised: its own last line says what is wrong, the traceback does not.
  message = f"{lines[0]} {lines[-1]}" if "Traceback (most recent call last):" in lines else "; ".join(lines)
  override = next((a for a in argv[1:] if a.startswith("--config.")
                   and _mentions(message, a.split("=")[0][len("--config."):])), None)
  if override is None:
    return message
  key = override.split("=")[0][len("--config."):]
  valid = _valid_keys(argv)
  close = difflib.get_close_matches(key, valid, n=5, cutoff=0.5)
  parent = key.rpartition(".")[0]
  siblings = [k for k in valid if k.rpartition(".")[0] == parent][:12]
  hint = ", ".join(close or siblings)
  return f"bad override {override!r}: {message}. Valid keys near it: {hint}"


def _mentions(message: str, key: str) -> bool:
  return any(part and part in message for part in key.split(".")) or "override" in message.lower()


def _valid_keys(argv) -> list[str]:
  """Flattened field names of the config the command line selects (without overrides)."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "configs/stage2.py")
  try:
    config = configs.load(path)
  except Exception:  # noqa: BLE001 - only used to suggest names; the caller reports the real error
    return []
  keys = []

  def walk(node, prefix):
    for name, value in node.items():
      full = f"{prefix}{name}"
      if hasattr(value, "items"):
        walk(value, full + ".")
      else:
        keys.append(full)

  walk(config, "")
  return keys


_OWN_CODE = (str(pathlib.Path(__file__).resolve().parents[1]),)


class _ConsoleFilter(std_logging.Filter):
  """The console shows handi-jax's own warnings, each once, and errors from anywhere; libraries' deprecation
  notices and repeats go to the log file only."""

  def __init__(self):
    super().__init__()
    self._seen = set()

  def filter(self, record):
    own = record.pathname.startswith(_OWN_CODE) and "site-packages" not in record.pathname
    key = (record.levelno, record.getMessage())
    if key in self._seen or not (own or record.levelno >= std_logging.ERROR):
      return False
    self._seen.add(key)
    return True


def setup_logging(workdir: str, mode: str) -> pathlib.Path:
  """Everything (INFO and up, library logs and Python warnings) goes to <workdir>/logs/<mode>-<time>.log; the
  console keeps the progress bars and what _ConsoleFilter passes."""
  log_dir = pathlib.Path(workdir) / "logs"
  log_dir.mkdir(parents=True, exist_ok=True)
  path = log_dir / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}.log"
  file_handler = std_logging.FileHandler(path)
  file_handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  root = std_logging.getLogger()
  root.addHandler(file_handler)
  root.setLevel(std_logging.INFO)
  logging.set_verbosity(logging.INFO)
  console = logging.get_absl_handler()
  console.setLevel(std_logging.WARNING)
  console_filter = _ConsoleFilter()
  console.addFilter(console_filter)
  import jax  # noqa: F401 - jax gives its "jax" logger a stderr handler of its own at import
  for handler in std_logging.getLogger("jax").handlers:
    handler.addFilter(console_filter)
  std_logging.captureWarnings(True)
  return path


def enable_compilation_cache(config) -> None:
  """XLA's persistent compilation cache in config.compilation_cache_dir: a second run skips compiling."""
  import jax

  if config.compilation_cache_dir:
    directory = pathlib.Path(os.path.expanduser(config.compilation_cache_dir))
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Every compile, even an eager op's: random initialisation runs op by op (the demo's UNet: 25 s -> 3 s warm).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _maybe_initialize_distributed(config):
  import jax

  multihost = config.multihost
  if multihost is None:
    multihost = any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"))
    multihost = multihost and int(os.environ.get("SLURM_NTASKS", "2")) > 1
  if multihost:
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
      sys.exit(f"error: multi-host start-up (jax.distributed.initialize) failed: {str(e).rstrip('.')}. Start "
               "every host through launch/ (tpu_pod.sh, slurm_h100.sbatch), or run on one host with "
               "--config.multihost=False")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found": torch is optional
  log_file = None if _MODE.value == "describe" else setup_logging(_WORKDIR.value, _MODE.value)
  import jax
  import tensorflow as tf

  # TensorFlow only feeds data: keep it off the accelerators JAX owns.
  tf.config.experimental.set_visible_devices([], "GPU")
  config = _CONFIG.value
  enable_compilation_cache(config)
  if _MODE.value not in ("describe", "compile_report"):  # these only resolve and compile, on one host
    _maybe_initialize_distributed(config)
  if log_file is not None:
    print(f"handi-jax --mode={_MODE.value}: full log in {log_file}")
  logging.info("config:\n%s", config)
  logging.info("JAX backend %s, process %d of %d, %d local / %d global devices", jax.default_backend(),
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  target = MODES[_MODE.value]
  if callable(target):
    return target(config, _WORKDIR.value)
  module_name, function_name = target.split(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if not re.match(rf"No module named '{re.escape(module_name)}'", str(e)):
      raise
    sys.exit(f"error: --mode={_MODE.value} is not available in this version of handi-jax "
             f"({module_name} is not implemented yet).")
  try:
    getattr(module, function_name)(config, _WORKDIR.value)
  except (FileNotFoundError, ValueError) as e:  # bad input (a missing file, a wrong shape, a mismatch)
    if _TRACEBACK.value:
      raise
    sys.exit(f"error: {e}\n(--traceback shows where)")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
