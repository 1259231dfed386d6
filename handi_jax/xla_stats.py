"""Figures read from a compiled XLA program: FLOPs with loops counted at their trip counts, memory, collectives.

XLA's `compiled.cost_analysis()` counts the body of a while loop (`lax.map`, `lax.scan`, `fori_loop`) once,
whatever its trip count. The compiled HLO records the trip counts XLA proved (`known_trip_count` in a while op's
backend_config), so `compiled_flops` takes XLA's count and adds the bodies' FLOPs (trip count - 1) more times,
counting those bodies itself from the HLO text: dots and convolutions exactly (a convolution by the window taps
that meet the input, as XLA counts them), elementwise ops and reductions at one FLOP per element (as XLA's cost
analysis does; transcendentals are not FLOPs there either).
Collective bytes are read from the same text, also scaled by trip counts. All figures are per device: an SPMD
program is one device's program.
"""

import dataclasses
import functools
import math
import re

import numpy as np

# Bytes per element of the HLO primitive types that occur in handi-jax's programs.
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_ELEMENTWISE = frozenset((
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs", "compare", "select", "clamp",
    "and", "or", "xor", "not", "remainder", "sign", "floor", "ceil", "round-nearest-even", "round-nearest-afz"))
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Calls whose callee runs once per caller execution (async-update / -done repeat the async-start's callee).
_CALL_ATTRS = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_PARENTHESES = re.compile(r"[()]")
_DELIMITERS = re.compile(r"[()\[\]{},]")  # what nests in an operand list, and its separator
_NAME = re.compile(r"%?[A-Za-z_][\w.\-]*")
_ASSIGNMENT = re.compile(r"\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"([\w\-]+)\(")
_WHILE_OP = re.compile(r"[)\]}]\s+while\(")  # "... = (shapes) while(%tuple), condition=..."


@dataclasses.dataclass
class _Instruction:
  name: str
  shape: str
  opcode: str
  arguments: str     # the text inside the parentheses: the operands, or a constant's value
  attributes: str
  root: bool

  @functools.cached_property
  def operands(self) -> list[str]:
    """Operand names, parsed when first asked for: most instructions' never are (a third of a parse's time)."""
    return [] if self.opcode == "constant" else _operand_names(self.arguments)


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at text[start]."""
  depth = 0
  for found in _PARENTHESES.finditer(text, start):
    depth += 1 if found.group() == "(" else -1
    if depth == 0:
      return found.start()
  return len(text) - 1


def _split_instruction(line: str) -> _Instruction | None:
  match = _ASSIGNMENT.match(line)
  if match is None:
    return None
  rest = line[match.end():]
  if rest.startswith("("):  # a tuple shape
    end = _closing(rest, 0)
    shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  op = _OPCODE.match(rest)
  if op is None:
    return None
  start = op.end() - 1
  end = _closing(rest, start)
  return _Instruction(match.group(2), shape, op.group(1), rest[start + 1:end], rest[end + 1:], bool(match.group(1)))


def _operand_names(arguments: str) -> list[str]:
  """Operand names of an argument list: compiled text writes `f32[4]{0} %x`, unoptimised text `x`."""
  names, depth, start = [], 0, 0
  for found in _DELIMITERS.finditer(arguments + ","):
    char, index = found.group(), found.start()
    if char != ",":
      depth += 1 if char in "([{" else -1
    elif depth == 0:
      token = arguments[start:index].strip().rpartition(" ")[2]
      if _NAME.fullmatch(token):
        names.append(token.lstrip("%"))
      start = index + 1
  return names


def parse_hlo(text: str) -> tuple[dict[str, list[_Instruction]], str, dict]:
  """(computations by name, the entry computation's name, module header attributes) of an HLO module's text."""
  computations, entry, current = {}, None, None
  header = {}
  for line in text.splitlines():
    if line.startswith("HloModule"):
      header = dict(re.findall(r"(num_partitions|replica_count)=(\d+)", line))
      continue
    head = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\)\s*->.*)?\{\s*$", line)  # unoptimised HLO: no signature
    if head and not line.startswith(" "):
      current = computations.setdefault(head.group(2), [])
      if head.group(1):
        entry = head.group(2)
      continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None and (instruction := _split_instruction(line)) is not None:
      current.append(instruction)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text; expected the text of compiled.as_text()")
  return computations, entry, {k: int(v) for k, v in header.items()}


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string (tuples summed; layouts ignored)."""
  return sum(_BYTES.get(dtype, 4) * math.prod(dims) for dtype, dims in _arrays(shape))


def _elements(shape: str) -> int:
  return sum(math.prod(dims) for _, dims in _arrays(shape))


def _dims_attribute(attributes: str, name: str) -> list[int]:
  found = re.search(rf"\b{name}=\{{([0-9,]*)\}}", attributes)
  return [int(d) for d in found.group(1).split(",") if d] if found else []


def _instruction_flops(instruction: _Instruction, by_name: dict[str, _Instruction]) -> float:
  opcode = instruction.opcode
  shapes = lambda name: by_name[name].shape if name in by_name else ""
  if opcode == "dot":
    lhs = _arrays(shapes(instruction.operands[0]))
    contracting = _dims_attribute(instruction.attributes, "lhs_contracting_dims")
    size = math.prod(lhs[0][1][d] for d in contracting) if lhs else 1
    return 2.0 * _elements(instruction.shape) * size
  if opcode == "convolution":
    return _convolution_flops(instruction, shapes)
  if opcode in _ELEMENTWISE:
    return float(_elements(instruction.shape))
  if opcode == "reduce":
    return float(sum(_elements(shapes(o)) for o in instruction.operands[:len(instruction.operands) // 2]))
  return 0.0


def _window_taps(output: int, kernel: int, input_size: int, stride: int, pad_low: int, lhs_dilate: int,
                 rhs_dilate: int) -> int:
  """(output position, kernel tap) pairs of one spatial dimension that meet a real input element, not padding or
  a hole of the input's dilation."""
  position = np.arange(output)[:, None] * stride - pad_low + np.arange(kernel)[None, :] * rhs_dilate
  real = (position >= 0) & (position % lhs_dilate == 0) & (position // lhs_dilate < input_size)
  return int(real.sum())


def _convolution_flops(instruction: _Instruction, shapes) -> float:
  """2 x the multiply-adds a convolution really does: per spatial dimension, the taps that meet input elements.
  TPU compiles batched dots into base-dilated convolutions whose windows span the batch (`size=128x8
  lhs_dilate=128x8`): each output meets one input element per window, not size x size of them."""
  lhs, rhs = (_arrays(shapes(o)) for o in instruction.operands[:2])
  out = _arrays(instruction.shape)
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attributes)
  if not (lhs and rhs and out and labels):
    return 0.0
  (lhs_labels, rhs_labels, out_labels), lhs, rhs, out = labels.groups(), lhs[0][1], rhs[0][1], out[0][1]
  window_text = re.search(r"window=\{([^}]*)\}", instruction.attributes)
  window = dict(re.findall(r"(\w+)=([\d_x-]+)", window_text.group(1))) if window_text else {}
  spatial = sorted(label for label in out_labels if label.isdigit())
  per_dim = lambda key, default: ([int(v) for v in window[key].split("x")] if key in window
                                  else [default] * len(spatial))
  strides, lhs_dilates, rhs_dilates = per_dim("stride", 1), per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
  pads_low = [int(p.split("_")[0]) for p in window["pad"].split("x")] if "pad" in window else [0] * len(spatial)
  taps = math.prod(
      _window_taps(out[out_labels.index(d)], rhs[rhs_labels.index(d)], lhs[lhs_labels.index(d)], stride, pad,
                   lhs_dilate, rhs_dilate)
      for d, stride, pad, lhs_dilate, rhs_dilate in zip(spatial, strides, pads_low, lhs_dilates, rhs_dilates,
                                                        strict=True))
  features_in_per_group = rhs[rhs_labels.index("i")]
  return 2.0 * out[out_labels.index("b")] * out[out_labels.index("f")] * features_in_per_group * taps


def _trip_count(loop: _Instruction, caller: dict[str, _Instruction], computations) -> int | None:
  """The while loop's trip count: XLA's known_trip_count (CPU, GPU) or, where the backend drops it (TPU), read
  from the loop itself: counter k starts at constant a, the body adds constant 1, the condition is k < constant b."""
  found = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attributes)
  if found:
    return int(found.group(1))
  names = dict(_CALL_ATTRS.findall(loop.attributes))
  condition = {i.name: i for i in computations.get(names.get("condition"), [])}
  body = {i.name: i for i in computations.get(names.get("body"), [])}
  compare = next((i for i in condition.values() if i.root), None)
  init = _through_copies(caller, loop.operands[0]) if loop.operands else None
  body_root = next((i for i in body.values() if i.root), None)
  if compare is None or compare.opcode != "compare" or "direction=LT" not in compare.attributes or init is None \
     or init.opcode != "tuple" or body_root is None or body_root.opcode != "tuple":
    return None
  counter = _tuple_index(_through_copies(condition, compare.operands[0]))
  limit = _constant(_through_copies(condition, compare.operands[1]))
  if counter is None or limit is None or counter >= len(init.operands):
    return None
  start = _constant(_through_copies(caller, init.operands[counter]))
  update = _through_copies(body, body_root.operands[counter])
  if start is None or update is None or update.opcode != "add":
    return None
  terms = [_through_copies(body, o) for o in update.operands]
  steps = [_constant(t) if t is not None and t.opcode == "constant" else None for t in terms]
  if 1 not in steps or not any(t is not None and _tuple_index(t) == counter for t in terms):
    return None
  return max(limit - start, 0)


def _through_copies(instructions: dict[str, _Instruction], name: str) -> _Instruction | None:
  instruction = instructions.get(name)
  while instruction is not None and instruction.opcode in ("copy", "bitcast") and instruction.operands:
    instruction = instructions.get(instruction.operands[0])
  return instruction


def _tuple_index(instruction: _Instruction | None) -> int | None:
  if instruction is None or instruction.opcode != "get-tuple-element":
    return None
  found = re.search(r"\bindex=(\d+)", instruction.attributes)
  return int(found.group(1)) if found else None


def _constant(instruction: _Instruction | None) -> int | None:
  if instruction is None or instruction.opcode != "constant" or not re.fullmatch(r"-?\d+", instruction.arguments):
    return None
  return int(instruction.arguments)


def _callees(instruction: _Instruction, caller: dict[str, _Instruction], computations
             ) -> list[tuple[str, int | None]]:
  """(computation, times per execution of the instruction; None = a loop of unknown trip count)."""
  if instruction.opcode in ("async-update", "async-done"):
    return []
  called = []
  attributes = instruction.attributes.partition(", metadata={")[0]  # calls are printed before the metadata
  for attr, name in _CALL_ATTRS.findall(attributes):
    if attr == "to_apply" and instruction.opcode in ("reduce", "reduce-window", "scatter", "select-and-scatter",
                                                      "sort", "all-reduce", "reduce-scatter", "all-reduce-start"):
      continue  # per-element combiners: the instruction's own count covers them
    if attr == "body":
      called.append((name, _trip_count(instruction, caller, computations)))
    elif attr != "condition":
      called.append((name, 1))
  for group in _BRANCHES.findall(attributes):
    called.extend((name.strip().lstrip("%"), 1) for name in group.split(",") if name.strip())
  return called


@dataclasses.dataclass
class HloCounts:
  """Per-device totals of one compiled program, while-loop bodies counted at their trip counts."""

  flops: float = 0.0                 # own count (see the module docstring)
  flops_loops_once: float = 0.0      # the same count with every loop body once, as XLA's cost analysis does
  collective_bytes: dict = dataclasses.field(default_factory=dict)   # kind -> bytes of the full buffers
  collective_link_bytes: dict = dataclasses.field(default_factory=dict)  # kind -> bytes one device sends (ring)
  collective_count: dict = dataclasses.field(default_factory=dict)   # kind -> executions per step
  unknown_trip_counts: int = 0       # while loops without a known trip count (counted once)


def _group_size(attributes: str, default: int) -> int:
  iota = re.search(r"replica_groups=\[([0-9,]+)\]<=", attributes)
  if iota:
    return int(iota.group(1).split(",")[-1])
  listed = re.search(r"replica_groups=\{\{([0-9,]*)\}", attributes)
  if listed:
    return max(1, len([d for d in listed.group(1).split(",") if d]))
  return default


def _link_bytes(kind: str, buffer_bytes: float, group: int) -> float:
  """Bytes one device sends in a ring implementation of the collective over `group` devices."""
  if kind == "collective-permute":
    return buffer_bytes
  share = (group - 1) / group if group > 1 else 0.0
  return 2 * share * buffer_bytes if kind == "all-reduce" else share * buffer_bytes


def count_hlo(text: str) -> HloCounts:
  """FLOPs and collective bytes of an HLO module's text (compiled.as_text()), per execution of the entry."""
  computations, entry, header = parse_hlo(text)
  devices = header.get("num_partitions", 1) * header.get("replica_count", 1)
  counts = HloCounts()
  memo, called = {}, {}

  def callees(instruction: _Instruction, by_name: dict) -> list[tuple[str, int | None]]:
    if id(instruction) not in called:
      called[id(instruction)] = _callees(instruction, by_name, computations)
    return called[id(instruction)]

  def visit(name: str) -> tuple[float, float]:
    """(FLOPs, FLOPs with loops once) of one execution of `name`, adding collectives to `pending`."""
    if name in memo:
      return memo[name]
    instructions = computations.get(name, [])
    by_name = {i.name: i for i in instructions}
    flops = once = 0.0
    for instruction in instructions:
      own = _instruction_flops(instruction, by_name)
      flops, once = flops + own, once + own
      for callee, times in callees(instruction, by_name):
        callee_flops, callee_once = visit(callee)
        flops += callee_flops * (times or 1)
        once += callee_once
    memo[name] = (flops, once)
    return memo[name]

  def collect(name: str, multiplier: float) -> None:
    by_name = {i.name: i for i in computations.get(name, [])}
    for instruction in by_name.values():
      kind = instruction.opcode.removesuffix("-done")
      if kind in COLLECTIVES and not instruction.opcode.endswith("-start"):
        group = _group_size(instruction.attributes, devices)
        size = shape_bytes(instruction.shape)
        if kind == "reduce-scatter":
          size *= group  # the result is one device's share of the reduced buffer
        counts.collective_bytes[kind] = counts.collective_bytes.get(kind, 0.0) + multiplier * size
        counts.collective_link_bytes[kind] = (counts.collective_link_bytes.get(kind, 0.0)
                                              + multiplier * _link_bytes(kind, size, group))
        counts.collective_count[kind] = counts.collective_count.get(kind, 0) + multiplier
      for callee, times in callees(instruction, by_name):
        if times is None:
          counts.unknown_trip_counts += 1
        collect(callee, multiplier * (times or 1))

  counts.flops, counts.flops_loops_once = visit(entry)
  collect(entry, 1)
  return counts


def compiled_flops(compiled, counts: HloCounts | None = None) -> float:
  """Per-device FLOPs of one execution of a compiled program, loop bodies at their known trip counts.

  XLA's own count (cost_analysis, loop bodies once) plus this module's count of the loops' extra iterations;
  `counts`: count_hlo(compiled.as_text()) when the caller has it already.
  """
  if counts is None:
    text = compiled.as_text()
    if not _WHILE_OP.search(text):  # nothing to add; parsing a train step's text takes seconds in Python
      return xla_flops(compiled)
    counts = count_hlo(text)
  return xla_flops(compiled) + counts.flops - counts.flops_loops_once


def xla_flops(compiled) -> float:
  """XLA's cost-analysis FLOPs (per device; every loop body counted once)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # older jax: one dict per program
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))


def memory(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program: arguments, outputs, aliased (donated) bytes, temporaries, and peak.

  peak: the larger of XLA's figure (where the backend reports one) and arguments + outputs + temporaries -
  aliased, which the device holds for the whole program (libtpu reports a heap-simulated peak below its temp).
  """
  stats = compiled.memory_analysis()
  if stats is None:
    raise ValueError("this backend's compiled program reports no memory analysis (memory_analysis() is None)")
  figures = dict(arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
                 aliased=int(stats.alias_size_in_bytes), temp=int(stats.temp_size_in_bytes),
                 generated_code=int(stats.generated_code_size_in_bytes))
  reported = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
  held = figures["arguments"] + figures["outputs"] + figures["temp"] - figures["aliased"]
  figures["peak"] = max(reported, held)
  figures["peak_source"] = "xla" if reported > held else "sum"
  return figures


def collectives(compiled, counts: HloCounts | None = None) -> dict[str, dict[str, float]]:
  """kind -> {"count", "bytes" (full buffers), "link_bytes" (what one device sends, ring)} per execution."""
  counts = counts or count_hlo(compiled.as_text())
  return {kind: dict(count=counts.collective_count[kind], bytes=counts.collective_bytes[kind],
                     link_bytes=counts.collective_link_bytes[kind]) for kind in counts.collective_count}


def hlo_size(text: str) -> dict[str, int]:
  """Size of an HLO module's text (instructions, characters, while loops): what makes a compile large."""
  computations, _, _ = parse_hlo(text)
  instructions = [i for body in computations.values() for i in body]
  return dict(computations=len(computations), instructions=len(instructions), characters=len(text),
              while_loops=sum(i.opcode == "while" for i in instructions))
