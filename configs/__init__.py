"""ml_collections configs: `common.py` holds the defaults and variants, `stage1.py`/`stage2.py` the stages."""

import importlib.util
import pathlib


def load(spec: str):
  """Load `path/to/config.py[:variants]` the way `--config=` does (without command-line overrides)."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"config file {path!r} not found (expected e.g. configs/stage2.py)")
  module_spec = importlib.util.spec_from_file_location(f"_handi_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
