"""Forward + backward of the HANDI UNet: jitted JAX against the same model in PyTorch eager, on this CPU.

Both sides hold identical weights (the PyTorch side is the release's forward written in tests/reference_torch.py
around diffusers' UNet3DConditionModel, dropout off on both) and compute mean(eps^2) and its gradient with respect
to every parameter, on the same inputs. JAX runs the step as training compiles it: `jax.jit` of a pure function
of the parameters, compiled with `handi_jax.train.compiler_options` (config.cpu_fast_compile; --compile default
drops it). Threads: torch.set_num_threads(--threads); XLA:CPU runs its intra-op (Eigen) pool with one thread per
core the process may use, so --threads other than that core count is refused (run under `taskset -c 0` for 1).

Timing: --warmup steps per side are run and dropped, then --rounds rounds of --iters steps of each side,
alternating (jax block, torch block, ...) so that both see the same machine load; printed are the median and
min of the wall time per step and the median process CPU time per step (all threads), and the 1-minute load
average at start and end (this process included).

  .venv/bin/python tests/benchmarks/bench_unet.py [--frames 8] [--size 16 16] [--rounds 5] [--iters 2]
"""

import argparse
import os
import statistics
import sys
import time
import types

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


def fast_compile_options() -> dict:
  """The options training compiles its step with on CPU (config.cpu_fast_compile=True, the default)."""
  from handi_jax.train import compiler_options
  return compiler_options(types.SimpleNamespace(cpu_fast_compile=True), jax.devices("cpu")[0])


def load() -> str:
  return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


class Setup:
  """The demo UNet in both frameworks with identical weights, inputs, and one step function per side."""

  def __init__(self, batch: int = 1, frames: int = 8, size: tuple[int, int] = (16, 16), remat: str = "none"):
    self.config = unet_config(full_size=False).to_dict()
    self.reference = HandiReference(torch_unet(self.config)).train()
    for module in self.reference.modules():  # same maths on both sides: no dropout
      if isinstance(module, torch.nn.Dropout):
        module.p = 0.0
    self.model = UNet3DConditionModel(self.config, remat=remat, rngs=nnx.Rngs(0))
    core.load_flat_params(self.model, core.to_flax(self.reference.state_dict_numpy(), convert_unet.UNET_RULES),
                          "UNet")
    rng = np.random.default_rng(0)
    height, width = size
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    self.inputs = (f32(batch, frames, height, width, 4), np.full((batch,), 500, np.int64),
                   f32(batch, 77, self.config["cross_attention_dim"]), f32(batch, 1, height, width, 4))
    self.mask = (rng.random((batch, height, width, 1)) > 0.5).astype(np.float32)
    self.motion = np.full((batch,), 3.0, np.float32)
    sample, timesteps, text, condition = self.inputs
    self.torch_inputs = (to_torch_video(sample), torch.from_numpy(timesteps), torch.from_numpy(text),
                         to_torch_video(condition), torch.from_numpy(self.mask).permute(0, 3, 1, 2)[:, :, None],
                         torch.from_numpy(self.motion))
    self.params = sum(p.numel() for p in self.reference.parameters())
    self.batch, self.frames, self.size = batch, frames, size

  def lowered_jax_step(self):
    """jax.jit(value_and_grad(loss)) of the parameters, lowered (compile it with the options to measure)."""
    graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)

    def loss_fn(params, rest, inputs, mask, motion):  # inputs as arguments, as in training (not constants)
      return jnp.mean(nnx.merge(graphdef, params, rest)(*inputs, mask=mask, motion=motion) ** 2)

    self.jax_args = params, rest, jax.device_put(self.inputs), jax.device_put(self.mask), jax.device_put(self.motion)
    return jax.jit(jax.value_and_grad(loss_fn)).lower(*self.jax_args)

  def jax_step(self, options: dict):
    """Compile; returns (step() -> (loss, grads) ready, compile seconds)."""
    lowered = self.lowered_jax_step()
    start = time.perf_counter()
    compiled = lowered.compile(options)
    compile_s = time.perf_counter() - start
    args = self.jax_args
    return (lambda: jax.block_until_ready(compiled(*args))), compile_s, compiled

  def torch_step(self):
    def step():
      self.reference.zero_grad(set_to_none=True)
      loss = self.reference(*self.torch_inputs).pow(2).mean()
      loss.backward()
      return loss.detach(), None
    return step


def measure(step, iters: int, wall: list, cpu: list) -> None:
  for _ in range(iters):
    start, start_cpu = time.perf_counter(), time.process_time()
    step()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--frames", type=int, default=8, help="noisy frames (the context frame is added)")
  parser.add_argument("--size", type=int, nargs=2, default=(16, 16), help="latent height width")
  parser.add_argument("--warmup", type=int, default=2, help="steps per side run before timing, not counted")
  parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of jax and torch blocks")
  parser.add_argument("--iters", type=int, default=2, help="steps per side and round")
  parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
  parser.add_argument("--compile", choices=("fast", "default"), default="fast",
                      help="fast: train.compiler_options with cpu_fast_compile (what training runs); default: none")
  parser.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                      help="an XLA debug option added to the compile options, e.g. xla_cpu_use_xnnpack=true")
  parser.add_argument("--remat", default="none", help="config.model.remat of the JAX model")
  parser.add_argument("--sides", nargs="+", choices=("jax", "torch"), default=("jax", "torch"))
  args = parser.parse_args()

  cores = len(os.sched_getaffinity(0))  # XLA:CPU sizes its intra-op pool to these
  threads = args.threads or cores
  if threads != cores:
    parser.error(f"--threads {threads}: XLA:CPU uses {cores} intra-op threads here (the cores this process may "
                 "run on); restrict the cores with taskset instead")
  torch.set_num_threads(threads)
  load_start = load()
  setup = Setup(args.batch, args.frames, tuple(args.size), args.remat)
  options = fast_compile_options() if args.compile == "fast" else {}
  for option in args.xla_option:
    name, value = option.split("=", 1)
    options[name] = {"true": True, "false": False}.get(value.lower(), value)
  steps = {}
  if "jax" in args.sides:
    steps["jax"], compile_s, _ = setup.jax_step(options)
  if "torch" in args.sides:
    steps["torch"] = setup.torch_step()
  losses = {}
  for side, step in steps.items():
    for _ in range(args.warmup):
      losses[side] = float(step()[0])
  wall, cpu = {s: [] for s in steps}, {s: [] for s in steps}
  for _ in range(args.rounds):
    for side, step in steps.items():
      measure(step, args.iters, wall[side], cpu[side])
  load_end = load()

  height, width = args.size
  n = args.rounds * args.iters
  print(f"UNet forward+backward, demo config ({setup.params:,} params), batch {args.batch}, {args.frames} frames "
        f"(+1 context), latent {height}x{width}; {threads} threads per side (torch.set_num_threads, XLA:CPU's pool "
        f"over {cores} cores); {args.warmup} warm-up steps, then {args.rounds} alternating rounds of {args.iters} "
        f"steps: median (min) of {n}")
  print(f"  load average (1, 5, 15 min): start {load_start}, end {load_end}")
  if "jax" in steps:
    print(f"  XLA compile options: {options}")
  print("  loss: " + "  ".join(f"{s} {v:.6f}" for s, v in losses.items()))
  rows = {}
  for side in steps:
    med, low, cpu_med = (1e3 * statistics.median(wall[side]), 1e3 * min(wall[side]),
                         1e3 * statistics.median(cpu[side]))
    rows[side] = med, cpu_med
    what = (f"jax {jax.__version__} (jit, {args.compile} compile {compile_s:.1f} s)" if side == "jax" else
            f"torch {torch.__version__} eager")
    print(f"  {what:45s} {med:8.1f} ms/step wall (min {low:.1f}), {cpu_med:8.1f} ms CPU/step")
  if len(rows) == 2:
    print(f"  ratio torch/jax: wall {rows['torch'][0] / rows['jax'][0]:.2f}x, "
          f"CPU {rows['torch'][1] / rows['jax'][1]:.2f}x")


if __name__ == "__main__":
  main()
