"""Evaluation outputs: metrics.csv (per clip), summary.json, report.md (the paper's Table 2 / 3 shape) and plots.

Table rows are runs x scope (full frame, motion area), columns the paper's metrics in its order, then
handi-jax's hand detection rate and motion-flow share. A metric whose extractor is not configured reads
"not configured"; one that cannot be computed on these clips (e.g. FID of fewer than two frames) reads "n/a".
A run's video that cannot be scored (missing, unreadable, too few frames, another shape) is counted under
"skipped", listed with its reason, and has a metrics.csv row with that reason. FID and FVD come with their
protocol (weights and their SHA-256, input, frame sampling, how many frames / clips); a value from fewer frames /
clips than the protocol's minimum is marked † as not comparable with published values.
"""

import csv
import io
import math
import pathlib

import cv2
import numpy as np

from handi_jax import fileio
from handi_jax.evaluation.extractors import NOT_CONFIGURED
from handi_jax.media import files as media_files

# (key, column title, higher is better): the paper's Table 2 / 3 columns, then handi-jax's diagnostics.
COLUMNS = (
    ("hs_err", "HS-Err ↓", False), ("fid", "FID ↓", False), ("clip_gt", "CLIP_GT ↑", True),
    ("fvd", "FVD ↓", False), ("egovlp", "EgoVLP ↑", True), ("clip_cs", "CLIP_Cs ↑", True),
    ("clip_tx", "CLIP_Tx ↑", True), ("blip", "BLIP ↑", True),
    ("gen_hand_rate", "hands found ↑", True), ("flow_inside", "flow in MA ↑", True),
)
SCOPES = ("full", "ma")
SCOPE_TITLES = {"full": "Full", "ma": "MA"}
SUBSET_TITLES = {"all": "All clips", "motion_intensive": "Motion-intensive subset"}
HS_ERR_MIN_SPAN = 0.01      # the HS-Err plot's x axis is at least this wide
HS_ERR_DOTS_MAX_CLIPS = 30  # up to this many clips a run, the HS-Err plot shows a dot per clip; more: a histogram
NOT_COMPARABLE = "†"        # marks a FID / FVD from fewer frames / clips than the protocol's minimum


def format_value(value) -> str:
  if isinstance(value, str):
    return value
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  return f"{value:.5f}" if abs(value) <= 1 else f"{value:.3f}"


def cell(values: dict, key: str) -> str:
  """One metric of a summary's scope as the report writes it; a FID / FVD from fewer frames / clips than the
  protocol's minimum (values[f"{key}_comparable"] False) is marked NOT_COMPARABLE."""
  text = format_value(values.get(key))
  value = values.get(key)
  below_minimum = values.get(f"{key}_comparable") is False and isinstance(value, float) and math.isfinite(value)
  return f"{text} {NOT_COMPARABLE}" if below_minimum else text


def not_comparable_note(protocol: dict) -> str:
  """What NOT_COMPARABLE means, with the configured minimums."""
  fewest = [f"{protocol['fid']['minimum_frames']} frames (FID)"] if "fid" in protocol else []
  fewest += [f"{protocol['fvd']['minimum_clips']} clips (FVD)"] if "fvd" in protocol else []
  return f"{NOT_COMPARABLE} From fewer than {' / '.join(fewest)}: not comparable with published values."


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
  fields = list(dict.fromkeys(key for row in rows for key in row))
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: format_value(v) if isinstance(v, float) else v for k, v in row.items()})
  fileio.write_text(path, buffer.getvalue())


def _frechet_sources(values: dict) -> tuple[str, str]:
  """(FID from, FVD from) of a summary's scope: how many frames / clips, marked when below the minimum."""
  mark = lambda comparable: "" if comparable else f" {NOT_COMPARABLE}"
  fid = NOT_CONFIGURED
  if "fid_frames" in values:
    fid = f"{values['fid_frames']} frames{mark(values['fid_comparable'])}"
  fvd = NOT_CONFIGURED
  if "fvd_clips" in values:
    frames = " or ".join(map(str, values["fvd_frames_per_clip"])) or "no"
    clips = "1 clip" if values["fvd_clips"] == 1 else f"{values['fvd_clips']} clips"
    fvd = f"{clips} of {frames} frames{mark(values['fvd_comparable'])}"
  return fid, fvd


def _protocol_section(summary: dict, protocol: dict) -> list[str]:
  """report.md's FID and FVD protocol: what each is computed from, then how many frames / clips per table row."""
  lines = ["## FID and FVD protocol", ""]
  for key, title in (("fid", "FID"), ("fvd", "FVD")):
    if key in protocol:
      lines += [f"{title}:", ""] + [f"- {name.replace('_', ' ')}: {value}" for name, value in protocol[key].items()]
      lines.append("")
  lines += ["| Subset | Scope | Run | FID from | FVD from |", "|---|---|---|---|---|"]
  for subset, title in SUBSET_TITLES.items():
    for scope in SCOPES:
      for run, by_subset in summary.items():
        fid, fvd = _frechet_sources(by_subset[subset][scope])
        lines.append(f"| {title} | {SCOPE_TITLES[scope]} | {run} | {fid} | {fvd} |")
  return lines + ["", not_comparable_note(protocol), ""]


def markdown_report(summary: dict, skipped: dict[str, dict[str, str]], protocol: dict) -> str:
  """summary[run][subset][scope][metric], skipped {run: {clip: reason}} and the FID / FVD protocol (scoring
  .frechet_protocol) -> report.md text: one table per subset, the FID and FVD protocol, the skipped videos."""
  lines = ["# handi-jax evaluation", "",
           "Metrics on the L generated frames (context frame excluded). Full = whole frame; MA = motion area "
           "(frames masked to the ground-truth motion-area mask and cropped to its square bounding box).", ""]
  header = "| Scope | Run | clips | skipped | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
  rule = "|" + "---|" * (4 + len(COLUMNS))
  for subset, title in SUBSET_TITLES.items():
    lines += [f"## {title}", "", header, rule]
    rows = [(SCOPE_TITLES[scope], run, by_subset[subset][scope]) for scope in SCOPES
            for run, by_subset in summary.items()]
    cells = [[cell(values, key) for key, _, _ in COLUMNS] for _, _, values in rows]
    lines += [f"| {scope} | {run} | {values['clips']} | {values['skipped']} | " + " | ".join(row_cells) + " |"
              for (scope, run, values), row_cells in zip(rows, cells, strict=True)]
    lines.append("")
    if any(NOT_COMPARABLE in text for row_cells in cells for text in row_cells):
      lines += [not_comparable_note(protocol) + " See the FID and FVD protocol below.", ""]
  if protocol:
    lines += _protocol_section(summary, protocol)
  if any(skipped.values()):
    lines += ["## Skipped videos", "",
              "These videos were not scored: missing, unreadable, too few frames for the metrics or more than the "
              "ground truth, or another size than the run's other videos and another shape than the ground truth. "
              "The rest of each run was.", "", "| Run | Clip | Why |", "|---|---|---|"]
    for run, by_clip in skipped.items():
      for clip, reason in by_clip.items():
        escaped = reason.replace("|", r"\|")  # a bare | would end the cell
        lines.append(f"| {run} | {clip} | {escaped} |")
    lines.append("")
  return "\n".join(lines)


def closing_summary(summary: dict, out_dir: pathlib.Path) -> str:
  """A few lines for the console: where the outputs are and each run's full-frame numbers over all clips."""
  lines = [f"Evaluation written to {out_dir}: report.md (tables, FID and FVD protocol, skipped videos), metrics.csv "
           "(per clip), summary.json, metrics.png, hs_err.png, contact sheets."]
  for run, by_subset in summary.items():
    values = by_subset["all"]["full"]
    numbers = ", ".join(f"{title} {cell(values, key)}" for key, title, _ in COLUMNS
                        if values.get(key) != NOT_CONFIGURED)
    lines.append(f"{run}: {values['clips']} clips, {values['skipped']} skipped; full frame: {numbers}")
  if any(NOT_COMPARABLE in line for line in lines[1:]):
    lines.append(f"{NOT_COMPARABLE} Too few frames / clips for a FID / FVD comparable with published values: see "
                 "report.md's FID and FVD protocol.")
  return "\n".join(lines)


def write_summary(out_dir: pathlib.Path, summary: dict, skipped: dict[str, dict[str, str]], protocol: dict) -> None:
  """summary.json {"protocol": the FID / FVD protocol, "runs": summary} and report.md."""
  fileio.write_json(out_dir / "summary.json", dict(protocol=protocol, runs=summary), indent=1, sort_keys=True)
  fileio.write_text(out_dir / "report.md", markdown_report(summary, skipped, protocol))


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  return plt


def _save(figure, path: pathlib.Path) -> None:
  with fileio.atomic_path(path) as tmp:
    figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
  _pyplot().close(figure)


def metric_bars_figure(summary: dict):
  """One panel per computed metric: a bar per run, full and MA scope side by side (all clips), each bar's value
  written over it (a bar of 0 has no height to see), one legend for the figure."""
  plt = _pyplot()
  runs = list(summary)
  keys = [(key, title) for key, title, _ in COLUMNS
          if any(isinstance(summary[r]["all"][s].get(key), float) for r in runs for s in SCOPES)]
  figure, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 3.6), squeeze=False)
  x = np.arange(len(runs))
  for axis, (key, title) in zip(axes[0], keys, strict=False):
    for offset, scope in ((-0.2, "full"), (0.2, "ma")):
      values = [summary[r]["all"][scope].get(key) for r in runs]
      values = [v if isinstance(v, float) else np.nan for v in values]
      bars = axis.bar(x + offset, np.nan_to_num(values), width=0.4, label=SCOPE_TITLES[scope])  # n/a: labelled at 0
      axis.bar_label(bars, labels=["n/a" if np.isnan(v) else f"{v:.3g}" for v in values], fontsize=7, padding=2,
                     rotation=90)  # upright, so neighbouring bars' values do not overlap
    axis.set_title(title)
    axis.set_xticks(x, runs, rotation=30, ha="right")
    axis.margins(y=0.25)  # room for the values over the tallest bars
  figure.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=len(SCOPES),
                bbox_to_anchor=(0.5, 1.08))
  return figure


def plot_metric_bars(summary: dict, path: pathlib.Path) -> None:
  _save(metric_bars_figure(summary), path)


def hs_err_axis_range(values: list[float]) -> tuple[float, float]:
  """The x range of the HS-Err plot: the values with a margin, at least HS_ERR_MIN_SPAN wide (near-equal values
  would otherwise give ticks like 0.46225 ... 0.46250), hardly below 0 (HS-Err is a squared distance; the small
  margin keeps a dot at 0 whole)."""
  values = [v for v in values if np.isfinite(v)] or [0.0]
  low, high = min(values), max(values)
  span = max(1.2 * (high - low), HS_ERR_MIN_SPAN)
  start = max(-0.05 * span, (low + high - span) / 2)
  return start, start + span


def hs_err_figure(per_clip: list[dict]):
  """Per-clip HS-Err (full frame) per run: a dot per clip on the run's line for up to HS_ERR_DOTS_MAX_CLIPS clips
  a run, a histogram beyond."""
  plt = _pyplot()
  runs = list(dict.fromkeys(row["run"] for row in per_clip))
  values = {run: [row["hs_err"] for row in per_clip if row["run"] == run and row.get("scope") == "full"]
            for run in runs}
  figure, axis = plt.subplots(figsize=(5, 3.2))
  x_range = hs_err_axis_range([v for run_values in values.values() for v in run_values])
  if max((len(v) for v in values.values()), default=0) <= HS_ERR_DOTS_MAX_CLIPS:
    for line, run in enumerate(runs):
      axis.plot(values[run], [line] * len(values[run]), "o", alpha=0.6)
    axis.set_yticks(range(len(runs)), runs)
    axis.set_ylim(-0.5, len(runs) - 0.5)
  else:
    axis.hist(list(values.values()), bins=20, range=x_range, label=runs)
    axis.set_ylabel("clips")
    axis.legend()
  axis.set_xlim(*x_range)
  axis.set_xlabel("HS-Err per clip (full frame)")
  return figure


def plot_hs_err_distribution(per_clip: list[dict], path: pathlib.Path) -> None:
  _save(hs_err_figure(per_clip), path)


def _tile(frame: np.ndarray, width: int, height: int, contours) -> np.ndarray:
  small = np.ascontiguousarray(cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA))
  return cv2.drawContours(small, contours, -1, (0, 255, 0), 1)


def _label(strip: np.ndarray, text: str) -> np.ndarray:
  cv2.putText(strip, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
  return cv2.putText(strip, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)


def contact_sheet(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], frames_shown: int = 5,
                  height: int = 96) -> np.ndarray:
  """One band per clip: generated frames above ground-truth frames (L frames subsampled to `frames_shown`),
  the motion-area mask outlined in green on both. rows: (name, gen (L, H, W, 3), gt (L, H, W, 3), mask (H, W))."""
  bands = []
  for name, gen, gt, mask in rows:
    picks = np.round(np.linspace(0, len(gen) - 1, min(frames_shown, len(gen)))).astype(int)
    width = max(1, round(gen.shape[2] * height / gen.shape[1]))
    small_mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(small_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    band = np.concatenate([_label(np.concatenate([_tile(v[i], width, height, contours) for i in picks], axis=1),
                                  f"{name} {which}") for v, which in ((gen, "generated"), (gt, "ground truth"))],
                          axis=0)
    bands.append(np.pad(band, ((0, 4), (0, 0), (0, 0)), constant_values=255))
  widest = max(b.shape[1] for b in bands)
  return np.concatenate([np.pad(b, ((0, 0), (0, widest - b.shape[1]), (0, 0)), constant_values=255)
                         for b in bands])


def write_contact_sheet(path: pathlib.Path, rows) -> None:
  media_files.write_png(path, contact_sheet(rows))
