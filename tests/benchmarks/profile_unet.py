"""Where the UNet's forward + backward spends its time, per operation: XLA:CPU (JAX) against PyTorch eager.

The same step as bench_unet.py (demo config, identical weights and inputs). JAX: the step compiled as training
compiles it, traced with jax.profiler at host_tracer_level 3 (XLA:CPU's thunk executor then records every HLO
thunk it runs); each thunk's self time is attributed to the model part it comes from through named scopes this
script adds around the model's layers (in this process only: the model code has none), read back from the
compiled HLO's op_name metadata. PyTorch: torch.profiler, self CPU time per aten op, the convolutions split by
rank (2-D convs, the temporal (3, 1, 1) Conv3d) and attention by sequence length (spatial: h * w, temporal: frames).

  .venv/bin/python tests/benchmarks/profile_unet.py [--frames 8] [--size 16 16] [--sides jax torch] [--top 25]

Times are per step, summed over threads (XLA may run two thunks at once, torch's ops run one at a time with
their own threads inside): "busy ms/step" can exceed the wall time on XLA's side.
"""

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from handi_jax.models import attention as attention_lib  # noqa: E402
from handi_jax.models import layers, shared_blocks, unet_blocks  # noqa: E402
from tests.benchmarks import bench_unet  # noqa: E402

# Named scopes added around model parts; the innermost one of these in an op's name is its part.
_SCOPED = {
    unet_blocks.TransformerTemporalModel: "temporal_transformer", unet_blocks.Transformer2DModel: "spatial_transformer",
    unet_blocks.TemporalConvLayer: "temporal_conv_layer", shared_blocks.ResnetBlock2D: "resnet",
    unet_blocks.FeedForward: "feed_forward", layers.TemporalConv: "conv_temporal", nnx.GroupNorm: "group_norm",
    nnx.LayerNorm: "layer_norm", nnx.Linear: "linear",
}


def _scope_calls():
  def wrap(call, name):
    @functools.wraps(call)
    def scoped(self, *args, **kwargs):
      scope = name
      if isinstance(self, nnx.Conv):
        scope = "conv_temporal" if len(self.kernel_size) == 3 else f"conv{self.kernel_size[0]}x{self.kernel_size[1]}"
      with jax.named_scope(scope):
        return call(self, *args, **kwargs)
    return scoped

  for cls, name in {**_SCOPED, nnx.Conv: "conv"}.items():
    cls.__call__ = wrap(cls.__call__, name)
  sdpa = attention_lib.xla_attention

  @functools.wraps(sdpa)
  def scoped_sdpa(*args):
    with jax.named_scope("sdpa"):
      return sdpa(*args)
  attention_lib.xla_attention = scoped_sdpa


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) (\w[\w-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")


def parse_hlo(text: str) -> tuple[dict, dict]:
  """instruction name -> (opcode, shape, op_name, called computation); computation -> [(opcode, op_name)]."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      name, shape, opcode, rest = match.groups()
      op_name = re.search(r'op_name="([^"]*)"', rest)
      calls = re.search(r"calls=%([\w.\-]+)", rest)
      info = (opcode, shape, op_name.group(1) if op_name else "", calls.group(1) if calls else None)
      instructions[name] = info
      computations[current].append(info)
    elif line and not line.startswith(" "):
      match = _COMPUTATION.match(line)
      current = match.group(1) if match else current
  return instructions, computations


def op_class(info, computations, depth: int = 0) -> str:
  """convolution / dot / reduce / transpose-copy / elementwise / other for an instruction (fusions by content)."""
  opcode, _, _, calls = info
  if opcode in ("convolution", "dot"):
    return opcode
  if opcode in ("fusion", "call") and calls and depth < 3:
    inner = [op_class(i, computations, depth + 1) for i in computations.get(calls, [])]
    for kind in ("convolution", "dot", "reduce", "elementwise", "transpose-copy"):
      if kind in inner:
        return kind
    return "other"
  if opcode in ("reduce", "reduce-window"):
    return "reduce"
  if opcode in ("transpose", "copy", "concatenate", "slice", "dynamic-slice", "dynamic-update-slice", "pad",
                "gather", "scatter", "reverse"):
    return "transpose-copy"
  if opcode in ("parameter", "constant", "bitcast", "broadcast", "reshape", "get-tuple-element", "tuple", "iota"):
    return "other"
  return "elementwise"


def part_of(op_name: str, computations, info) -> tuple[str, str]:
  """(model part, fwd/bwd) from the op_name's scopes (a fusion without metadata: from its computation's ops)."""
  names = [op_name] if op_name else [i[2] for i in computations.get(info[3], []) if i[2]]
  for name in names:
    parts = re.findall(r"[\w]+", name)
    scopes = [p for p in parts if p in set(_SCOPED.values()) | {"sdpa", "conv3x3", "conv1x1", "conv_temporal"}]
    direction = "bwd" if "transpose(jvp" in name else "fwd"
    if scopes:
      leaf = scopes[-1]
      if leaf in ("sdpa", "linear", "layer_norm", "feed_forward"):
        context = next((s for s in reversed(scopes) if s.endswith("transformer")), "")
        leaf = f"{leaf} ({context.split('_')[0]})" if context else leaf
      if leaf == "group_norm" and "temporal" in " ".join(scopes):
        leaf = "group_norm (temporal)"
      return leaf, direction
    if name:
      return "rest", direction
  return "rest", "?"


def profile_jax(setup, options, iters: int, top: int, hlo_out: str | None = None) -> None:
  step, compile_s, compiled = setup.jax_step(options)
  for _ in range(2):
    step()
  text = compiled.as_text()
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(text)
  instructions, computations = parse_hlo(text)
  trace_dir = tempfile.mkdtemp(prefix="unet_jax_trace_")
  profiler_options = jax.profiler.ProfileOptions()
  profiler_options.host_tracer_level = 3  # XLA:CPU thunks
  profiler_options.python_tracer_level = 0
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=profiler_options):
    for _ in range(iters):
      step()
  path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)
            if e.get("ph") == "X" and "dur" in e]
  # Self time: an event's duration minus the events nested in it on its thread.
  self_us = collections.Counter()
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[(e["pid"], e["tid"])].append(e)
  for thread_events in by_thread.values():
    thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []
    for e in thread_events:
      while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
        stack.pop()
      if stack:
        self_us[stack[-1]["name"]] -= e["dur"]
      self_us[e["name"]] += e["dur"]
      stack.append(e)
  rows = []
  for name, us in self_us.items():
    info = instructions.get(name)
    if info is None:
      continue
    part, direction = part_of(info[2], computations, info)
    rows.append((us / iters / 1e3, name, op_class(info, computations), part, direction, info[1][:60]))
  total = sum(r[0] for r in rows)
  executor = self_us.get("ThunkExecutor::Execute (wait for completion)", 0) / iters / 1e3
  print(f"\nJAX {jax.__version__}, XLA:CPU thunks ({len(rows)} HLO instructions ran), compile {compile_s:.1f} s: "
        f"{total:.1f} busy ms/step in thunks, {executor:.1f} ms/step the caller waited; load {bench_unet.load()}")
  _print_groups(rows, total)
  print(f"  top {top} instructions (self ms/step):")
  for ms, name, kind, part, direction, shape in sorted(rows, reverse=True)[:top]:
    print(f"    {ms:7.2f}  {kind:14s} {part:28s} {direction}  {name}  {shape}")


def _print_groups(rows, total):
  groups = collections.Counter()
  for ms, _, kind, part, direction, _ in rows:
    groups[(part, kind, direction)] += ms
  print("  by model part, op class, fwd/bwd (self ms/step, share):")
  for (part, kind, direction), ms in groups.most_common(30):
    print(f"    {ms:7.2f}  {100 * ms / total:5.1f}%  {part:28s} {kind:14s} {direction}")
  classes = collections.Counter()
  for ms, _, kind, *_ in rows:
    classes[kind] += ms
  print("  by op class: " + ", ".join(f"{k} {v:.1f}" for k, v in classes.most_common()))


def torch_part(name: str, shapes, frames: int, pixels: int) -> str:
  """Model part of an aten op from its name and input shapes."""
  first = next((s for s in shapes if s), [])
  if "convolution" in name or "conv" in name:
    return "conv_temporal (Conv3d)" if len(first) == 5 else "conv2d"
  if "group_norm" in name:
    return "group_norm"
  if "layer_norm" in name:
    return "layer_norm"
  if "scaled_dot_product" in name or name in ("aten::bmm", "aten::baddbmm", "aten::_softmax",
                                                "aten::_softmax_backward_data"):
    length = first[-2] if len(first) >= 2 else 0
    return "sdpa (temporal)" if length == frames else "sdpa (spatial)" if length == pixels else "sdpa/bmm"
  if name in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul"):
    return "linear"
  if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::permute", "aten::_to_copy",
              "aten::repeat_interleave", "aten::index_select", "aten::upsample_nearest2d",
              "aten::upsample_nearest2d_backward", "aten::slice_backward", "aten::narrow"):
    return "transpose-copy"
  return "elementwise/other"


def profile_torch(setup, iters: int, top: int) -> None:
  step = setup.torch_step()
  for _ in range(2):
    step()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
    for _ in range(iters):
      step()
  frames, pixels = setup.frames + 1, setup.size[0] * setup.size[1]
  rows = []
  for event in prof.key_averages(group_by_input_shape=True):
    if event.self_cpu_time_total <= 0:
      continue
    shapes = event.input_shapes or []
    rows.append((event.self_cpu_time_total / iters / 1e3, event.key, torch_part(event.key, shapes, frames, pixels),
                 event.count // iters, str([s for s in shapes if s])[:70]))
  total = sum(r[0] for r in rows)
  print(f"\ntorch {torch.__version__} eager, {torch.get_num_threads()} threads: {total:.1f} self CPU ms/step in aten "
        f"ops (profiler overhead included); load {bench_unet.load()}")
  parts = collections.Counter()
  for ms, _, part, _, _ in rows:
    parts[part] += ms
  print("  by model part: " + ", ".join(f"{k} {v:.1f} ({100 * v / total:.0f}%)" for k, v in parts.most_common()))
  ops = collections.Counter()
  for ms, key, part, _, _ in rows:
    ops[(key, part)] += ms
  print("  by aten op (self ms/step):")
  for (key, part), ms in ops.most_common(top):
    print(f"    {ms:7.2f}  {100 * ms / total:5.1f}%  {part:24s} {key}")
  print(f"  top {top} (op, input shapes):")
  for ms, key, _, count, shapes in sorted(rows, reverse=True)[:top]:
    print(f"    {ms:7.2f}  x{count:<3d} {key:45s} {shapes}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--size", type=int, nargs=2, default=(16, 16))
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--sides", nargs="+", choices=("jax", "torch"), default=("jax", "torch"))
  parser.add_argument("--compile", choices=("fast", "default"), default="fast")
  parser.add_argument("--hlo-out", help="write the compiled HLO text of the JAX step here")
  args = parser.parse_args()
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  print(f"UNet forward+backward, demo config, {args.frames} frames (+1 context), latent {args.size[0]}x"
        f"{args.size[1]}; load at start {bench_unet.load()}")
  _scope_calls()
  setup = bench_unet.Setup(frames=args.frames, size=tuple(args.size))
  if "jax" in args.sides:
    profile_jax(setup, bench_unet.fast_compile_options() if args.compile == "fast" else {}, args.iters, args.top,
                args.hlo_out)
  if "torch" in args.sides:
    profile_torch(setup, args.iters, args.top)


if __name__ == "__main__":
  main()
