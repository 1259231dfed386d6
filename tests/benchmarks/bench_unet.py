"""Forward + backward of the HANDI UNet: jitted JAX against the same model in PyTorch, on this CPU.

Both sides hold identical weights (the PyTorch side is the release's forward written in tests/test_unet.py around
diffusers' UNet3DConditionModel) and compute mean(eps^2) and its gradient with respect to every parameter, on
the same inputs, with as many threads as JAX's CPU backend uses. Prints both timings and the ratio.

  .venv/bin/python tests/benchmarks/bench_unet.py [--frames 8] [--size 16 16] [--iters 5]
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from configs.common import unet_config  # noqa: E402
from handi_jax.convert import core  # noqa: E402
from handi_jax.convert import unet as convert_unet  # noqa: E402
from handi_jax.models.unet3d import UNet3DConditionModel  # noqa: E402
from tests.reference_torch import HandiReference, to_torch_video, torch_unet  # noqa: E402


def timed(step, iters):
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--size", type=int, nargs=2, default=(16, 16), help="latent height width")
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()

  threads = os.cpu_count()  # XLA's CPU backend runs one Eigen thread per core
  torch.set_num_threads(threads)
  config = unet_config(full_size=False).to_dict()  # the demo model
  reference = HandiReference(torch_unet(config)).train()
  for module in reference.modules():  # same maths on both sides: no dropout
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
  model = UNet3DConditionModel(config, rngs=nnx.Rngs(0))
  core.load_flat_params(model, core.to_flax(reference.state_dict_numpy(), convert_unet.UNET_RULES), "UNet")

  rng = np.random.default_rng(0)
  height, width = args.size
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  sample, condition = f32(args.batch, args.frames, height, width, 4), f32(args.batch, 1, height, width, 4)
  text = f32(args.batch, 77, config["cross_attention_dim"])
  mask = (rng.random((args.batch, height, width, 1)) > 0.5).astype(np.float32)
  timesteps, motion = np.full((args.batch,), 500, np.int64), np.full((args.batch,), 3.0, np.float32)

  def loss_fn(m):
    return jnp.mean(m(sample, timesteps, text, condition, mask=mask, motion=motion) ** 2)

  step = nnx.jit(nnx.value_and_grad(loss_fn))
  start = time.perf_counter()
  jax.block_until_ready(step(model))
  compile_s = time.perf_counter() - start
  jax_s = timed(lambda: jax.block_until_ready(step(model)), args.iters)

  torch_inputs = (to_torch_video(sample), torch.from_numpy(timesteps), torch.from_numpy(text),
                  to_torch_video(condition), torch.from_numpy(mask).permute(0, 3, 1, 2)[:, :, None],
                  torch.from_numpy(motion))

  def torch_step():
    reference.zero_grad(set_to_none=True)
    loss = reference(*torch_inputs).pow(2).mean()
    loss.backward()
    return loss

  torch_loss = torch_step()
  torch_s = timed(torch_step, args.iters)
  jax_loss = float(step(model)[0])

  params = sum(p.numel() for p in reference.parameters())
  print(f"UNet forward+backward, demo config ({params:,} params), batch {args.batch}, {args.frames} frames "
        f"(+1 context), latent {height}x{width}, {threads} CPU threads, median of {args.iters}")
  print(f"  loss: jax {jax_loss:.6f}  torch {float(torch_loss.detach()):.6f}")
  print(f"  jax (jit, compile {compile_s:.1f} s): {1e3 * jax_s:.1f} ms/step")
  print(f"  torch {torch.__version__}:            {1e3 * torch_s:.1f} ms/step")
  print(f"  ratio torch/jax: {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
  main()
