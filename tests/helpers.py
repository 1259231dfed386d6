"""Helpers shared by several test modules (tests never import one another): tiny configs and inputs, and
independent re-implementations of documented rules."""

import json

import cv2
import numpy as np
from flax import nnx

from configs import common
from handi_jax.convert import core
from handi_jax.convert import unet as convert_unet
from handi_jax.models.unet3d import UNet3DConditionModel

# diffusers' tiny-config rules: norm_num_groups divides every channel count, and its `attention_head_dim` is the
# per-head width (heads = channels // 8 here); transformer_in is always 8 heads of that width.
TINY_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8,
            cross_attention_dim=24, norm_num_groups=4, norm_eps=1e-5, transformer_in_heads=8, mask_channels=1,
            motion_strength=True, sample_size=8)
BATCH, FRAMES, HEIGHT, WIDTH = 2, 3, 6, 11   # 11 -> 6 -> 11: forced-size (non-x2) upsampling
TOLERANCE = 5e-5  # relative to the output's max |value|: float32 round-off through ~200 ops


def tiny_unet_config(**overrides):
  return {**TINY_UNET, **overrides}


def jax_unet(config, torch_state):
  model = UNet3DConditionModel(config, rngs=nnx.Rngs(0))
  core.load_flat_params(model, core.to_flax(torch_state, convert_unet.UNET_RULES), "tiny UNet")
  return model


def unet_inputs(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return dict(sample=f32(BATCH, FRAMES, HEIGHT, WIDTH, 4), condition=f32(BATCH, 1, HEIGHT, WIDTH, 4),
              text=f32(BATCH, 77, TINY_UNET["cross_attention_dim"]), timesteps=np.array([999, 37], np.int64),
              mask=(rng.random((1, HEIGHT, WIDTH, 1)) > 0.5).astype(np.float32), motion=np.array([3.0], np.float32))


def relative_error(ours, reference):
  ours, reference = np.asarray(ours), np.asarray(reference)
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


@nnx.jit
def handi_forward(model, sample, timesteps, text, condition, mask, motion):
  return model(sample, timesteps, text, condition, mask=mask, motion=motion)


def tiny_train_config(stage=2, steps=2):
  config = common.get_config(stage)
  # 32 channels in 32 groups: the release's UNet class can load the export (it builds 32-group temporal norms).
  config.model.unet.update(block_out_channels=(32,), layers_per_block=1, attention_head_dim=8, cross_attention_dim=32)
  config.model.vae.update(block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
  config.model.vae_without_weights = "random"  # 2 channels a norm group: too few for block_mean_weights
  config.data.update(num_frames=3, height=32, width=32)
  config.data.demo.num_clips = 8
  config.train.update(global_batch_size=8, num_steps=steps, checkpoint_every=1, warmup_steps=1,
                      learning_rate=1e-3, log_every=1)
  config.loss.eta_hand = 0.0  # the landmark network's cost is covered by tests/test_losses.py
  return config


def mediapipe_hands(static_image_mode: bool, outputs=None):
  from mediapipe.python.solution_base import SolutionBase
  from mediapipe.python.solutions import hands as mp_hands

  if outputs is None:
    return mp_hands.Hands(static_image_mode=static_image_mode, max_num_hands=2, model_complexity=1,
                          min_detection_confidence=0.1, min_tracking_confidence=0.1)
  # Same graph and settings as mp.solutions.hands.Hands, asking for more of its output streams.
  return SolutionBase(
      binary_graph_path=mp_hands._BINARYPB_FILE_PATH,
      side_inputs={"model_complexity": 1, "num_hands": 2, "use_prev_landmarks": not static_image_mode},
      calculator_params={"palmdetectioncpu__TensorsToDetectionsCalculator.min_score_thresh": 0.1,
                         "handlandmarkcpu__ThresholdingCalculator.threshold": 0.1},
      outputs=outputs)


def keypoints_of(hand) -> np.ndarray:
  return np.array([[p.x, p.y] for p in hand.landmark], np.float32)


def synthetic_hand(wrist_x: float, wrist_y: float, size: float) -> np.ndarray:
  """21 normalised (x, y) joints of an upright open hand: wrist, then 4 joints along each of 5 fingers."""
  angles = np.deg2rad([-55, -18, 0, 16, 32])  # thumb .. pinky, from vertical
  joints = [(wrist_x, wrist_y)]
  for angle in angles:
    for step in range(1, 5):
      radius = size * (0.35 + 0.2 * step)
      joints.append((wrist_x + radius * np.sin(angle), wrist_y - radius * np.cos(angle)))
  return np.asarray(joints, np.float32)


def hull_mask(points, height, width):
  """Independent rasterisation of the documented rule: pixel centres inside the convex hull of the joints."""
  mask = np.zeros((height, width), np.uint8)
  if len(points):
    pixels = np.round((points * [width, height] - 0.5) * 16).astype(np.int32)
    cv2.fillConvexPoly(mask, cv2.convexHull(pixels), 255, lineType=cv2.LINE_8, shift=4)
  return mask


BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_tiny_tokenizer(directory):
  """A CLIP BPE vocabulary of letters plus the merges that spell "hand" and "cut"; pad token "!" (id 0)."""
  directory.mkdir(parents=True, exist_ok=True)
  letters = "abcdefghijklmnopqrstuvwxyz"
  symbols = ["!"] + list(letters) + [c + "</w>" for c in letters] + ["ha", "han", "hand</w>", "cu", "cut</w>"]
  vocab = {s: i for i, s in enumerate(symbols)}
  vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
  (directory / "vocab.json").write_text(json.dumps(vocab))
  (directory / "merges.txt").write_text("#version: 0.2\nh a\nha n\nhan d</w>\nc u\ncu t</w>\n")
  (directory / "tokenizer_config.json").write_text(json.dumps(dict(
      tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True, pad_token="!",
      bos_token=BOS, eos_token=EOS, unk_token=EOS)))
  return vocab
