"""EgoVLP checkpoints (showlab/EgoVLP's egovlp.pth, or a safetensors export) -> handi_jax.models.egovlp.

The release saves its trainer state with torch.save: {"arch", "epoch", "state_dict", "optimizer", "monitor_best",
"config"}, the state dict's keys prefixed `module.` (DistributedDataParallel), and "config" a pickled object of
the release's own classes. Those objects are read as inert stand-ins: nothing in the file is executed, and the
release's code need not be importable. Only the video tower is kept (`video_model.*`, `vid_proj.*`): a
video-to-video score never runs the DistilBERT text tower (`text_model.*`, `txt_proj.*`).

The model's frame count is the checkpoint's temporal_embed length unless `num_frames` asks for another; the
release fits it the same way when its config differs (`_inflate_positional_embeds` with 'zeros': extra
positions are zero, surplus ones dropped). num_heads is not in the weights: 12 for the release's ViT-B/16.
"""

import math
import os
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from handi_jax import fileio
from handi_jax.convert import core
from handi_jax.models.egovlp import RELEASE_CONFIG, EgoVLPVideoModel

RULES = (
    core.Rule("video_model.cls_token", "video_model.cls_token"),
    core.Rule("video_model.pos_embed", "video_model.pos_embed"),
    core.Rule("video_model.temporal_embed", "video_model.temporal_embed"),
) + core.DEFAULT_RULES
_TEXT_TOWER = ("text_model.", "txt_proj.")
_PARALLEL_PREFIX = "module."
_TORCH_FORMATS = (".pth", ".pt", ".bin", ".ckpt")


class _Inert:
  """Stands in for any non-tensor class the checkpoint pickles (the release's config, paths, arguments)."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state


def _read_torch_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{path} is a PyTorch checkpoint; reading it needs torch (pip install torch==2.13.0), or "
                      "convert it to safetensors first.") from e
  # weights_only loading stays on, with every class it does not know mapped to the inert stand-in.
  stand_ins = [(_Inert, name) for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))]
  with torch.serialization.safe_globals(stand_ins):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise core.CheckpointMismatchError(f"{path}: neither a state dict nor a training checkpoint holding "
                                       "'state_dict' (EgoVLP's egovlp.pth is the latter)")
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The state dict of an EgoVLP checkpoint file as numpy arrays, keys as saved (prefix included); a remote .pth is
  read from a local temporary copy (torch's loader)."""
  path = fileio.as_path(path)
  if path.suffix == ".safetensors":
    return core.read_safetensors(path)
  if path.suffix not in _TORCH_FORMATS:
    raise ValueError(f"{path}: unknown checkpoint format (expected the release's .pth or a .safetensors export)")
  with fileio.local_copy(path) as local:
    return _read_torch_state_dict(local)


def video_state_dict(state_dict, what: str = "EgoVLP checkpoint") -> dict[str, np.ndarray]:
  """The video tower's entries, without the data-parallel `module.` prefix; the text tower dropped."""
  unprefixed = {k.removeprefix(_PARALLEL_PREFIX): v for k, v in state_dict.items()}
  video = {k: np.asarray(v) for k, v in unprefixed.items() if not k.startswith(_TEXT_TOWER)}
  if not any(k.startswith("video_model.") for k in video):
    shown = ", ".join(sorted(state_dict)[:5]) or "nothing"
    raise core.CheckpointMismatchError(f"{what}: no `video_model.*` weights (found {shown}, ...); expected "
                                       "EgoVLP's FrozenInTime checkpoint, e.g. egovlp.pth")
  return video


def fit_temporal_embed(state_dict, num_frames: int) -> dict[str, np.ndarray]:
  """temporal_embed cut to, or zero-filled up to, `num_frames` positions."""
  temporal = state_dict["video_model.temporal_embed"]
  fitted = np.zeros((temporal.shape[0], num_frames, temporal.shape[2]), temporal.dtype)
  kept = min(num_frames, temporal.shape[1])
  fitted[:, :kept] = temporal[:, :kept]
  return {**state_dict, "video_model.temporal_embed": fitted}


def config_from_state_dict(state_dict, num_heads: int = RELEASE_CONFIG["num_heads"],
                           what: str = "EgoVLP checkpoint") -> dict:
  """The model config the video tower's weights describe (num_heads aside: the weights do not hold it)."""
  needed = ("video_model.cls_token", "video_model.pos_embed", "video_model.temporal_embed",
            "video_model.patch_embed.proj.weight", "video_model.blocks.0.mlp.fc1.weight", "vid_proj.0.weight")
  missing = [key for key in needed if key not in state_dict]
  if missing:
    raise core.CheckpointMismatchError(f"{what}: missing {', '.join(missing)}; not EgoVLP's FrozenInTime video "
                                       "tower (SpaceTimeTransformer + vid_proj)")
  patch_weight = state_dict["video_model.patch_embed.proj.weight"]
  patches_per_side = math.isqrt(state_dict["video_model.pos_embed"].shape[1] - 1)
  depth = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("video_model.blocks."))
  return dict(RELEASE_CONFIG, image_size=patches_per_side * patch_weight.shape[-1],
              patch_size=patch_weight.shape[-1], num_channels=patch_weight.shape[1],
              embed_dim=state_dict["video_model.cls_token"].shape[-1], depth=depth, num_heads=num_heads,
              mlp_hidden_dim=state_dict["video_model.blocks.0.mlp.fc1.weight"].shape[0],
              num_frames=state_dict["video_model.temporal_embed"].shape[1],
              projection_dim=state_dict["vid_proj.0.weight"].shape[0])


def from_state_dict(state_dict, *, num_frames: int | None = None, num_heads: int = RELEASE_CONFIG["num_heads"],
                    what: str = "EgoVLP checkpoint", dtype=jnp.float32) -> EgoVLPVideoModel:
  """The video model holding a FrozenInTime state dict (numpy arrays; `module.` prefix and text tower allowed)."""
  video = video_state_dict(state_dict, what)
  if num_frames is not None and "video_model.temporal_embed" in video:
    video = fit_temporal_embed(video, num_frames)
  config = config_from_state_dict(video, num_heads, what)
  params = core.to_flax(video, RULES)
  return core.build_with_params(lambda: EgoVLPVideoModel(config, dtype=dtype, rngs=nnx.Rngs(0)), params, what)


def load_pretrained(path: str | os.PathLike, *, num_frames: int | None = None,
                    num_heads: int = RELEASE_CONFIG["num_heads"], dtype=jnp.float32) -> EgoVLPVideoModel:
  path = fileio.as_path(path)
  if not path.is_file():
    raise FileNotFoundError(f"EgoVLP checkpoint {path} not found: set config.evaluate.egovlp to showlab/EgoVLP's "
                            "egovlp.pth (EgoVLP_PT_BEST), or leave it empty: EgoVLP reads 'not configured'")
  return from_state_dict(read_checkpoint(path), num_frames=num_frames, num_heads=num_heads,
                         what=f"EgoVLP checkpoint {path}", dtype=dtype)
