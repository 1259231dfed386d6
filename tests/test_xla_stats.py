"""xla_stats: FLOPs with loop bodies at their trip counts, memory and collective bytes, against hand counts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from handi_jax import xla_stats

M, K, N, TRIPS = 64, 32, 16, 5


def _compile(fn, *shapes, **jit_kwargs):
  return jax.jit(fn, **jit_kwargs).lower(*shapes).compile()


def _f32(*shape, sharding=None):
  return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)


def test_a_matmul_in_a_lax_map_counts_every_trip():
  compiled = _compile(lambda x, w: jax.lax.map(lambda xi: xi @ w, x), _f32(TRIPS, M, K), _f32(K, N))
  one_matmul = 2 * M * K * N
  # XLA counts the body once (plus the loop counter's add); the scaled count has all five matmuls.
  assert xla_stats.xla_flops(compiled) == pytest.approx(one_matmul, rel=1e-3)
  assert xla_stats.compiled_flops(compiled) == pytest.approx(TRIPS * one_matmul, rel=1e-3)


def test_nested_loops_multiply_their_trip_counts():
  def fn(x, w):
    return jax.lax.map(lambda xi: jax.lax.fori_loop(0, 3, lambda _, h: jnp.tanh(h @ w), xi), x)

  compiled = _compile(fn, _f32(TRIPS, M, K), _f32(K, K))
  assert xla_stats.compiled_flops(compiled) == pytest.approx(TRIPS * 3 * 2 * M * K * K, rel=1e-2)


def test_a_loop_free_program_is_xla_s_own_count():
  def fn(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  compiled = _compile(fn, _f32(2, 10, 10, 8), _f32(3, 3, 8, 12))
  flops = 2 * (2 * 8 * 8 * 12) * (3 * 3 * 8)  # outputs x taps per output
  assert xla_stats.compiled_flops(compiled) == xla_stats.xla_flops(compiled) == pytest.approx(flops, rel=1e-3)
  assert xla_stats.count_hlo(compiled.as_text()).flops == pytest.approx(flops, rel=1e-3)


_CONVOLUTIONS = {  # padding, strides and dilations make taps miss the input: XLA's cost analysis counts only hits
    "padded_strided": (dict(window_strides=(2, 1), padding=((1, 1), (2, 0))), (2, 9, 7, 4), (3, 3, 4, 6)),
    "negative_padding": (dict(window_strides=(1, 1), padding=((-1, 2), (1, -2))), (2, 9, 7, 4), (3, 3, 4, 6)),
    "dilated": (dict(window_strides=(1, 3), padding=((2, 1), (0, 3)), lhs_dilation=(2, 1), rhs_dilation=(1, 2)),
                (1, 6, 11, 3), (2, 3, 3, 5)),
    "feature_groups": (dict(window_strides=(1, 1), padding="SAME", feature_group_count=2), (2, 5, 5, 8), (3, 3, 4, 6)),
    "batch_groups": (dict(window_strides=(1, 1), padding="VALID", batch_group_count=2), (4, 5, 5, 3), (2, 2, 3, 6)),
}


@pytest.mark.parametrize("name", _CONVOLUTIONS)
def test_convolution_flops_count_only_taps_that_meet_the_input(name):
  options, lhs, rhs = _CONVOLUTIONS[name]
  fn = lambda x, k: jax.lax.conv_general_dilated(x, k, dimension_numbers=("NHWC", "HWIO", "NHWC"), **options)
  compiled = _compile(fn, _f32(*lhs), _f32(*rhs))
  assert xla_stats.count_hlo(compiled.as_text()).flops == xla_stats.xla_flops(compiled)


def test_a_batched_dot_written_as_a_base_dilated_convolution_counts_one_matmul_per_batch():
  # TPU compiles batched dots (attention's einsums) into this form: the batch becomes a spatial window of its own
  # size whose input is dilated by that size, so each output meets one input element, not `batch` of them.
  batch, m, k, n = 8, 5, 16, 3
  fn = lambda x, w: jax.lax.conv_general_dilated(x, w, (batch - 1,), ((0, 0),), lhs_dilation=(batch,),
                                                 dimension_numbers=("HNC", "HIO", "HNC"))
  compiled = _compile(jax.vmap(fn, in_axes=(0, None)), _f32(TRIPS, batch, m, k), _f32(batch, k, n))
  assert "lhs_dilate" in compiled.as_text()
  assert xla_stats.count_hlo(compiled.as_text()).flops == pytest.approx(TRIPS * 2 * batch * m * k * n, rel=1e-3)


def _mesh():
  return jax.make_mesh((8,), ("d",), devices=jax.devices()[:8])


def test_an_all_gather_on_8_devices_moves_its_buffer():
  if jax.device_count() < 8:
    pytest.skip("needs the 8 simulated CPU devices of tests/conftest.py")
  mesh = _mesh()
  compiled = _compile(lambda a: a * 2, _f32(64, 128, sharding=NamedSharding(mesh, PartitionSpec("d"))),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))
  gathered = 64 * 128 * 4
  assert xla_stats.collectives(compiled) == {
      "all-gather": dict(count=1, bytes=gathered, link_bytes=gathered * 7 / 8)}
  memory = xla_stats.memory(compiled)
  assert memory["arguments"] == gathered / 8 and memory["outputs"] == gathered
  assert memory["peak"] >= memory["temp"]


def test_reduce_scatter_and_all_reduce_in_a_loop():
  if jax.device_count() < 8:
    pytest.skip("needs the 8 simulated CPU devices of tests/conftest.py")
  mesh = _mesh()

  def per_device(x):
    def body(_, carry):
      scattered = jax.lax.psum_scatter(x + carry.sum(), "d", scatter_dimension=0, tiled=True)
      return carry + jax.lax.psum(scattered, "d").sum()
    return jax.lax.fori_loop(0, 3, body, jnp.zeros((), x.dtype))[None]

  fn = jax.shard_map(per_device, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec("d"))
  found = xla_stats.collectives(_compile(fn, _f32(256, 4)))
  full, share = 256 * 4 * 4, 32 * 4 * 4
  assert found["reduce-scatter"] == dict(count=3, bytes=3 * full, link_bytes=3 * full * 7 / 8)
  assert found["all-reduce"] == dict(count=3, bytes=3 * share, link_bytes=3 * share * 2 * 7 / 8)


# A loop as the TPU compiler writes it: no known_trip_count in the while op's backend_config.
_TPU_STYLE = """HloModule jit_loop, num_partitions=1

%body (p: (s32[], f32[4,8], f32[8,8])) -> (s32[], f32[4,8], f32[8,8]) {
  %p = (s32[], f32[4,8], f32[8,8]) parameter(0)
  %one = s32[] constant(1)
  %i = s32[] get-tuple-element(%p), index=0
  %h = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %w = f32[8,8]{1,0} get-tuple-element(%p), index=2
  %next = s32[] add(%i, %one)
  %mm = f32[4,8]{1,0} convolution(%h, %w), dim_labels=bf_io->bf
  ROOT %t = (s32[], f32[4,8], f32[8,8]) tuple(%next, %mm, %w)
}

%cond (q: (s32[], f32[4,8], f32[8,8])) -> pred[] {
  %q = (s32[], f32[4,8], f32[8,8]) parameter(0)
  %limit = s32[] constant(7)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %limit), direction=LT
}

ENTRY %main (a: f32[4,8], b: f32[8,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,8]{1,0} parameter(1)
  %two = s32[] constant(2)
  %start = s32[] copy(%two)
  %init = (s32[], f32[4,8], f32[8,8]) tuple(%start, %a, %b)
  %loop = (s32[], f32[4,8], f32[8,8]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[4,8]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_a_loop_without_a_recorded_trip_count_is_read_from_its_counter():
  counts = xla_stats.count_hlo(_TPU_STYLE)
  matmul = 2 * 4 * 8 * 8
  assert counts.flops_loops_once == matmul + 1  # + the counter's add
  assert counts.flops == 5 * (matmul + 1)        # counter 2 .. 6
  assert counts.unknown_trip_counts == 0
  unknown = xla_stats.count_hlo(_TPU_STYLE.replace("direction=LT", "direction=NE"))
  assert unknown.flops == unknown.flops_loops_once and unknown.unknown_trip_counts == 1


def test_shape_bytes_and_hlo_size():
  assert xla_stats.shape_bytes("(bf16[2,3]{1,0:T(8,128)(2,1)}, s32[], pred[4])") == 12 + 4 + 4
  size = xla_stats.hlo_size(_TPU_STYLE)
  assert size["computations"] == 3 and size["while_loops"] == 1 and size["instructions"] == 19


def test_hlo_size_of_an_unoptimised_graph():
  """Lowered.as_text(dialect="hlo") writes computations without signatures; a scan adds its body and condition."""
  def f(x):
    return jax.lax.scan(lambda c, _: (jnp.sin(c) @ c, None), x, length=3)[0]

  lowered = jax.jit(f).lower(_f32(M, M))
  text = lowered.as_text(dialect="hlo")
  size = xla_stats.hlo_size(text)
  assert size["while_loops"] == 1 and size["computations"] >= 3
  assert size["instructions"] == sum(1 for line in text.splitlines() if re.match(r"\s+(ROOT )?[\w.\-%]+ = ", line))
  # Operands are written without `%` there: the matmul still counts, at the loop's 3 trips.
  counts = xla_stats.count_hlo(text)
  assert counts.flops_loops_once == pytest.approx(lowered.cost_analysis()["flops"], rel=0.02)
  assert counts.flops == pytest.approx(3 * 2 * M ** 3, rel=0.02)


def test_memory_counts_the_sharded_arguments():
  if jax.device_count() < 8:
    pytest.skip("needs the 8 simulated CPU devices of tests/conftest.py")
  mesh = _mesh()
  sharded = NamedSharding(mesh, PartitionSpec("d", None))
  compiled = _compile(lambda a, b: (a @ b.T).sum(), _f32(256, 64, sharding=sharded), _f32(128, 64, sharding=sharded))
  memory = xla_stats.memory(compiled)
  assert memory["arguments"] == (256 * 64 + 128 * 64) * 4 / 8
  assert memory["peak"] >= memory["temp"] and memory["peak"] >= memory["arguments"]
  np.testing.assert_equal(sorted(memory), sorted(["arguments", "outputs", "aliased", "temp", "generated_code", "peak",
                                                  "peak_source"]))
