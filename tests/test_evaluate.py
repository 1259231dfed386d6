"""Evaluation: the CLIP extractor against transformers.CLIPModel on random tiny weights, and the whole job
(--mode=evaluate) end to end on the real clips of ../shared/data: with CLIP, EgoVLP and BLIP (fast), and with every
extractor (slow), each on tiny random weights read from the config's paths (tests/test_evaluate_extractors.py
writes them)."""

import contextlib
import csv
import hashlib
import io
import json
import logging
import pathlib
import types

import cv2
import jax
import numpy as np
import pytest

from configs import common
from handi_jax import evaluate, sharding, tokenizers
from handi_jax.convert import clip as convert_clip
from handi_jax.evaluation import clips as clips_lib
from handi_jax.evaluation import extractors, metrics, report, scoring
from handi_jax.media import files as media_files
from handi_jax.media.clip_frames import sample_indices
from tests import test_evaluate_extractors as weights_files

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
  """(our ClipExtractor, transformers CLIPModel, tokenizer) with the same random tiny weights, via a saved folder."""
  import torch
  import transformers

  tokenizer = tokenizers.demo_tokenizer()
  text = dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
              bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu")
  vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, hidden_act="gelu")
  torch.manual_seed(0)
  reference = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                             projection_dim=16)).eval()
  with torch.no_grad():  # make every parameter matter (LayerNorms start at exactly 1 / 0)
    for p in reference.parameters():
      p.add_(0.05 * torch.randn_like(p))
  directory = tmp_path_factory.mktemp("clip")
  reference.save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  return extractors.ClipExtractor.from_directory(str(directory), batch_size=3), reference, tokenizer, str(directory)


def _reference_image_embeds(reference, frames):
  """transformers on the same preprocessed pixels (the preprocessing has its own test)."""
  import torch

  pixels = np.array(extractors.clip_preprocess(frames, 32))
  with torch.no_grad():
    out = reference.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
  return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


def _reference_text_embeds(reference, tokenizer, prompts):
  import torch

  ids = torch.from_numpy(tokenizers.tokenize(tokenizer, prompts).astype(np.int64))
  with torch.no_grad():
    out = reference.get_text_features(input_ids=ids)
  return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


def test_image_and_text_embeddings_match_transformers(clip_pair):
  ours, reference, tokenizer, _ = clip_pair
  frames = np.random.default_rng(0).integers(0, 256, (5, 40, 56, 3), np.uint8)  # 5 frames: batches of 3 + 2
  image_error = np.abs(ours.image_embeddings(frames) - _reference_image_embeds(reference, frames)).max()
  prompts = ["julienne the carrot", "roll dough"]
  text_ours = np.stack([ours.text_embedding(p) for p in prompts])
  text_error = np.abs(text_ours - _reference_text_embeds(reference, tokenizer, prompts)).max()
  print(f"CLIP parity, max abs error: image embeddings {image_error:.2e}, text embeddings {text_error:.2e}")
  assert image_error < TOLERANCE and text_error < TOLERANCE


def test_clip_text_score_of_a_known_pair_equals_transformers(clip_pair):
  ours, reference, tokenizer, _ = clip_pair
  frames = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), np.uint8)
  prompt = "knit the fabric"
  score = metrics.clip_text(ours.image_embeddings(frames), ours.text_embedding(prompt))
  image, text = _reference_image_embeds(reference, frames), _reference_text_embeds(reference, tokenizer, [prompt])[0]
  image, text = image / np.linalg.norm(image, axis=-1, keepdims=True), text / np.linalg.norm(text)
  assert score == pytest.approx(100 * float(np.mean(image @ text)), abs=1e-4)


def test_loading_a_text_only_folder_names_the_fix(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "clip_text_model"}')
  with pytest.raises(ValueError, match="two-tower CLIPModel"):
    convert_clip.load_pretrained(tmp_path)


def test_preprocessing_equals_transformers_clip_image_processor():
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  rng = np.random.default_rng(2)
  for shape in ((40, 56, 3), (57, 31, 3), (183, 320, 3)):
    frames = rng.integers(0, 256, (2,) + shape, np.uint8)
    theirs = processor(list(frames), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(extractors.clip_preprocess(frames, 32), theirs, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# End to end on ../shared/data/clips: the ground truth itself (must score perfectly), a shifted copy, a run whose
# videos are all unusable and one with a video of another shape; CLIP, EgoVLP and BLIP configured, FID and FVD not.

CLIPS = {"31": "julienne a carrot", "36": "roll dough", "816": "knit the fabric — tricoter à l'aiguille"}
RUNS = ("same", "shifted", "broken", "odd")
PAPER_COLUMNS = ("HS-Err ↓", "FID ↓", "CLIP_GT ↑", "FVD ↓", "EgoVLP ↑", "CLIP_Cs ↑", "CLIP_Tx ↑", "BLIP ↑")


def report_table(report_md: str, title: str) -> dict:
  """{(scope, run): {column title: cell}} of report.md's table under "## <title>"."""
  section = report_md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
  rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
          if line.startswith("| ")]
  header = rows[0]
  return {(row[0], row[1]): dict(zip(header, row, strict=True)) for row in rows[1:]}


def is_number(text: str) -> bool:
  """A report cell that holds a number (a FID / FVD may carry report.NOT_COMPARABLE after it)."""
  try:
    float(text.removesuffix(report.NOT_COMPARABLE).strip())
  except ValueError:
    return False
  return True


class _Warnings(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def evaluation(shared_data, clip_pair, tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate")
  clips = shared_data / "clips"
  (root / "prompt.json").write_bytes("".join(
      json.dumps(dict(source=f"source/{name}.png", target=f"target/{name}.gif", prompt=prompt), ensure_ascii=False)
      + "\n" for name, prompt in CLIPS.items()).encode())
  videos = {}
  for name in CLIPS:
    gt = media_files.read_video(clips / f"{name}.gif")
    gt = gt[np.round(np.linspace(0, len(gt) - 1, 6)).astype(int)]  # 6 frames (L = 5) keep MediaPipe's share small
    videos[name] = gt
    for run, video in (("same", gt), ("shifted", np.roll(gt, 12, axis=2))):
      (root / run / name).mkdir(parents=True)
      media_files.write_gif(root / run / name / "video.gif", video, 8)
  # "broken": 31 has one frame, 36 none, 816 is cut short. "odd": 36 squashed to a square, the others as "same".
  (root / "broken").mkdir()
  media_files.write_gif(root / "broken" / "31.gif", videos["31"][:1], 8)
  (root / "broken" / "816.gif").write_bytes((root / "same" / "816" / "video.gif").read_bytes()[:200])
  (root / "odd").mkdir()
  for name in ("31", "816"):
    media_files.write_gif(root / "odd" / f"{name}.gif", videos[name], 8)
  squashed = np.stack([cv2.resize(frame, (256, 256), interpolation=cv2.INTER_AREA) for frame in videos["36"]])
  media_files.write_gif(root / "odd" / "36.gif", squashed, 8)
  config = common.get_config(2)
  config.evaluate.update(prompts_file=str(root / "prompt.json"), image_dir=str(clips), gt_dir=str(clips),
                         runs=",".join(f"{run}={root / run}" for run in RUNS), clip=clip_pair[3],
                         egovlp=str(weights_files.write_egovlp_checkpoint(root / "egovlp.safetensors")),
                         blip=str(weights_files.write_blip_directory(root / "blip")),
                         output_dir=str(root / "out"), batch_size=8)
  warnings = _Warnings()
  logging.getLogger("absl").addHandler(warnings)
  try:
    with contextlib.redirect_stdout(io.StringIO()) as printed:
      summary = evaluate.evaluate(config, str(root))
  finally:
    logging.getLogger("absl").removeHandler(warnings)
  return types.SimpleNamespace(summary=summary, root=root, out=root / "out", printed=printed.getvalue(),
                               warnings=warnings.messages)


def test_evaluation_writes_every_output(evaluation):
  summary, out = evaluation.summary, evaluation.out
  for name in ("metrics.csv", "summary.json", "report.md", "metrics.png", "hs_err.png", "contact_same.png",
               "contact_shifted.png", "contact_odd.png", "config.json"):
    assert (out / name).is_file(), name
  assert not (out / "contact_broken.png").exists()  # no clip of that run to show
  rows = list(csv.DictReader((out / "metrics.csv").open(encoding="utf-8")))
  assert {(r["run"], r["clip"]) for r in rows} == {(run, c) for run in RUNS for c in CLIPS}
  assert {r["frames"] for r in rows if r["run"] == "same"} == {"5"}  # L of each scored clip
  assert all(is_number(r[key]) for r in rows if r["run"] == "same" for key in ("egovlp", "blip"))
  # FID / FVD have no configured extractor here: they say so, never a number; the other six paper columns have one.
  for subset in ("All clips", "Motion-intensive subset"):
    table = report_table((out / "report.md").read_text(encoding="utf-8"), subset)
    for scope in ("Full", "MA"):
      cells = table[scope, "same"]
      assert [title for title in PAPER_COLUMNS if cells[title] == "not configured"] == ["FID ↓", "FVD ↓"]
      assert all(is_number(cells[title]) for title in PAPER_COLUMNS if title not in ("FID ↓", "FVD ↓"))
  for scope in ("full", "ma"):
    for key in ("fid", "fvd"):
      assert summary["same"]["all"][scope][key] == "not configured"
  assert "## FID and FVD protocol" not in (out / "report.md").read_text(encoding="utf-8")
  assert {"EgoVLP ↑", "BLIP ↑"} <= {axis.get_title() for axis in report.metric_bars_figure(summary).axes}
  scalars = scoring.training_scalars(summary["same"])
  assert {"eval/all/full/egovlp", "eval/all/ma/blip", "eval/motion_intensive/ma/egovlp"} <= scalars.keys()


def test_ground_truth_against_itself_scores_perfectly_and_a_shift_does_not(evaluation):
  summary = evaluation.summary
  same, shifted = summary["same"]["all"], summary["shifted"]["all"]
  assert same["full"]["hs_err"] == pytest.approx(0.0, abs=1e-12)
  assert same["full"]["clip_gt"] == pytest.approx(1.0, abs=1e-5)
  assert shifted["full"]["hs_err"] > 1e-4 and shifted["full"]["clip_gt"] < same["full"]["clip_gt"]
  # EgoVLP: the same frames give the same embedding (cosine 1) in both scopes; shifted frames another one.
  assert same["full"]["egovlp"] == pytest.approx(1.0, abs=1e-5) and same["ma"]["egovlp"] == pytest.approx(1.0, abs=1e-5)
  assert shifted["full"]["egovlp"] < 1 - 1e-4
  # BLIP compares captions of the generated frames with the prompt, not with the ground truth: any cosine.
  assert all(-1 <= summary[run]["all"][scope]["blip"] <= 1 for run in ("same", "shifted") for scope in ("full", "ma"))
  # 36 (448 x 256) is another size than 31 and 816 (320 x 183) but its ground truth's shape: scored
  assert same["full"]["clips"] == 3 and summary["same"]["motion_intensive"]["full"]["clips"] == 1


def test_bad_run_videos_are_skipped_with_one_warning_and_a_row_each(evaluation):
  root, out = evaluation.root, evaluation.out
  reasons = {
      ("broken", "31"): f"{root / 'broken' / '31.gif'}: 1 frames where at least 3 are needed",
      ("broken", "36"): f"{root / 'broken'}: missing: none of 36/video.mp4, 36/video.gif, 36.mp4, 36.gif",
      ("broken", "816"): f"{root / 'broken' / '816.gif'}: unreadable (",
      ("odd", "36"): f"{root / 'odd' / '36.gif'}: 256 x 256 px where the run's other videos are 320 x 183 and the "
                     "ground truth's aspect ratio is 1.750"}
  assert len(evaluation.warnings) == len(reasons)
  for (run, clip), reason in reasons.items():
    (warning,) = [w for w in evaluation.warnings if w.startswith(f"run {run}, clip {clip} skipped: ")]
    assert warning.startswith(f"run {run}, clip {clip} skipped: {reason}") and "\n" not in warning
  rows = list(csv.DictReader((out / "metrics.csv").open(encoding="utf-8")))
  skipped = {(r["run"], r["clip"]): r["skipped"] for r in rows if r["skipped"]}
  assert skipped.keys() == reasons.keys()
  assert all(skipped[key].startswith(reason) for key, reason in reasons.items())
  # the odd run's other clips are scored as the same videos are in run "same"
  scored = {(r["clip"], r["scope"]): {k: v for k, v in r.items() if k != "run"} for r in rows if r["run"] == "same"}
  for r in rows:
    if r["run"] == "odd" and not r["skipped"]:
      assert r["clip"] in ("31", "816") and {k: v for k, v in r.items() if k != "run"} == scored[r["clip"], r["scope"]]
  summary = evaluation.summary
  assert (summary["broken"]["all"]["full"]["clips"], summary["broken"]["all"]["full"]["skipped"]) == (0, 3)
  assert (summary["odd"]["all"]["full"]["clips"], summary["odd"]["all"]["full"]["skipped"]) == (2, 1)
  assert summary["odd"]["all"]["full"]["hs_err"] == pytest.approx(0.0, abs=1e-12)
  assert summary["same"]["all"]["ma"]["skipped"] == 0
  report_md = (out / "report.md").read_text(encoding="utf-8")
  assert "| Full | broken | 0 | 3 |" in report_md and "| Full | odd | 2 | 1 |" in report_md
  listed = report_md[report_md.index("## Skipped videos"):]
  assert all(f"| {run} | {clip} | {reason}" in listed for (run, clip), reason in reasons.items())


def test_summary_and_config_are_json_any_parser_reads_with_utf8_prompts(evaluation):
  def no_constants(name):
    raise ValueError(f"{name} is not JSON")

  out = evaluation.out
  summary = json.loads((out / "summary.json").read_bytes().decode("utf-8"), parse_constant=no_constants)
  assert summary["runs"]["broken"]["all"]["full"]["hs_err"] is None  # no clip scored: NaN written as null
  assert summary["protocol"] == {}  # neither FID nor FVD configured
  json.loads((out / "config.json").read_bytes().decode("utf-8"), parse_constant=no_constants)
  rows = list(csv.DictReader(io.StringIO((out / "metrics.csv").read_bytes().decode("utf-8"))))
  assert {r["prompt"] for r in rows if r["clip"] == "816"} == {CLIPS["816"]}


def test_evaluate_prints_where_the_outputs_are_and_a_line_per_run(evaluation):
  lines = evaluation.printed.strip().splitlines()
  assert str(evaluation.out) in lines[0] and "report.md" in lines[0] and "metrics.csv" in lines[0]
  assert [line.split(":")[0] for line in lines[1:]] == list(RUNS)
  assert lines[1].startswith("same: 3 clips, 0 skipped; full frame: HS-Err ↓ 0.00000, CLIP_GT ↑ 1.00000")
  assert lines[3].startswith("broken: 0 clips, 3 skipped; full frame: HS-Err ↓ n/a")
  assert "not configured" not in evaluation.printed and "## All clips" not in evaluation.printed


def test_minimum_frames_follow_the_configured_metrics():
  class I3dStandIn:
    minimum_frames = 9

  assert scoring.minimum_frames(extractors.Extractors()) == 2  # frame 0 and one scored frame (flow: a pair)
  assert scoring.minimum_frames(extractors.Extractors(clip=object())) == 3  # CLIP_Cs: two scored frames
  assert scoring.minimum_frames(extractors.Extractors(clip=object(), i3d=I3dStandIn())) == 10


def test_a_video_longer_than_its_ground_truth_is_unusable():
  with pytest.raises(clips_lib.UnusableVideo, match="^5 frames, more than the ground truth's 4 "):
    scoring.align_ground_truth(np.zeros((4, 8, 8, 3), np.uint8), None, 5, 8, 8)


def test_off_size_videos_are_another_size_than_the_run_and_another_shape_than_their_ground_truth():
  sizes = {"a": ((320, 183), 320 / 183), "b": ((320, 183), 320 / 183),
           "c": ((448, 256), 456 / 256),   # 1.8% narrower than its ground truth: that shape
           "d": ((256, 256), 448 / 256),   # a square of a 1.75 ground truth
           "e": ((256, 256), 1.0)}         # a square of a square ground truth
  assert scoring.off_size_videos(sizes) == {
      "d": "256 x 256 px where the run's other videos are 320 x 183 and the ground truth's aspect ratio is 1.750"}
  assert scoring.off_size_videos({"d": sizes["d"]}) == {}  # alone, it is the run's size


def _hs_err_rows(values):
  """metrics.csv rows of run "handi" with these full-frame HS-Err values (and motion-area ones the plot leaves out)."""
  return [dict(run="handi", clip=str(i), scope=scope, hs_err=v * factor)
          for i, v in enumerate(values) for scope, factor in (("full", 1), ("ma", 3))]


@pytest.mark.parametrize("values", [[0.46225, 0.4625], [0.46225], [0.0002, 0.0001]])
def test_hs_err_plot_of_one_or_two_clips_spans_a_readable_range(values):
  figure = report.hs_err_figure(_hs_err_rows(values) + [dict(run="broken", clip="0", skipped="unreadable")])
  axis = figure.axes[0]
  low, high = axis.get_xlim()
  assert high - low == pytest.approx(report.HS_ERR_MIN_SPAN) and -0.001 < low < min(values) and max(values) < high
  (dots, _) = axis.lines  # one line of dots a run: the skipped clip has none
  assert sorted(dots.get_xdata()) == sorted(values)
  assert [t.get_text() for t in axis.get_yticklabels()] == ["handi", "broken"]
  figure.canvas.draw()
  assert axis.xaxis.get_offset_text().get_text() == ""  # tick labels without a "+4.62e-1" offset
  report._pyplot().close(figure)


def test_hs_err_plot_of_many_clips_is_a_histogram_over_the_same_range():
  values = list(np.linspace(0.1, 0.2, report.HS_ERR_DOTS_MAX_CLIPS + 1))
  figure = report.hs_err_figure(_hs_err_rows(values))
  axis = figure.axes[0]
  assert sum(patch.get_height() for patch in axis.patches) == len(values) and not axis.lines
  assert axis.get_xlim() == pytest.approx((0.1 - 0.01, 0.2 + 0.01))
  report._pyplot().close(figure)


def test_metric_bars_show_the_value_of_every_bar_and_a_legend():
  values = dict(clips=1, skipped=0, hs_err=0.0, clip_gt=0.9512, fid="not configured")
  summary = {"handi": {"all": {"full": values, "ma": dict(values, clip_gt=float("nan"))}}}
  figure = report.metric_bars_figure(summary)
  hs_err_axis, clip_gt_axis = figure.axes
  assert hs_err_axis.get_title() == "HS-Err ↓" and clip_gt_axis.get_title() == "CLIP_GT ↑"
  assert [t.get_text() for t in hs_err_axis.texts] == ["0", "0"]  # a bar of 0: no height, its value says it
  assert [t.get_text() for t in clip_gt_axis.texts] == ["0.951", "n/a"]
  (legend,) = figure.legends
  assert [t.get_text() for t in legend.get_texts()] == ["Full", "MA"]
  report._pyplot().close(figure)


@pytest.mark.slow
def test_evaluation_generates_with_the_configured_models_when_no_run_is_given(shared_data, tmp_path):
  """No runs: the tiny random models of the demo config generate every clip, then the metrics follow."""
  frames = shared_data / "ek_frames"
  (tmp_path / "prompt.json").write_text(json.dumps(dict(source="source/1.png", target="target/1.gif",
                                                        prompt="julienne the carrot")) + "\n")
  image = np.asarray(media_files.load_image(frames / "1.png"))
  gt = np.stack([np.roll(image, 4 * i, axis=1) for i in range(6)])  # distinct frames: GIF merges repeats
  media_files.write_gif(tmp_path / "1.gif", gt, 8)
  config = common.get_config(2)
  config.data.num_frames = 4
  config.sampling.update(height=32, width=56, num_inference_steps=2)
  config.evaluate.update(prompts_file=str(tmp_path / "prompt.json"), image_dir=str(frames), gt_dir=str(tmp_path),
                         mask_dir=str(frames))
  summary = evaluate.evaluate(config, str(tmp_path))
  assert (tmp_path / "evaluate" / "generated" / "1" / "video.mp4").is_file()
  assert summary["generated"]["all"]["full"]["clips"] == 1
  assert summary["generated"]["all"]["full"]["clip_gt"] == "not configured"


def _mean_colour(frames):
  """Stand-in features (mean RGB and its square per frame): exercises the FID / FVD plumbing cheaply."""
  x = np.asarray(frames, np.float64).reshape(len(frames), -1, 3)
  return np.concatenate([x.mean(axis=1), (x ** 2).mean(axis=1) / 255], axis=1)


class _StandIn:
  features = staticmethod(_mean_colour)

  @staticmethod
  def protocol():
    return dict(network="mean colour", weights="stand-in.safetensors", weights_sha256="5e" * 32)


def _scope_result(gen, gt):
  return scoring.ScopeResult(dict(frames=len(gen), hs_err=0.0), None, None,
                              dict(inception=_mean_colour(gen), i3d=_mean_colour(gen.reshape(1, -1, 1, 3))),
                              dict(inception=_mean_colour(gt), i3d=_mean_colour(gt.reshape(1, -1, 1, 3))))


def test_fid_and_fvd_use_the_configured_extractors():
  rng = np.random.default_rng(0)
  clips = {name: rng.integers(0, 256, (4, 8, 8, 3), np.uint8) for name in "abc"}
  results = {name: {"full": _scope_result(gt, gt), "ma": None} for name, gt in clips.items()}
  configured = extractors.Extractors(inception=_StandIn(), i3d=_StandIn())
  summary = scoring.aggregate(results, list("abc"), configured)
  assert summary["full"]["fid"] == pytest.approx(0.0, abs=1e-9)
  assert summary["full"]["fvd"] == pytest.approx(0.0, abs=1e-9)
  assert summary["full"]["clip_gt"] == "not configured" and summary["ma"]["clips"] == 0
  assert np.isnan(summary["ma"]["fid"])
  results["a"]["full"] = _scope_result(clips["a"] // 2, clips["a"])
  assert scoring.aggregate(results, list("abc"), configured)["full"]["fid"] > 1


def test_fid_and_fvd_state_what_they_come_from_and_whether_published_values_compare(monkeypatch):
  """3 clips of 4 frames: FID from 12 frames, FVD from 3 clips of 4 frames, both far below the minimums (marked
  in report.md and the console); at the minimums exactly, not marked."""
  rng = np.random.default_rng(1)
  results = {name: {"full": _scope_result(*rng.integers(0, 256, (2, 4, 8, 8, 3), np.uint8)), "ma": None}
             for name in "abc"}
  configured = extractors.Extractors(inception=_StandIn(), i3d=_StandIn())
  full = scoring.aggregate(results, list("abc"), configured)["full"]
  assert (full["fid_frames"], full["fid_comparable"]) == (12, False)
  assert (full["fvd_clips"], full["fvd_frames_per_clip"], full["fvd_comparable"]) == (3, [4], False)
  protocol = scoring.frechet_protocol(configured)
  assert protocol["fid"]["minimum_frames"] == metrics.FID_MINIMUM_FRAMES == 10_000
  assert protocol["fvd"]["minimum_clips"] == metrics.FVD_MINIMUM_CLIPS == 2048
  assert "StyleGAN-V" in protocol["fvd"]["minimum_source"] and "TTUR" in protocol["fid"]["minimum_source"]
  assert protocol["fvd"]["frame_sampling"] == scoring.FVD_FRAME_SAMPLING

  by_subset = {"all": {"full": full, "ma": full}, "motion_intensive": {"full": full, "ma": full}}
  text = report.markdown_report({"handi": by_subset}, {}, protocol)
  cells = report_table(text, "All clips")["Full", "handi"]
  assert cells["FID ↓"].endswith(" †") and cells["FVD ↓"].endswith(" †") and is_number(cells["FID ↓"])
  note = "† From fewer than 10000 frames (FID) / 2048 clips (FVD): not comparable with published values."
  assert text.count(note) == 3  # under both tables and in the protocol section
  protocol_section = text.split("## FID and FVD protocol", 1)[1]
  assert f"- weights sha256: {'5e' * 32}" in protocol_section and "- minimum clips: 2048" in protocol_section
  assert "| All clips | Full | handi | 12 frames † | 3 clips of 4 frames † |" in protocol_section
  printed = report.closing_summary({"handi": by_subset}, pathlib.Path("eval"))
  assert f"FID ↓ {report.format_value(full['fid'])} †" in printed.splitlines()[1]
  assert printed.splitlines()[-1].startswith("† Too few")

  monkeypatch.setattr(metrics, "FID_MINIMUM_FRAMES", 12)
  monkeypatch.setattr(metrics, "FVD_MINIMUM_CLIPS", 3)
  full = scoring.aggregate(results, list("abc"), configured)["full"]
  assert full["fid_comparable"] and full["fvd_comparable"]
  assert report.NOT_COMPARABLE not in report.closing_summary({"handi": {"all": {"full": full}}}, pathlib.Path("e"))


def test_training_scalars_keep_only_numbers():
  summary = {"all": {"full": dict(clips=3, hs_err=0.01, fid="not configured", clip_gt=float("nan"))},
             "motion_intensive": {"ma": dict(clips=1, hs_err=0.02)}}
  assert scoring.training_scalars(summary) == {
      "eval/all/full/clips": 3.0, "eval/all/full/hs_err": 0.01,
      "eval/motion_intensive/ma/clips": 1.0, "eval/motion_intensive/ma/hs_err": 0.02}


@pytest.mark.slow
def test_the_training_evaluator_scores_the_trained_unet_on_a_tfrecord_split(tmp_path):
  """Train stage 2 one step on the demo data with the config's evaluator: it generates two clips of that TFRecord
  split with the UNet in memory and scores them."""
  from handi_jax import train
  from handi_jax.data import demo_clips
  from handi_jax.evaluation import during_training
  from tests.helpers import tiny_train_config

  config = tiny_train_config(stage=2, steps=1)
  config.data.dir = str(demo_clips.write_demo_dataset(tmp_path / "data", config))
  config.sampling.update(height=32, width=32, num_inference_steps=2)
  config.evaluate.update(data_dir=config.data.dir, split=config.data.split, max_clips=2)
  config.train.eval_every = 1
  (evaluator,) = during_training.evaluators_from_config(config, tmp_path / "run")
  results = []
  recording = lambda *args: results.append(evaluator(*args)) or results[-1]
  train.train_and_evaluate(config, str(tmp_path / "run"), [recording])
  ((scalars, images),) = results
  assert scalars["eval/all/full/clips"] == 2.0 and "eval/all/full/hs_err" in scalars
  assert images["eval/contact_generated"].ndim == 4
  assert (tmp_path / "run" / "eval" / "step_1" / "report.md").is_file()


def test_egovlp_and_blip_come_from_their_config_paths(tmp_path):
  config = common.get_config(2)
  config.evaluate.update(egovlp=str(weights_files.write_egovlp_checkpoint(tmp_path / "egovlp.safetensors")),
                         egovlp_frames=3)
  found = scoring.extractors_from_config(config)
  assert found.egovlp.num_frames == 3 == found.egovlp.model.config.num_frames  # temporal positions fitted to 3
  assert found.blip is None and found.clip is None
  for field in ("egovlp", "blip"):
    config = common.get_config(2)
    config.evaluate[field] = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"config.evaluate.{field}"):
      scoring.extractors_from_config(config)


@pytest.mark.slow
def test_every_extractor_configured_fills_the_papers_eight_columns(shared_data, clip_pair, tmp_path):
  """All five extractors from their config paths on random weights (tiny CLIP, EgoVLP and BLIP; the FID Inception
  and the I3D have fixed sizes): two clips of 10 frames (L = 9, the I3D's fewest), the ground truth itself and a
  copy shifted sideways. Every paper column of report.md holds a number; the ground truth scores HS-Err 0, FID 0,
  CLIP_GT 1, FVD 0 and EgoVLP 1; 18 frames and 2 clips are far below the FID / FVD minimums, so both are marked
  and the protocol names the weights by their SHA-256."""
  clips = shared_data / "clips"
  names = ("31", "816")
  (tmp_path / "prompt.json").write_text("".join(json.dumps(dict(
      source=f"source/{name}.png", target=f"target/{name}.gif", prompt=CLIPS[name])) + "\n" for name in names))
  for name in names:
    gt = media_files.read_video(clips / f"{name}.gif")
    gt = gt[sample_indices(len(gt), 10)]
    for run, video in (("same", gt), ("shifted", np.roll(gt, 12, axis=2))):
      (tmp_path / run).mkdir(exist_ok=True)
      media_files.write_gif(tmp_path / run / f"{name}.gif", video, 8)
  weights = dict(inception=weights_files.write_inception_weights(tmp_path / "pt_inception.safetensors"),
                 i3d=weights_files.write_i3d_weights(tmp_path / "i3d.safetensors"),
                 egovlp=weights_files.write_egovlp_checkpoint(tmp_path / "egovlp.safetensors"),
                 blip=weights_files.write_blip_directory(tmp_path / "blip"))
  config = common.get_config(2)
  config.evaluate.update(prompts_file=str(tmp_path / "prompt.json"), image_dir=str(clips), gt_dir=str(clips),
                         runs=f"same={tmp_path / 'same'},shifted={tmp_path / 'shifted'}", clip=clip_pair[3],
                         output_dir=str(tmp_path / "out"), batch_size=8, **{k: str(v) for k, v in weights.items()})
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    summary = evaluate.evaluate(config, str(tmp_path))
  report_md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
  print(report_md)
  table = report_table(report_md, "All clips")
  for scope in ("Full", "MA"):
    for run in ("same", "shifted"):
      assert all(is_number(table[scope, run][title]) for title in PAPER_COLUMNS), table[scope, run]
      assert table[scope, run]["FID ↓"].endswith(" †") and table[scope, run]["FVD ↓"].endswith(" †")
  same = summary["same"]["all"]["full"]
  assert same["hs_err"] == pytest.approx(0.0, abs=1e-12) and same["clip_gt"] == pytest.approx(1.0, abs=1e-5)
  assert same["fid"] == pytest.approx(0.0, abs=1e-3) and same["fvd"] == pytest.approx(0.0, abs=1e-3)
  assert same["egovlp"] == pytest.approx(1.0, abs=1e-5)
  shifted = summary["shifted"]["all"]["full"]
  assert shifted["fid"] > 1e-3 and shifted["fvd"] > 1e-3 and shifted["egovlp"] < 1 - 1e-4

  sha256 = {key: hashlib.sha256(weights[key].read_bytes()).hexdigest() for key in ("inception", "i3d")}
  protocol = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))["protocol"]
  assert (protocol["fid"]["weights_sha256"], protocol["fvd"]["weights_sha256"]) == (sha256["inception"], sha256["i3d"])
  assert (protocol["fvd"]["resolution"], protocol["fvd"]["input_range"]) == ("224 x 224", "RGB in [-1, 1]")
  assert f"- weights sha256: {sha256['i3d']}" in report_md and f"- weights sha256: {sha256['inception']}" in report_md
  assert "| All clips | Full | same | 18 frames † | 2 clips of 9 frames † |" in report_md
  assert printed.getvalue().rstrip().splitlines()[-1].startswith("† Too few frames / clips")
  assert {"eval/all/full/fid", "eval/all/full/fvd", "eval/all/full/fid_frames", "eval/all/full/blip"} <= \
      scoring.training_scalars(summary["same"]).keys()


def _assert_same_summary(ours, reference, where="summary"):
  """Equal, numbers to float tolerance (features batched differently over devices)."""
  if isinstance(reference, dict):
    assert ours.keys() == reference.keys(), where
    for key in reference:
      _assert_same_summary(ours[key], reference[key], f"{where}.{key}")
  elif isinstance(reference, float) and not isinstance(ours, str):
    assert ours == pytest.approx(reference, rel=1e-5, abs=1e-6, nan_ok=True), where
  else:
    assert ours == reference, where


def test_summary_on_eight_devices_and_two_processes_equals_one_device_and_one_process(evaluation, clip_pair, tmp_path,
                                                                                       monkeypatch, shared_data):
  """The evaluation fixture's runs (a skipped clip in "broken", an off-size one in "odd") scored with CLIP and
  HS-Err: on one device in one process, then on the 8 devices by two processes (faked one after the other; the
  gather hands each both shares), process 1's MediaPipe first in a pool of two worker processes."""
  config = common.get_config(2)
  config.evaluate.update(prompts_file=str(evaluation.root / "prompt.json"), image_dir=str(shared_data / "clips"),
                         gt_dir=str(shared_data / "clips"), clip=clip_pair[3], batch_size=8,
                         runs=",".join(f"{run}={evaluation.root / run}" for run in RUNS))
  clips = clips_lib.load_clips(config)
  runs = clips_lib.parse_runs(config.evaluate.runs)
  with monkeypatch.context() as one_device:
    one_device.setattr(jax, "local_devices", lambda: jax.devices()[:1])
    single = scoring.evaluate_runs(config, clips, runs, tmp_path / "single")
  ex = scoring.extractors_from_config(config)  # a process loads its models once, for its own devices

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  shares, summaries = {}, {}

  def gather(share):  # what every process receives: the shares of processes 0 and 1
    shares[jax.process_index()] = share
    return [shares[0], shares[1]]

  monkeypatch.setattr(sharding, "gather_from_processes", gather)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  config.evaluate.hand_workers = 2
  pool_detector = scoring.hand_detector

  def pool_only(*args):  # every detection of the share must come from the pool: none left for this process
    detector = pool_detector(*args)
    detector.detector = None
    return detector

  monkeypatch.setattr(scoring, "hand_detector", pool_only)
  shares[1] = scoring.score_share(config, clips, runs, ex)
  monkeypatch.setattr(scoring, "hand_detector", pool_detector)
  assert {run: sorted(share[0]) for run, share in shares[1].items()} == {
      "same": ["36"], "shifted": ["36"], "broken": [], "odd": ["36"]}  # clip i: process i % 2
  config.evaluate.hand_workers = 0
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  summaries[0] = scoring.evaluate_runs(config, clips, runs, tmp_path / "split", ex)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  summaries[1] = scoring.evaluate_runs(config, clips, runs, tmp_path / "split_1", ex)
  assert not (tmp_path / "split_1").exists()  # process 0 alone writes
  _assert_same_summary(summaries[1], single)
  _assert_same_summary(summaries[0], single)
  assert single["odd"]["all"]["full"]["skipped"] == 1 and single["broken"]["all"]["full"]["clips"] == 0
  _assert_same_summary(json.loads((tmp_path / "split" / "summary.json").read_text(encoding="utf-8")),
                       json.loads((tmp_path / "single" / "summary.json").read_text(encoding="utf-8")))
  split_rows = list(csv.DictReader((tmp_path / "split" / "metrics.csv").open(encoding="utf-8")))
  single_rows = list(csv.DictReader((tmp_path / "single" / "metrics.csv").open(encoding="utf-8")))
  assert [(r["run"], r["clip"], r["scope"], r["skipped"], r["hs_err"]) for r in split_rows] == [
      (r["run"], r["clip"], r["scope"], r["skipped"], r["hs_err"]) for r in single_rows]
  for name in ("contact_same.png", "contact_odd.png"):
    assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()


@pytest.mark.slow
def test_two_processes_started_by_hand_write_the_summary_one_process_writes(evaluation, clip_pair, tmp_path,
                                                                            shared_data):
  """`python -m handi_jax.main --mode=evaluate` in two processes (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID; one CPU device each): process 0's summary.json equals one process's, the gather is the real one."""
  import os
  import socket
  import subprocess
  import sys

  from tests.conftest import REPO_ROOT

  fields = dict(prompts_file=evaluation.root / "prompt.json", image_dir=shared_data / "clips",
                gt_dir=shared_data / "clips", clip=clip_pair[3], batch_size=8,
                runs=",".join(f"{run}={evaluation.root / run}" for run in RUNS))
  config = common.get_config(2)
  config.evaluate.update({key: value if isinstance(value, int) else str(value) for key, value in fields.items()})
  scoring.evaluate_runs(config, clips_lib.load_clips(config), clips_lib.parse_runs(config.evaluate.runs),
                        tmp_path / "single")
  with socket.socket() as free:
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "JAX_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
  args = [f"--config.evaluate.{key}={value}" for key, value in fields.items()]
  processes = [subprocess.Popen(
      [sys.executable, "-m", "handi_jax.main", "--mode=evaluate", f"--workdir={tmp_path / f'w{i}'}",
       f"--config.evaluate.output_dir={tmp_path / 'two'}", *args], cwd=REPO_ROOT, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env, JAX_PROCESS_ID=str(i))) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  _assert_same_summary(json.loads((tmp_path / "two" / "summary.json").read_text(encoding="utf-8")),
                       json.loads((tmp_path / "single" / "summary.json").read_text(encoding="utf-8")))
