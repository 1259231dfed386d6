"""Scoring generated videos against the ground truth: per clip and scope (full frame, motion area), then over the
clips of each run (means, FID, FVD; all clips and the motion-intensive subset), written as metrics.csv,
summary.json, report.md, plots and contact sheets. handi_jax/evaluate.py's docstring gives the protocol.

Across processes and devices: each process scores the clips it owns (clip i: process i % process_count,
sharding.process_share), its features batched over its own devices (extractors.batched) and its MediaPipe detection
spread over config.evaluate.hand_workers processes; the per-clip results of all processes are gathered, and every
process aggregates them in clip order (the same summary whatever the split); process 0 alone writes the outputs."""

import collections
import dataclasses
import hashlib
import multiprocessing
import pathlib

import cv2
import jax
import numpy as np
from absl import logging

from handi_jax import sharding
from handi_jax.evaluation import blip, egovlp, metrics, report
from handi_jax.evaluation import clips as clips_lib
from handi_jax.evaluation import extractors as extractors_lib
from handi_jax.media import files as media_files
from handi_jax.media import hand_detection
from handi_jax.media import hand_masks as mask_rules
from handi_jax.media.clip_frames import sample_indices

# ---------------------------------------------------------------------------------------------------
# Per clip.


# A video of another size than the run's others is still scored when its aspect ratio is its ground truth's within
# this: generation rounds each side to a multiple of 8 (320 x 183 -> 680 x 384 at 512 x 512 px is 1.3% wider), and
# the same scene is often published at sizes 2% apart (EPIC-KITCHENS 456 x 256, frames cropped to 448 x 256).
ASPECT_TOLERANCE = 0.05


def minimum_frames(ex: extractors_lib.Extractors) -> int:
  """The fewest frames F a run's video needs: the context frame 0 and L = F - 1 scored frames, L >= 1 for every
  metric (the motion flow pairs frame 0 with frame 1), L >= 2 with CLIP (CLIP_Cs scores consecutive pairs), and with
  FVD the I3D's minimum (9)."""
  scored = max(1, 2 if ex.clip is not None else 1, ex.i3d.minimum_frames if ex.i3d is not None else 1)
  return 1 + scored


def align_ground_truth(frames: np.ndarray, mask: np.ndarray | None, num_frames: int, height: int,
                       width: int) -> tuple[np.ndarray, np.ndarray | None]:
  """The ground truth sampled to the generated video's F frames and size; the mask resized likewise."""
  if len(frames) < num_frames:
    raise clips_lib.UnusableVideo(f"{num_frames} frames, more than the ground truth's {len(frames)} (it is sampled "
                                  "to the generated video's frames)")
  frames = frames[sample_indices(len(frames), num_frames)]
  frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])
  mask = None if mask is None else cv2.resize(
      mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
  return frames, mask


def square_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
  """(top, bottom, left, right) of the mask's bounding box grown to a square inside the frame; None if empty."""
  rows, cols = np.nonzero(mask)
  if rows.size == 0:
    return None
  height, width = mask.shape
  top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
  side = min(max(bottom - top, right - left), height, width)
  top = int(np.clip((top + bottom - side) // 2, 0, height - side))
  left = int(np.clip((left + right - side) // 2, 0, width - side))
  return top, top + side, left, left + side


def motion_area_frames(frames: np.ndarray, mask: np.ndarray, box) -> np.ndarray:
  """Frames (N, H, W, 3) black outside the mask, cropped to `box` (see the module docstring)."""
  top, bottom, left, right = box
  return (frames * mask[None, :, :, None].astype(frames.dtype))[:, top:bottom, left:right]


def detect_keypoints(detector: hand_detection.HandDetector, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """MediaPipe keypoints (N, 2, 21, 2) in [0, 1] of the frame and presence (N, 2, 21), data_prep's slot rule."""
  keypoints, presence = hand_detection.empty_keypoints(len(frames))
  for f, hands in enumerate(detector.detect_clip(np.ascontiguousarray(frames), fps=8.0)):
    slots, _ = hand_detection.assign_slots(hands)
    for s, hand in enumerate(slots):
      if hand is not None:
        keypoints[f, s], presence[f, s] = hand.landmarks, 1
  return keypoints, presence


def _features(frames: np.ndarray, ex: extractors_lib.Extractors) -> dict:
  """FID features of every frame and the FVD features of the clip, for the extractors that are configured."""
  found = {}
  if ex.inception is not None:
    found["inception"] = ex.inception.features(frames)
  if ex.i3d is not None:
    found["i3d"] = ex.i3d.features(frames[None])
  return found


@dataclasses.dataclass
class ScopeResult:
  values: dict                     # per-clip metrics of this scope
  gen: np.ndarray | None           # (L, h, w, 3) frames as fed to the extractors (kept for contact sheets only)
  gt: np.ndarray | None
  features: dict = dataclasses.field(default_factory=dict)      # FID / FVD features of the generated frames
  gt_features: dict = dataclasses.field(default_factory=dict)   # ... and of the ground truth


class GroundTruthFeatures:
  """The ground truth's keypoints and features per (clip, scope, frame size), computed once for all runs
  (the ground truth and its motion area do not depend on the run)."""

  def __init__(self, detector, ex: extractors_lib.Extractors):
    self.detector, self.ex, self._cache = detector, ex, {}

  def get(self, key, frames: np.ndarray) -> dict:
    key = key + (frames.shape,)
    if key not in self._cache:
      keypoints, presence = detect_keypoints(self.detector, frames)
      clip = None if self.ex.clip is None else self.ex.clip.image_embeddings(frames)
      self._cache[key] = dict(keypoints=keypoints, presence=presence, clip=clip, frechet=_features(frames, self.ex))
    return self._cache[key]


def evaluate_scope(gen, gt, gt_features: dict, prompt, detector, ex: extractors_lib.Extractors) -> ScopeResult:
  gen_kp, gen_presence = detect_keypoints(detector, gen)
  values = dict(frames=len(gen),
                hs_err=metrics.hs_err(gen_kp, gen_presence, gt_features["keypoints"], gt_features["presence"]),
                **metrics.hand_detection_rates(gen_presence, gt_features["presence"]))
  if ex.clip is not None:
    gen_embeddings = ex.clip.image_embeddings(gen)
    values.update(clip_gt=metrics.clip_gt(gen_embeddings, gt_features["clip"]),
                  clip_cs=metrics.clip_consecutive(gen_embeddings),
                  clip_tx=metrics.clip_text(gen_embeddings, ex.clip.text_embedding(prompt)))
  if ex.egovlp is not None:
    values["egovlp"] = float(ex.egovlp.score(gen, gt))
  if ex.blip is not None:
    values["blip"] = float(ex.blip.score(gen, prompt))
  return ScopeResult(values, gen, gt, _features(gen, ex), gt_features["frechet"])


def evaluate_clip(clip: clips_lib.Clip, generated: np.ndarray, detector, ex, truth: GroundTruthFeatures,
                  config) -> dict:
  """{"full": ScopeResult, "ma": ScopeResult or None when the motion area is empty, "mask": (H, W) bool,
  "gt_aspect": the ground truth's width / height}."""
  num_frames, height, width = generated.shape[:3]
  source = clip.frames()
  gt, mask = align_ground_truth(source, clip.mask, num_frames, height, width)
  gen, gt = generated[1:], gt[1:]
  gt_full = truth.get((clip.name, "full"), gt)
  full = evaluate_scope(gen, gt, gt_full, clip.prompt, detector, ex)
  if mask is None:
    mask = mask_rules.clip_masks(gt_full["keypoints"], gt_full["presence"], height, width,
                                 config.data.build.mask_rule)[1] > 0
  full.values["mask_area"] = float(mask.mean())
  flow = media_files.motion_flow_map(generated, float(config.generate.flow_threshold))
  full.values["flow_inside"] = metrics.flow_inside_share(flow, mask)
  box = square_box(mask)
  ma = None
  if box is not None:
    gen_ma, gt_ma = motion_area_frames(gen, mask, box), motion_area_frames(gt, mask, box)
    ma = evaluate_scope(gen_ma, gt_ma, truth.get((clip.name, "ma"), gt_ma), clip.prompt, detector, ex)
  return {"full": full, "ma": ma, "mask": mask, "gt_aspect": source.shape[2] / source.shape[1]}


# ---------------------------------------------------------------------------------------------------
# Aggregation.


def _frechet(extractor, name: str, scoped: list[ScopeResult]) -> float | str:
  """FID (`name` "inception": every frame) or FVD ("i3d": one vector per clip) over the clips in `scoped`."""
  if extractor is None:
    return extractors_lib.NOT_CONFIGURED
  if not scoped:
    return float("nan")
  gen = np.concatenate([r.features[name] for r in scoped])
  gt = np.concatenate([r.gt_features[name] for r in scoped])
  return metrics.frechet_distance_of_features(gen, gt) if min(len(gen), len(gt)) >= 2 else float("nan")


def _frechet_counts(ex: extractors_lib.Extractors, scoped: list[ScopeResult]) -> dict:
  """How many frames FID and how many clips (of how many frames) FVD come from, and whether that many make them
  comparable with published values (metrics.FID_MINIMUM_FRAMES, metrics.FVD_MINIMUM_CLIPS)."""
  counts = {}
  if ex.inception is not None:
    frames = sum(len(r.features["inception"]) for r in scoped)
    counts.update(fid_frames=frames, fid_comparable=frames >= metrics.FID_MINIMUM_FRAMES)
  if ex.i3d is not None:
    counts.update(fvd_clips=len(scoped), fvd_frames_per_clip=sorted({r.values["frames"] for r in scoped}),
                  fvd_comparable=len(scoped) >= metrics.FVD_MINIMUM_CLIPS)
  return counts


def aggregate(results: dict[str, dict], names: list[str], ex: extractors_lib.Extractors) -> dict:
  """Means of per-clip metrics over `names`, FID over their frames and FVD over their clips (with the counts
  _frechet_counts gives), per scope; the clips of `names` without results were skipped."""
  summary = {}
  for scope in report.SCOPES:
    scoped = [results[n][scope] for n in names if n in results and results[n][scope] is not None]
    values = dict(clips=len(scoped), skipped=sum(n not in results for n in names))
    for key, _, _ in report.COLUMNS:
      found = [r.values[key] for r in scoped if key in r.values]
      values[key] = float(np.nanmean(found)) if found and not np.all(np.isnan(found)) else float("nan")
    for key, name in (("clip_gt", "clip"), ("clip_cs", "clip"), ("clip_tx", "clip"), ("egovlp", "egovlp"),
                      ("blip", "blip")):
      if getattr(ex, name) is None:
        values[key] = extractors_lib.NOT_CONFIGURED
    values["fid"] = _frechet(ex.inception, "inception", scoped)
    values["fvd"] = _frechet(ex.i3d, "i3d", scoped)
    values.update(_frechet_counts(ex, scoped))
    summary[scope] = values
  return summary


# ---------------------------------------------------------------------------------------------------
# Extractors from the config.


def extractors_from_config(config) -> extractors_lib.Extractors:
  """The extractors config.evaluate names weights for (None where its field is empty); a path that does not exist
  is a FileNotFoundError naming the field."""
  e = config.evaluate
  return extractors_lib.Extractors(
      clip=extractors_lib.ClipExtractor.from_directory(e.clip, e.batch_size) if e.clip else None,
      inception=extractors_lib.InceptionExtractor.from_file(e.inception, e.batch_size) if e.inception else None,
      i3d=extractors_lib.I3dExtractor.from_file(e.i3d) if e.i3d else None,
      egovlp=egovlp.EgoVlpScorer.from_file(e.egovlp, num_frames=int(e.egovlp_frames)) if e.egovlp else None,
      blip=blip.BlipScorer.from_directory(e.blip, e.batch_size) if e.blip else None)


# What FID and FVD are fed of each clip (evaluate_clip's alignment), for the report's protocol.
FID_FRAME_SAMPLING = ("every scored frame of every clip, pooled: frames 1..F-1 of each generated video (frame 0, "
                      "the context image, left out) against the same frames of its ground truth sampled evenly to the "
                      "video's F frames and resized to its size")
FVD_FRAME_SAMPLING = ("one clip per video: its L = F - 1 scored frames in order, all of them (no temporal "
                      "subsampling or cropping), against the same frames of its ground truth sampled evenly to F "
                      "frames")


def frechet_protocol(ex: extractors_lib.Extractors) -> dict:
  """summary.json's "protocol": what the configured FID and FVD are computed from, and the fewest frames / clips
  for a value comparable with published ones (the counts of each run and scope are in its summary)."""
  protocol = {}
  if ex.inception is not None:
    protocol["fid"] = dict(
        ex.inception.protocol(), frame_sampling=FID_FRAME_SAMPLING, minimum_frames=metrics.FID_MINIMUM_FRAMES,
        minimum_source="the FID authors' recommended minimum sample size (bioinf-jku/TTUR); FID of fewer frames is "
                       "biased (it falls as samples grow) and not comparable with published values")
  if ex.i3d is not None:
    protocol["fvd"] = dict(
        ex.i3d.protocol(), frame_sampling=FVD_FRAME_SAMPLING, minimum_clips=metrics.FVD_MINIMUM_CLIPS,
        minimum_source=f"StyleGAN-V's protocol (fvd2048_16f: {metrics.FVD_MINIMUM_CLIPS} clips of "
                       f"{metrics.FVD_CONVENTION_FRAMES} frames a side), the convention of recent video papers; FVD "
                       "of fewer clips is biased (it falls as clips grow) and not comparable with published values")
  return protocol


# ---------------------------------------------------------------------------------------------------
# All runs.


def off_size_videos(sizes: dict[str, tuple[tuple[int, int], float]]) -> dict[str, str]:
  """{clip: reason} of the videos, sizes {clip: ((width, height), ground truth's aspect ratio)}, that are neither
  the run's most common size (ties: the earlier clip's) nor their ground truth's shape: scoring one would stretch its
  ground truth to another shape. Every other size is scored, the ground truth resized to it (see evaluate.py)."""
  if not sizes:
    return {}
  (common_width, common_height), _ = collections.Counter(size for size, _ in sizes.values()).most_common(1)[0]
  return {name: f"{width} x {height} px where the run's other videos are {common_width} x {common_height} and the "
                f"ground truth's aspect ratio is {gt_aspect:.3f}"
          for name, ((width, height), gt_aspect) in sizes.items()
          if (width, height) != (common_width, common_height)
          and abs(width / height / gt_aspect - 1) > ASPECT_TOLERANCE}


def _skip(run: str, skipped: dict[str, str], name: str, video, reason) -> None:
  skipped[name] = f"{video}: {reason}"
  logging.warning("run %s, clip %s skipped: %s", run, name, skipped[name])


def evaluate_run(run: str, folder: pathlib.Path, clips: list[clips_lib.Clip], detector, ex, truth, config,
                 keep_frames: set[str]):
  """(results {clip: evaluate_clip's}, skipped {clip: reason}, scored {clip: (video, (width, height), ground truth's
  aspect ratio)}) of one run's videos of `clips`; a video that cannot be scored (clips_lib.UnusableVideo) skips its
  clip, with a warning, and the other clips go on. Only the clips in `keep_frames` keep their frames (for the
  contact sheets): of the others only features and numbers stay in memory."""
  results, skipped, scored = {}, {}, {}
  fewest = minimum_frames(ex)
  for clip in clips:
    video = folder
    try:
      video = clips_lib.find_generated(folder, clip.name)
      generated = clips_lib.read_checked(video, fewest)
      results[clip.name] = evaluate_clip(clip, generated, detector, ex, truth, config)
    except clips_lib.UnusableVideo as e:
      _skip(run, skipped, clip.name, video, e)
      continue
    scored[clip.name] = video, (generated.shape[2], generated.shape[1]), results[clip.name]["gt_aspect"]
    logging.info("run %s, clip %s: %s", run, clip.name, results[clip.name]["full"].values)
    if clip.name not in keep_frames:
      for scoped in filter(None, (results[clip.name]["full"], results[clip.name]["ma"])):
        scoped.gen = scoped.gt = None
      results[clip.name]["mask"] = None
  return results, skipped, scored


# ---------------------------------------------------------------------------------------------------
# MediaPipe in a worker pool: workers run evaluate_clip without extractors, recording the hands they find per frame
# stack; the scoring process then replays them (the same frames give the same key) instead of detecting again.


def _frames_key(frames: np.ndarray) -> tuple:
  return frames.shape, hashlib.sha1(np.ascontiguousarray(frames).tobytes()).hexdigest()


class _RecordingDetector:
  def __init__(self, detector):
    self.detector, self.found = detector, {}

  def detect_clip(self, frames: np.ndarray, fps: float):
    self.found[_frames_key(frames)] = hands = self.detector.detect_clip(frames, fps)
    return hands


class _ReplayingDetector:
  """Hands the pool found, by frames; frames it did not see are detected here."""

  def __init__(self, detector, found: dict):
    self.detector, self.found = detector, found

  def detect_clip(self, frames: np.ndarray, fps: float):
    key = _frames_key(frames)
    return self.found[key] if key in self.found else self.detector.detect_clip(frames, fps)


_worker_detector = None


def _start_hand_worker(settings: hand_detection.DetectorSettings) -> None:
  global _worker_detector
  _worker_detector = hand_detection.HandDetector(settings)


def _hands_of_clip(task) -> dict:
  """A worker's task: the hands in every frame stack evaluate_clip detects on for one clip in every run."""
  clip, runs, fewest, config = task
  recorder = _RecordingDetector(_worker_detector)
  truth = GroundTruthFeatures(recorder, extractors_lib.Extractors())
  for folder in runs:
    try:
      generated = clips_lib.read_checked(clips_lib.find_generated(folder, clip.name), fewest)
      evaluate_clip(clip, generated, recorder, extractors_lib.Extractors(), truth, config)
    except clips_lib.UnusableVideo:
      continue  # the scoring process reports it
  return recorder.found


def hand_detector(config, clips: list[clips_lib.Clip], runs: dict[str, pathlib.Path], fewest: int):
  """The detector scoring uses: with config.evaluate.hand_workers > 1, the hands of `clips` found ahead by that many
  worker processes (spawned: MediaPipe and JAX are not fork-safe), else MediaPipe in this process."""
  settings = hand_detection.DetectorSettings.from_config(config.data.build)
  detector = hand_detection.HandDetector(settings)
  workers = int(config.evaluate.hand_workers)
  if workers <= 1 or not clips:
    return detector
  found = {}
  tasks = [(clip, list(runs.values()), fewest, config) for clip in clips]
  with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)), _start_hand_worker, (settings,)) as pool:
    for hands in pool.imap_unordered(_hands_of_clip, tasks):
      found.update(hands)
  return _ReplayingDetector(detector, found)


def score_share(config, clips: list[clips_lib.Clip], runs: dict[str, pathlib.Path],
                ex: extractors_lib.Extractors) -> dict:
  """This process's share of the scoring: {run: evaluate_run's} over the clips it owns (sharding.process_share)."""
  owned = sharding.process_share(clips)
  detector = hand_detector(config, owned, runs, minimum_frames(ex))
  truth = GroundTruthFeatures(detector, ex)
  keep_frames = {c.name for c in clips[:int(config.evaluate.contact_sheet_clips)]}
  return {run: evaluate_run(run, folder, owned, detector, ex, truth, config, keep_frames)
          for run, folder in runs.items()}


def merge_shares(clips: list[clips_lib.Clip], shares: list[dict]) -> dict:
  """The score_share of every process -> {run: (results, skipped)} over all clips, skipped in clip order; a video
  that is neither its run's most common size nor its ground truth's shape (off_size_videos) is skipped here."""
  merged = {}
  for run in shares[0]:
    results, skipped, scored = {}, {}, {}
    for share in shares:
      for whole, part in zip((results, skipped, scored), share[run], strict=True):
        whole.update(part)
    off_size = off_size_videos({name: (size, aspect) for name, (_, size, aspect) in scored.items()})
    for name, reason in off_size.items():
      _skip(run, skipped, name, scored[name][0], reason)
      del results[name]
    merged[run] = results, {c.name: skipped[c.name] for c in clips if c.name in skipped}
  return merged


def per_clip_rows(run: str, clips: list[clips_lib.Clip], results: dict, skipped: dict[str, str],
                  subset: set[str]) -> list[dict]:
  """metrics.csv's rows of one run: one per clip and scope, and one with the reason per skipped clip."""
  rows = []
  for clip in clips:
    if clip.name in skipped:
      rows.append(dict(run=run, clip=clip.name, prompt=clip.prompt, skipped=skipped[clip.name]))
      continue
    for scope in report.SCOPES:
      if (result := results[clip.name][scope]) is not None:
        rows.append(dict(run=run, clip=clip.name, prompt=clip.prompt, skipped="", scope=scope,
                         motion_intensive=clip.name in subset, **result.values))
  return rows


def evaluate_runs(config, clips: list[clips_lib.Clip], runs: dict[str, pathlib.Path], out_dir: pathlib.Path,
                  ex: extractors_lib.Extractors | None = None) -> dict:
  """Metrics of every run over `clips`; writes every output into out_dir (process 0) and returns summary.json's
  "runs" {run: {"all" | "motion_intensive": {"full" | "ma": {metric: value, "clips": scored, "skipped": count, FID /
  FVD counts}}}} (its "protocol" is frechet_protocol's). Every process calls it (see the module docstring)."""
  ex = ex if ex is not None else extractors_from_config(config)
  scored = merge_shares(clips, sharding.gather_from_processes(score_share(config, clips, runs, ex)))
  areas = {}
  for results, _ in scored.values():  # the ground truth's mask area, from the first run that scored the clip
    for name, result in results.items():
      areas.setdefault(name, result["full"].values["mask_area"])
  subset = clips_lib.motion_intensive_from_data(config) or set(
      metrics.motion_intensive_subset(areas, float(config.evaluate.motion_intensive_fraction)))
  names = [c.name for c in clips]
  summary, rows = {}, []
  for run, (results, skipped) in scored.items():
    summary[run] = {"all": aggregate(results, names, ex),
                    "motion_intensive": aggregate(results, [n for n in names if n in subset], ex)}
    rows += per_clip_rows(run, clips, results, skipped, subset)
  if jax.process_index() == 0:
    write_outputs(config, clips, scored, summary, rows, frechet_protocol(ex), out_dir)
  return summary


def write_outputs(config, clips, scored: dict, summary: dict, rows: list[dict], protocol: dict,
                  out_dir: pathlib.Path) -> None:
  """metrics.csv, summary.json, report.md, the plots and the contact sheets."""
  out_dir.mkdir(parents=True, exist_ok=True)
  report.write_csv(out_dir / "metrics.csv", rows)
  report.write_summary(out_dir, summary, {run: skipped for run, (_, skipped) in scored.items()}, protocol)
  report.plot_metric_bars(summary, out_dir / "metrics.png")
  report.plot_hs_err_distribution(rows, out_dir / "hs_err.png")
  for run, (results, _) in scored.items():
    sheet = [(c.name, results[c.name]["full"].gen, results[c.name]["full"].gt, results[c.name]["mask"])
             for c in clips[:int(config.evaluate.contact_sheet_clips)] if c.name in results]
    if sheet:
      report.write_contact_sheet(out_dir / f"contact_{run}.png", sheet)


def training_scalars(run_summary: dict) -> dict[str, float]:
  """One run's summary -> {"eval/<subset>/<scope>/<metric>": value} with the numbers only (no "not configured",
  no NaN), as a metric writer takes them."""
  return {f"eval/{subset}/{scope}/{key}": float(value)
          for subset, by_scope in run_summary.items() for scope, values in by_scope.items()
          for key, value in values.items()
          if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)}
