"""25-step classifier-free-guided DPM-Solver++ 2M sampling of a small HANDI UNet: JAX against PyTorch, one run.

JAX: handi_jax.diffusion.guided_sampling.sample_video_jit, all steps in one compiled lax.scan (compile timed apart).
PyTorch: the same UNet weights in diffusers' UNet3DConditionModel with the release's forward around it
(tests/test_unet.py HandiReference: context frame prepended, [mask, latents] -> conv_in2, motion -> cond_proj)
and diffusers' DPMSolverMultistepScheduler, stepped in a Python loop as the release's pipeline does.
Both start from the same noised context latent; the script prints both times, the ratio and how far the two
final latents are apart.

    .venv/bin/python tests/benchmarks/bench_sampling.py [--frames 16] [--size 32] [--steps 25]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DPMSolverMultistepScheduler  # noqa: E402
from flax import nnx  # noqa: E402

from configs import common  # noqa: E402
from handi_jax.diffusion import guided_sampling as video_sampling  # noqa: E402
from handi_jax.diffusion import samplers, schedules  # noqa: E402
from tests.helpers import jax_unet  # noqa: E402
from tests.reference_torch import HandiReference, torch_unet  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=16)
  parser.add_argument("--size", type=int, default=32, help="latent height = width (32 = 256 px, training size)")
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--guidance", type=float, default=9.0)
  args = parser.parse_args()

  config = common.get_config(stage=2)
  # diffusers' UNet3DConditionModel hard-codes 8 heads in transformer_in.
  unet_config = dict(config.model.unet.to_dict(), transformer_in_heads=8)
  reference = HandiReference(torch_unet(unet_config)).eval()
  ours = jax_unet(unet_config, reference.state_dict_numpy())
  graphdef, state = nnx.split(ours)

  rng = np.random.default_rng(0)
  size, frames, dim = args.size, args.frames, unet_config["cross_attention_dim"]
  context = rng.standard_normal((1, 1, size, size, 4)).astype(np.float32)
  text = rng.standard_normal((1, 77, dim)).astype(np.float32)
  uncond = rng.standard_normal((1, 77, dim)).astype(np.float32)
  mask = np.zeros((1, size, size, 1), np.float32)
  mask[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = 1.0
  motion = np.array([3.0], np.float32)

  settings = samplers.SamplerSettings(num_inference_steps=args.steps)
  plan = samplers.make_plan(settings, schedules.make_schedule(config.diffusion))
  keys = jax.random.split(jax.random.key(0), 1)  # one per sample
  # The start latent sample_video draws from `keys`, recomputed here so the torch loop starts from it too.
  x_init = np.asarray(video_sampling.initial_latents(plan, jnp.asarray(context), frames,
                                                     video_sampling.split_keys(keys)[0], "noised_context"))

  def run_jax():
    return video_sampling.sample_video_jit(graphdef, state, plan, jnp.asarray(context), jnp.asarray(text),
                                           jnp.asarray(uncond), jnp.asarray(mask), jnp.asarray(motion),
                                           jnp.float32(args.guidance), keys, num_frames=frames).block_until_ready()

  start = time.perf_counter()
  run_jax()
  jax_first = time.perf_counter() - start
  start = time.perf_counter()
  ours_final = np.asarray(run_jax())
  jax_time = time.perf_counter() - start

  scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          final_sigmas_type="sigma_min")
  scheduler.set_timesteps(args.steps)
  to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 4, 1, 2, 3))))
  latents = to_torch(x_init)
  texts = torch.from_numpy(np.concatenate([uncond, text]))
  contexts = to_torch(np.concatenate([context, context]))
  torch_mask = torch.from_numpy(mask).permute(0, 3, 1, 2)[:, :, None]
  start = time.perf_counter()
  with torch.no_grad():
    for t in scheduler.timesteps:
      eps = reference(torch.cat([latents, latents]), t.reshape(1), texts, contexts, torch_mask,
                      torch.from_numpy(motion))
      eps_uncond, eps_cond = eps.chunk(2)
      latents = scheduler.step(eps_uncond + args.guidance * (eps_cond - eps_uncond), t, latents).prev_sample
  torch_time = time.perf_counter() - start
  theirs_final = latents.permute(0, 2, 3, 4, 1).numpy()

  error = np.abs(ours_final - theirs_final).max() / np.abs(theirs_final).max()
  print(f"UNet {unet_config['block_out_channels']}, CFG batch 2 x {frames} frames (+1 context) at {size}x{size} "
        f"latents, {args.steps} DPM-Solver++ 2M steps, guidance {args.guidance}; {jax.devices()[0].device_kind}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads")
  print(f"JAX compiled loop: first call (trace + compile + run) {jax_first:.2f} s, then {jax_time:.2f} s")
  print(f"PyTorch loop (diffusers UNet3DConditionModel + DPMSolverMultistepScheduler): {torch_time:.2f} s")
  print(f"ratio PyTorch / JAX (steady state): {torch_time / jax_time:.2f}x")
  print(f"final latents: max |JAX - PyTorch| / max |PyTorch| = {error:.2e}")


if __name__ == "__main__":
  main()
