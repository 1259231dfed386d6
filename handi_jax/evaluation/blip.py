"""The BLIP score of the paper's tables, as LEGO (Lai et al., ECCV 2024) defines it and HANDI takes it.

LEGO's metric code (github.com/BolinLai/LEGO, metrics/all_metrics_in_one.py: compute_blip_caption and
compute_text_similarity) does not score an image-text pair with a BLIP head. It
  1. captions the generated frame with BLIP's captioning model (model_large_caption.pth for BLIP-L,
     model_base_caption_capfilt_large.pth for BLIP-B): the frame resized to 384 x 384 (PIL bicubic, no crop), scaled
     to [0, 1] and normalised with CLIP's mean and std; the text prompt "a picture of"; beam search with 3 beams,
     max_length 20 and min_length 5 (prompt tokens included), under transformers 4.19.2; the decoded caption less
     its first len("a picture of") characters;
  2. embeds the caption and the action description with EgoVLP's text tower (DistilBERT's [CLS] token, ReLU, a
     768 -> 256 projection; egovlp.pth for Ego4D, epic_mir_plus.pth for EpicKitchens), each tokenised alone;
  3. takes their cosine similarity (no x100) and averages it over the samples.
LEGO generates one frame per sample. HANDI calls the score video level and does not say how frames are pooled; here
every generated frame is captioned and scored and the clip's score is the mean over its frames, each frame
weighted as LEGO weighs its one frame. That pooling is this port's reading, not a published fact.

Beam search follows transformers 4.19.2, the version LEGO pins: a finished hypothesis (its end token left out,
the prompt counted) scores sum log-prob / length ** length_penalty, and the search stops for an image once it
holds num_beams hypotheses none of which the best candidate can beat. Later transformers divide by the generated
length alone, which can pick another caption; with length_penalty 0 the two agree.

LEGO loads BLIP's own .pth files. Salesforce/blip-image-captioning-large holds BLIP's large COCO captioner (BLIP
released one, model_large_caption.pth) in transformers' layout; transformers' conversion script made the base one
from model_base_capfilt_large.pth, not LEGO's model_base_caption_capfilt_large.pth. BLIP's own ViT normalises with
LayerNorm eps 1e-6, transformers' configs say 1e-5: set vision_config.layer_norm_eps in captioner/config.json to
1e-6 to match LEGO to the last digit.

`config.evaluate.blip` is a directory with two folders:
  captioner/     a transformers BlipForConditionalGeneration with its processor (save_pretrained of both), e.g.
                 Salesforce/blip-image-captioning-large (BLIP_large, the main tables) or -base (BLIP_base);
  text_encoder/  distilbert-base-uncased's config.json and tokenizer files, and the EgoVLP checkpoint of the
                 benchmark (see handi_jax.convert.egovlp_text).
"""

import dataclasses
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from transformers import AutoTokenizer

from handi_jax import fileio
from handi_jax.convert import blip as convert_blip
from handi_jax.convert import egovlp_text as convert_egovlp_text
from handi_jax.models.blip import BlipForConditionalGeneration
from handi_jax.models.egovlp_text import EgoVlpTextEncoder

# BLIP's (= OpenAI CLIP's) normalisation, as LEGO's transform and BlipImageProcessor use it.
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_TEXT_BUCKET = 16  # EgoVLP inputs are padded to a multiple of this, so few lengths compile


@dataclasses.dataclass(frozen=True)
class Decoding:
  """LEGO's captioning settings (compute_blip_caption)."""

  prompt: str = "a picture of"
  num_beams: int = 3
  max_length: int = 20
  min_length: int = 5
  length_penalty: float = 1.0  # transformers' default; LEGO leaves it


LEGO_DECODING = Decoding()


def preprocess(frames: np.ndarray, size: int) -> np.ndarray:
  """uint8 frames (N, H, W, 3) -> (N, size, size, 3) float32 as LEGO feeds BLIP: PIL bicubic resize of the whole
  frame to a square (uint8 out, as torchvision's Resize on a PIL image), /255, mean/std normalisation."""
  resized = np.stack([np.asarray(Image.fromarray(frame).resize((size, size), Image.BICUBIC))
                      for frame in np.asarray(frames, np.uint8)])
  return (resized.astype(np.float32) / 255.0 - np.asarray(BLIP_MEAN, np.float32)) / np.asarray(BLIP_STD, np.float32)


@nnx.jit
def _image_states(model: BlipForConditionalGeneration, pixels: jax.Array) -> tuple:
  return model.text_decoder.cross_attention_states(model.vision_model(pixels))


@functools.partial(nnx.jit, static_argnames=("eos_id", "candidates"))
def _beam_candidates(model: BlipForConditionalGeneration, image_states, token_ids, length, beam_scores, block_eos,
                     *, eos_id: int, candidates: int):
  """The `candidates` best (running score + next-token log-prob) of each image over its beams, and their flat
  indices beam * vocab + token. token_ids (images * beams, max_length) hold `length` real tokens each."""
  log_probs = jax.nn.log_softmax(model.text_decoder(token_ids, image_states, length), axis=-1)
  # transformers' MinLengthLogitsProcessor: no end token before min_length tokens (prompt included).
  log_probs = jnp.where(block_eos & (jnp.arange(log_probs.shape[-1]) == eos_id), -jnp.inf, log_probs)
  images = image_states[0][0].shape[0]  # the first layer's image keys: (images, tokens, heads, head_dim)
  return jax.lax.top_k((log_probs + beam_scores[:, None]).reshape(images, -1), candidates)


class _Hypotheses:
  """Finished captions of one image, the best `size` kept (transformers 4.19.2 BeamHypotheses)."""

  def __init__(self, size: int, length_penalty: float):
    self.size, self.length_penalty, self.kept = size, length_penalty, []

  def add(self, tokens: np.ndarray, sum_log_probs: float) -> None:
    score = sum_log_probs / len(tokens) ** self.length_penalty
    if len(self.kept) < self.size or score > self.worst():
      self.kept.append((score, tokens))
      if len(self.kept) > self.size:
        del self.kept[min(range(len(self.kept)), key=lambda i: self.kept[i][0])]

  def worst(self) -> float:
    return min(score for score, _ in self.kept)

  def cannot_improve(self, best_sum_log_probs: float, length: int) -> bool:
    return len(self.kept) >= self.size and self.worst() >= best_sum_log_probs / length ** self.length_penalty

  def best(self) -> np.ndarray:
    # sorted() is stable: among equal scores the last added wins, as transformers pops the end of the sorted list.
    return sorted(self.kept, key=lambda kept: kept[0])[-1][1]


def beam_search(candidates_of, prompt_ids: np.ndarray, images: int, vocab_size: int, decoding: Decoding,
                eos_id: int, pad_id: int) -> list[np.ndarray]:
  """Per image, the best token sequence (prompt included, end token left out) of transformers 4.19.2's beam search.

  candidates_of(token_ids (images * beams, max_length), length, beam_scores (images * beams,), block_eos) returns
  the 2 * beams best (scores, beam * vocab + token) per image, best first.
  """
  beams, max_length = decoding.num_beams, decoding.max_length
  tokens = np.full((images, beams, max_length), pad_id, np.int32)
  tokens[:, :, :len(prompt_ids)] = prompt_ids
  beam_scores = np.zeros((images, beams), np.float32)
  beam_scores[:, 1:] = -1e9  # the beams start equal: expand the first only
  finished = [_Hypotheses(beams, decoding.length_penalty) for _ in range(images)]
  done = np.zeros(images, bool)
  length = len(prompt_ids)
  while length < max_length and not done.all():
    scores, indices = (np.asarray(a) for a in candidates_of(
        jnp.asarray(tokens.reshape(-1, max_length)), length, jnp.asarray(beam_scores.reshape(-1)),
        length < decoding.min_length))
    next_tokens, next_scores = tokens.copy(), beam_scores.copy()
    for image in np.flatnonzero(~done):
      kept = 0
      for rank, (score, index) in enumerate(zip(scores[image], indices[image], strict=True)):
        beam, token = divmod(int(index), vocab_size)
        if token == eos_id:
          if rank < beams:  # an end among the lower half of the candidates is not a caption
            finished[image].add(tokens[image, beam, :length].copy(), float(score))
        else:
          next_tokens[image, kept, :length] = tokens[image, beam, :length]
          next_tokens[image, kept, length] = token
          next_scores[image, kept] = score
          kept += 1
        if kept == beams:
          break
      done[image] = finished[image].cannot_improve(float(scores[image, 0]), length)
    tokens, beam_scores = next_tokens, next_scores
    length += 1
  for image in np.flatnonzero(~done):
    for beam in range(beams):
      finished[image].add(tokens[image, beam, :length].copy(), float(beam_scores[image, beam]))
  return [hypotheses.best() for hypotheses in finished]


@nnx.jit
def _text_embeddings(encoder: EgoVlpTextEncoder, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  return encoder(token_ids, attention_mask)


class BlipScorer:
  """`score(frames, prompt)`: the mean over frames of the EgoVLP-text cosine similarity between the frame's BLIP
  caption and the prompt (the action description). Frames go through BLIP in batches of `batch_size`."""

  def __init__(self, captioner: BlipForConditionalGeneration, captioner_tokenizer, text_encoder: EgoVlpTextEncoder,
               text_tokenizer, batch_size: int = 32, decoding: Decoding = LEGO_DECODING):
    self.captioner, self.captioner_tokenizer = captioner, captioner_tokenizer
    self.text_encoder, self.text_tokenizer = text_encoder, text_tokenizer
    self.batch_size, self.decoding = batch_size, decoding

  @classmethod
  def from_directory(cls, directory: str | os.PathLike, batch_size: int = 32) -> "BlipScorer":
    """`directory` holds captioner/ and text_encoder/ (see the module docstring); a remote one is read from a local
    temporary copy (transformers' tokenizers read local files only)."""
    if not fileio.is_local(directory):
      with fileio.local_copy(directory) as local:
        return cls.from_directory(local, batch_size)
    directory = pathlib.Path(directory)
    captioner_dir, text_dir = directory / "captioner", directory / "text_encoder"
    if not (captioner_dir.is_dir() and text_dir.is_dir()):
      raise FileNotFoundError(f"config.evaluate.blip={str(directory)!r}: expected the folders captioner/ (a "
                              "transformers BlipForConditionalGeneration and its processor) and text_encoder/ "
                              "(distilbert-base-uncased files and an EgoVLP checkpoint); see handi_jax.evaluation.blip")
    return cls(convert_blip.load_pretrained(captioner_dir), AutoTokenizer.from_pretrained(str(captioner_dir)),
               convert_egovlp_text.load_pretrained(text_dir), AutoTokenizer.from_pretrained(str(text_dir)), batch_size)

  def captions(self, frames: np.ndarray) -> list[str]:
    """LEGO's caption of each uint8 frame (N, H, W, 3)."""
    text = self.captioner.config.text
    prompt_ids = np.asarray(self.captioner_tokenizer(self.decoding.prompt)["input_ids"], np.int32)
    # As BLIP's generate: the decoder's start token in place of [CLS], the closing [SEP] dropped.
    prompt_ids = np.concatenate([[text.bos_token_id], prompt_ids[1:-1]]).astype(np.int32)
    pixels = preprocess(frames, int(self.captioner.config.vision.image_size))
    sequences = []
    for start in range(0, len(pixels), self.batch_size):
      chunk = pixels[start:start + self.batch_size]
      padded = np.concatenate([chunk, np.zeros((self.batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
      candidates_of = functools.partial(_beam_candidates, self.captioner, _image_states(self.captioner, padded),
                                        eos_id=int(text.sep_token_id), candidates=2 * self.decoding.num_beams)
      best = beam_search(candidates_of, prompt_ids, self.batch_size, int(text.vocab_size), self.decoding,
                         int(text.sep_token_id), int(text.pad_token_id))
      sequences += best[:len(chunk)]
    decoded = self.captioner_tokenizer.batch_decode(sequences, skip_special_tokens=True)
    return [caption[len(self.decoding.prompt):] for caption in decoded]

  def text_embeddings(self, texts: list[str]) -> np.ndarray:
    """EgoVLP text embeddings (len(texts), 256), each text tokenised alone (padding is masked out)."""
    limit = int(self.text_encoder.config.text_model.max_position_embeddings)
    ids = self.text_tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
    length = min(limit, -(-max(map(len, ids)) // _TEXT_BUCKET) * _TEXT_BUCKET)
    rows = -(-len(ids) // self.batch_size) * self.batch_size
    token_ids, mask = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
    for row, sequence in enumerate(ids):
      token_ids[row, :len(sequence)], mask[row, :len(sequence)] = sequence, 1
    embeddings = []
    for start in range(0, rows, self.batch_size):
      batch = slice(start, start + self.batch_size)
      embeddings.append(np.asarray(_text_embeddings(self.text_encoder, token_ids[batch], mask[batch])))
    return np.concatenate(embeddings)[:len(ids)]

  def score(self, frames: np.ndarray, prompt: str) -> float:
    """uint8 frames (N, H, W, 3) of one clip and its action description -> the clip's BLIP score."""
    if len(frames) == 0:
      raise ValueError("BLIP score: the clip has no generated frames to caption")
    embeddings = self.text_embeddings([prompt] + self.captions(frames))
    # Norms floored at 1e-8, as torch's cosine_similarity.
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-8)
    return float(np.mean(unit[1:] @ unit[0]))
