"""The scaffold of the `python -m handi_jax.<job>` commands: --config, --workdir and flags for one config section.

Flags are defined when the command runs, not at import, so handi_jax.main (which owns --config and --workdir)
can import the job modules.
"""

import pathlib
from collections.abc import Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "stage2.py")


def run(section: str, shortcuts: Sequence[str], default_workdir: str, workdir_help: str,
        job: Callable[[object, str], None]) -> None:
  """Parse the flags, copy each given --<name> into config.<section>.<name>, then job(config, workdir)."""
  config_flag = config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG,
      "Config file with optional variants (configs/stage2.py:paper); override fields with --config.<field>=...",
      lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", default_workdir, workdir_help)
  values = {name: flags.DEFINE_string(name, None, f"Sets config.{section}.{name}.") for name in shortcuts}

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = config_flag.value
    for name, flag in values.items():
      if flag.value is not None:
        config[section][name] = flag.value
    job(config, workdir_flag.value)

  app.run(main)
