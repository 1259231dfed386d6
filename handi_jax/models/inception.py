"""The FID Inception-v3 (pytorch-fid's `InceptionV3` with `use_fid_inception=True`) in Flax NNX.

This is the network of TensorFlow's FID code (the 2015-12-05 Inception graph), as pytorch-fid rebuilds it on
torchvision's Inception3 with its FIDInceptionA/C/E_1/E_2 blocks (average pools without the padded zeros,
a max pool in the last block). Attribute paths equal the names in pytorch-fid's weights file
(pt_inception-2015-12-05-6726825d.pth: `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch5x5_1.bn.running_mean`,
...), so handi_jax.convert.inception imports it with one rule table. Channels-last; BatchNorm is in inference
form (running statistics), so the whole network is one pure function of the pixels.

`model(images)`: float RGB (N, H, W, 3) in [0, 1] -> the 2048-d pool features (N, 2048) FID uses. Like
pytorch-fid's defaults (resize_input, normalize_input), images are resized bilinearly to 299 x 299 (no
antialiasing, half-pixel centres: torch's `interpolate(..., align_corners=False)`) and scaled to [-1, 1];
`resize_to=None` skips the resize (inputs then need at least 75 x 75 pixels).
"""

import jax
import jax.numpy as jnp
from flax import linen, nnx

FEATURES = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3  # torchvision's BasicConv2d


class BatchNorm(nnx.Module):
  """Inference BatchNorm; the running statistics are Params, so conversion treats them like weights."""

  def __init__(self, features: int, *, rngs: nnx.Rngs):
    del rngs
    self.scale = nnx.Param(jnp.ones((features,)))
    self.bias = nnx.Param(jnp.zeros((features,)))
    self.mean = nnx.Param(jnp.zeros((features,)))
    self.var = nnx.Param(jnp.ones((features,)))

  def __call__(self, x):
    return (x - self.mean.value) * jax.lax.rsqrt(self.var.value + BN_EPS) * self.scale.value + self.bias.value


class BasicConv2d(nnx.Module):
  """Conv (no bias) + BatchNorm + ReLU; `padding` is torch's (ph, pw)."""

  def __init__(self, in_channels, out_channels, kernel, stride=1, padding=(0, 0), *, rngs):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    self.conv = nnx.Conv(in_channels, out_channels, kernel_size=kernel, strides=(stride, stride),
                         padding=tuple((p, p) for p in padding), use_bias=False, rngs=rngs)
    self.bn = BatchNorm(out_channels, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _max_pool(x, stride=2, padding=0):
  return linen.max_pool(x, (3, 3), (stride, stride), padding=((padding, padding),) * 2)


def _avg_pool(x):
  """3 x 3, stride 1, padding 1, padded zeros not counted (FIDInception*'s count_include_pad=False)."""
  return linen.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nnx.Module):  # FIDInceptionA

  def __init__(self, in_channels, pool_features, *, rngs):
    self.branch1x1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(_avg_pool(x))], -1)


class InceptionB(nnx.Module):  # torchvision's, unchanged by pytorch-fid

  def __init__(self, in_channels, *, rngs):
    self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), _max_pool(x)], -1)


class InceptionC(nnx.Module):  # FIDInceptionC

  def __init__(self, in_channels, channels_7x7, *, rngs):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x):
    double = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      double = layer(double)
    return jnp.concatenate([
        self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), double,
        self.branch_pool(_avg_pool(x))], -1)


class InceptionD(nnx.Module):  # torchvision's

  def __init__(self, in_channels, *, rngs):
    self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), seven, _max_pool(x)], -1)


class InceptionE(nnx.Module):
  """FIDInceptionE_1 (`max_pool=False`: average pool without padded zeros) or FIDInceptionE_2 (max pool)."""

  def __init__(self, in_channels, max_pool: bool, *, rngs):
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(in_channels, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x):
    three = self.branch3x3_1(x)
    double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _max_pool(x, stride=1, padding=1) if self.max_pool else _avg_pool(x)
    return jnp.concatenate([
        self.branch1x1(x), self.branch3x3_2a(three), self.branch3x3_2b(three),
        self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double), self.branch_pool(pooled)], -1)


class FIDInceptionV3(nnx.Module):
  """See the module docstring; `resize_to` is the square side images are resized to (None: as given)."""

  def __init__(self, *, resize_to: int | None = INPUT_SIZE, rngs: nnx.Rngs):
    self.resize_to = resize_to
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, max_pool=False, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool=True, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FID Inception input: expected (batch, height, width, 3) RGB in [0, 1], got {images.shape}")
    x = images.astype(jnp.float32)
    if self.resize_to is not None:
      x = jax.image.resize(x, (x.shape[0], self.resize_to, self.resize_to, 3), "linear", antialias=False)
    x = 2.0 * x - 1.0
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool(x)))
    x = _max_pool(x)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    return x.mean(axis=(1, 2))
