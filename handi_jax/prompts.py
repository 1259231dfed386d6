"""What to generate: the samples a config asks for, read from a prompts file in the release's format or given as
one image + prompt; finding their images and masks; the marker that says a sample is done.

Generation, evaluation and the app share these, so they read prompts files and find inputs the same way.
"""

import codecs
import dataclasses
import json
import pathlib

from handi_jax import fileio

DONE_FILE = {"generate": "done.json", "predict_masks": "mask_done.json"}


@dataclasses.dataclass(frozen=True)
class Sample:
  index: int                       # position in the input list: seeds the sample's random key
  name: str                        # output folder name (the image stem)
  image: fileio.Path                # local or remote (handi_jax.fileio)
  prompt: str
  mask: fileio.Path | None          # a user mask skips stage 1


def find_mask(mask_dir: str, stem: str, field: str) -> fileio.Path:
  """The mask of image `stem` in `mask_dir` (config field `field`): <stem>_mask.png or <stem>.png."""
  candidates = [fileio.as_path(mask_dir) / f"{stem}_mask.png", fileio.as_path(mask_dir) / f"{stem}.png"]
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(f"no mask for {stem!r} in {field}={mask_dir!r}: expected {stem}.png or {stem}_mask.png "
                          "(or leave it empty)")


def prompt_rows(path: fileio.Path, keys: tuple[str, ...], field: str) -> list[tuple[str, dict]]:
  """(where, row) for each line of a prompts file in the release's format (one JSON object per line, with
  `keys`, each a string); `field` is the config field that names the file. The file must be UTF-8 (a byte-order
  mark is allowed): another encoding is an error naming the line, as guessing it could garble the prompts."""
  if not path.is_file():
    raise FileNotFoundError(f"{field} {path} does not exist")
  rows = []
  # Split the bytes on newlines only: str.splitlines would also split inside a JSON string holding U+2028.
  for number, raw in enumerate(path.read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n"), start=1):
    where = f"{path} line {number}"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
                       f"save {field} as UTF-8") from e
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where} is not JSON ({e}); expected one {{{', '.join(keys)}}} object per line") from e
    if not isinstance(row, dict) or not set(keys) <= set(row):
      raise ValueError(f"{where}: expected keys {', '.join(map(repr, keys))}, found {row!r}")
    not_text = [key for key in keys if not isinstance(row[key], str)]
    if not_text:
      raise ValueError(f"{where}: {', '.join(map(repr, not_text))} must be a string, found {row!r}")
    rows.append((where, row))
  return rows


def find_input(root: str, relative: str, what: str, field: str) -> fileio.Path:
  """`root/relative`, else `root/<its file name>` (the release's prompt.json names files in sub-folders); `what`
  says where the name came from, `field` is the config field that sets `root`."""
  candidates = [fileio.as_path(root) / relative, fileio.as_path(root) / pathlib.PurePosixPath(relative).name]
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(f"{what} {relative!r} not found; looked for {' and '.join(map(str, candidates))} "
                          f"(set {field})")


def samples_from_config(config) -> list[Sample]:
  """The samples config.generate asks for: a prompts file (JSON lines) or one image + prompt."""
  g = config.generate
  if g.prompts_file:
    samples = []
    for where, row in prompt_rows(fileio.as_path(g.prompts_file), ("source", "prompt"), "config.generate.prompts_file"):
      image = find_input(g.image_dir, row["source"], f"{where}: image", "config.generate.image_dir")
      mask = find_mask(g.mask_dir, image.stem, "config.generate.mask_dir") if g.mask_dir else None
      samples.append(Sample(len(samples), image.stem, image, row["prompt"], mask))
  elif g.image:
    image = fileio.as_path(g.image)
    samples = [Sample(0, image.stem, image, g.prompt, fileio.as_path(g.mask) if g.mask else None)]
  else:
    raise ValueError("nothing to generate: set config.generate.image and config.generate.prompt, or "
                     "config.generate.prompts_file (JSON lines with 'source' and 'prompt')")
  for sample in samples:
    if not sample.prompt or not sample.prompt.strip():
      raise ValueError(f"sample {sample.name!r} ({sample.image}) has an empty prompt; give the action text "
                       "(config.generate.prompt or the 'prompt' field of the prompts file)")
  names = [s.name for s in samples]
  if len(set(names)) != len(names):
    raise ValueError(f"two samples share an output folder name: {sorted({n for n in names if names.count(n) > 1})}; "
                     "give the images distinct file names")
  return samples
