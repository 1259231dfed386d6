"""CLIP tokenizers: a pipeline's `tokenizer/` folder, prompts -> ids, and the demo tokenizer.

The demo tokenizer, for runs without a pretrained model directory (demo, tests, offline), is a real
transformers `CLIPTokenizer` (lower-casing, CLIP's pre-tokenisation, BOS/EOS, padding to 77) over a
byte-level vocabulary with no BPE merges: every word becomes its characters, the last one marked `</w>`.
256 byte symbols x {inner, word-final} + <|startoftext|> + <|endoftext|> = 514 ids, all below any CLIP vocab
size, so it feeds a randomly initialised text encoder of the tiny config. Written into a directory (a
temporary one by default) and loaded from there, like a pretrained `tokenizer/` folder.
"""

import json
import os
import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np
from absl import logging
from transformers import CLIPTokenizer

from handi_jax import fileio

# CLIP's context length (the text encoder has this many position embeddings).
CONTEXT_LENGTH = 77

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
  """GPT-2/CLIP byte-level alphabet: printable Latin-1 bytes stand for themselves, the rest move to 256+."""
  printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
  symbols, shifted = [], 0
  for byte in range(256):
    if byte in printable:
      symbols.append(chr(byte))
    else:
      symbols.append(chr(256 + shifted))
      shifted += 1
  return symbols


def write_demo_tokenizer_files(directory: str | pathlib.Path) -> pathlib.Path:
  """vocab.json and merges.txt of the demo tokenizer in `directory`."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  symbols = _byte_symbols()
  vocab = {s: i for i, s in enumerate(symbols)}
  vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
  vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
  (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
  (directory / "merges.txt").write_text("#version: 0.2\n")
  return directory


def demo_tokenizer(directory: str | os.PathLike | None = None) -> CLIPTokenizer:
  """The demo tokenizer, its files written to `directory` (default, or when `directory` is remote: a new local
  temporary directory, as transformers reads local files only)."""
  local = directory if directory and fileio.is_local(directory) else None
  directory = write_demo_tokenizer_files(local or tempfile.mkdtemp(prefix="handi_jax_tokenizer_"))
  # transformers 5 takes `vocab=` / `merges=` paths (the v4 `vocab_file=` keywords are silently ignored).
  return CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"))


def load_tokenizer(directory: str | os.PathLike):
  """transformers' CLIPTokenizer from a pipeline's `tokenizer/` folder (vocab.json + merges.txt or tokenizer.json)."""
  directory = fileio.as_path(directory)
  if not ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
          or (directory / "tokenizer.json").is_file()):
    raise FileNotFoundError(f"tokenizer directory {directory} has no vocab.json + merges.txt (or tokenizer.json): "
                            "expected the tokenizer/ folder of a diffusers pipeline")
  # from_pretrained reads the folder's tokenizer_config.json too (lower-casing, pad token); transformers 5
  # silently ignores the v4 `vocab_file=` / `merges_file=` constructor keywords.
  with fileio.local_copy(directory) as local:  # transformers reads local files only
    return CLIPTokenizer.from_pretrained(str(local))


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """Token ids (B, max_length) int32: BOS, the prompt, EOS, then padding. A longer prompt is truncated (EOS
  kept), with a warning that says how many of its tokens the text encoder never sees."""
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  # Full lengths (BOS and EOS included); verbose=False: transformers' own over-length warning would say the model
  # fails on them, which is not so here.
  lengths = [len(ids) for ids in tokenizer(prompts, verbose=False)["input_ids"]]
  for prompt, length in zip(prompts, lengths, strict=True):
    if length > max_length:
      logging.warning("the prompt %r is %d tokens with BOS and EOS, CLIP reads %d: its last %d tokens are dropped",
                      _shortened(prompt), length, max_length, length - max_length)
  ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                  return_tensors="np")["input_ids"]
  return np.asarray(ids, np.int32)


def _shortened(text: str, limit: int = 60) -> str:
  return text if len(text) <= limit else text[:limit] + "..."
