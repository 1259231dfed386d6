"""PyTorch references for the tests and benchmarks: diffusers/transformers models with every parameter random,
and the original release's HANDI UNet forward rebuilt around diffusers' UNet3DConditionModel
(reference_spec.md section 1.3)."""

import diffusers
import numpy as np
import torch
from diffusers.models.resnet import TemporalConvLayer

from handi_jax.convert import unet as convert_unet
from handi_jax.convert import vae as convert_vae
from handi_jax.models.unet3d import unet_config_dict


def torch_unet(config, seed=0):
  """diffusers UNet3DConditionModel for `config`, every parameter random (none left at zero or one).

  A temporal_norm_num_groups other than norm_num_groups rebuilds the GroupNorms of transformer_in and of every
  TemporalConvLayer with that many groups (same eps): with 32, the model the release's class builds, which
  passes no norm_num_groups to them (reference_spec.md 1.5, item 7)."""
  config = unet_config_dict(config)
  torch.manual_seed(seed)
  down, up = convert_unet.block_types(len(config["block_out_channels"]))
  model = diffusers.UNet3DConditionModel(
      sample_size=config["sample_size"], in_channels=config["in_channels"], out_channels=config["out_channels"],
      down_block_types=down, up_block_types=up, block_out_channels=config["block_out_channels"],
      layers_per_block=config["layers_per_block"], norm_num_groups=config["norm_num_groups"],
      norm_eps=config["norm_eps"], cross_attention_dim=config["cross_attention_dim"],
      attention_head_dim=config["attention_head_dim"],
      time_cond_proj_dim=config["block_out_channels"][0] if config["motion_strength"] else None)
  groups = config["temporal_norm_num_groups"]
  if groups != config["norm_num_groups"]:
    norm = model.transformer_in.norm
    model.transformer_in.norm = torch.nn.GroupNorm(groups, norm.num_channels, eps=norm.eps)
    for layer in [m for m in model.modules() if isinstance(m, TemporalConvLayer)]:
      for stage in (layer.conv1, layer.conv2, layer.conv3, layer.conv4):
        stage[0] = torch.nn.GroupNorm(groups, stage[0].num_channels, eps=stage[0].eps)
  randomize(model, seed)
  return model.eval()


def randomize(module, seed):
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if p.ndim > 1:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      else:
        p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)


class HandiReference(torch.nn.Module):
  """The release's UNet forward (reference_spec.md 1.3) around a diffusers UNet3DConditionModel built with
  time_cond_proj_dim = block_out_channels[0]: context frame prepended and dropped, [mask, latents] -> conv_in2,
  motion strength -> the timestep sinusoid -> time_embedding.cond_proj."""

  def __init__(self, unet, seed=1):
    super().__init__()
    self.unet = unet
    c0, out = unet.config.block_out_channels[0], unet.config.out_channels
    self.conv_in2 = torch.nn.Conv2d(1 + out, c0, 3, padding=1)
    self.motion_embedding = torch.nn.Sequential(torch.nn.Linear(c0, 4 * c0), torch.nn.SiLU(),
                                                torch.nn.Linear(4 * c0, 4 * c0))
    randomize(self.conv_in2, seed)
    randomize(self.motion_embedding, seed + 1)

  def state_dict_numpy(self):
    state = {k: v for k, v in self.unet.state_dict().items()}
    state.update({f"conv_in2.{k}": v for k, v in self.conv_in2.state_dict().items()})
    state.update({f"motion_embedding.{k}": v for k, v in self.motion_embedding.state_dict().items()})
    return {k: v.detach().numpy() for k, v in state.items()}

  def load_state_dict_numpy(self, state):
    """The inverse of state_dict_numpy, strict: e.g. an export in the release's keys."""
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    extras = {"conv_in2.": self.conv_in2, "motion_embedding.": self.motion_embedding}
    for prefix, module in extras.items():
      module.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    self.unet.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(tuple(extras))})

  def forward(self, sample, timestep, encoder_hidden_states, condition_latent, mask=None, motion=None):
    u = self.unet
    x = torch.cat([condition_latent, sample], dim=2)
    batch, _, frames, height, width = x.shape
    forward_size = any(s % 2 ** u.num_upsamplers for s in (height, width))
    t_emb = u.time_proj(timestep.expand(batch))
    condition = u.time_proj(motion) if motion is not None else None  # motion_proj: the same Timesteps
    emb = u.time_embedding(t_emb, condition).repeat_interleave(frames, dim=0)
    context = encoder_hidden_states.repeat_interleave(frames, dim=0)
    if mask is not None:
      x = torch.cat([mask.repeat(batch // mask.shape[0], 1, frames, 1, 1), x], dim=1)
    x = x.permute(0, 2, 1, 3, 4).reshape(batch * frames, -1, height, width)
    x = (self.conv_in2 if mask is not None else u.conv_in)(x)
    x = u.transformer_in(x, num_frames=frames, return_dict=False)[0]
    skips = (x,)
    for block in u.down_blocks:
      if getattr(block, "has_cross_attention", False):
        x, res = block(hidden_states=x, temb=emb, encoder_hidden_states=context, num_frames=frames)
      else:
        x, res = block(hidden_states=x, temb=emb, num_frames=frames)
      skips += res
    x = u.mid_block(x, emb, encoder_hidden_states=context, num_frames=frames)
    for i, block in enumerate(u.up_blocks):
      res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
      size = skips[-1].shape[2:] if i < len(u.up_blocks) - 1 and forward_size else None
      kwargs = dict(encoder_hidden_states=context) if getattr(block, "has_cross_attention", False) else {}
      x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, upsample_size=size, num_frames=frames,
                **kwargs)
    x = u.conv_out(u.conv_act(u.conv_norm_out(x)))
    return x.reshape(batch, frames, -1, height, width).permute(0, 2, 1, 3, 4)[:, :, 1:]


def to_torch_video(x):  # (B, F, h, w, C) -> (B, C, F, h, w)
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 4, 1, 2, 3))))


def diffusers_vae(config, seed=0):
  """A diffusers AutoencoderKL with every parameter random (norm scales and biases too)."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**convert_vae.config_to_diffusers(config)).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if param.ndim == 1:
        param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(param))
  return model


# ---------------------------------------------------------------------------------------------------
# pytorch-fid 0.3.0's FID Inception (pytorch_fid.inception.InceptionV3 with use_fid_inception=True), written out
# because pytorch-fid needs torchvision, and the only torchvision 0.28.0 wheel reachable here is CUDA-built and
# fails to import beside torch 2.13.0+cpu ("operator torchvision::nms does not exist"). Same module names as
# torchvision's Inception3 (so as pt_inception-2015-12-05-6726825d.pth), same blocks, pools and order.

class FidBasicConv2d(torch.nn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = torch.nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = torch.nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return torch.relu(self.bn(self.conv(x)))


def _fid_avg_pool(x):
  return torch.nn.functional.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FidInceptionA(torch.nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = FidBasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = FidBasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = FidBasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = FidBasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = FidBasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = FidBasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = FidBasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(_fid_avg_pool(x))], 1)


class FidInceptionB(torch.nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = FidBasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = FidBasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = FidBasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = FidBasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      torch.nn.functional.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FidInceptionC(torch.nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = FidBasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = FidBasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = FidBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = FidBasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = FidBasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = FidBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = FidBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = FidBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = FidBasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = FidBasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    dbl = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      dbl = layer(dbl)
    return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                      self.branch_pool(_fid_avg_pool(x))], 1)


class FidInceptionD(torch.nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = FidBasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = FidBasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = FidBasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = FidBasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = FidBasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = FidBasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven,
                      torch.nn.functional.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FidInceptionE(torch.nn.Module):
  """FIDInceptionE_1 (max_pool=False) / FIDInceptionE_2 (max_pool=True)."""

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = FidBasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = FidBasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = FidBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = FidBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = FidBasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = FidBasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = FidBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = FidBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = FidBasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    three = self.branch3x3_1(x)
    dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = (torch.nn.functional.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
              else _fid_avg_pool(x))
    return torch.cat([self.branch1x1(x), torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], 1),
                      torch.cat([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], 1),
                      self.branch_pool(pooled)], 1)


class FidInceptionV3(torch.nn.Module):
  """pytorch-fid InceptionV3([3], resize_input, normalize_input=True): images (N, 3, H, W) in [0, 1] -> (N, 2048)."""

  def __init__(self, resize_input=True):
    super().__init__()
    self.resize_input = resize_input
    self.Conv2d_1a_3x3 = FidBasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = FidBasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = FidBasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = FidBasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = FidBasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = FidInceptionA(192, 32), FidInceptionA(256, 64), FidInceptionA(288, 64)
    self.Mixed_6a = FidInceptionB(288)
    self.Mixed_6b, self.Mixed_6c = FidInceptionC(768, 128), FidInceptionC(768, 160)
    self.Mixed_6d, self.Mixed_6e = FidInceptionC(768, 160), FidInceptionC(768, 192)
    self.Mixed_7a = FidInceptionD(768)
    self.Mixed_7b, self.Mixed_7c = FidInceptionE(1280, max_pool=False), FidInceptionE(2048, max_pool=True)
    self.fc = torch.nn.Linear(2048, 1008)  # in the weights file, unused by FID

  def forward(self, x):
    if self.resize_input:
      x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(torch.nn.functional.max_pool2d(x, kernel_size=3, stride=2)))
    x = torch.nn.functional.max_pool2d(x, kernel_size=3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return torch.nn.functional.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def randomize_batchnorm(module, seed):
  """Random running statistics and affine parameters (fresh BatchNorms are identities in eval mode)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
        m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=generator))
        m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=generator))
        m.weight.copy_(0.5 + torch.rand(m.num_features, generator=generator))
        m.bias.copy_(0.1 * torch.randn(m.num_features, generator=generator))
  return module.eval()


# ---------------------------------------------------------------------------------------------------
# piergiaj/pytorch-i3d's InceptionI3d (the common PyTorch I3D for FVD; not on PyPI), with its module names,
# TF-SAME padding rule and zero-padded max pools. `avg_pool` is its AvgPool3d window ((2, 7, 7) in the port).

def _i3d_pad(x, kernel, stride):
  pads = []
  for size, k, s in zip(x.shape[2:], kernel, stride, strict=True):
    total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
    pads.append((total // 2, total - total // 2))
  (tf, tb), (hf, hb), (wf, wb) = pads
  return torch.nn.functional.pad(x, (wf, wb, hf, hb, tf, tb))


class I3dMaxPool(torch.nn.MaxPool3d):
  def forward(self, x):
    return super().forward(_i3d_pad(x, self.kernel_size, self.stride))


class I3dUnit3D(torch.nn.Module):
  def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), logits=False):
    super().__init__()
    self.kernel, self.stride, self.is_logits = kernel, stride, logits
    self.conv3d = torch.nn.Conv3d(cin, cout, kernel, stride=stride, padding=0, bias=logits)
    if not logits:
      self.bn = torch.nn.BatchNorm3d(cout, eps=0.001, momentum=0.01)

  def forward(self, x):
    x = self.conv3d(_i3d_pad(x, self.kernel, self.stride))
    return x if self.is_logits else torch.relu(self.bn(x))


class I3dInceptionModule(torch.nn.Module):
  def __init__(self, cin, c):
    super().__init__()
    self.b0 = I3dUnit3D(cin, c[0])
    self.b1a, self.b1b = I3dUnit3D(cin, c[1]), I3dUnit3D(c[1], c[2], (3, 3, 3))
    self.b2a, self.b2b = I3dUnit3D(cin, c[3]), I3dUnit3D(c[3], c[4], (3, 3, 3))
    self.b3a, self.b3b = I3dMaxPool((3, 3, 3), (1, 1, 1)), I3dUnit3D(cin, c[5])

  def forward(self, x):
    return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


class InceptionI3dReference(torch.nn.Module):
  """videos (N, 3, T, H, W) in [-1, 1] -> logits (N, classes, T') like pytorch-i3d's forward (spatial squeeze)."""

  MIXED = (("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)), ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
           ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)), ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
           ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)), ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
           ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)), ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
           ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)))

  def __init__(self, num_classes=400, avg_pool=(2, 7, 7)):
    super().__init__()
    self.Conv3d_1a_7x7 = I3dUnit3D(3, 64, (7, 7, 7), (2, 2, 2))
    self.MaxPool3d_2a_3x3 = I3dMaxPool((1, 3, 3), (1, 2, 2))
    self.Conv3d_2b_1x1 = I3dUnit3D(64, 64)
    self.Conv3d_2c_3x3 = I3dUnit3D(64, 192, (3, 3, 3))
    self.MaxPool3d_3a_3x3 = I3dMaxPool((1, 3, 3), (1, 2, 2))
    self.MaxPool3d_4a_3x3 = I3dMaxPool((3, 3, 3), (2, 2, 2))
    self.MaxPool3d_5a_2x2 = I3dMaxPool((2, 2, 2), (2, 2, 2))
    for name, cin, c in self.MIXED:
      setattr(self, name, I3dInceptionModule(cin, c))
    self.avg_pool = torch.nn.AvgPool3d(avg_pool, stride=(1, 1, 1))
    self.logits = I3dUnit3D(1024, num_classes, logits=True)

  def forward(self, x):
    for name in ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
                 "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
                 "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c"):
      x = getattr(self, name)(x)
    return self.logits(self.avg_pool(x)).squeeze(3).squeeze(3)


# ---------------------------------------------------------------------------------------------------
# EgoVLP's video tower (showlab/EgoVLP model/model.py FrozenInTime.compute_video, model/video_transformer.py
# SpaceTimeTransformer, attention style 'frozen-in-time'), which cannot be pip-installed: written here from its
# documented behaviour, head-first with plain matmuls, with the release's module names (video_model.*, vid_proj.0).
# Then LEGO's scoring steps (metrics/all_metrics_in_one.py): Resize + CenterCrop as torchvision 0.12 does them on
# tensors, ImageNet normalisation, cosine of the two embeddings with norms clamped at 1e-8.

class EgoVlpDividedAttention(torch.nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = torch.nn.Linear(dim, 3 * dim)
    self.proj = torch.nn.Linear(dim, dim)

  def forward(self, x, frames, over):
    batch, tokens, dim = x.shape
    head_dim = dim // self.heads
    q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d)
    q = q * head_dim ** -0.5
    cls_out = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2), dim=-1) @ v
    per_frame = (tokens - 1) // frames

    def split(t):  # (B, h, F*N, d) -> (B, h, groups, members, d): frames of patches, or positions across frames
      t = t[:, :, 1:].reshape(batch, self.heads, frames, per_frame, head_dim)
      return t if over == "space" else t.transpose(2, 3)

    qs, ks, vs = split(q), split(k), split(v)
    groups = qs.shape[2]
    ks = torch.cat([k[:, :, None, :1].expand(-1, -1, groups, -1, -1), ks], dim=3)
    vs = torch.cat([v[:, :, None, :1].expand(-1, -1, groups, -1, -1), vs], dim=3)
    out = torch.softmax(qs @ ks.transpose(-1, -2), dim=-1) @ vs
    if over == "time":
      out = out.transpose(2, 3)
    out = torch.cat([cls_out, out.reshape(batch, self.heads, tokens - 1, head_dim)], dim=2)
    return self.proj(out.permute(0, 2, 1, 3).reshape(batch, tokens, dim))


class EgoVlpMlp(torch.nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class EgoVlpBlock(torch.nn.Module):
  def __init__(self, dim, heads, hidden):
    super().__init__()
    self.norm1, self.norm2, self.norm3 = (torch.nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
    self.attn, self.timeattn = EgoVlpDividedAttention(dim, heads), EgoVlpDividedAttention(dim, heads)
    self.mlp = EgoVlpMlp(dim, hidden)

  def forward(self, x, frames):
    time_residual = x + self.timeattn(self.norm3(x), frames, "time")
    space_residual = x + self.attn(self.norm1(time_residual), frames, "space")  # onto x, not time_residual
    return space_residual + self.mlp(self.norm2(space_residual))


class EgoVlpPatchEmbed(torch.nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = torch.nn.Conv2d(3, dim, patch, stride=patch)


class EgoVlpSpaceTimeTransformer(torch.nn.Module):
  def __init__(self, image, patch, dim, depth, heads, hidden, frames):
    super().__init__()
    self.per_frame, self.frames = (image // patch) ** 2, frames
    self.patch_embed = EgoVlpPatchEmbed(patch, dim)
    self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = torch.nn.Parameter(torch.zeros(1, self.per_frame + 1, dim))
    self.temporal_embed = torch.nn.Parameter(torch.zeros(1, frames, dim))
    self.blocks = torch.nn.ModuleList(EgoVlpBlock(dim, heads, hidden) for _ in range(depth))
    self.norm = torch.nn.LayerNorm(dim, eps=1e-6)

  def forward(self, video):  # (B, F, 3, H, W), F <= frames
    batch, frames = video.shape[:2]
    x = self.patch_embed.proj(video.flatten(0, 1)).flatten(2).transpose(1, 2)
    x = x.reshape(batch, -1, self.cls_token.shape[-1])
    x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)
    # Positions laid out for the full frame count (spatial tiled per frame, temporal repeated per patch), then cut.
    table = self.pos_embed[:, 1:].repeat(1, self.frames, 1) + self.temporal_embed.repeat_interleave(self.per_frame, 1)
    x = x + torch.cat([self.pos_embed[:, :1], table], dim=1)[:, :x.shape[1]]
    for block in self.blocks:
      x = block(x, frames)
    return self.norm(x)[:, 0]


class EgoVlpVideoReference(torch.nn.Module):
  def __init__(self, image=32, patch=16, dim=32, depth=2, heads=2, hidden=64, frames=2, projection=16):
    super().__init__()
    self.video_model = EgoVlpSpaceTimeTransformer(image, patch, dim, depth, heads, hidden, frames)
    self.vid_proj = torch.nn.Sequential(torch.nn.Linear(dim, projection))

  def forward(self, video):
    return self.vid_proj(self.video_model(video))


def egovlp_frame_indices(length, num_frames):
  """EgoVLP's test sampling: segment bounds from linspace, truncated to ints; the middle of each segment."""
  bounds = np.linspace(0, length, min(num_frames, length) + 1).astype(int)
  return [(start + end - 1) // 2 for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def egovlp_reference_input(frames, num_frames, size):
  """uint8 (N, H, W, 3) -> (num_frames, 3, size, size): sampled, resized, cropped, normalised, zero-filled."""
  clip = torch.from_numpy(np.asarray(frames)[egovlp_frame_indices(len(frames), num_frames)]).permute(0, 3, 1, 2)
  clip = clip.float() / 255
  height, width = clip.shape[-2:]
  short, long = min(height, width), max(height, width)
  resized = (size, int(size * long / short)) if height <= width else (int(size * long / short), size)
  clip = torch.nn.functional.interpolate(clip, size=resized, mode="bilinear", align_corners=False)
  top, left = int(round((resized[0] - size) / 2.0)), int(round((resized[1] - size) / 2.0))
  clip = clip[:, :, top:top + size, left:left + size]
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  out = torch.zeros(num_frames, 3, size, size)
  out[:len(clip)] = (clip - mean) / std
  return out


def egovlp_reference_score(model, generated, reference, num_frames, size):
  with torch.no_grad():
    embeddings = model(torch.stack([egovlp_reference_input(v, num_frames, size) for v in (generated, reference)]))
  norms = embeddings.norm(dim=1, keepdim=True).clamp_min(1e-8)
  unit = embeddings / norms
  return float((unit[0] * unit[1]).sum())
