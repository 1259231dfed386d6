"""The BLIP score: the JAX BLIP captioner and EgoVLP text tower against transformers on tiny random models, the
beam search against transformers' generate and against transformers 4.19.2's length rule, the score end to end,
and the errors for directories that are not what the score needs."""

import pathlib
import sys
import types

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from handi_jax.convert import blip as convert_blip
from handi_jax.convert import core
from handi_jax.convert import egovlp_text as convert_egovlp_text
from handi_jax.evaluation import blip
from handi_jax.models.blip import BlipForConditionalGeneration
from handi_jax.models.egovlp_text import EgoVlpTextEncoder

TOLERANCE = 1e-5
# Of the reference's largest magnitude, for outputs of O(10) (the logits): float32 round-off, a few units in the last
# place, which XLA:CPU's code generation moves with its optimisation level (tests/conftest.py compiles at level 1).
RELATIVE_TOLERANCE = 4e-6
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "man", "woman", "cuts", "onion", "with",
         "knife", "the", "hand", "pick", "up", "egg", "bowl", "pan", "[DEC]"]
PAD, SEP, DEC = WORDS.index("[PAD]"), WORDS.index("[SEP]"), WORDS.index("[DEC]")
IMAGE_SIZE = 32
PROJECTION = 16


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Every parameter random and O(1) (norm scales near 1), so the logits are peaked: the beams never meet near-ties
  that float32 round-off could order differently."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      norm_scale = name.endswith("weight") and param.ndim == 1
      param.copy_(1.0 + 0.1 * noise if norm_scale else 0.5 * noise)


def _write_captioner(directory: pathlib.Path, seed: int = 0, end_bias: float = 0.0):
  """A tiny BlipForConditionalGeneration with its processor; `end_bias` is added to the [SEP] logit."""
  directory.mkdir(parents=True)
  vocab = directory.parent / "vocab.txt"
  vocab.write_text("\n".join(WORDS) + "\n")
  config = transformers.BlipConfig(
      vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         image_size=IMAGE_SIZE, patch_size=8),
      text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=32, bos_token_id=DEC, sep_token_id=SEP,
                       pad_token_id=PAD))
  model = transformers.BlipForConditionalGeneration(config).eval()
  _randomize(model, seed)
  with torch.no_grad():
    model.text_decoder.cls.predictions.bias[SEP] += end_bias
  model.save_pretrained(directory)
  tokenizer = transformers.BertTokenizerFast(vocab=str(vocab), bos_token="[DEC]")
  image_processor = transformers.BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
  transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
  return model, tokenizer


class _TrainerConfig:
  """Stands for EgoVLP's ConfigParser, pickled beside the weights and not importable where the score runs."""

  def __init__(self):
    self.save_dir = pathlib.PosixPath("/runs/egovlp")
    self.settings = {"arch": "FrozenInTime"}


def _write_text_encoder(directory: pathlib.Path, seed: int = 1):
  """distilbert files and an EgoVLP-style checkpoint (module. prefix, video tower, pickled trainer config)."""
  directory.mkdir(parents=True)
  config = transformers.DistilBertConfig(vocab_size=len(WORDS), dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                         max_position_embeddings=64)
  text_model = transformers.DistilBertModel(config).eval()
  projection = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(32, PROJECTION))
  _randomize(text_model, seed)
  _randomize(projection, seed + 1)
  config.save_pretrained(directory)
  (directory / "vocab.txt").write_text("\n".join(WORDS) + "\n")
  transformers.DistilBertTokenizerFast(vocab=str(directory / "vocab.txt")).save_pretrained(directory)
  state = {f"module.text_model.{k}": v for k, v in text_model.state_dict().items()}
  state.update({f"module.txt_proj.{k}": v for k, v in projection.state_dict().items()})
  state["module.vid_proj.0.weight"] = torch.zeros(PROJECTION, 8)
  foreign = types.ModuleType("parse_config")
  foreign.ConfigParser = type("ConfigParser", (_TrainerConfig,), {"__module__": "parse_config"})
  sys.modules["parse_config"] = foreign
  try:
    torch.save({"arch": "FrozenInTime", "epoch": 3, "state_dict": state, "config": foreign.ConfigParser()},
               directory / "egovlp.pth")
  finally:
    del sys.modules["parse_config"]

  def embed(texts):
    tokens = transformers.DistilBertTokenizerFast.from_pretrained(str(directory))
    with torch.no_grad():
      return torch.cat([projection(text_model(**tokens(text, return_tensors="pt")).last_hidden_state[:, 0])
                        for text in texts]).numpy()

  return embed


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
  directory = tmp_path_factory.mktemp("blip") / "captioner"
  reference, tokenizer = _write_captioner(directory)
  return convert_blip.load_pretrained(directory), reference, tokenizer


def _frames(count: int, seed: int = 0, size=(48, 40)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, *size, 3), np.uint8)


def _pixels(frames: np.ndarray) -> np.ndarray:
  return blip.preprocess(frames, IMAGE_SIZE)


def _generate(reference, tokenizer, frames, length_penalty: float) -> list[list[int]]:
  """transformers' captions of `frames` with LEGO's settings, end and padding tokens dropped."""
  ids = torch.tensor([tokenizer("a picture of")["input_ids"]] * len(frames))
  pixels = torch.from_numpy(_pixels(frames)).permute(0, 3, 1, 2)
  with torch.no_grad():
    out = reference.generate(pixels, ids, num_beams=3, max_length=20, min_length=5, length_penalty=length_penalty)
  return [[t for t in row[:list(row).index(SEP)] if t != PAD] if SEP in row else [t for t in row if t != PAD]
          for row in out.tolist()]


def test_preprocess_matches_blips_image_processor():
  frames = _frames(2)
  processor = transformers.BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
  theirs = processor(list(frames), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(_pixels(frames), theirs, atol=1e-6)


def test_vision_features_and_next_token_logits_match_transformers(captioner):
  """The image tokens, then the decoder as captioning runs it: a padded max_length buffer, three beams per image
  sharing its cross-attention states, the logits read after each length."""
  model, reference, _ = captioner
  pixels = _pixels(_frames(2))
  ids = np.array([[DEC, 5, 6, 7, 8, 10, 11], [DEC, 5, 6, 7, 9, 16, 17]], np.int32)
  with torch.no_grad():
    theirs = reference(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), input_ids=torch.from_numpy(ids))
  image_embeds = np.asarray(nnx.jit(lambda m, x: m.vision_model(x))(model, pixels))
  vision_error = np.abs(image_embeds - theirs.image_embeds.numpy()).max() / np.abs(theirs.image_embeds.numpy()).max()
  buffer = np.full((2, 3, 20), PAD, np.int32)
  buffer[:, :, :ids.shape[1]] = ids[:, None]
  states = blip._image_states(model, pixels)
  decode = nnx.jit(lambda decoder, tokens, states, length: decoder(tokens, states, length))
  logits = np.stack([np.asarray(decode(model.text_decoder, buffer.reshape(6, 20), states, length))
                     for length in range(1, ids.shape[1] + 1)], axis=1).reshape(2, 3, ids.shape[1], -1)
  logits_error = np.abs(logits - theirs.logits.numpy()[:, None]).max() / np.abs(theirs.logits.numpy()).max()
  print(f"BLIP parity, of their largest value: image tokens max error {vision_error:.1e}, logits {logits_error:.1e}")
  assert vision_error < RELATIVE_TOLERANCE and logits_error < RELATIVE_TOLERANCE


def test_egovlp_text_embeddings_match_the_torch_tower(tmp_path):
  embed = _write_text_encoder(tmp_path / "text_encoder")
  encoder = convert_egovlp_text.load_pretrained(tmp_path / "text_encoder")
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "text_encoder"))
  scorer = blip.BlipScorer(None, None, encoder, tokenizer, batch_size=2)
  texts = ["a man cuts the onion with a knife", "pick up egg", "hand"]
  mine = scorer.text_embeddings(texts)  # padded to one length, three rows in batches of two
  error = np.abs(mine - embed(texts)).max()
  print(f"EgoVLP text parity: max error {error:.1e}")
  assert mine.shape == (3, PROJECTION) and error < TOLERANCE


def test_egovlp_text_tower_reads_from_safetensors_without_the_video_tower(tmp_path):
  _write_text_encoder(tmp_path / "text_encoder")
  tower = convert_egovlp_text.read_checkpoint(tmp_path / "text_encoder" / "egovlp.pth")
  assert all(k.startswith(("text_model.", "txt_proj.1.")) for k in tower)
  (tmp_path / "text_encoder" / "egovlp.pth").unlink()
  core.write_safetensors(tmp_path / "text_encoder" / "model.safetensors", tower)
  encoder = convert_egovlp_text.load_pretrained(tmp_path / "text_encoder")
  assert encoder.config.projection_dim == PROJECTION


@pytest.mark.parametrize("end_bias, length_penalty", [(-1e4, 1.0), (4.0, 0.0)])
def test_captions_match_transformers_generate(tmp_path, end_bias, length_penalty):
  """LEGO's beam search (3 beams, lengths 5..20) token for token. Without end tokens every caption runs to
  max_length and the length rule cannot matter; with them, length_penalty 0 makes transformers 4.19.2 and today's
  rule the same."""
  reference, tokenizer = _write_captioner(tmp_path / "captioner", seed=13, end_bias=end_bias)
  scorer = blip.BlipScorer(convert_blip.load_pretrained(tmp_path / "captioner"), tokenizer, None, None, batch_size=4,
                           decoding=blip.Decoding(length_penalty=length_penalty))
  frames = _frames(6, seed=3)
  expected = _generate(reference, tokenizer, frames, length_penalty)
  lengths = sorted({len(sequence) for sequence in expected})
  print(f"end bias {end_bias}: caption lengths {lengths}")
  captions = scorer.captions(frames)
  assert captions == [tokenizer.decode(sequence, skip_special_tokens=True)[len("a picture of"):]
                      for sequence in expected]
  if end_bias > 0:  # the case must exercise finished hypotheses of several lengths
    assert len(lengths) > 1


def test_beam_search_divides_by_the_whole_length_as_transformers_4_19():
  """A prompt of 4 tokens. Ending at once scores -2.0; two words then the end token score -4.0. transformers 4.19.2
  divides by the length with the prompt (-2/4 > -4/6): the empty caption wins. Today's transformers divides by the
  generated tokens with the end (-2/1 < -4/3) and would pick the longer one."""
  prompt, end, first, second = 5, 1, 2, 3
  log_probs = np.full((6, 6), -10.0, np.float32)
  log_probs[prompt, [end, first]] = -2.0, -0.5
  log_probs[first, [end, second]] = -5.0, -0.5
  log_probs[second, end] = -3.0

  def candidates_of(token_ids, length, beam_scores, block_eos):
    totals = (log_probs[np.asarray(token_ids)[:, length - 1]] + np.asarray(beam_scores)[:, None]).reshape(1, -1)
    order = np.argsort(-totals, axis=1, kind="stable")[:, :4]
    return np.take_along_axis(totals, order, axis=1), order

  decoding = blip.Decoding(num_beams=2, max_length=10, min_length=0)
  best = blip.beam_search(candidates_of, np.full(4, prompt, np.int32), 1, 6, decoding, eos_id=end, pad_id=0)
  assert best[0].tolist() == [prompt] * 4
  favour_longer = blip.Decoding(num_beams=2, max_length=10, min_length=0, length_penalty=2.0)
  longer = blip.beam_search(candidates_of, np.full(4, prompt, np.int32), 1, 6, favour_longer, eos_id=end, pad_id=0)
  assert longer[0].tolist() == [prompt] * 4 + [first, second]  # -2/16 < -4/36


def test_the_score_is_the_mean_egovlp_similarity_of_the_frame_captions(tmp_path):
  reference, tokenizer = _write_captioner(tmp_path / "blip" / "captioner", seed=13, end_bias=4.0)
  embed = _write_text_encoder(tmp_path / "blip" / "text_encoder")
  frames, prompt = _frames(4, seed=3), "the person picks up the egg with the hand"
  scorer = blip.BlipScorer.from_directory(tmp_path / "blip", batch_size=4)
  scorer.decoding = blip.Decoding(length_penalty=0.0)  # where transformers 5 and 4.19.2 agree (see above)
  captions = [tokenizer.decode(sequence, skip_special_tokens=True)[len("a picture of"):]
              for sequence in _generate(reference, tokenizer, frames, length_penalty=0.0)]
  embeddings = embed([prompt] + captions)
  cosines = embeddings[1:] @ embeddings[0] / np.linalg.norm(embeddings[1:], axis=1) / np.linalg.norm(embeddings[0])
  score = scorer.score(frames, prompt)
  print(f"captions {captions}: BLIP score {score:.6f}, reference {cosines.mean():.6f}")
  assert abs(score - cosines.mean()) < TOLERANCE


def test_directories_that_are_not_the_blip_score_s_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="captioner/"):
    blip.BlipScorer.from_directory(tmp_path)
  transformers.CLIPConfig().save_pretrained(tmp_path / "clip")
  with pytest.raises(ValueError, match="not a transformers BLIP config"):
    convert_blip.load_pretrained(tmp_path / "clip")
  retrieval = transformers.BlipConfig(architectures=["BlipForImageTextRetrieval"])
  retrieval.save_pretrained(tmp_path / "itm")
  with pytest.raises(ValueError, match="BlipForImageTextRetrieval checkpoint.*captions frames"):
    convert_blip.load_pretrained(tmp_path / "itm")
  with pytest.raises(ValueError, match="expected 'distilbert'"):
    convert_egovlp_text.load_pretrained(tmp_path / "clip")


def test_a_config_that_does_not_describe_the_weights_is_a_mismatch(tmp_path):
  _write_captioner(tmp_path / "captioner")
  config = core.read_config(tmp_path / "captioner")
  config["text_config"]["num_hidden_layers"] = 3
  core.write_model_dir(tmp_path / "edited", config, core.read_state_dict(tmp_path / "captioner"), "model.safetensors")
  with pytest.raises(core.CheckpointMismatchError, match="text_decoder.bert.encoder.layer.2"):
    convert_blip.load_pretrained(tmp_path / "edited")


def _shapes(module) -> dict:
  return {".".join(map(str, path)): tuple(v.value.shape) for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _meta_state(model: torch.nn.Module) -> dict:
  """The state dict's shapes as zero-stride arrays: full-size models without their memory."""
  return {k: np.broadcast_to(np.float32(0), v.shape) for k, v in model.state_dict().items()}


def test_full_size_blip_large_and_egovlp_text_parameters_map_one_to_one():
  """Salesforce/blip-image-captioning-large's architecture (ViT-L/16 at 384, BERT-base decoder) and EgoVLP's
  DistilBERT-base + 256-d projection: every transformers tensor lands on a JAX parameter of its shape."""
  blip_large = transformers.BlipConfig(
      vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
      text_config=dict(num_attention_heads=12))
  with torch.device("meta"):
    reference = transformers.BlipForConditionalGeneration(blip_large)
  config = convert_blip.config_from_transformers(blip_large.to_dict())
  ours = nnx.eval_shape(lambda: BlipForConditionalGeneration(config, rngs=nnx.Rngs(0)))
  params = {k: v.shape for k, v in convert_blip.flax_params(_meta_state(reference)).items()}
  assert params == _shapes(ours)
  print(f"BLIP-large captioner: {sum(np.prod(s) for s in params.values()) / 1e6:.1f} M parameters (the LM head's "
        "copy of the word embeddings included)")

  with torch.device("meta"):
    text_model = transformers.DistilBertModel(transformers.DistilBertConfig())
  state = {f"text_model.{k}": v for k, v in _meta_state(text_model).items()}
  state.update({"txt_proj.1.weight": np.zeros((256, 768), np.float32), "txt_proj.1.bias": np.zeros(256, np.float32)})
  text_config = convert_egovlp_text.config_from_transformers(transformers.DistilBertConfig().to_dict())
  encoder = nnx.eval_shape(lambda: EgoVlpTextEncoder(dict(text_model=text_config, projection_dim=256),
                                                     rngs=nnx.Rngs(0)))
  assert {k: v.shape for k, v in core.to_flax(state, convert_egovlp_text.RULES).items()} == _shapes(encoder)
