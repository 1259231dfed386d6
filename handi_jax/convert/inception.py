"""pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth) -> models.inception.FIDInceptionV3.

The file is a torchvision Inception3 state dict; its BatchNorm running statistics become the module's `mean`
and `var`, `num_batches_tracked` counters and the 1008-way classifier `fc` (FID reads the pool features
before it) are dropped. A .pth needs torch to read; a safetensors copy of the same names does not.
"""

import os

from flax import nnx

from handi_jax import fileio
from handi_jax.convert import core
from handi_jax.models.inception import INPUT_SIZE, FIDInceptionV3

RULES = (
    core.Rule("{m}.running_mean", "{m}.mean"),
    core.Rule("{m}.running_var", "{m}.var"),
) + core.DEFAULT_RULES
UNUSED = ("fc.weight", "fc.bias")


def from_state_dict(state_dict, *, resize_to: int | None = INPUT_SIZE, what: str = "FID Inception") -> FIDInceptionV3:
  state_dict = {k: v for k, v in state_dict.items() if k not in UNUSED and not k.endswith(".num_batches_tracked")}
  return core.build_with_params(lambda: FIDInceptionV3(resize_to=resize_to, rngs=nnx.Rngs(0)),
                                core.to_flax(state_dict, RULES), what)


def load_pretrained(path: str | os.PathLike, *, resize_to: int | None = INPUT_SIZE) -> FIDInceptionV3:
  """The FID Inception from pytorch-fid's weights file (.pth) or a safetensors file with the same names."""
  path = fileio.as_path(path)
  if not path.is_file():
    raise FileNotFoundError(f"FID Inception weights {path} not found: set config.evaluate.inception to pytorch-fid's "
                            "pt_inception-2015-12-05-6726825d.pth (or leave it empty: FID reads 'not configured')")
  return from_state_dict(core.read_state_dict(path), resize_to=resize_to, what=f"FID Inception {path}")
