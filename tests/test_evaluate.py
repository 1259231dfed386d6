"""Evaluation: the CLIP extractor against transformers.CLIPModel on random tiny weights, and the whole job
(--mode=evaluate) end to end on the real clips of ../shared/data."""

import csv
import json

import numpy as np
import pytest

from configs import common
from handi_jax import evaluate, tokenizers
from handi_jax.convert import clip as convert_clip
from handi_jax.evaluation import extractors, metrics, scoring
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
# End to end on ../shared/data/clips: the ground truth itself (must score perfectly) and a shifted copy.

CLIPS = {"31": "julienne a carrot", "36": "roll dough", "816": "knit the fabric"}


@pytest.fixture(scope="module")
def evaluation(shared_data, clip_pair, tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate")
  clips = shared_data / "clips"
  (root / "prompt.json").write_text("".join(
      json.dumps(dict(source=f"source/{name}.png", target=f"target/{name}.gif", prompt=prompt)) + "\n"
      for name, prompt in CLIPS.items()))
  for name in CLIPS:
    gt = media_files.read_video(clips / f"{name}.gif")
    gt = gt[np.round(np.linspace(0, len(gt) - 1, 6)).astype(int)]  # 6 frames (L = 5) keep MediaPipe's share small
    for run, video in (("same", gt), ("shifted", np.roll(gt, 12, axis=2))):
      (root / run / name).mkdir(parents=True)
      media_files.write_gif(root / run / name / "video.gif", video, 8)
  config = common.get_config(2)
  config.evaluate.update(prompts_file=str(root / "prompt.json"), image_dir=str(clips), gt_dir=str(clips),
                         runs=f"same={root / 'same'},shifted={root / 'shifted'}", clip=clip_pair[3],
                         output_dir=str(root / "out"), batch_size=8)
  summary = evaluate.evaluate(config, str(root))
  return summary, root / "out"


def test_evaluation_writes_every_output(evaluation):
  summary, out = evaluation
  for name in ("metrics.csv", "summary.json", "report.md", "metrics.png", "hs_err.png", "contact_same.png",
               "contact_shifted.png"):
    assert (out / name).is_file(), name
  rows = list(csv.DictReader((out / "metrics.csv").open()))
  assert {(r["run"], r["clip"]) for r in rows} == {(run, c) for run in ("same", "shifted") for c in CLIPS}
  text = (out / "report.md").read_text()
  assert "not configured" in text and "| MA | shifted |" in text
  # FID / FVD / EgoVLP / BLIP have no configured extractor here: they say so, never a number.
  for scope in ("full", "ma"):
    for key in ("fid", "fvd", "egovlp", "blip"):
      assert summary["same"]["all"][scope][key] == "not configured"


def test_ground_truth_against_itself_scores_perfectly_and_a_shift_does_not(evaluation):
  summary, _ = evaluation
  same, shifted = summary["same"]["all"], summary["shifted"]["all"]
  assert same["full"]["hs_err"] == pytest.approx(0.0, abs=1e-12)
  assert same["full"]["clip_gt"] == pytest.approx(1.0, abs=1e-5)
  assert shifted["full"]["hs_err"] > 1e-4 and shifted["full"]["clip_gt"] < same["full"]["clip_gt"]
  assert same["full"]["clips"] == 3 and summary["same"]["motion_intensive"]["full"]["clips"] == 1


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
