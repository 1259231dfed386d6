"""UNet3DConditionModel <-> PyTorch checkpoints: diffusers' stock keys and the original HANDI/AnimateAnything keys.

The NNX attribute paths are the torch module names, so the shared rules of core.DEFAULT_RULES are the whole
table (no exceptions: torch's nn.Sequential indices are nnx.List indices here). The formats differ only in which
keys exist:
  diffusers  stock diffusers `UNet3DConditionModel` keys; `time_embedding.cond_proj` is included through the
             config field `time_cond_proj_dim` (diffusers >= 0.25 builds it), `conv_in2` and `motion_embedding`
             are not diffusers parameters and are left out of an export (logged).
  original   the release's keys (reference_spec.md 1.5): stock + conv_in2, cond_proj, motion_embedding.

The two PyTorch classes build some norms differently (config field temporal_norm_num_groups): diffusers gives
transformer_in and the TemporalConvLayers norm_num_groups GroupNorm groups, the release's class always 32. Import
takes the groups of the class that wrote the checkpoint (the release's when it has conv_in2 / motion_embedding);
export refuses a model that the target class would build differently. The release's class also hard-codes a
5-channel conv_in2 (4 latents + 1 mask); import refuses another width unless the config's mask_channels asks for it.
"""

import logging
import os
from collections.abc import Mapping

import numpy as np
from flax import nnx

from handi_jax import fileio
from handi_jax.convert import core
from handi_jax.models.unet3d import CONFIG_FIELDS, UNet3DConditionModel, unet_config_dict

UNET_RULES = core.DEFAULT_RULES
KEY_FORMATS = ("diffusers", "original")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Parameters of the HANDI/AnimateAnything extension, absent from stock diffusers checkpoints.
MASK_KEYS = ("conv_in2.weight", "conv_in2.bias")
COND_PROJ_KEYS = ("time_embedding.cond_proj.weight",)
MOTION_EMBEDDING_KEYS = ("motion_embedding.0.weight", "motion_embedding.0.bias", "motion_embedding.2.weight",
                         "motion_embedding.2.bias")
HANDI_KEYS = MASK_KEYS + COND_PROJ_KEYS + MOTION_EMBEDDING_KEYS
# Architecture constants of both diffusers' UNet3DConditionModel and the release (not config fields there).
TRANSFORMER_IN_HEADS = 8
# The release's class: GroupNorm groups of transformer_in and the TemporalConvLayers; conv_in2's input channels.
RELEASE_TEMPORAL_NORM_GROUPS = 32
RELEASE_CONV_IN2_CHANNELS = 5
_FIXED_FIELDS = {"act_fn": "silu", "downsample_padding": 1, "mid_block_scale_factor": 1, "num_attention_heads": None}

log = logging.getLogger(__name__)


def block_types(num_blocks: int) -> tuple[list[str], list[str]]:
  down = ["CrossAttnDownBlock3D"] * (num_blocks - 1) + ["DownBlock3D"]
  up = ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * (num_blocks - 1)
  return down, up


def to_pretrained_config(config, key_format: str) -> dict:
  """config.model.unet -> the config.json of a diffusers (or original-release) UNet directory."""
  cfg = unet_config_dict(config)
  _check_key_format(key_format)
  if cfg["transformer_in_heads"] != TRANSFORMER_IN_HEADS:
    raise ValueError(f"transformer_in_heads={cfg['transformer_in_heads']}: the PyTorch UNet3DConditionModel "
                     f"hard-codes {TRANSFORMER_IN_HEADS} heads in transformer_in, so this model cannot be exported; "
                     f"set config.model.unet.transformer_in_heads={TRANSFORMER_IN_HEADS}")
  temporal, groups = cfg["temporal_norm_num_groups"], cfg["norm_num_groups"]
  if key_format == "original" and temporal != RELEASE_TEMPORAL_NORM_GROUPS:
    raise ValueError(f"temporal_norm_num_groups={temporal}: the release's UNet3DConditionModel gives transformer_in "
                     f"and the temporal convs {RELEASE_TEMPORAL_NORM_GROUPS} GroupNorm groups and would compute "
                     "something else; export key_format='diffusers' (--unet_format diffusers) or use a model with "
                     f"temporal_norm_num_groups={RELEASE_TEMPORAL_NORM_GROUPS}")
  if key_format == "diffusers" and temporal != groups:
    raise ValueError(f"temporal_norm_num_groups={temporal}: diffusers' UNet3DConditionModel gives transformer_in "
                     f"and the temporal convs norm_num_groups={groups} GroupNorm groups and would compute something "
                     "else; export key_format='original' (--unet_format original) or use a model with "
                     "temporal_norm_num_groups=norm_num_groups")
  down, up = block_types(len(cfg["block_out_channels"]))
  out = dict(
      _class_name="UNet3DConditionModel", sample_size=cfg["sample_size"], in_channels=cfg["in_channels"],
      out_channels=cfg["out_channels"], down_block_types=down, up_block_types=up,
      block_out_channels=list(cfg["block_out_channels"]), layers_per_block=cfg["layers_per_block"],
      norm_num_groups=cfg["norm_num_groups"], norm_eps=cfg["norm_eps"],
      cross_attention_dim=cfg["cross_attention_dim"], attention_head_dim=cfg["attention_head_dim"], **_FIXED_FIELDS)
  if key_format == "diffusers":
    out["_diffusers_version"] = "0.42.1"
    out["time_cond_proj_dim"] = cfg["block_out_channels"][0] if cfg["motion_strength"] else None
  else:
    out["_diffusers_version"] = "0.24.0"
    del out["num_attention_heads"]  # not an argument of the release's class
    out["motion_mask"] = bool(cfg["mask_channels"])
    out["motion_strength"] = bool(cfg["motion_strength"])
  return out


def from_pretrained_config(pretrained: Mapping, state_shapes: Mapping[str, tuple], handi_extension: bool,
                           mask_channels: int = 1) -> dict:
  """A UNet config.json (+ the checkpoint's key -> shape) -> config.model.unet fields.

  The HANDI parameters are always built when `handi_extension` (the release builds them whatever its
  motion_mask / motion_strength flags say; those only gate their use, which the call's mask / motion decide here).
  conv_in2 must take `mask_channels` (the release: 1) + out_channels inputs.
  """
  name = pretrained.get("_class_name", "UNet3DConditionModel")
  if name != "UNet3DConditionModel":
    raise ValueError(f"config.json describes a {name}; expected a UNet3DConditionModel directory (the unet/ "
                     "folder of a text-to-video pipeline)")
  for field, value in _FIXED_FIELDS.items():
    if pretrained.get(field, value) != value:
      raise ValueError(f"config.json has {field}={pretrained[field]!r}; this UNet supports only {value!r}")
  channels = tuple(pretrained.get("block_out_channels", (320, 640, 1280, 1280)))
  down, up = block_types(len(channels))
  for field, expected in (("down_block_types", down), ("up_block_types", up)):
    if list(pretrained.get(field, expected)) != expected:
      raise ValueError(f"config.json has {field}={pretrained[field]}; this UNet supports only {expected}")
  head_dim = pretrained.get("attention_head_dim", 64)
  if not isinstance(head_dim, int):
    raise ValueError(f"config.json has attention_head_dim={head_dim!r}; this UNet supports one int for all blocks")
  cond_dim = pretrained.get("time_cond_proj_dim")
  if cond_dim not in (None, channels[0]):
    raise ValueError(f"config.json has time_cond_proj_dim={cond_dim}; the motion condition is a {channels[0]}-d "
                     "sinusoid (block_out_channels[0]), so only that or null is supported")
  out_channels = pretrained.get("out_channels", 4)
  found = state_shapes[MASK_KEYS[0]][1] if MASK_KEYS[0] in state_shapes else None
  if handi_extension and found is not None and found != mask_channels + out_channels:
    other = found - out_channels
    raise core.CheckpointMismatchError(
        f"conv_in2.weight takes {found} input channels, expected {mask_channels + out_channels} = {out_channels} "
        f"latent + {mask_channels} mask (the release hard-codes {RELEASE_CONV_IN2_CHANNELS} = 4 latent + 1 mask)"
        + (f"; for {other} mask channels set config.model.unet.mask_channels={other}" if other > 0 else ""))
  groups = pretrained.get("norm_num_groups", 32)
  temporal_groups = groups
  if any(k in state_shapes for k in MASK_KEYS + MOTION_EMBEDDING_KEYS):  # written by the release's class
    temporal_groups = RELEASE_TEMPORAL_NORM_GROUPS
    if any(c % temporal_groups for c in channels):
      raise core.CheckpointMismatchError(
          f"a checkpoint in the release's keys (conv_in2, motion_embedding) with block_out_channels {list(channels)}: "
          f"the release's class gives transformer_in and the temporal convs {temporal_groups} GroupNorm groups, "
          "which these channel counts do not allow, so no release model wrote it")
  return dict(
      in_channels=pretrained.get("in_channels", 4), out_channels=out_channels, block_out_channels=channels,
      layers_per_block=pretrained.get("layers_per_block", 2), attention_head_dim=head_dim,
      cross_attention_dim=pretrained.get("cross_attention_dim", 1024),
      norm_num_groups=groups, norm_eps=pretrained.get("norm_eps", 1e-5), temporal_norm_num_groups=temporal_groups,
      transformer_in_heads=TRANSFORMER_IN_HEADS, mask_channels=mask_channels if handi_extension else 0,
      motion_strength=handi_extension,
      sample_size=pretrained.get("sample_size", 32))


def export_state_dict(params: Mapping[str, np.ndarray], config, key_format: str = "diffusers") -> dict:
  """Flat NNX params ({path: array}) -> torch state dict (numpy, torch layouts) in `key_format`.

  Works on any array-likes numpy can transpose, e.g. `np.broadcast_to` placeholders for abstract shapes.
  """
  _check_key_format(key_format)
  cfg = unet_config_dict(config)
  to_pretrained_config(cfg, key_format)  # validates exportability
  state = core.to_torch(params, UNET_RULES)
  if key_format == "original":
    missing = [k for k in HANDI_KEYS if k not in state]
    if missing or state[MASK_KEYS[0]].shape[1] != RELEASE_CONV_IN2_CHANNELS:
      raise ValueError(f"key_format='original' needs the release's extra parameters (conv_in2 on 4 latent + 1 mask "
                       f"channels, cond_proj, motion_embedding); this model lacks "
                       f"{missing or [f'a {RELEASE_CONV_IN2_CHANNELS}-channel conv_in2']}. Build it with "
                       "out_channels=4, mask_channels=1 and motion_strength=True, or export key_format='diffusers'")
    return state
  dropped = [k for k in MASK_KEYS + MOTION_EMBEDDING_KEYS if k in state]
  if dropped:
    log.warning("diffusers format: leaving out %s (not parameters of diffusers' UNet3DConditionModel; "
                "export key_format='original' to keep them)", ", ".join(dropped))
  return {k: v for k, v in state.items() if k not in dropped}


def save_pretrained(model: UNet3DConditionModel, directory: str | os.PathLike, key_format: str = "diffusers") -> None:
  """config.json + diffusion_pytorch_model.safetensors that the PyTorch UNet of `key_format` loads."""
  state = export_state_dict(core.flat_params(model), model.config, key_format)
  with fileio.atomic_directory(directory) as tmp:
    core.write_model_dir(tmp, to_pretrained_config(model.config, key_format), state, WEIGHTS_NAME)


def load_pretrained(directory: str | os.PathLike, *, dtype=np.float32, param_dtype=np.float32, expected_config=None,
                    init_missing_handi_params: bool = False, handi_extension: bool = True, attention: str = "xla",
                    remat: str = "none", rngs: nnx.Rngs | None = None) -> UNet3DConditionModel:
  """A UNet3DConditionModel from a diffusers UNet directory or one saved by the original release.

  Missing, unexpected or mis-shaped keys are an error naming them. A stock diffusers checkpoint lacks the HANDI
  parameters: that is an error too unless `init_missing_handi_params=True`, which starts conv_in2 as conv_in on
  the latent channels with a zero mask column, and cond_proj / motion_embedding at zero (the model then
  behaves like the stock one). `handi_extension=False` builds the stock diffusers model instead. With
  `expected_config` (config.model.unet) the checkpoint's architecture must agree with it; its mask_channels is
  also the only way to accept a conv_in2 wider than the release's (1 mask channel).
  """
  directory = fileio.as_path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"UNet directory {directory} does not exist: expected a diffusers UNet folder with "
                            "config.json and diffusion_pytorch_model.safetensors (or .bin)")
  pretrained = core.read_config(directory)
  expected = None if expected_config is None else unet_config_dict(expected_config)
  fields = [f for f in CONFIG_FIELDS if f != "sample_size"]
  if expected is not None:  # before reading any weights (the release's motion_strength flag only gates its use)
    core.check_config_matches(pretrained, expected, [f for f in fields if f in pretrained and f != "motion_strength"],
                              "the UNet", str(directory))
  state = core.read_state_dict(directory)
  # A config without a mask (0) keeps the release's 1 here; the check below names the difference.
  mask_channels = (expected["mask_channels"] or 1) if expected is not None else 1
  config = from_pretrained_config(pretrained, {k: v.shape for k, v in state.items()}, handi_extension, mask_channels)
  if expected is not None:  # also the fields derived from the weights (mask_channels, temporal_norm_num_groups)
    core.check_config_matches(config, expected, fields, "the UNet", str(directory))
  model = UNet3DConditionModel(config, dtype=dtype, param_dtype=param_dtype, attention=attention, remat=remat,
                               rngs=rngs or nnx.Rngs(params=0, dropout=0))
  params = core.to_flax(state, UNET_RULES)
  model_keys = core.to_torch(core.flat_params(model), UNET_RULES)
  missing = [k for k in HANDI_KEYS if k in model_keys and k not in state]
  if missing:
    if not init_missing_handi_params:
      raise core.CheckpointMismatchError(
          f"UNet from {directory}: the checkpoint lacks the HANDI parameters {', '.join(missing)} (a stock "
          "diffusers UNet). Start them from conv_in / zeros with init_missing_handi_params=True (`python -m "
          "handi_jax.convert import --init_missing_handi_params`), or keep the stock model with "
          "handi_extension=False (--stock_unet).")
    for key in missing:
      flax_key = key.replace(".weight", ".kernel")
      params[flax_key] = _initial_value(key, model_keys[key].shape, params, config["out_channels"])
  core.load_flat_params(model, params, f"UNet from {directory}")
  return model


def _initial_value(torch_key: str, torch_shape: tuple, params: Mapping[str, np.ndarray], latent_channels: int):
  """Start value (flax layout) of a missing HANDI parameter: conv_in2 = [zero mask columns, conv_in on the
  latent channels]; everything else zero, so the model starts out as the stock one."""
  if torch_key == "conv_in2.bias":
    log.warning("init_missing_handi_params: conv_in2.bias starts as conv_in.bias")
    return np.array(params["conv_in.bias"])
  if torch_key == "conv_in2.weight":
    log.warning("init_missing_handi_params: conv_in2.weight starts as conv_in on the latent channels, zero on "
                "the mask channel(s)")
    out, in_channels, kh, kw = torch_shape
    kernel = np.zeros((kh, kw, in_channels, out), params["conv_in.kernel"].dtype)
    kernel[:, :, in_channels - latent_channels:] = params["conv_in.kernel"][:, :, -latent_channels:]
    return kernel
  log.warning("init_missing_handi_params: %s starts at zero", torch_key)
  return np.zeros(torch_shape[::-1], np.float32)


def _check_key_format(key_format: str) -> None:
  if key_format not in KEY_FORMATS:
    raise ValueError(f"key_format={key_format!r}; valid: {', '.join(KEY_FORMATS)}")
