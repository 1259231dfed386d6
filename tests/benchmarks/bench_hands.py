"""Hand landmarks and the Hand Refinement Loss: throughput and step cost, one run.

1. Landmarks per second on the same 224 x 224 crops: the batched, jitted JAX network against MediaPipe's
   TFLite path (tf.lite.Interpreter with its default XNNPACK delegate, one crop per invoke, as MediaPipe's
   InferenceCalculator runs it), both on this CPU with as many threads as cores.
2. A tiny-config stage-2 training step (demo UNet and VAE from configs/common.py, value and gradient with
   respect to every UNet parameter) with and without L_HR: median wall time after compilation, and XLA's
   peak temporary memory of the compiled step (compiled.memory_analysis()).

    .venv/bin/python tests/benchmarks/bench_hands.py [--crops 32] [--frames 4] [--size 64]
"""

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import common  # noqa: E402
from handi_jax import losses  # noqa: E402
from handi_jax.diffusion import schedules  # noqa: E402
from handi_jax.hand_landmarks import network as hl  # noqa: E402
from handi_jax.models import unet3d  # noqa: E402
from handi_jax.models import vae as vae_lib  # noqa: E402
from tests.helpers import synthetic_hand  # noqa: E402


def _median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def bench_landmarks(num_crops: int, repeats: int):
  import tensorflow as tf

  crops = np.random.default_rng(0).uniform(0, 1, (num_crops, 224, 224, 3)).astype(np.float32)
  params = hl.load_hand_landmark_params()
  fn = jax.jit(hl.hand_landmarks)
  start = time.perf_counter()
  jax.block_until_ready(fn(params, crops))
  compile_s = time.perf_counter() - start
  jax_s = _median_seconds(lambda: fn(params, crops), repeats)

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    interpreter = tf.lite.Interpreter(model_path=str(hl.default_model_path()), num_threads=os.cpu_count())
  interpreter.allocate_tensors()
  (detail,) = interpreter.get_input_details()

  def tflite_all():
    for crop in crops:
      interpreter.set_tensor(detail["index"], crop[None])
      interpreter.invoke()

  tflite_all()
  tflite_s = _median_seconds(tflite_all, repeats)
  print(f"landmarks, {num_crops} crops: JAX jit batched {num_crops / jax_s:.1f} crops/s ({1e3 * jax_s / num_crops:.1f} "
        f"ms/crop; first call {compile_s:.1f} s) | TFLite XNNPACK {num_crops / tflite_s:.1f} crops/s "
        f"({1e3 * tflite_s / num_crops:.1f} ms/crop) | JAX / TFLite throughput {tflite_s / jax_s:.2f}x")


def bench_stage2_step(frames: int, size: int, repeats: int):
  config = common.get_config(2)
  unet = unet3d.UNet3DConditionModel(config.model.unet, rngs=nnx.Rngs(0))
  vae = vae_lib.AutoencoderKL(config.model.vae, rngs=nnx.Rngs(1))
  landmark_params = hl.load_hand_landmark_params()
  schedule = schedules.make_schedule(config.diffusion)
  graphdef, params, rest = nnx.split(unet, nnx.Param, ...)
  vae_graphdef, vae_state = nnx.split(vae)
  rng = np.random.default_rng(0)
  hands = np.stack([synthetic_hand(0.3, 0.8, 0.4), synthetic_hand(0.7, 0.8, 0.4)])
  batch = dict(frames=jnp.asarray(rng.uniform(-1, 1, (1, frames, size, size, 3)), jnp.float32),
               keypoints=jnp.asarray(np.broadcast_to(hands, (1, frames, 2, 21, 2))),
               presence=jnp.ones((1, frames, 2, 21)))
  text = jnp.zeros((1, 77, config.model.unet.cross_attention_dim))

  def make_step(loss_config):
    def step(params, vae_state, landmark_params, batch):
      vae = nnx.merge(vae_graphdef, vae_state)
      latents = jax.lax.stop_gradient(vae_lib.encode_video(vae, batch["frames"]))
      noise = jax.random.normal(jax.random.key(0), latents.shape)
      t = jnp.asarray([700])
      noisy = schedules.q_sample(schedule, latents, t, noise)
      mask = jnp.ones((1, *latents.shape[2:4], 1))
      decode = lambda z: vae_lib.decode_video(vae, z)

      def loss_fn(params):
        eps = nnx.merge(graphdef, params, rest)(noisy, t, text, latents[:, :1], mask=mask)
        x0 = schedules.predict_x0_from_eps(schedule, noisy, t, eps)
        return losses.stage2_loss(eps, noise, x0, batch, decode, landmark_params, loss_config,
                                  config.model.frame_chunk, jax.random.key(1))

      return jax.value_and_grad(loss_fn, has_aux=True)(params)
    return step

  results = {}
  for name, eta in (("without L_HR (eta 0)", 0.0), ("with L_HR (eta 0.1)", 0.1)):
    loss_config = config.loss.copy_and_resolve_references()
    loss_config.eta_hand = eta
    start = time.perf_counter()
    compiled = jax.jit(make_step(loss_config)).lower(params, vae_state, landmark_params, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    step_s = _median_seconds(lambda c=compiled: c(params, vae_state, landmark_params, batch), repeats)
    results[name] = step_s
    print(f"stage-2 step {name}: {1e3 * step_s:.0f} ms/step (compile {compile_s:.0f} s), peak temp memory "
          f"{memory.temp_size_in_bytes / 2**20:.1f} MiB, arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB")
  without, with_hr = results.values()
  print(f"stage-2 step: with / without L_HR = {with_hr / without:.2f}x time "
        f"(batch 1, {frames} frames at {size} x {size}, {frames - 1} generated frames x 2 hands scored)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--crops", type=int, default=32)
  parser.add_argument("--frames", type=int, default=4, help="frames per clip in the stage-2 step (1 = context)")
  parser.add_argument("--size", type=int, default=64, help="frame height = width in pixels")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"devices: {jax.devices()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
  bench_landmarks(args.crops, args.repeats)
  bench_stage2_step(args.frames, args.size, args.repeats)


if __name__ == "__main__":
  main()
