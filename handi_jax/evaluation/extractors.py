"""Feature extractors and scorers of the evaluation, batched and jitted, and the ones that are not configured.

Every extractor takes uint8 RGB frames (N, H, W, 3) of any size and does its own resizing; frames of the
motion-area scope arrive already masked and cropped (see handi_jax.evaluate). An extractor whose weights are
not configured is `None` in `Extractors`, and its metrics are reported as "not configured", never as a number.
CLIP, the FID Inception and the FVD I3D are here; the EgoVLP and BLIP scores are JAX ports of their own
(handi_jax.evaluation.egovlp: EgoVLP's video tower, handi_jax.evaluation.blip: BLIP's captioner and EgoVLP's text
tower). The Inception and the I3D loaded from a file remember its SHA-256: published FID / FVD values depend on
the exact weights, so the report names them.
"""

import dataclasses
import functools
import hashlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from handi_jax import fileio, sharding, tokenizers
from handi_jax.convert import clip as convert_clip
from handi_jax.convert import i3d as convert_i3d
from handi_jax.convert import inception as convert_inception
from handi_jax.evaluation.blip import BlipScorer
from handi_jax.evaluation.egovlp import EgoVlpScorer
from handi_jax.models.clip_vision import CLIPModel
from handi_jax.models.i3d import INPUT_SIZE as I3D_SIZE
from handi_jax.models.i3d import POOL_BEFORE, InceptionI3d
from handi_jax.models.inception import INPUT_SIZE, FIDInceptionV3

NOT_CONFIGURED = "not configured"
IN_MEMORY = dict(weights="in memory (no file)", weights_sha256=None)  # an extractor built from arrays, not a file
# CLIPImageProcessor's normalisation (OpenAI CLIP).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(frames: np.ndarray, size: int) -> np.ndarray:
  """uint8 frames (N, H, W, 3) -> CLIP's input (N, size, size, 3) float32, as transformers' CLIPImageProcessor
  makes it: PIL bicubic resize of the shorter side to `size`, central crop, /255, mean/std normalisation.
  On the host, so the jitted network sees one shape whatever the frame (or motion-area crop) size."""
  out = np.empty((len(frames), size, size, 3), np.float32)
  for i, frame in enumerate(np.asarray(frames, np.uint8)):
    height, width = frame.shape[:2]
    # transformers' get_resize_output_image_size: the longer side becomes int(size * long / short).
    new_w, new_h = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    resized = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC), np.float32)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out[i] = resized[top:top + size, left:left + size] / 255.0
  return (out - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


@nnx.jit
def _clip_image_embeds(model: CLIPModel, pixels: jax.Array) -> jax.Array:
  return model.image_embeds(pixels)


@nnx.jit
def _clip_text_embeds(model: CLIPModel, input_ids: jax.Array) -> jax.Array:
  return model.text_embeds(input_ids)


def weights_identity(path: str | os.PathLike) -> dict[str, str]:
  """{"weights": the file's path, "weights_sha256": its SHA-256}: which weights gave a number."""
  with fileio.local_copy(path) as local, open(local, "rb") as file:
    return dict(weights=str(path), weights_sha256=hashlib.file_digest(file, "sha256").hexdigest())


def batched(function, inputs: np.ndarray, batch_size: int) -> np.ndarray:
  """function over `inputs` in batches of exactly batch_size rounded up to a multiple of this process's devices (the
  last one padded): one compiled shape, each batch split over the devices, the model replicated. Every row's output
  depends on that row alone."""
  devices = jax.local_devices()
  batch_size = -(-batch_size // len(devices)) * len(devices)
  mesh = sharding.batch_mesh(devices)
  split = sharding.batch_sharding(mesh, inputs.ndim)
  outputs = []
  with jax.set_mesh(mesh):  # this process's devices, also inside training's mesh (the training evaluator)
    for start in range(0, len(inputs), batch_size):
      chunk = inputs[start:start + batch_size]
      padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
      outputs.append(np.asarray(function(jax.device_put(padded, split)))[:len(chunk)])
  return np.concatenate(outputs)


class ClipExtractor:
  """CLIP image and text embeddings (projected, not normalised) for CLIP_GT, CLIP_Cs and CLIP_Tx."""

  def __init__(self, model: CLIPModel, tokenizer, batch_size: int = 32):
    self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

  @classmethod
  def from_directory(cls, directory: str, batch_size: int = 32) -> "ClipExtractor":
    """A transformers CLIPModel folder holding its tokenizer files too (what save_pretrained of both writes)."""
    return cls(convert_clip.load_pretrained(directory), tokenizers.load_tokenizer(directory), batch_size)

  def image_embeddings(self, frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, projection_dim) float32."""
    pixels = clip_preprocess(frames, int(self.model.config.vision.image_size))
    return batched(lambda x: _clip_image_embeds(self.model, x), pixels, self.batch_size)

  def text_embedding(self, prompt: str) -> np.ndarray:
    length = int(self.model.config.text.max_position_embeddings)
    ids = jnp.asarray(tokenizers.tokenize(self.tokenizer, [prompt], max_length=length))
    return np.asarray(_clip_text_embeds(self.model, ids))[0]


@functools.partial(jax.jit, static_argnums=1)
def _resize_square(frames: jax.Array, size: int) -> jax.Array:
  """uint8 (N, H, W, 3) -> float [0, 1] (N, size, size, 3), bilinear as torch's interpolate(align_corners=False)."""
  images = frames.astype(jnp.float32) / 255.0
  return jax.image.resize(images, (images.shape[0], size, size, 3), "linear", antialias=False)


@nnx.jit
def _inception_features(model: FIDInceptionV3, images: jax.Array) -> jax.Array:
  return model(images)


class InceptionExtractor:
  """FID features: pytorch-fid's pool3 (2048-d) of each frame. The resize to 299 x 299 runs as its own small
  jitted step per frame size, so the network compiles once whatever the frame (or motion-area crop) size."""

  def __init__(self, model: FIDInceptionV3, batch_size: int = 32, weights: dict = IN_MEMORY):
    if model.resize_to is not None:
      raise ValueError("InceptionExtractor resizes the frames itself: load the model with resize_to=None")
    self.model, self.batch_size, self.weights = model, batch_size, weights

  @classmethod
  def from_file(cls, path: str, batch_size: int = 32) -> "InceptionExtractor":
    return cls(convert_inception.load_pretrained(path, resize_to=None), batch_size, weights_identity(path))

  def protocol(self) -> dict:
    """What FID is computed from (the report states it)."""
    return dict(network="pytorch-fid's FID Inception-v3, 2048-d pool3 features of each frame", **self.weights,
                resolution=f"{INPUT_SIZE} x {INPUT_SIZE}",
                resize="bilinear without antialiasing (torch's interpolate), the frame squashed to the square",
                input_range="RGB in [0, 1], scaled to [-1, 1] inside the network (pytorch-fid's normalize_input)")

  def features(self, frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 2048) float32."""
    images = np.concatenate([np.asarray(_resize_square(jnp.asarray(frames[i:i + self.batch_size]), INPUT_SIZE))
                             for i in range(0, len(frames), self.batch_size)])
    return batched(lambda x: _inception_features(self.model, x), images, self.batch_size)


@nnx.jit
def _i3d_logits(model: InceptionI3d, videos: jax.Array) -> jax.Array:
  return model(videos)


class I3dExtractor:
  """FVD features: the I3D's Kinetics logits (N, 400) of each video, the reference FVD's choice. Frames are
  resized to 224 x 224 (bilinear, as the FVD code's resize) and scaled to [-1, 1]; the L frames are fed as
  they are: `minimum_frames` of them at least."""

  def __init__(self, model: InceptionI3d, batch_size: int = 4, weights: dict = IN_MEMORY):
    self.model, self.batch_size, self.weights = model, batch_size, weights

  @classmethod
  def from_file(cls, path: str, batch_size: int = 4) -> "I3dExtractor":
    return cls(convert_i3d.load_pretrained(path), batch_size, weights_identity(path))

  def protocol(self) -> dict:
    """What FVD is computed from (the report states it)."""
    return dict(network=f"Inception-I3D (pytorch-i3d's InceptionI3d), {self.model.logits.conv3d.out_features} "
                        "Kinetics logits of each clip, averaged over time", **self.weights,
                resolution=f"{I3D_SIZE} x {I3D_SIZE}",
                resize="bilinear without antialiasing, the frame squashed to the square", input_range="RGB in [-1, 1]")

  @property
  def minimum_frames(self) -> int:
    """The fewest frames a video needs: time is strided by 8 (SAME padding: T -> ceil(T / 8)) by Conv3d_1a and the
    pools before Mixed_4b and Mixed_5b, and the final average pool needs its window's T steps left: 9 for the port's
    (2, 7, 7); fewer frames leave no time step to average (NaN features)."""
    stride = self.model.Conv3d_1a_7x7.stride[0] * math.prod(strides[0] for _, strides in POOL_BEFORE.values())
    return (self.model.avg_pool[0] - 1) * stride + 1

  def features(self, videos: np.ndarray) -> np.ndarray:
    """(N, L, H, W, 3) uint8 -> (N, 400) float32."""
    videos = np.asarray(videos)
    n, length = videos.shape[:2]
    frames = np.asarray(_resize_square(jnp.asarray(videos.reshape((n * length,) + videos.shape[2:])), I3D_SIZE))
    clips = (frames * 2.0 - 1.0).reshape(n, length, I3D_SIZE, I3D_SIZE, 3)
    return batched(lambda x: _i3d_logits(self.model, x), clips, self.batch_size)


@dataclasses.dataclass
class Extractors:
  """What the evaluation can compute; `None` = not configured (its columns say so)."""

  clip: ClipExtractor | None = None
  inception: InceptionExtractor | None = None
  i3d: I3dExtractor | None = None
  egovlp: EgoVlpScorer | None = None  # score(generated, ground-truth video)
  blip: BlipScorer | None = None      # score(generated frames, prompt)

