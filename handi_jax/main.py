"""handi-jax entry point: `python -m handi_jax.main [--config=configs/stage2.py] --workdir=DIR --mode=MODE`.

Picks a mode and hands over to it; flags, config, console, log file and input errors are handi_jax.command_line's.
"""

import importlib
import os
import sys

from absl import logging

from handi_jax import command_line


def describe(config, workdir):
  """Print the resolved config and the device mesh it would build; build it when the devices exist."""
  import jax

  from handi_jax import sharding

  print(config)
  shape = sharding.mesh_shape(config.mesh, jax.device_count(), config.num_devices_expected)
  print(f"mesh axes {sharding.MESH_AXES} -> shape {tuple(shape.values())}")
  batch_devices = shape.data * shape.fsdp
  print(f"global batch {sharding.global_batch_size(config.train, batch_devices)} clips a step over "
        f"{batch_devices} batch device(s)")
  if shape.num_devices != jax.device_count():
    print(f"this config wants {shape.num_devices} devices ({config.num_devices_expected} expected by the "
          f"variant); {jax.device_count()} {jax.default_backend()} device(s) exist here, so the mesh is not "
          "built. On the target hardware it is; for a dry run on CPU set "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={shape.num_devices}.")
    return
  mesh = sharding.make_mesh(config)
  print(f"mesh built: {dict(mesh.shape)} over {mesh.devices.size} device(s)")


def train(config, workdir):
  """Training with the evaluators config.train.eval_every asks for (handi_jax.evaluation.during_training)."""
  from handi_jax import train as train_job
  from handi_jax.evaluation import during_training

  return train_job.train_and_evaluate(config, workdir, during_training.evaluators_from_config(config, workdir))


# mode -> function or "module:function" (imported on use); each takes (config, workdir).
MODES = {
    "describe": describe,
    "train": train,
    "generate": "handi_jax.generate:generate_from_config",
    "evaluate": "handi_jax.evaluate:evaluate",
    "export": "handi_jax.export:export_from_config",
    "predict_masks": "handi_jax.generate:predict_masks_from_config",
    "demo": "handi_jax.demo:run_demo",
    "compile_report": "handi_jax.compile_report:compile_report",
}


def distributed_arguments(config, environ) -> dict:
  """jax.distributed.initialize's arguments for processes started by hand: config.distributed's fields, else
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; none given leaves JAX to SLURM or the TPU runtime."""
  given = config.distributed
  found = dict(coordinator_address=given.coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS", ""),
               num_processes=given.num_processes if given.num_processes >= 0 else environ.get("JAX_NUM_PROCESSES"),
               process_id=given.process_id if given.process_id >= 0 else environ.get("JAX_PROCESS_ID"))
  try:
    return {key: int(value) if key != "coordinator_address" else value
            for key, value in found.items() if value not in ("", None)}
  except ValueError as e:
    raise ValueError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers ({e})") from e


def _maybe_initialize_distributed(config):
  import jax

  multihost = config.multihost
  if multihost is None:
    multihost = any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"))
    multihost = multihost and int(os.environ.get("SLURM_NTASKS", "2")) > 1
  if multihost:
    try:
      jax.distributed.initialize(**distributed_arguments(config, os.environ))
    except (ValueError, RuntimeError) as e:
      sys.exit(f"error: multi-host start-up (jax.distributed.initialize) failed: {str(e).rstrip('.')}. Start "
               "every host through launch/ (tpu_pod.sh, slurm_h100.sbatch) or with JAX_COORDINATOR_ADDRESS, "
               "JAX_NUM_PROCESSES and JAX_PROCESS_ID set, or run on one host with --config.multihost=False")


def run_mode(config, workdir: str, mode: str) -> None:
  """Set up JAX (multi-host when asked) and TensorFlow, then run MODES[mode]."""
  import jax
  import tensorflow as tf

  # TensorFlow only feeds data: keep it off the accelerators JAX owns.
  tf.config.experimental.set_visible_devices([], "GPU")
  if mode not in ("describe", "compile_report"):  # these only resolve and compile, on one host
    _maybe_initialize_distributed(config)
  logging.info("config:\n%s", config)
  logging.info("JAX backend %s, process %d of %d, %d local / %d global devices", jax.default_backend(),
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  target = MODES[mode]
  if isinstance(target, str):
    module_name, function_name = target.split(":")
    target = getattr(importlib.import_module(module_name), function_name)
  target(config, workdir)


if __name__ == "__main__":
  command_line.run(
      "main", (), "runs/default", "Directory for checkpoints, logs and outputs.", run_mode,
      options=(command_line.Option("mode", "train", "What to run: " + ", ".join(MODES) + ".", choices=tuple(MODES)),),
      # The log file is named after the mode; describe only prints, so it writes none.
      log_name=lambda options: None if options["mode"] == "describe" else options["mode"])
