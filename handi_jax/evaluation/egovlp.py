"""The EgoVLP score of the paper's Table 2: video-to-video similarity of a generated and a ground-truth video.

Definition, from the evaluation code of LEGO (BolinLai/LEGO, metrics/all_metrics_in_one.py, `run_egovlp` and
`compute_egovlp`), which the paper cites for it: both videos go through EgoVLP's video tower (FrozenInTime's
compute_video: SpaceTimeTransformer, then vid_proj; the text tower is not used) and the score is the cosine of
the two 256-d embeddings (its `sim_matrix`, norms clamped at 1e-8), a number in [-1, 1] averaged over the clips.
Each frame is scaled to [0, 1], resized bilinearly (no antialiasing: torchvision 0.12 on tensors) so its shorter
side is 224 (the longer one int(224 * long / short)), centre-cropped to 224 x 224 and normalised with the
ImageNet mean and std. LEGO scores single images repeated over the frames; for videos the frames are sampled as
EgoVLP's test loader does (showlab/EgoVLP, base/base_dataset.py `sample_frames`, 'uniform': the middle frame of
`num_frames` equal segments), and a video shorter than that is zero-filled after normalisation, as that loader
does. egovlp.pth was pretrained on 4-frame clips (configs/pt/egoclip.json) and LEGO feeds it 4 (Ego4D); LEGO
scores Epic-Kitchens with the fine-tuned epic_mir_plus.pth at 16 frames, which loads here the same way.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from handi_jax.convert import egovlp as convert_egovlp
from handi_jax.models.egovlp import RELEASE_CONFIG, EgoVLPVideoModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_FRAMES = 4
_NORM_EPS = 1e-8


def uniform_frame_indices(length: int, num_frames: int) -> np.ndarray:
  """EgoVLP's 'uniform' sampling: `num_frames` (at most `length`) equal segments, the middle frame of each."""
  count = min(num_frames, length)
  bounds = np.linspace(0, length, count + 1).astype(int)
  return (bounds[:-1] + bounds[1:] - 1) // 2


def _crop_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
  """(resized height, resized width, top, left): torchvision's Resize(size) then CenterCrop(size)."""
  if width <= height:
    new_height, new_width = int(size * height / width), size
  else:
    new_height, new_width = size, int(size * width / height)
  # round() as torchvision's centre crop uses it (half to even).
  return new_height, new_width, int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))


@functools.partial(jax.jit, static_argnums=1)
def _prepare(frames: jax.Array, size: int) -> jax.Array:
  """uint8 (F, H, W, 3) -> normalised (F, size, size, 3) float32."""
  new_height, new_width, top, left = _crop_box(frames.shape[1], frames.shape[2], size)
  images = frames.astype(jnp.float32) / 255.0
  images = jax.image.resize(images, (images.shape[0], new_height, new_width, 3), "linear", antialias=False)
  images = images[:, top:top + size, left:left + size]
  return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


@nnx.jit
def _video_embeddings(model: EgoVLPVideoModel, videos: jax.Array) -> jax.Array:
  return model(videos)


class EgoVlpScorer:
  """`score(generated, reference)`: the EgoVLP score of one pair of uint8 videos (N, H, W, 3), any N and size."""

  def __init__(self, model: EgoVLPVideoModel, num_frames: int = DEFAULT_FRAMES):
    if not 1 <= num_frames <= model.config.num_frames:
      raise ValueError(f"EgoVLP scorer: num_frames={num_frames}, but the model has {model.config.num_frames} "
                       "temporal positions; load it with convert.egovlp.load_pretrained(path, num_frames=...)")
    self.model, self.num_frames = model, num_frames

  @classmethod
  def from_file(cls, path: str, num_frames: int = DEFAULT_FRAMES,
                num_heads: int = RELEASE_CONFIG["num_heads"]) -> "EgoVlpScorer":
    """egovlp.pth (or a safetensors export of it), its temporal positions fitted to `num_frames`."""
    return cls(convert_egovlp.load_pretrained(path, num_frames=num_frames, num_heads=num_heads), num_frames)

  def preprocess(self, frames: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the model's input (num_frames, S, S, 3) float32."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
      raise ValueError(f"EgoVLP scorer: expected uint8 RGB frames (N >= 1, H, W, 3), got {frames.dtype} "
                       f"{frames.shape}")
    sampled = frames[uniform_frame_indices(len(frames), self.num_frames)]
    size = int(self.model.config.image_size)
    video = np.zeros((self.num_frames, size, size, 3), np.float32)
    video[:len(sampled)] = np.asarray(_prepare(jnp.asarray(sampled), size))
    return video

  def video_embeddings(self, *videos: np.ndarray) -> np.ndarray:
    """The projected (not normalised) embedding of each uint8 video, (len(videos), projection_dim)."""
    return np.asarray(_video_embeddings(self.model, jnp.asarray(np.stack([self.preprocess(v) for v in videos]))))

  def score(self, generated: np.ndarray, reference: np.ndarray) -> float:
    embeddings = self.video_embeddings(generated, reference).astype(np.float64)
    norms = np.maximum(np.linalg.norm(embeddings, axis=1), _NORM_EPS)
    return float(embeddings[0] @ embeddings[1] / (norms[0] * norms[1]))
