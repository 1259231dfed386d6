"""Evaluation feature extractors: the JAX ones (jitted, batched) against their PyTorch references, on this CPU.

Per clip of L generated frames the evaluation runs CLIP on every frame (CLIP_GT / CLIP_Cs / CLIP_Tx), the FID
Inception on every frame and the I3D once on the clip (FVD). Both sides hold the same random weights of the
real architectures (CLIP ViT-B/32 as transformers' CLIPConfig defaults, pytorch-fid's Inception, pytorch-i3d's
I3D; tests/reference_torch.py) and get the same preprocessed inputs; PyTorch runs eagerly under no_grad with as
many threads as JAX's CPU backend. Timed: one pass over the clips after one warm-up (compilation) pass. Prints
clips/s per extractor, both sides, and the ratio.

  .venv/bin/python tests/benchmarks/bench_evaluate.py [--clips 2] [--frames 15]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from handi_jax.convert import clip as convert_clip  # noqa: E402
from handi_jax.convert import i3d as convert_i3d  # noqa: E402
from handi_jax.convert import inception as convert_inception  # noqa: E402
from handi_jax.evaluation import extractors  # noqa: E402
from tests import reference_torch  # noqa: E402


def numpy_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def timed(function, count):
  """Clips per second of function(i) over clips 0..count-1, after a warm-up call (JAX compiles there)."""
  function(0)
  start = time.perf_counter()
  for index in range(count):
    function(index)
  return count / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clips", type=int, default=2)
  parser.add_argument("--frames", type=int, default=15, help="L, the generated frames per clip")
  parser.add_argument("--size", type=int, nargs=2, default=(256, 448), help="frame height width")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  clips = rng.integers(0, 256, (args.clips, args.frames, *args.size, 3), np.uint8)
  results = {}

  # CLIP ViT-B/32 image tower + projection on every frame.
  clip_torch = transformers.CLIPModel(transformers.CLIPConfig()).eval()
  clip_jax = extractors.ClipExtractor(
      convert_clip.from_state_dict(convert_clip.config_from_transformers(clip_torch.config.to_dict()),
                                   numpy_state(clip_torch)), tokenizer=None, batch_size=args.frames)
  pixels = [extractors.clip_preprocess(c, 224) for c in clips]  # the same host preprocessing for both sides

  def clip_reference(i):
    with torch.no_grad():
      clip_torch.get_image_features(pixel_values=torch.from_numpy(pixels[i]).permute(0, 3, 1, 2))

  def clip_ours(i):
    extractors.batched(lambda x: extractors._clip_image_embeds(clip_jax.model, x), pixels[i], args.frames)

  results["CLIP (every frame)"] = (timed(clip_ours, args.clips), timed(clip_reference, args.clips))

  # FID Inception on every frame (resize to 299 inside both).
  inception_torch = reference_torch.randomize_batchnorm(reference_torch.FidInceptionV3(resize_input=True), 1)
  inception_jax = extractors.InceptionExtractor(
      convert_inception.from_state_dict(numpy_state(inception_torch), resize_to=None), batch_size=args.frames)

  def inception_reference(i):
    with torch.no_grad():
      inception_torch(torch.from_numpy(clips[i].astype(np.float32) / 255).permute(0, 3, 1, 2))

  results["FID Inception (every frame)"] = (timed(lambda i: inception_jax.features(clips[i]), args.clips),
                                            timed(inception_reference, args.clips))

  # I3D once per clip at 224 x 224.
  i3d_torch = reference_torch.randomize_batchnorm(reference_torch.InceptionI3dReference(), 2)
  i3d_jax = extractors.I3dExtractor(convert_i3d.from_state_dict(numpy_state(i3d_torch)), batch_size=1)

  def i3d_reference(i):
    with torch.no_grad():
      frames = torch.from_numpy(clips[i].astype(np.float32) / 255).permute(0, 3, 1, 2)
      frames = torch.nn.functional.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False)
      i3d_torch((frames * 2 - 1).permute(1, 0, 2, 3)[None]).mean(dim=2)

  results["I3D (once per clip)"] = (timed(lambda i: i3d_jax.features(clips[i][None]), args.clips),
                                    timed(i3d_reference, args.clips))

  print(f"{args.clips} clips of {args.frames} frames, {args.size[0]} x {args.size[1]}, {os.cpu_count()} CPU threads")
  print(f"{'extractor':30s} {'JAX clips/s':>12s} {'PyTorch clips/s':>16s} {'ratio':>7s}")
  for name, (ours, theirs) in results.items():
    print(f"{name:30s} {ours:12.3f} {theirs:16.3f} {ours / theirs:6.2f}x")
  total_ours = 1 / sum(1 / ours for ours, _ in results.values())
  total_theirs = 1 / sum(1 / theirs for _, theirs in results.values())
  print(f"{'all three':30s} {total_ours:12.3f} {total_theirs:16.3f} {total_ours / total_theirs:6.2f}x")


if __name__ == "__main__":
  main()
