"""Scaled dot-product attention with a kernel chosen by config (`config.model.attention`).

`xla` is plain attention that runs everywhere; `cudnn` is cuDNN's fused kernel on CUDA GPUs; `tpu_flash` is the
Pallas splash-attention kernel on TPUs, meant for the long spatial sequences of the UNet. Temporal attention
(sequence = frames, at most a few dozen) always takes the `xla` path: kernels gain nothing there.
All functions take (batch, length, heads, head_dim) arrays and use scale head_dim ** -0.5.

Kernels are chosen for the target: the devices of the mesh set by `jax.set_mesh` (a TPU topology in a compile-only
process on a CPU host), else the default backend. The splash kernel runs inside `jax.shard_map` over that mesh.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax._src import mesh as mesh_lib
from jax._src import xla_bridge
from jax.sharding import PartitionSpec

from handi_jax.sharding import BATCH_AXES

IMPLEMENTATIONS = ("xla", "cudnn", "tpu_flash")
_BACKEND_OF = {"cudnn": "gpu", "tpu_flash": "tpu"}
_TPU_BLOCK = 128  # splash-attention block length; sequences are padded to a multiple of it
_HEAD_AXIS = "tensor"


def target_platform() -> str:
  """The platform being compiled for: that of the mesh set by `jax.set_mesh` (also inside `jit`), else the default
  backend."""
  mesh = mesh_lib.get_concrete_mesh()
  return jax.default_backend() if mesh.empty else mesh.devices.flat[0].platform


def check_implementation(implementation: str, backend: str | None = None) -> None:
  """Raise a ValueError naming the setting to use when `implementation` cannot run on `backend` (default: the
  target platform)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention={implementation!r} is not known; valid settings: {', '.join(IMPLEMENTATIONS)} "
                     "(--config.model.attention=xla works everywhere)")
  backend = backend or target_platform()
  needed = _BACKEND_OF.get(implementation)
  if needed is not None and backend != needed:
    device = {"gpu": "a CUDA GPU", "tpu": "a TPU"}[needed]
    raise ValueError(f"attention={implementation!r} needs {device}; on {backend} use "
                     "--config.model.attention=xla")


def dot_product_attention(query, key, value, implementation: str = "xla"):
  """softmax(q k^T / sqrt(d)) v for q (N, Lq, H, D), k and v (N, Lk, H, D) -> (N, Lq, H, D)."""
  check_implementation(implementation)
  if implementation == "cudnn":
    if query.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"attention='cudnn' needs bfloat16 or float16 compute, got {query.dtype}; set "
                       "--config.model.dtype=bfloat16 or --config.model.attention=xla")
    return jax.nn.dot_product_attention(query, key, value, implementation="cudnn")
  if implementation == "tpu_flash":
    return splash_attention(query, key, value)
  return xla_attention(query, key, value)


def xla_attention(query, key, value):
  """Plain attention; logits and softmax in float32 whatever the compute dtype."""
  if target_platform() == "cpu":
    return _cpu_attention(query, key, value)
  return _plain_attention(query, key, value)


def _plain_attention(query, key, value):
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("nqhd,nkhd->nhqk", query, key, preferred_element_type=jnp.float32) * scale
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum("nhqk,nkhd->nqhd", weights, value)


# Key lengths up to this (temporal attention: the frames) take broadcast products instead of batched dots on CPU.
_CPU_SHORT_KEYS = 32


def _cpu_attention(query, key, value):
  """xla_attention as XLA:CPU runs it fastest, the same values: the scale applied to q instead of the L x L logits,
  the softmax normalised after the value product, exp(logits - max) @ v / sum (one pass over the logits less
  each way; spatial self-attention fwd + bwd in 20 instead of 54 ms CPU at 9 x 256 tokens). XLA:CPU runs a batched
  dot as one small matmul per batch entry, so for short keys (temporal attention: thousands of 9 x 8 x 9 products)
  the products are broadcast multiplies + sums, which it fuses (3 instead of 13 ms CPU at 256 x 9 tokens)."""
  query = query * jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
  if key.shape[1] <= _CPU_SHORT_KEYS:
    f32 = lambda x: x.astype(jnp.float32)
    logits = jnp.sum(f32(query)[:, :, None] * f32(key)[:, None], axis=-1)  # (N, Lq, Lk, H)
    weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=2, keepdims=True)))
    out = jnp.sum(weights[..., None] * f32(value)[:, None], axis=2)  # (N, Lq, H, D)
    return (out / jnp.sum(weights, axis=2)[..., None]).astype(value.dtype)
  logits = jnp.einsum("nqhd,nkhd->nhqk", query, key, preferred_element_type=jnp.float32)
  weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  out = jnp.einsum("nhqk,nkhd->nqhd", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
  return (out / jnp.sum(weights, axis=-1).transpose(0, 2, 1)[..., None]).astype(value.dtype)


def splash_attention(query, key, value, interpret: bool = False):
  """Pallas TPU splash attention, run per shard of the mesh set by `jax.set_mesh` (plain call without one).

  A Mosaic kernel cannot be partitioned by XLA, so it runs inside `jax.shard_map`: the batch dimension (batch *
  frames for spatial attention) is split over the batch axes, the heads over "tensor" (see `_shard_spec`).
  `interpret=True` runs the kernel in the Pallas interpreter (any backend; slow), which tests use.
  """
  if not interpret and jax.default_backend() != "tpu":
    # Compile-only process (TPU target, CPU runtime): jax picks an older Mosaic IR version from the TPU runtime's
    # build date, which it cannot read here, so it would emit version 8, which libtpu 0.0.20 (jax[tpu]==0.7.1)
    # refuses. Its forward-compatible lowering, used for exports, emits version 7; it changes only Mosaic kernels.
    xla_bridge.FORCE_FORWARD_COMPAT_LOWERING_PLATFORMS.add("tpu")
  local = functools.partial(_local_splash_attention, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    if not mesh_lib.thread_resources.env.physical_mesh.empty:
      raise ValueError("attention='tpu_flash' takes its mesh from `with jax.set_mesh(mesh):`, found only the legacy "
                       "`with mesh:` context; enter the mesh with jax.set_mesh")
    return local(query, key, value)
  spec = _shard_spec(mesh, batch=query.shape[0], heads=query.shape[2])
  # check_vma=False: the kernel's pallas_call declares no varying-axes types for its outputs.
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
      query, key, value)


def _shard_spec(mesh, batch: int, heads: int) -> PartitionSpec:
  """(N, L, H, D) spec: N over the batch axes, in order, as long as their product divides N (an axis that would not
  divide it is left out and replicates the work); H over the tensor axis when it divides H, else replicated."""
  batch_axes = []
  for axis in BATCH_AXES:
    size = mesh.shape.get(axis, 1)
    if size > 1 and batch % (math.prod(mesh.shape[a] for a in batch_axes) * size) == 0:
      batch_axes.append(axis)
  tensor = mesh.shape.get(_HEAD_AXIS, 1)
  head_axis = _HEAD_AXIS if tensor > 1 and heads % tensor == 0 else None
  return PartitionSpec(tuple(batch_axes) or None, None, head_axis, None)


def _local_splash_attention(query, key, value, interpret: bool):
  """The splash kernel on one device's arrays; sequences are padded to the block length and padded keys masked."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

  _, q_len, heads, head_dim = query.shape
  kv_len = key.shape[1]
  q_padded, kv_padded = -(-q_len // _TPU_BLOCK) * _TPU_BLOCK, -(-kv_len // _TPU_BLOCK) * _TPU_BLOCK

  def heads_major(x, length):  # (N, L, H, D) -> (N, H, L_padded, D)
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3)

  q = heads_major(query * jnp.asarray(head_dim ** -0.5, query.dtype), q_padded)
  k, v = heads_major(key, kv_padded), heads_major(value, kv_padded)
  kernel = _splash_kernel(q_padded, kv_padded, heads, interpret)
  # Only keys of the same segment are attended to: real keys are segment 0, padding is segment 1.
  segments = splash.SegmentIds(q=jnp.zeros((q_padded,), jnp.int32),
                               kv=(jnp.arange(kv_padded) >= kv_len).astype(jnp.int32))
  out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segments)
  return out.transpose(0, 2, 1, 3)[:, :q_len]


# Built per call, not cached: its mask arrays belong to the trace that builds them (jax caches the mask processing).
def _splash_kernel(q_len: int, kv_len: int, heads: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  block_q = _largest_dividing_block(q_len)
  block_kv = _largest_dividing_block(kv_len)
  sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                            block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                            block_q_dq=block_q, block_kv_dq=block_kv)
  mask = masks.MultiHeadMask([masks.FullMask((q_len, kv_len))] * heads)
  return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def _largest_dividing_block(length: int) -> int:
  """The largest of 512, 256, 128 that divides `length` (a multiple of 128)."""
  return next(b for b in (512, 256, _TPU_BLOCK) if length % b == 0)
