"""The devices a compile report compiles for (config.compile_report.target), the chip its bounds use, and the
target's identity in program keys."""

import os

import jax

from handi_jax import chips

_TPU_INSTALL = 'pip install "jax[tpu]==0.7.1"'


def target_devices(target: str) -> list:
  """The devices config.compile_report.target names (see handi_jax.compile_report's docstring)."""
  if target == "devices":
    return jax.devices()
  if target.startswith("cpu:"):
    return _simulated_cpu_devices(target)
  if target.startswith("tpu:"):
    return _tpu_topology_devices(target)
  raise ValueError(f"config.compile_report.target={target!r}; expected 'devices', 'cpu:N' or 'tpu:<topology>' "
                   "(e.g. cpu:8, tpu:v5p:2x4x4)")


def _simulated_cpu_devices(target: str) -> list:
  count = int(target.partition(":")[2])
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise ValueError(f"compile_report target {target!r} needs {count} CPU devices, {len(devices)} exist; set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before starting")
  return devices[:count]


def _tpu_topology_devices(target: str) -> list:
  """The devices of libtpu's compile-only client for the topology after "tpu:"."""
  if "TPU_ACCELERATOR_TYPE" in os.environ:
    raise ValueError("compile_report for a TPU topology: unset TPU_ACCELERATOR_TYPE (with it libtpu aborts the "
                     "process when asked for the cost analysis)")
  from jax.experimental import topologies

  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=target[4:]).devices)
  except Exception as e:  # noqa: BLE001 - libtpu missing or an unknown topology: both answered in one line
    raise ValueError(f"compile_report target {target!r}: no TPU compiler for topology {target[4:]!r} ({e}); "
                     f"it needs libtpu ({_TPU_INSTALL}) and a topology such as v5p:2x4x4") from e


def target_chip(report_config, devices) -> chips.Chip | None:
  """The chip the bounds are computed for: config.compile_report.chip, else the target devices' own."""
  if report_config.chip:
    return chips.chip_named(report_config.chip)
  return chips.chip_of(devices[0])


def target_identity(target: str, devices) -> str:
  """The target as far as it decides a compile: its name, device kind and count, jax's and the compiler's versions."""
  return " ".join((target, devices[0].device_kind, str(len(devices)), jax.__version__,
                   str(getattr(devices[0].client, "platform_version", ""))))
