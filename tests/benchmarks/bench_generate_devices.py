"""Generation throughput of one process on 1 and on 8 devices: the same samples through pipeline.Generator's batches.

On this project's CPU the 8 devices are simulated (XLA's host platform device count) and share its cores, so the
figure shows the batch split over the devices, not a speed-up: the samples per second should be about equal. The
script also checks that both runs wrote the same video files. Stage 2 only (user masks), a one-level UNet at
48 x 88 px (the tests' tiny model), compile timed apart (a first batch of the same shapes).

    .venv/bin/python tests/benchmarks/bench_generate_devices.py [--samples 16] [--frames 16] [--steps 25]
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402

from configs import common  # noqa: E402
from handi_jax import pipeline, prompts  # noqa: E402

FRAMES_DIR = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ek_frames"


def _config(args, output_dir):
  config = common.get_config(stage=2)
  config.data.num_frames = args.frames
  config.sampling.update(num_inference_steps=args.steps, target_area=64 * 64)
  config.model.unet.update(block_out_channels=(16,), norm_num_groups=8, transformer_in_heads=2)
  config.generate.update(output_dir=str(output_dir), batch_size=args.per_device)
  return config


def _samples(count: int) -> list[prompts.Sample]:
  """`count` samples over the five test images (their masks: stage 2 only), each with its own name and index."""
  return [prompts.Sample(i, f"s{i}", FRAMES_DIR / f"{i % 5 + 1}.png", f"action number {i}",
                         FRAMES_DIR / f"{i % 5 + 1}_mask.png") for i in range(count)]


def _throughput(args, devices, root: pathlib.Path) -> float:
  """Samples per second of one run of every sample on `devices` (after a first batch that compiles)."""
  config = _config(args, root)
  generator = pipeline.Generator.from_config(config, root, devices=devices)
  samples = _samples(args.samples)
  batches = generator.batches(samples)
  warm_up = batches[0]
  generator.run_batch(warm_up, [root / "warm_up" / s.name for s in warm_up])
  start = time.perf_counter()
  for batch in batches:
    generator.run_batch(batch, [root / s.name for s in batch])
  return len(samples) / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--samples", type=int, default=16)
  parser.add_argument("--frames", type=int, default=16)
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--per-device", type=int, default=1, help="config.generate.batch_size")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    rates = {}
    for count in (1, 8):
      rates[count] = _throughput(args, jax.local_devices()[:count], pathlib.Path(tmp) / str(count))
      print(f"{count} device(s): {rates[count]:.3f} samples/s ({args.samples} samples, {args.frames} frames, "
            f"{args.steps} steps, {args.per_device} per device)", flush=True)
    same = all((pathlib.Path(tmp) / "1" / f"s{i}" / name).read_bytes()
               == (pathlib.Path(tmp) / "8" / f"s{i}" / name).read_bytes()
               for i in range(args.samples) for name in ("video.mp4", "video.gif", "flow.png"))
    print(f"8 / 1 device(s): {rates[8] / rates[1]:.2f}x; the same files: {same}")


if __name__ == "__main__":
  main()
