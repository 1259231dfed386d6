"""Accelerator figures from the vendors' data sheets: peak dense bf16 FLOP/s, HBM, and interconnect bandwidth.

The compile report turns FLOPs and collective bytes into step-time bounds with them, and training divides its
measured FLOP/s by the peak to log MFU. Interconnect = one chip's bandwidth to its neighbours in one direction
(TPU ICI; NVLink for GPUs), the figure a ring all-gather or reduce-scatter is bounded by.
"""

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  device_kinds: tuple[str, ...]    # jax Device.device_kind values that name this chip
  peak_bf16_flops: float           # dense, per chip, FLOP/s
  hbm_bytes: float
  hbm_bytes_per_s: float
  interconnect_bytes_per_s: float


_G = 1e9
CHIPS = {
    "v5p": Chip("TPU v5p", ("TPU v5",), 459e12, 95 * _G, 2765 * _G, 600 * _G),
    "v5e": Chip("TPU v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * _G, 819 * _G, 200 * _G),
    "v6e": Chip("TPU v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * _G, 1640 * _G, 448 * _G),
    "h100": Chip("NVIDIA H100 SXM", ("NVIDIA H100 80GB HBM3", "NVIDIA H100"), 989e12, 80 * _G, 3350 * _G, 450 * _G),
    "h200": Chip("NVIDIA H200 SXM", ("NVIDIA H200",), 989e12, 141 * _G, 4800 * _G, 450 * _G),
}


def chip_named(name: str) -> Chip:
  if name not in CHIPS:
    raise ValueError(f"unknown chip {name!r}; known chips: {', '.join(CHIPS)}")
  return CHIPS[name]


def chip_of(device: jax.Device) -> Chip | None:
  """The table entry for a device (None for CPUs and chips not in the table)."""
  kind = getattr(device, "device_kind", "")
  # Longest matching prefix: "TPU v5 lite" is a v5e although it starts with v5p's "TPU v5".
  matches = [(len(k), chip) for chip in CHIPS.values() for k in chip.device_kinds if kind.startswith(k)]
  return max(matches, key=lambda m: m[0])[1] if matches else None
