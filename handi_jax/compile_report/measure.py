"""Compiling one program and measuring it (per-device memory, FLOPs, collectives, step-time bounds), reusing the
figures of a program measured before (same program key), and the report file that lets a stopped report resume."""

import hashlib
import json
import time

import jax
import numpy as np
from absl import logging

from handi_jax import chips, fileio, xla_stats

REPORT_FILE = "compile_report.json"


def sharded_bytes(args) -> int:
  """Bytes one device holds of abstract arguments (the largest shard of each array)."""
  total = 0
  for leaf in jax.tree.leaves(args):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    total += int(np.prod(shape)) * leaf.dtype.itemsize
  return total


def program_key(lowered_text: str, target: str) -> str:
  """Two programs with the same key compile to the same executable: the same lowered program for the same target
  (targets.target_identity)."""
  return hashlib.sha256(f"{target}\n{lowered_text}".encode()).hexdigest()


def measured_programs(reports) -> dict:
  """program_key -> (figures, report path) of every program measured in these compile_report.json files."""
  known = {}
  for path in map(fileio.as_path, reports):
    try:
      programs = json.loads(path.read_text())["programs"]
    except (OSError, ValueError, KeyError) as e:
      raise ValueError(f"config.compile_report.reuse: {path} is not a readable compile report ({e}); give the "
                       f"path of a {REPORT_FILE} that --mode=compile_report wrote") from e
    known.update({p["program_key"]: (p, str(path)) for p in programs.values() if "program_key" in p})
  return known


def known_programs(reuse: str, workdir) -> dict:
  """measured_programs of the reports config.compile_report.reuse lists (comma-separated) and of <workdir>'s own
  report, so that a report stopped part-way resumes where it stopped."""
  own_report = fileio.as_path(workdir) / REPORT_FILE
  reports = [r.strip() for r in reuse.split(",") if r.strip()]
  return measured_programs(reports + ([own_report] if fileio.is_committed(own_report) else []))


def write_report(workdir, report: dict) -> None:
  fileio.write_text(fileio.as_path(workdir) / REPORT_FILE, json.dumps(report, indent=2, sort_keys=True) + "\n")


def measure(name: str, lower, args, chip: chips.Chip | None, known: dict | None = None, target: str = "") -> dict:
  """Lower (lower(*args), e.g. a jitted function's .lower) and compile one program; its per-device figures and
  bounds. A program already in `known` (measured_programs) for the same `target` (targets.target_identity) is not
  compiled again: its figures are reused."""
  logging.info("compile report: lowering %s", name)
  started = time.perf_counter()
  lowered = lower(*args)
  lowered_at = time.perf_counter()
  key = program_key(lowered.as_text(), target)
  if known and key in known:
    figures, source = known[key]
    logging.info("compile report: %s is a program measured in %s; its figures are reused", name, source)
    return dict(figures, reused_from=source, chip_bounds=bounds(figures, chip) if chip else None)
  logging.info("compile report: compiling %s (lowered in %.1f s)", name, lowered_at - started)
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  text = compiled.as_text()
  counts = xla_stats.count_hlo(text)
  result = dict(
      lower_seconds=round(lowered_at - started, 1), compile_seconds=round(compiled_at - lowered_at, 1),
      memory=xla_stats.memory(compiled), state_bytes=sharded_bytes(args),
      flops_per_device=xla_stats.compiled_flops(compiled, counts), xla_flops_loops_once=xla_stats.xla_flops(compiled),
      unknown_trip_counts=counts.unknown_trip_counts,
      collectives=xla_stats.collectives(compiled, counts), hlo=xla_stats.hlo_size(text),
      lowered_characters=len(lowered.as_text()), program_key=key)
  return with_bounds(result, chip)


def bounds(figures: dict, chip: chips.Chip) -> dict:
  """Step-time lower bounds on `chip`: compute at peak FLOP/s, collectives at the interconnect bandwidth."""
  link = sum(c["link_bytes"] for c in figures["collectives"].values())
  compute = figures["flops_per_device"] / chip.peak_bf16_flops
  communication = link / chip.interconnect_bytes_per_s
  return dict(chip=chip.name, compute_seconds=compute, collective_seconds=communication,
              step_seconds=max(compute, communication), fits_hbm=figures["memory"]["peak"] <= chip.hbm_bytes,
              hbm_bytes=chip.hbm_bytes)


def with_bounds(figures: dict, chip: chips.Chip | None) -> dict:
  """`figures` with their bounds on every known chip and on the report's chip (None without one)."""
  figures["bounds"] = {key: bounds(figures, c) for key, c in chips.CHIPS.items()}
  figures["chip_bounds"] = bounds(figures, chip) if chip else None
  return figures
