"""The compile report as a console table."""


def format_table(report: dict) -> str:
  """The report as a console table: one row per program; a sampler's row adds its batch and the slice's samples
  per second (its TFLOP/dev are one batch's per device)."""
  gib, tera = 2.0 ** 30, 1e12
  chip = report["chip"] or "no chip"
  lines = [f"compile report: stage {report['stage']}, target {report['target']} ({report['num_devices']} x "
           f"{report['device_kind']}), mesh {report['mesh']}, bounds on {chip}",
           f"{'program':<22}{'compile s':>10}{'args GiB':>10}{'temp GiB':>10}{'peak GiB':>10}{'TFLOP/dev':>11}"
           f"{'useful':>8}{'AG GiB':>8}{'RS GiB':>8}{'AR GiB':>8}{'compute s':>11}{'comm s':>9}{'batch':>7}"
           f"{'samples/s':>11}"]
  for name, p in report["programs"].items():
    coll = lambda kind, p=p: p["collectives"].get(kind, {}).get("bytes", 0.0) / gib
    b = p["chip_bounds"] or {}
    useful = f"{p['useful_ratio']:.2f}" if "useful_ratio" in p else "-"
    compiled = "reused" if "reused_from" in p else f"{p['compile_seconds']:.0f}"
    rate = f"{b['samples_per_second']:.3f}" if "samples_per_second" in b else "-"
    lines.append(
        f"{name:<22}{compiled:>10}{p['memory'].get('arguments', 0) / gib:>10.2f}"
        f"{p['memory']['temp'] / gib:>10.2f}{p['memory']['peak'] / gib:>10.2f}{p['flops_per_device'] / tera:>11.2f}"
        f"{useful:>8}{coll('all-gather'):>8.2f}{coll('reduce-scatter'):>8.2f}{coll('all-reduce'):>8.2f}"
        f"{b.get('compute_seconds', float('nan')):>11.3f}{b.get('collective_seconds', float('nan')):>9.3f}"
        f"{p.get('batch', '-'):>7}{rate:>11}")
  return "\n".join(lines)
