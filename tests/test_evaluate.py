"""Evaluation: the CLIP extractor against transformers.CLIPModel on random tiny weights, and the whole job
(--mode=evaluate) end to end on the real clips of ../shared/data."""

import contextlib
import csv
import io
import json
import logging
import types

import cv2
import numpy as np
import pytest

from configs import common
from handi_jax import evaluate, tokenizers
from handi_jax.convert import clip as convert_clip
from handi_jax.evaluation import clips as clips_lib
from handi_jax.evaluation import extractors, metrics, report, scoring
from handi_jax.media import files as media_files

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
# videos are all unusable and one with a video of another shape.

CLIPS = {"31": "julienne a carrot", "36": "roll dough", "816": "knit the fabric — tricoter à l'aiguille"}
RUNS = ("same", "shifted", "broken", "odd")


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
  text = (out / "report.md").read_text()
  assert "not configured" in text and "| MA | shifted |" in text
  # FID / FVD / EgoVLP / BLIP have no configured extractor here: they say so, never a number.
  for scope in ("full", "ma"):
    for key in ("fid", "fvd", "egovlp", "blip"):
      assert summary["same"]["all"][scope][key] == "not configured"


def test_ground_truth_against_itself_scores_perfectly_and_a_shift_does_not(evaluation):
  summary = evaluation.summary
  same, shifted = summary["same"]["all"], summary["shifted"]["all"]
  assert same["full"]["hs_err"] == pytest.approx(0.0, abs=1e-12)
  assert same["full"]["clip_gt"] == pytest.approx(1.0, abs=1e-5)
  assert shifted["full"]["hs_err"] > 1e-4 and shifted["full"]["clip_gt"] < same["full"]["clip_gt"]
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
  assert summary["broken"]["all"]["full"]["hs_err"] is None  # no clip scored: NaN written as null
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


def _scope_result(gen, gt):
  return scoring.ScopeResult(dict(hs_err=0.0), None, None,
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


class ConstantScorer:
  """A pluggable EgoVLP / BLIP stand-in, built by config.evaluate.egovlp="tests.test_evaluate:ConstantScorer"."""

  def score(self, generated, reference):
    return 0.5


def test_egovlp_and_blip_plug_in_by_module_and_factory():
  config = common.get_config(2)
  config.evaluate.egovlp = "tests.test_evaluate:ConstantScorer"
  found = scoring.extractors_from_config(config)
  assert found.egovlp.score(None, None) == 0.5 and found.blip is None and found.clip is None
  config.evaluate.blip = "blip_without_a_factory"
  with pytest.raises(ValueError, match="package.module:factory"):
    scoring.extractors_from_config(config)
