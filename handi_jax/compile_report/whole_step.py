"""The whole train step's figures from the parts config.compile_report.parts measured separately (the rules are in
handi_jax.compile_report's docstring)."""

from handi_jax import chips
from handi_jax.compile_report import measure


def _summed_collectives(parts) -> dict:
  collectives = {}
  for part in parts:
    for kind, figures in part["collectives"].items():
      total = collectives.setdefault(kind, dict(count=0, bytes=0.0, link_bytes=0.0))
      for key in total:
        total[key] += figures[key]
  return collectives


def combine_blocks(programs: dict, step_argument_bytes: int, gradient_bytes: int, chip: chips.Chip | None) -> dict:
  """The whole step's figures from the parts of parts='blocks'."""
  parts = [p for name, p in programs.items() if name != "train_step"]
  kept = sum(p.get("kept_activation_bytes", 0) for p in parts)
  largest_temp = max(p["memory"]["temp"] for p in parts)
  whole = dict(
      from_parts=True, flops_per_device=sum(p["flops_per_device"] for p in parts),
      collectives=_summed_collectives(parts), state_bytes=step_argument_bytes,
      memory=dict(peak=step_argument_bytes + gradient_bytes + kept + largest_temp, arguments=step_argument_bytes,
                  gradients=gradient_bytes, kept_activations=kept, temp=largest_temp,
                  rule="peak = step arguments + gradients + block inputs kept by remat + largest part temp"),
      compile_seconds=sum(p["compile_seconds"] for p in parts))
  return measure.with_bounds(whole, chip)


def combine_parts(parts: dict, chip: chips.Chip | None) -> dict:
  """The whole step's figures from the unet_step and pixel_loss parts of parts='pixel_loss'."""
  unet, pixel = parts["unet_step"], parts["pixel_loss"]
  peak_upper = unet["memory"]["peak"] + pixel["memory"]["temp"] + pixel["memory"]["outputs"]
  whole = dict(
      from_parts=True, flops_per_device=unet["flops_per_device"] + pixel["flops_per_device"],
      collectives=_summed_collectives((unet, pixel)), state_bytes=unet["state_bytes"],
      memory=dict(peak=peak_upper, peak_lower=max(unet["memory"]["peak"], pixel["memory"]["peak"]),
                  temp=unet["memory"]["temp"] + pixel["memory"]["temp"], arguments=unet["memory"]["arguments"],
                  rule="peak = unet_step peak + pixel_loss temp + outputs (upper bound); peak_lower = max of peaks"),
      compile_seconds=unet["compile_seconds"] + pixel["compile_seconds"])
  return measure.with_bounds(whole, chip)
