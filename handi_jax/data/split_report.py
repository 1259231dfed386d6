"""Per-split summary files: prior mask, motion-intensive index, and the report with its coverage histogram."""

import io
import json
import math
import pathlib
from collections import Counter
from collections.abc import Callable

import cv2
import numpy as np

from handi_jax.data import schema

HISTOGRAM_BINS = 20


def motion_intensive(clips: list[dict], fraction: float) -> dict:
  """The clips in the top `fraction` of union-mask area (at least one), largest first; ties by clip id."""
  ranked = sorted(clips, key=lambda c: (-c["mask_area"], c["clip_id"]))
  chosen = ranked[:max(1, math.ceil(fraction * len(ranked)))]
  return dict(fraction=fraction, threshold_area=chosen[-1]["mask_area"],
              clips=[dict(clip_id=c["clip_id"], mask_area=c["mask_area"]) for c in chosen])


def report(clips: list[dict], rejected: list[dict], num_frames: int) -> dict:
  hands = np.array([c["hands_per_frame"] for c in clips], np.int64).reshape(len(clips), num_frames)
  areas = np.array([c["mask_area"] for c in clips], np.float64)
  counts, edges = np.histogram(areas, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
  return dict(
      clips=len(clips), frames=len(clips) * num_frames, rejected=len(rejected),
      rejected_by_reason=dict(sorted(Counter(r["reason"] for r in rejected).items())),
      hand_detection_rate=float((hands > 0).mean()),
      hand_detection_rate_per_frame=[float(v) for v in (hands > 0).mean(axis=0)],
      mean_hands_per_frame=float(hands.mean()),
      mask_area=dict(mean=float(areas.mean()), median=float(np.median(areas)), min=float(areas.min()),
                     max=float(areas.max())),
      coverage_histogram=dict(bin_edges=[round(float(e), 4) for e in edges], counts=[int(c) for c in counts]))


def histogram_png(summary: dict, split: str) -> bytes:
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  histogram = summary["coverage_histogram"]
  edges = np.array(histogram["bin_edges"])
  figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
  axis.bar(edges[:-1] * 100, histogram["counts"], width=np.diff(edges) * 100, align="edge", edgecolor="black")
  axis.set_xlabel("motion-area mask coverage of the frame (%)")
  axis.set_ylabel("clips")
  axis.set_title(f"split {split!r}: {summary['clips']} clips, mean coverage {summary['mask_area']['mean']:.1%}")
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", metadata={"Software": None})
  plt.close(figure)
  return buffer.getvalue()


def write_split_files(split_dir: pathlib.Path, clips: list[dict], rejected: list[dict], prior: np.ndarray, config,
                      write: Callable[[pathlib.Path, bytes], None]) -> None:
  buffer = io.BytesIO()
  np.save(buffer, prior, allow_pickle=False)
  write(split_dir / schema.PRIOR_MASK_NPY, buffer.getvalue())
  write(split_dir / schema.PRIOR_MASK_PNG, cv2.imencode(".png", np.round(prior * 255).astype(np.uint8))[1].tobytes())
  index = motion_intensive(clips, config.data.build.motion_intensive_fraction)
  write(split_dir / schema.MOTION_INTENSIVE, (json.dumps(index, indent=1) + "\n").encode())
  summary = report(clips, rejected, config.data.num_frames)
  write(split_dir / schema.REPORT, (json.dumps(summary, indent=1) + "\n").encode())
  write(split_dir / schema.COVERAGE_HISTOGRAM, histogram_png(summary, split_dir.name))
