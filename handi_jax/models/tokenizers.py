"""A tiny deterministic CLIP tokenizer for runs without a pretrained model directory (demo, tests, offline).

It is a real transformers `CLIPTokenizer` (lower-casing, CLIP's pre-tokenisation, BOS/EOS, padding to 77)
over a byte-level vocabulary with no BPE merges: every word becomes its characters, the last one marked
`</w>`. 256 byte symbols x {inner, word-final} + <|startoftext|> + <|endoftext|> = 514 ids, all below any
CLIP vocab size, so it feeds a randomly initialised text encoder of the tiny config. Written into a
directory (a temporary one by default) and loaded from there, like a pretrained `tokenizer/` folder.
"""

import json
import pathlib
import tempfile

from transformers import CLIPTokenizer

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


def demo_tokenizer(directory: str | pathlib.Path | None = None) -> CLIPTokenizer:
  """The demo tokenizer, its files written to `directory` (default: a new temporary directory)."""
  directory = write_demo_tokenizer_files(directory or tempfile.mkdtemp(prefix="handi_jax_tokenizer_"))
  # transformers 5 takes `vocab=` / `merges=` paths (the v4 `vocab_file=` keywords are silently ignored).
  return CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"))
