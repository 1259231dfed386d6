"""Evaluation feature extractors and scorers: the JAX ones (jitted, batched) against their PyTorch references.

Per clip of L generated frames the evaluation runs CLIP on every frame (CLIP_GT / CLIP_Cs / CLIP_Tx), the FID
Inception on every frame, the I3D once on the clip (FVD), EgoVLP's video tower on the generated and the ground-truth
clip (EgoVLP score, 4 sampled frames each) and BLIP's captioner on every frame, then EgoVLP's text tower on the
captions and the prompt (BLIP score). Both sides hold the same random weights of the real architectures (CLIP
ViT-B/32 as transformers' CLIPConfig defaults, pytorch-fid's Inception, pytorch-i3d's I3D, EgoVLP's ViT-B/16
video tower and Salesforce/blip-image-captioning-base's captioner with DistilBERT-base; tests/reference_torch.py
and transformers) and get the same inputs; PyTorch runs eagerly under no_grad with as many threads as JAX's CPU
backend (BLIP: transformers' generate, 3 beams, lengths 5..20). Timed: one pass over the clips after one warm-up
(compilation) pass. Prints clips/s per extractor, both sides, and the ratio.

  .venv/bin/python tests/benchmarks/bench_evaluate.py [--clips 2] [--frames 15] [--only egovlp blip]
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from handi_jax.convert import blip as convert_blip  # noqa: E402
from handi_jax.convert import clip as convert_clip  # noqa: E402
from handi_jax.convert import egovlp as convert_egovlp  # noqa: E402
from handi_jax.convert import egovlp_text as convert_egovlp_text  # noqa: E402
from handi_jax.convert import i3d as convert_i3d  # noqa: E402
from handi_jax.convert import inception as convert_inception  # noqa: E402
from handi_jax.evaluation import blip, extractors  # noqa: E402
from handi_jax.evaluation.egovlp import EgoVlpScorer  # noqa: E402
from tests import reference_torch  # noqa: E402

PROMPT = "a person cuts the onion with a knife"


def numpy_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def timed(function, count):
  """Clips per second of function(i) over clips 0..count-1, after a warm-up call (JAX compiles there)."""
  function(0)
  start = time.perf_counter()
  for index in range(count):
    function(index)
  return count / (time.perf_counter() - start)


def bench_clip(clips, frames):
  """CLIP ViT-B/32 image tower + projection on every frame, the same host preprocessing for both sides."""
  clip_torch = transformers.CLIPModel(transformers.CLIPConfig()).eval()
  clip_jax = extractors.ClipExtractor(
      convert_clip.from_state_dict(convert_clip.config_from_transformers(clip_torch.config.to_dict()),
                                   numpy_state(clip_torch)), tokenizer=None, batch_size=frames)
  pixels = [extractors.clip_preprocess(c, 224) for c in clips]

  def ours(i):
    extractors.batched(lambda x: extractors._clip_image_embeds(clip_jax.model, x), pixels[i], frames)

  def theirs(i):
    with torch.no_grad():
      clip_torch.get_image_features(pixel_values=torch.from_numpy(pixels[i]).permute(0, 3, 1, 2))

  return ours, theirs


def bench_inception(clips, frames):
  """The FID Inception on every frame (resize to 299 inside both)."""
  inception_torch = reference_torch.randomize_batchnorm(reference_torch.FidInceptionV3(resize_input=True), 1)
  inception_jax = extractors.InceptionExtractor(
      convert_inception.from_state_dict(numpy_state(inception_torch), resize_to=None), batch_size=frames)

  def theirs(i):
    with torch.no_grad():
      inception_torch(torch.from_numpy(clips[i].astype(np.float32) / 255).permute(0, 3, 1, 2))

  return lambda i: inception_jax.features(clips[i]), theirs


def bench_i3d(clips, frames):
  """The I3D once per clip at 224 x 224."""
  del frames
  i3d_torch = reference_torch.randomize_batchnorm(reference_torch.InceptionI3dReference(), 2)
  i3d_jax = extractors.I3dExtractor(convert_i3d.from_state_dict(numpy_state(i3d_torch)), batch_size=1)

  def theirs(i):
    with torch.no_grad():
      video = torch.from_numpy(clips[i].astype(np.float32) / 255).permute(0, 3, 1, 2)
      video = torch.nn.functional.interpolate(video, size=(224, 224), mode="bilinear", align_corners=False)
      i3d_torch((video * 2 - 1).permute(1, 0, 2, 3)[None]).mean(dim=2)

  return lambda i: i3d_jax.features(clips[i][None]), theirs


def bench_egovlp(clips, frames):
  """EgoVLP's release video tower (ViT-B/16 at 224, divided space-time attention) on 4 frames of the generated and of
  the ground-truth clip (here the mirrored clip); each side with its own preprocessing (JAX: jitted; reference:
  torch)."""
  del frames
  size = dict(image=224, patch=16, dim=768, depth=12, heads=12, hidden=3072, frames=4, projection=256)
  egovlp_torch = reference_torch.EgoVlpVideoReference(**size)
  reference_torch.randomize(egovlp_torch, 0)
  egovlp_torch.eval()
  scorer = EgoVlpScorer(convert_egovlp.from_state_dict(numpy_state(egovlp_torch), num_frames=4), num_frames=4)
  truths = np.flip(clips, axis=3)
  return (lambda i: scorer.score(clips[i], truths[i]),
          lambda i: reference_torch.egovlp_reference_score(egovlp_torch, clips[i], truths[i], 4, 224))


def _synthetic_vocabulary(directory: pathlib.Path, size: int) -> pathlib.Path:
  """A WordPiece vocabulary of BLIP's size, BERT's special tokens and BLIP's [DEC] at their ids (random weights
  caption with any token, so every id needs a word)."""
  words = [f"w{i}" for i in range(size)]
  words[:4] = ["[PAD]", "a", "picture", "of"]
  words[100:104] = ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  words[30522:30524] = ["[DEC]", "[ENC]"]
  path = directory / "vocab.txt"
  path.write_text("\n".join(words) + "\n")
  return path


def bench_blip(clips, frames):
  """Salesforce/blip-image-captioning-base's captioner (ViT-B/16 at 384, BERT-base decoder) on every frame, then
  EgoVLP's DistilBERT-base text tower on the captions and the prompt; PyTorch: transformers' generate (LEGO's
  settings) and DistilBertModel. Random weights caption up to the longest length."""
  blip_config = transformers.BlipConfig(text_config=dict(num_attention_heads=12))
  captioner_torch = transformers.BlipForConditionalGeneration(blip_config).eval()
  text_config = transformers.DistilBertConfig(vocab_size=blip_config.text_config.vocab_size)
  text_torch = transformers.DistilBertModel(text_config).eval()
  projection = torch.nn.Linear(text_config.dim, 256)
  vocabulary = _synthetic_vocabulary(pathlib.Path(tempfile.mkdtemp()), blip_config.text_config.vocab_size)
  captioner_tokenizer = transformers.BertTokenizerFast(vocab=str(vocabulary), bos_token="[DEC]")
  text_tokenizer = transformers.DistilBertTokenizerFast(vocab=str(vocabulary))
  tower = {f"text_model.{k}": v for k, v in numpy_state(text_torch).items()}
  tower.update({f"txt_proj.1.{k}": v for k, v in numpy_state(projection).items()})
  scorer = blip.BlipScorer(
      convert_blip.from_state_dict(convert_blip.config_from_transformers(blip_config.to_dict()),
                                   numpy_state(captioner_torch)), captioner_tokenizer,
      convert_egovlp_text.from_state_dict(convert_egovlp_text.config_from_transformers(text_config.to_dict()), tower),
      text_tokenizer, batch_size=frames)
  decoding = blip.LEGO_DECODING
  prompt_ids = torch.tensor([captioner_tokenizer(decoding.prompt)["input_ids"]])

  def theirs(i):
    with torch.no_grad():
      pixels = torch.from_numpy(blip.preprocess(clips[i], blip_config.vision_config.image_size)).permute(0, 3, 1, 2)
      out = captioner_torch.generate(pixels, prompt_ids.repeat(len(pixels), 1), num_beams=decoding.num_beams,
                                     max_length=decoding.max_length, min_length=decoding.min_length)
      captions = [c[len(decoding.prompt):] for c in captioner_tokenizer.batch_decode(out, skip_special_tokens=True)]
      texts = text_tokenizer([PROMPT] + captions, padding=True, return_tensors="pt")
      embeddings = projection(torch.relu(text_torch(**texts).last_hidden_state[:, 0]))
      embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
      return float((embeddings[1:] @ embeddings[0]).mean())

  return lambda i: scorer.score(clips[i], PROMPT), theirs


BENCHES = {"clip": ("CLIP (every frame)", bench_clip), "inception": ("FID Inception (every frame)", bench_inception),
           "i3d": ("I3D (once per clip)", bench_i3d), "egovlp": ("EgoVLP (2 clips x 4 frames)", bench_egovlp),
           "blip": ("BLIP (caption every frame)", bench_blip)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clips", type=int, default=2)
  parser.add_argument("--frames", type=int, default=15, help="L, the generated frames per clip")
  parser.add_argument("--size", type=int, nargs=2, default=(256, 448), help="frame height width")
  parser.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES), help="what to time")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  clips = np.random.default_rng(0).integers(0, 256, (args.clips, args.frames, *args.size, 3), np.uint8)
  results = {}
  for key in args.only:
    name, bench = BENCHES[key]
    ours, theirs = bench(clips, args.frames)
    results[name] = (timed(ours, args.clips), timed(theirs, args.clips))
    print(f"{name}: JAX {results[name][0]:.3f} clips/s, PyTorch {results[name][1]:.3f} clips/s", flush=True)

  print(f"{args.clips} clips of {args.frames} frames, {args.size[0]} x {args.size[1]}, {os.cpu_count()} CPU threads")
  print(f"{'extractor':30s} {'JAX clips/s':>12s} {'PyTorch clips/s':>16s} {'ratio':>7s}")
  for name, (ours, theirs) in results.items():
    print(f"{name:30s} {ours:12.3f} {theirs:16.3f} {ours / theirs:6.2f}x")
  total_ours = 1 / sum(1 / ours for ours, _ in results.values())
  total_theirs = 1 / sum(1 / theirs for _, theirs in results.values())
  print(f"{'all of them':30s} {total_ours:12.3f} {total_theirs:16.3f} {total_ours / total_theirs:6.2f}x")


if __name__ == "__main__":
  main()
