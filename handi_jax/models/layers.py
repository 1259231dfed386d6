"""Layer constructors every model here is built from (UNet, VAE, CLIP): one kernel initialiser, torch's padding and
norm conventions, and logical axis names on every parameter (the sharding rules map them onto the mesh)."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from handi_jax.models import attention

# LeCun normal, N(0, 1 / fan_in). Real runs load converted weights, so the random init only matters to tests and the
# demo: this is what the UNet and the CLIP text encoder have always drawn (the demo's random text encoder, and so its
# printed numbers, depend on it), and a plain normal is cheap to compile per shape (a truncated one is not).
KERNEL_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


@dataclasses.dataclass(frozen=True)
class LayerOptions:
  """Precision and attention kernel shared by every layer of a model."""

  dtype: Any = jnp.float32        # compute dtype
  param_dtype: Any = jnp.float32  # master weights
  attention: str = "xla"          # kernel for the UNet's spatial attention (see attention.py)


def conv(in_features: int, out_features: int, opts: LayerOptions, rngs: nnx.Rngs, kernel: int = 3,
         stride: int = 1, padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
         zero_init: bool = False) -> nnx.Conv:
  """torch Conv2d(k, stride, padding=k//2): symmetric explicit padding (XLA 'SAME' pads (0, 1) at stride 2), or
  `padding` ((top, bottom), (left, right))."""
  pad = kernel // 2
  return nnx.Conv(
      in_features, out_features, (kernel, kernel), strides=stride, padding=padding or ((pad, pad), (pad, pad)),
      kernel_init=nnx.with_partitioning(_zeros if zero_init else KERNEL_INIT, (None, None, "conv_in", "conv_out")),
      bias_init=nnx.with_partitioning(_zeros, ("conv_out",)), dtype=opts.dtype, param_dtype=opts.param_dtype,
      rngs=rngs)


class TemporalConv(nnx.Conv):
  """nnx.Conv with kernel (3, 1, 1) and padding (1, 0, 0) over (batch, frames, h, w, C), the same parameters.

  On CPU it runs as one matmul of every frame with the three taps side by side, (C, 3 C), whose outputs are added
  shifted by a frame: XLA:CPU runs the (3, 1, 1) convolution and its gradients 3-4x slower (fwd + bwd at 9 x 16 x
  16 x 32: 1.3 instead of 5.1 ms CPU). Other platforms keep the convolution.
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if attention.target_platform() != "cpu":
      return super().__call__(inputs)
    x, kernel, bias = self.promote_dtype((inputs, self.kernel.value, self.bias.value), dtype=self.dtype)
    c_in, c_out = kernel.shape[-2:]
    taps = jnp.dot(x, kernel.reshape(3, c_in, c_out).transpose(1, 0, 2).reshape(c_in, 3 * c_out),
                   precision=self.precision)
    taps = taps.reshape(x.shape[:-1] + (3, c_out))
    taps = jnp.pad(taps, ((0, 0), (1, 1)) + ((0, 0),) * (taps.ndim - 2))  # frame t + 1 of taps is frame t of x
    frames = x.shape[1]
    # output frame t = x[t - 1] @ W_0 + x[t] @ W_1 + x[t + 1] @ W_2
    return taps[:, :frames, ..., 0, :] + taps[:, 1:frames + 1, ..., 1, :] + taps[:, 2:, ..., 2, :] + bias


def temporal_conv(features: int, opts: LayerOptions, rngs: nnx.Rngs, zero_init: bool = False) -> nnx.Conv:
  """torch Conv3d(k=(3, 1, 1), padding=(1, 0, 0)) over (batch, frames, h, w, C)."""
  return TemporalConv(
      features, features, (3, 1, 1), padding=((1, 1), (0, 0), (0, 0)),
      kernel_init=nnx.with_partitioning(_zeros if zero_init else KERNEL_INIT,
                                        (None, None, None, "conv_in", "conv_out")),
      bias_init=nnx.with_partitioning(_zeros, ("conv_out",)), dtype=opts.dtype, param_dtype=opts.param_dtype,
      rngs=rngs)


def linear(in_features: int, out_features: int, names: tuple[str, str], opts: LayerOptions, rngs: nnx.Rngs,
           use_bias: bool = True, zero_init: bool = False) -> nnx.Linear:
  """`names`: the logical axes of the kernel (input, output); the bias takes the output's."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias,
      kernel_init=nnx.with_partitioning(_zeros if zero_init else KERNEL_INIT, names),
      bias_init=nnx.with_partitioning(_zeros, (names[1],)), dtype=opts.dtype, param_dtype=opts.param_dtype,
      rngs=rngs)


def group_norm(features: int, groups: int, eps: float, opts: LayerOptions, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """Statistics over every non-batch axis (per frame on 4-D input, across frames on 5-D), two-pass variance as
  torch computes it."""
  if features % groups:
    raise ValueError(f"GroupNorm: {features} channels are not divisible by {groups} groups; choose the model "
                     "config's norm_num_groups (and the UNet's temporal_norm_num_groups; None: norm_num_groups) "
                     "dividing every entry of its block_out_channels")
  return nnx.GroupNorm(features, num_groups=groups, epsilon=eps, use_fast_variance=False,
                       scale_init=nnx.with_partitioning(_ones, ("norm",)),
                       bias_init=nnx.with_partitioning(_zeros, ("norm",)), dtype=opts.dtype,
                       param_dtype=opts.param_dtype, rngs=rngs)


def layer_norm(features: int, opts: LayerOptions, rngs: nnx.Rngs, eps: float = 1e-5) -> nnx.LayerNorm:
  """Two-pass variance, as torch computes it."""
  return nnx.LayerNorm(features, epsilon=eps, use_fast_variance=False,
                       scale_init=nnx.with_partitioning(_ones, ("norm",)),
                       bias_init=nnx.with_partitioning(_zeros, ("norm",)), dtype=opts.dtype,
                       param_dtype=opts.param_dtype, rngs=rngs)
