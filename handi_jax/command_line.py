"""The scaffold of every `python -m` command of handi-jax: flags, config, console, log file and input errors.

A command is one call under `if __name__ == "__main__":` at the bottom of its module, e.g. generate's and the
app's:

    command_line.run("generate", ("image", "prompt"), "runs/generate", "Working directory.", generate_job)
    command_line.run("app", (), "runs/app", "Outputs go to <workdir>/app/.", serve,
                     options=(command_line.Option("port", 7860, "Port to serve the page on."),))

It defines --config (default configs/stage2.py; any field overridden with --config.<field>=<value>), --workdir,
--traceback, one string flag --<name> per shortcut (it sets config.<command>.<name>) and the command's options,
lists them all in --help, then runs job(config, workdir, **options) with:
- the console: handi-jax's own warnings, each once, as `warning: <message>`, errors from anywhere, progress bars;
- everything else (INFO and up, libraries, Python warnings) in <workdir>/logs/<command>-<time>.log, absl's format,
  and what C++ libraries (MediaPipe, TensorFlow Lite, XLA) print to the process's stderr themselves;
- XLA's persistent compilation cache (config.compilation_cache_dir);
- an input error (USER_ERRORS, a bad flag or --config override) as one line `error: <message>` and exit status 1;
  --traceback shows the traceback instead.

Flags are defined when the command runs, not at import, so one process imports every job module (handi_jax.main
dispatches to them) without their flags colliding. Commands that keep argparse (handi_jax.convert) share the
console and the error line through setup_logging and exit_on_user_errors.
"""

import atexit
import contextlib
import dataclasses
import difflib
import logging as std_logging
import os
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

import configs
from handi_jax import fileio

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "stage2.py")
# Bad input rather than a bug: a missing file, a wrong value or shape, a checkpoint that does not fit its model
# (convert.core.CheckpointMismatchError), a file that is not JSON or not UTF-8 (both ValueErrors).
USER_ERRORS = (FileNotFoundError, ValueError)
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", tuple: "a tuple such as (32, 64)"}
_OWN_CODE = (str(pathlib.Path(__file__).resolve().parents[1]),)


@dataclasses.dataclass(frozen=True)
class Option:
  """A flag of one command, handed to its job as a keyword argument; its type is that of the default (str when
  None), an enum when `choices` are given."""

  name: str
  default: str | int | bool | None
  help: str
  choices: tuple[str, ...] = ()

  def define(self) -> None:
    if self.choices:
      flags.DEFINE_enum(self.name, self.default, self.choices, self.help)
    elif isinstance(self.default, bool):
      flags.DEFINE_bool(self.name, self.default, self.help)
    elif isinstance(self.default, int):
      flags.DEFINE_integer(self.name, self.default, self.help)
    else:
      flags.DEFINE_string(self.name, self.default, self.help)


def run(command: str, shortcuts: Sequence[str], default_workdir: str, workdir_help: str,
        job: Callable[..., object], *, options: Sequence[Option] = (),
        log_name: Callable[[dict], str | None] | None = None) -> None:
  """Parse the command line, copy each given --<shortcut> into config.<command>.<shortcut>, set up the console,
  the log file and the compilation cache, then job(config, workdir, **options); its return value is ignored (a
  job that has an exit status of its own ends with sys.exit). `log_name(options)` names the log file (None: no
  log file); by default it is `command`."""
  quiet_libraries()
  own_flags = ("config", "workdir", "traceback", *shortcuts, *(option.name for option in options))

  def define_flags():
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Config file with optional variants, e.g. configs/stage2.py:paper,h100x8. "
        "Override any field with --config.<field>=<value> (e.g. --config.train.learning_rate=1e-4).",
        lock_config=True)
    flags.DEFINE_string("workdir", default_workdir, workdir_help)
    flags.DEFINE_bool("traceback", False, "Show the traceback of an input error instead of one line.")
    for name in shortcuts:
      flags.DEFINE_string(name, None, f"Sets config.{command}.{name}.")
    for option in options:
      option.define()
    # absl's --help lists the key flags of the program's main module (named by its file, as python -m runs it).
    for name in own_flags:
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])

  def main(argv):
    values = flags.FLAGS
    with exit_on_user_errors(values.traceback):
      if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
      config = values.config
      for name in shortcuts:
        if values[name].value is not None:
          config[command][name] = values[name].value
      option_values = {option.name: values[option.name].value for option in options}
      log_file = setup_logging(values.workdir, log_name(option_values) if log_name else command)
      if log_file is not None:
        print(f"full log in {log_file}")
        send_native_output_to(log_file)
      enable_compilation_cache(config)
      job(config, values.workdir, **option_values)

  app.run(main, flags_parser=lambda argv: _parse_flags(argv, define_flags))


@contextlib.contextmanager
def exit_on_user_errors(show_traceback: bool):
  """USER_ERRORS end the program with `error: <message>` on stderr and status 1; others keep their traceback."""
  try:
    yield
  except USER_ERRORS as error:
    if show_traceback:
      raise
    print(f"error: {_message(error)}\n(--traceback shows where)", file=sys.stderr)
    sys.exit(1)


def _message(error: Exception) -> str:
  if isinstance(error, OSError) and error.strerror and error.filename:  # open()'s "[Errno 2] No such file..."
    return f"{error.strerror}: {error.filename}"
  return str(error)


_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull", "--helpxml")


def _parse_flags(argv: list[str], define_flags: Callable[[], None]) -> list[str]:
  """Define and parse the flags; a bad flag or --config override is an input error. The config file is read
  first on its own, so that an unknown key is named (with the keys near it) before ml_collections fails on it."""
  with exit_on_user_errors("--traceback" in argv):
    config = configs.load(_config_argument(argv))
    _check_override_keys(argv, config)
    try:
      define_flags()  # --config's default is read here, with the overrides, when no --config is given
      return flags.FLAGS(argv)
    except SystemExit as e:  # absl prints the help asked for, then exits 1: asked-for help is a success
      if e.code == 1 and any(arg.split("=")[0] in _HELP_FLAGS for arg in argv[1:]):
        raise SystemExit(0) from None
      raise
    except flags.IllegalFlagValueError as e:
      raise ValueError(_explain_bad_value(e, config)) from e
    except flags.Error as e:
      raise ValueError(str(e)) from e


def _config_argument(argv: list[str]) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return DEFAULT_CONFIG


def _overrides(argv: list[str]) -> dict[str, str]:
  """Field -> the argument that sets it, for every --config.<field>[=value] (also --noconfig.<field>)."""
  found = {}
  for arg in argv[1:]:
    if match := re.match(r"-{1,2}(?:no)?config\.([^=]+)", arg):
      found[match.group(1)] = arg
  return found


def _check_override_keys(argv: list[str], config: config_dict.ConfigDict) -> None:
  for key, arg in _overrides(argv).items():
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      if not isinstance(node, config_dict.ConfigDict) or part not in node:
        raise ValueError(f"unknown config key {key} (in {arg}). {_near_keys(config, key, parts[:depth])}")
      node = node[part]


def _near_keys(config: config_dict.ConfigDict, key: str, known: list[str]) -> str:
  """Keys spelled like `key` (in its own section where one is, so train.x does not offer stage1_train.x), else those
  of the deepest section of it that exists."""
  flat = _flat_keys(config)
  section = ".".join(known) + "." if known else ""
  same_section = [name for name in flat if name.startswith(section)]
  close = difflib.get_close_matches(key, same_section, n=3, cutoff=0.8) or difflib.get_close_matches(
      key, flat, n=3, cutoff=0.8)
  if close:
    return f"Did you mean {' or '.join(close)}?"
  section = config
  for part in known:
    section = section[part]
  if not isinstance(section, config_dict.ConfigDict):
    return f"{'.'.join(known)} has no fields."
  return f"Keys of {'.'.join(known) or 'the config'}: {', '.join(section.keys())}."


def _flat_keys(node: config_dict.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for name, value in node.items():
    keys.append(prefix + name)
    if isinstance(value, config_dict.ConfigDict):
      keys.extend(_flat_keys(value, f"{prefix}{name}."))
  return keys


def _explain_bad_value(error: flags.IllegalFlagValueError, config: config_dict.ConfigDict) -> str:
  """`config.train.num_steps must be an integer, got 'ten'` instead of int()'s message."""
  match = re.match(r"flag --([\w.]+)=(.*?): ", str(error), re.DOTALL)
  if match is None:
    return str(error)
  name, value = match.groups()
  if name.startswith("config."):
    *sections, field = name.split(".")[1:]
    node = config
    for section in sections:
      node = node[section]
    kind = node.get_type(field)
  else:
    kind, name = type(flags.FLAGS[name].default), f"--{name}"
  if kind not in _TYPE_NAMES:
    return str(error).removeprefix("flag ")
  return f"{name} must be {_TYPE_NAMES[kind]}, got {value!r}"


def quiet_libraries() -> None:
  """Before TensorFlow and transformers are imported: no C++ start-up chatter, no "PyTorch was not found"."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # torch is optional


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


class _ConsoleFormatter(std_logging.Formatter):
  """`warning: <message>`, as a command-line tool says it (absl's prefix of time, thread and line is the log
  file's)."""

  def format(self, record):
    return f"{record.levelname.lower()}: {super().format(record)}"


def setup_logging(workdir: str, name: str | None) -> pathlib.Path | None:
  """The console (absl's handler) keeps the progress bars and what _ConsoleFilter passes, as _ConsoleFormatter
  writes it; everything (INFO and up, library logs and Python warnings) goes to <workdir>/logs/<name>-<time>.log,
  returned (no file when name is None). A remote workdir (gs://...) gets the log at exit: it is written to a
  local temporary file meanwhile, since a log is appended to line by line."""
  if not flags.FLAGS.is_parsed():  # an argparse command: absl's own flags (where logs go) keep their defaults
    flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  console, console_filter, console_format = logging.get_absl_handler(), _ConsoleFilter(), _ConsoleFormatter()
  console.setLevel(std_logging.WARNING)
  console.setFormatter(console_format)
  console.addFilter(console_filter)
  import jax  # noqa: F401 - jax gives its "jax" logger a stderr handler of its own at import
  for handler in std_logging.getLogger("jax").handlers:
    handler.setFormatter(console_format)
    handler.addFilter(console_filter)
  std_logging.captureWarnings(True)
  if name is None:
    return None
  remote = not fileio.is_local(workdir)
  log_dir = pathlib.Path(tempfile.mkdtemp(prefix="handi_jax-log-")) if remote else pathlib.Path(workdir) / "logs"
  log_dir.mkdir(parents=True, exist_ok=True)
  path = log_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
  file_handler = std_logging.FileHandler(path)
  if remote:
    atexit.register(_upload_log, file_handler, path, fileio.as_path(workdir) / "logs" / path.name)
  file_handler.setFormatter(logging.PythonFormatter())
  root = std_logging.getLogger()
  root.addHandler(file_handler)
  root.setLevel(std_logging.INFO)
  logging.set_verbosity(logging.INFO)
  return path


def send_native_output_to(log_file: pathlib.Path) -> None:
  """C++ libraries write their notices to file descriptor 2 themselves, past Python's logging (MediaPipe's
  `W0000 ... inference_feedback_manager.cc`, TensorFlow Lite's `INFO: Created ... XNNPACK delegate`): point it at
  the log file, which child processes then inherit too, and keep Python's sys.stderr (progress bars, the console
  handlers, the error line) on the terminal. For a command's process only: it rebinds the process's stderr."""
  sys.stderr.flush()
  terminal = os.dup(2)
  log = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
  os.dup2(log, 2)
  os.close(log)
  console = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors=sys.stderr.errors)
  for handler in (logging.get_absl_handler().python_handler, *std_logging.getLogger("jax").handlers):
    if isinstance(handler, std_logging.StreamHandler) and handler.stream in (sys.stderr, sys.__stderr__):
      handler.setStream(console)
  sys.stderr = console


def _upload_log(handler: std_logging.FileHandler, local: pathlib.Path, remote) -> None:
  handler.flush()
  fileio.write_bytes(remote, local.read_bytes())
  print(f"log uploaded to {remote}", file=sys.stderr)


def enable_compilation_cache(config) -> None:
  """XLA's persistent compilation cache in config.compilation_cache_dir: a second run skips compiling."""
  import jax

  if config.compilation_cache_dir:
    directory = pathlib.Path(os.path.expanduser(config.compilation_cache_dir))
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Every compile, even an eager op's: random initialisation runs op by op (the demo's UNet: 25 s -> 3 s warm).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
