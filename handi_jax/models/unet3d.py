"""HANDI's 3D UNet: the ModelScope text-to-video UNet with the AnimateAnything extension, in Flax NNX.

Extension over diffusers' UNet3DConditionModel (reference_spec.md section 1): the clean context latent is
prepended as frame 0 and dropped from the output; a mask is concatenated first on the channel axis and goes
through `conv_in2`; a motion strength is embedded like a timestep and added through `time_embedding.cond_proj`.
`conv_in` and the unused `motion_embedding` are kept so checkpoints round-trip. Attribute paths equal the
PyTorch state-dict names (see handi_jax/convert/unet.py).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from handi_jax.models import attention as attention_lib
from handi_jax.models import layers
from handi_jax.models import unet_blocks as blocks

CONFIG_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "attention_head_dim",
                 "cross_attention_dim", "norm_num_groups", "norm_eps", "temporal_norm_num_groups",
                 "transformer_in_heads", "mask_channels", "motion_strength", "sample_size")
# Fields a config may leave out. temporal_norm_num_groups (GroupNorm groups of transformer_in and the temporal
# convs) None = norm_num_groups, as diffusers' UNet3DConditionModel builds them; the release's class uses 32.
CONFIG_DEFAULTS = {"temporal_norm_num_groups": None}
REMAT_POLICIES = {"none": None, "full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable}


def unet_config_dict(config) -> dict:
  """config.model.unet (ConfigDict or dict) as a plain dict, checked for the fields the model reads, defaults
  resolved (so two configs that build the same model compare equal)."""
  values = {**CONFIG_DEFAULTS, **(config.to_dict() if hasattr(config, "to_dict") else dict(config))}
  missing = [f for f in CONFIG_FIELDS if f not in values]
  if missing:
    raise ValueError(f"UNet config lacks {missing}; expected the fields of configs/common.py unet_config(): "
                     f"{', '.join(CONFIG_FIELDS)}")
  if values["temporal_norm_num_groups"] is None:
    values["temporal_norm_num_groups"] = values["norm_num_groups"]
  return values


class UNet3DConditionModel(nnx.Module):
  """Denoiser eps(z_t, t, text, context latent, mask, motion), channels-last.

  Construct: `UNet3DConditionModel(config.model.unet, dtype=..., param_dtype=..., attention="xla"|"cudnn"|
  "tpu_flash", remat="none"|"full"|"dots_saveable", rngs=nnx.Rngs(0))`. Temporal-conv dropout (0.1) is off
  until `unet.train()`; it draws from the rngs stream "dropout" (or "default").

  Call: `unet(sample, timesteps, encoder_hidden_states, condition_latent, mask=None, motion=None)`
    sample                (B, F, h, w, 4)  noisy latents
    timesteps             scalar, (1,) or (B,)
    encoder_hidden_states (B, 77, cross_attention_dim)  text embedding
    condition_latent      (B, 1, h, w, 4)  clean context latent, run as frame 0 and dropped from the output
    mask                  (B_m, h, w, 1) in [0, 1], B a multiple of B_m (batch b uses mask b % B_m), or None;
                          given: [mask, latents] -> conv_in2; None: latents -> conv_in
    motion                None, scalar, (1,) or (B,) motion strength (needs motion_strength=True)
  returns eps (B, F, h, w, out_channels) in float32. h and w need not be multiples of 8.
  """

  def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "xla",
               remat: str = "none", rngs: nnx.Rngs):
    cfg = unet_config_dict(config)
    if attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"attention={attention!r}; valid: {', '.join(attention_lib.IMPLEMENTATIONS)} "
                       "(config.model.attention)")
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}; valid: {', '.join(REMAT_POLICIES)} (config.model.remat)")
    channels = tuple(cfg["block_out_channels"])
    head_dim = cfg["attention_head_dim"]
    bad = [c for c in channels if c % head_dim]
    if not isinstance(head_dim, int) or bad:
      raise ValueError(f"attention_head_dim={head_dim!r} must be one int dividing every block_out_channels entry "
                       f"{channels} (heads = channels // attention_head_dim)")
    self.config = cfg
    self.remat = remat
    opts = layers.LayerOptions(jnp.dtype(dtype), jnp.dtype(param_dtype), attention)
    self.dtype = opts.dtype
    groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
    time_features = 4 * channels[0]

    self.conv_in = layers.conv(cfg["in_channels"], channels[0], opts, rngs)
    self.conv_in2 = (layers.conv(cfg["mask_channels"] + cfg["out_channels"], channels[0], opts, rngs)
                     if cfg["mask_channels"] else None)
    motion = bool(cfg["motion_strength"])
    self.time_embedding = blocks.TimestepEmbedding(channels[0], time_features, channels[0] if motion else None,
                                                   opts, rngs)
    if motion:  # in the release's state dict, never used in its forward pass
      self.motion_embedding = nnx.List([
          layers.linear(channels[0], time_features, ("embed", "mlp"), opts, rngs), nnx.silu,
          layers.linear(time_features, time_features, ("mlp", "embed"), opts, rngs, zero_init=True)])
    else:
      self.motion_embedding = None
    temporal_groups = cfg["temporal_norm_num_groups"]
    self.transformer_in = blocks.TransformerTemporalModel(cfg["transformer_in_heads"], head_dim, channels[0],
                                                          temporal_groups, opts, rngs)

    spec = functools.partial(blocks.BlockSpec, time_features=time_features, groups=groups, eps=eps,
                             temporal_groups=temporal_groups, head_dim=head_dim,
                             context_features=cfg["cross_attention_dim"])
    last = len(channels) - 1
    # diffusers' down_block_types / up_block_types: cross-attention everywhere but the lowest resolution.
    down_types = [blocks.CrossAttnDownBlock3D] * last + [blocks.DownBlock3D]
    up_types = [blocks.UpBlock3D] + [blocks.CrossAttnUpBlock3D] * last
    self.down_blocks = nnx.List([
        block(spec(in_features=channels[max(i - 1, 0)], out_features=c, num_layers=cfg["layers_per_block"]),
              add_downsample=i < last, opts=opts, rngs=rngs)
        for i, (block, c) in enumerate(zip(down_types, channels, strict=True))])
    self.mid_block = blocks.UNetMidBlock3DCrossAttn(spec(in_features=channels[-1], out_features=channels[-1],
                                                         num_layers=1), opts, rngs)
    reversed_channels = channels[::-1]
    self.up_blocks = nnx.List([
        block(spec(in_features=reversed_channels[min(i + 1, last)], out_features=c,
                   num_layers=cfg["layers_per_block"] + 1),
              prev_out_features=reversed_channels[max(i - 1, 0)], add_upsample=i < last, opts=opts, rngs=rngs)
        for i, (block, c) in enumerate(zip(up_types, reversed_channels, strict=True))])
    self.conv_norm_out = layers.group_norm(channels[0], groups, eps, opts, rngs)
    self.conv_out = layers.conv(channels[0], cfg["out_channels"], opts, rngs)

  def __call__(self, sample, timesteps, encoder_hidden_states, condition_latent, mask=None, motion=None):
    latent_channels = self.config["out_channels"]
    _expect_shape("sample", sample, 5, latent_channels, "(B, F, h, w, C) noisy latents")
    _expect_shape("condition_latent", condition_latent, 5, latent_channels, "(B, 1, h, w, C) context latent")
    if condition_latent.shape[0] != sample.shape[0] or condition_latent.shape[1] != 1 or \
       condition_latent.shape[2:4] != sample.shape[2:4]:
      raise ValueError(f"condition_latent has shape {condition_latent.shape}; expected (B, 1, h, w, C) = "
                       f"{(sample.shape[0], 1) + sample.shape[2:]} for sample {sample.shape}")
    x = jnp.concatenate([condition_latent, sample], axis=1)
    if mask is not None:
      if self.conv_in2 is None:
        raise ValueError("a mask was given, but this UNet has no conv_in2 (config mask_channels=0); pass mask=None")
      mask = jnp.asarray(mask)
      expected = (sample.shape[2], sample.shape[3], self.config["mask_channels"])
      if mask.ndim != 4 or mask.shape[1:] != expected or sample.shape[0] % mask.shape[0]:
        raise ValueError(f"mask has shape {mask.shape}; expected (B_m, {', '.join(map(str, expected))}) with the "
                         f"batch {sample.shape[0]} a multiple of B_m")
      mask = jnp.tile(mask, (sample.shape[0] // mask.shape[0], 1, 1, 1)).astype(x.dtype)
      mask = jnp.broadcast_to(mask[:, None], x.shape[:4] + mask.shape[-1:])
      x = jnp.concatenate([mask, x], axis=-1)
    elif self.config["in_channels"] != latent_channels:
      raise ValueError(f"mask=None runs conv_in, which takes in_channels={self.config['in_channels']} channels, "
                       f"but the latents have {latent_channels}; pass a mask (conv_in2)")
    return self.forward_frames(x, timesteps, encoder_hidden_states, motion, masked_input=mask is not None)[:, 1:]

  def forward_frames(self, x, timesteps, encoder_hidden_states, motion=None, masked_input: bool = False):
    """The stock diffusers UNet3DConditionModel forward on all frames of x (B, T, h, w, C_in): no frame is
    prepended or dropped; `masked_input` picks conv_in2 (x already holds the mask channels) over conv_in."""
    batch, frames, height, width, _ = x.shape
    channels = self.config["block_out_channels"]
    t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps, jnp.float32), (-1,)), (batch,))
    condition = None
    if motion is not None:
      if self.time_embedding.cond_proj is None:
        raise ValueError("motion was given, but this UNet has no time_embedding.cond_proj (config "
                         "motion_strength=False); pass motion=None")
      m = jnp.broadcast_to(jnp.reshape(jnp.asarray(motion, jnp.float32), (-1,)), (batch,))
      condition = blocks.sinusoidal_embedding(m, channels[0]).astype(self.dtype)
    temb = self.time_embedding(blocks.sinusoidal_embedding(t, channels[0]).astype(self.dtype), condition)
    temb = jnp.repeat(temb, frames, axis=0)
    context = jnp.repeat(jnp.asarray(encoder_hidden_states, self.dtype), frames, axis=0)

    h = x.reshape(batch * frames, height, width, -1).astype(self.dtype)
    h = (self.conv_in2 if masked_input else self.conv_in)(h)
    if frames > 1:
      h = self._run(self.transformer_in, h, num_frames=frames)
    skips = (h,)
    for block in self.down_blocks:
      h, res = self._run(block, h, temb, context, num_frames=frames)
      skips += res
    h = self._run(self.mid_block, h, temb, context, num_frames=frames)
    for i, block in enumerate(self.up_blocks):
      n = len(block.resnets)
      res, skips = skips[-n:], skips[:-n]
      size = tuple(skips[-1].shape[1:3]) if i < len(self.up_blocks) - 1 else None
      h = self._run(block, h, res, temb, context, num_frames=frames, upsample_size=size)
    h = self.conv_out(nnx.silu(self.conv_norm_out(h)))
    return h.reshape(batch, frames, height, width, -1).astype(jnp.float32)

  def _run(self, block, *arrays, **static):
    """block(*arrays, **static), rematerialised as config.model.remat asks; `static` holds Python values."""
    call = lambda module, *a: module(*a, **static)
    if self.remat == "none":
      return call(block, *arrays)
    return nnx.remat(call, policy=REMAT_POLICIES[self.remat])(block, *arrays)


def _expect_shape(name: str, array, ndim: int, channels: int, meaning: str) -> None:
  shape = jnp.shape(array)
  if len(shape) != ndim or shape[-1] != channels:
    raise ValueError(f"{name} has shape {tuple(shape)}; expected {meaning} with C = {channels} (channels-last)")
