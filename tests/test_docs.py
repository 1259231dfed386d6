"""The docs agree with the code. README.md, data_prep/README.md and the configs' docstrings state numbers that come
from the configs: each is read from its sentence and compared with the field it comes from, so a default changed
without its docs fails here, naming the doc line and the field. Every `config.<field>` the docs name exists, and every
`python -m` command in them uses flags its module defines, config fields that exist and variants that exist.

Nothing here builds a model: configs, text, and the commands' flags read from their source (flags are defined when a
command runs, not at import: handi_jax.command_line).
"""

import ast
import functools
import math
import re
import shlex

import pytest

import configs
from configs import stage1 as stage1_config
from tests.conftest import REPO_ROOT

README, DATA_PREP_README, CONFIGS = "README.md", "data_prep/README.md", "configs/common.py"
NUMBER = r"\d[\d,_]*(?:\.\d+)?(?:e-?\d+)?"


@functools.cache
def _config(spec: str = "stage2.py"):
  """configs/<spec> as `--config=configs/<spec>` loads it; stage1.py is the stage-1 config --mode=demo trains."""
  return configs.load(str(REPO_ROOT / "configs" / spec))


def _text(doc: str) -> str:
  return (REPO_ROOT / doc).read_text(encoding="utf-8")


def _regex(template: str) -> str:
  """A phrase as the docs write it -> a regex: {name} is a number, ... any text within the paragraph (or table
  row), a space any whitespace (the docs wrap lines anywhere, comments too)."""
  pieces = []
  for piece in re.split(r"(\{\w+\}|\.\.\.| )", template):
    if piece == " ":
      pieces.append(r"\s+(?:#\s+)?")
    elif piece == "...":
      pieces.append(r"(?:(?!\n\s*\n|\n\|).)*?")  # not past the paragraph or the table row
    elif name := re.fullmatch(r"\{(\w+)\}", piece):
      pieces.append(rf"(?P<{name[1]}>{NUMBER})")
    else:
      pieces.append(re.escape(piece))
  return "".join(pieces)


def _agrees(doc: str, template: str, spec: str = "stage2.py", **fields) -> None:
  """Every place `doc` reads `template` (at least one) states each {name} as the config gives it: a field path of
  configs/<spec> (e.g. "data.num_frames"), or (what it is, value) for a number derived from fields."""
  text = _text(doc)
  matches = list(re.finditer(_regex(template), text, re.S))
  assert matches, f"{doc}: nothing reads '{template}' any more: put the number back or update tests/test_docs.py"
  for match in matches:
    where = f"{doc}:{text.count(chr(10), 0, match.start()) + 1}"
    for name, field in fields.items():
      what, value = field if isinstance(field, tuple) else (f"config.{field}", _field(_config(spec), field))
      stated = float(match[name].replace(",", "").replace("_", ""))
      assert math.isclose(stated, value), (
          f"{where} says {match[name]} in '{' '.join(match[0].split())}', but {what} is {value} "
          f"(--config=configs/{spec}): make the docs say what the config does")


def _batch(config) -> tuple[str, int]:
  """The global batch of a hardware variant: per-device batch x the devices of the batch axes."""
  return "per_device_batch_size x data x fsdp", config.train.per_device_batch_size * config.mesh.data * config.mesh.fsdp


def _field(config, path: str):
  for key in path.split("."):
    config = config[key]
  return config


def test_readme_demo_section_states_the_demo_config():
  demo, stage1 = _config(), _config("stage1.py")
  vae_block = 2 ** (len(demo.model.vae.block_out_channels) - 1)  # the block-mean VAE: x2 per level
  _agrees(README, "(config variant `demo`: ... {height} x {width} px, {frames} frames)",
          height="data.height", width="data.width", frames="data.num_frames")
  _agrees(README, "demo dataset ({clips} clips:", clips="data.demo.num_clips")
  _agrees(README, "trains stage 2 for {steps} steps (batch {batch})", steps="train.num_steps",
          batch="train.global_batch_size")
  _agrees(README, "lets a tiny model learn in {steps} steps", steps="train.num_steps")
  _agrees(README, "trains stage 1 for {steps} steps (batch {batch}, lr {lr})", "stage1.py", steps="train.num_steps",
          batch="train.global_batch_size", lr="train.learning_rate")
  _agrees(README, "soft mIoU loss (weight {alpha}) on {frames} decoded mask frames a clip", "stage1.py",
          alpha="loss.alpha_miou", frames="loss.miou_frames")
  _agrees(README, "the mask is stage 1's: after {steps} steps", "stage1.py", steps="train.num_steps")
  _agrees(README, "mean colour of an {side} x {side2} pixel block", side=("the block-mean VAE's block", vae_block),
          side2=("the block-mean VAE's block", vae_block))
  last = ("config.data.num_frames - 1", demo.data.num_frames - 1)
  _agrees(README, "inside the clip's true mask, frames 1-{last}", last=last)
  _agrees(README, "compiling the train step {compile} s, {steps} steps {seconds} s", steps="train.num_steps")
  _agrees(README, "(mostly the {steps} steps)", steps="train.num_steps")
  # configs/stage1.py's defaults are what --mode=demo trains stage 1 with (it derives them from the stage-2 config)
  demo_stage1 = stage1_config.as_stage1(demo.copy_and_resolve_references())
  assert (demo_stage1.train.to_dict(), demo_stage1.loss.to_dict()) == (stage1.train.to_dict(), stage1.loss.to_dict())


def test_readme_variants_table_states_the_variants():
  _agrees(README, "| `demo` (default) | ... learn in {steps} CPU steps ({frames} frames,", steps="train.num_steps",
          frames="data.num_frames")
  _agrees(README, "| `demo` (default) | ... lr {lr}, guidance {guidance};", lr="train.learning_rate",
          guidance="sampling.guidance_scale")
  _agrees(README, "| `demo` (default) | ... stage 1: {steps} steps at lr {lr}, mIoU weight {alpha})", "stage1.py",
          steps="train.num_steps", lr="train.learning_rate", alpha="loss.alpha_miou")
  _agrees(README, "| `paper` | ... ({frames} frames, lr {lr}, batch {batch}, alpha = eta = {alpha} with the pixel "
          "losses on {pixel_frames} random generated frames a clip, {steps} DPM++ steps, guidance {guidance})",
          "stage2.py:paper", frames="data.num_frames", lr="train.learning_rate", batch="train.global_batch_size",
          alpha="loss.alpha_miou", pixel_frames="loss.miou_frames", steps="sampling.num_inference_steps",
          guidance="sampling.guidance_scale")
  paper = _config("stage2.py:paper")
  assert (paper.loss.eta_hand, paper.loss.hand_frames) == (paper.loss.alpha_miou, paper.loss.miou_frames), (
      "README's paper row says alpha = eta and one pixel-frame count for both losses")
  h100 = _config("stage2.py:paper,h100x8")
  _agrees(README, "| `h100x8` | one host, {gpus} H100: mesh (data {data}, fsdp {fsdp}, tensor {tensor}), "
          "{per_device} clips a GPU ({batch})", "stage2.py:paper,h100x8", gpus="num_devices_expected",
          data="mesh.data", fsdp="mesh.fsdp", tensor="mesh.tensor", per_device="train.per_device_batch_size",
          batch=_batch(h100))
  pod = _config("stage2.py:paper,tpu_v5p_64")
  _agrees(README, "| `tpu_v5p_64` | a v5p-64 slice ({chips} chips, ... mesh (data {data}, fsdp {fsdp}), "
          "{per_device} clips a chip ({batch}: {paper_batch} does not split over {chips2})",
          "stage2.py:paper,tpu_v5p_64", chips="num_devices_expected", chips2="num_devices_expected",
          data="mesh.data", fsdp="mesh.fsdp", per_device="train.per_device_batch_size",
          batch=_batch(pod),
          paper_batch=("the paper variant's train.global_batch_size", paper.train.global_batch_size))


def test_readme_generation_and_evaluation_defaults():
  side = ("the side of config.sampling.fallback_area's square", math.isqrt(_config().sampling.fallback_area))
  _agrees(README, "`config.sampling.fallback_area` ({side} x {side2} px", side=side, side2=side)
  _agrees(README, "`--config.sampling.target_area={area}` samples as the release does", area="sampling.fallback_area")
  _agrees(README, "motion-intensive subset (top {percent}% mask area)",
          percent=("100 x config.evaluate.motion_intensive_fraction",
                   100 * _config().evaluate.motion_intensive_fraction))
  _agrees(README, "`profile_num_steps` (default {steps})", steps="train.profile_num_steps")
  port = ("python -m handi_jax.app's --port default", _option_defaults("handi_jax.app")["port"])
  _agrees(README, "http://127.0.0.1:{port}", port=port)
  _agrees("handi_jax/app.py", "[--port={port}]", port=port)
  _agrees("handi_jax/evaluate.py", "egovlp_frames: {frames} with egovlp.pth", frames="evaluate.egovlp_frames")


def _constant(path: str, name: str):
  """The value of a module-level `NAME = literal` in `path`, read from the source."""
  for node in ast.parse(_text(path)).body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name:
      return ast.literal_eval(node.value)
  raise AssertionError(f"{path} has no {name}")


def test_docs_state_the_code_constants():
  far = _constant("handi_jax/pipeline.py", "FAR_FROM_TRAINING")
  assert re.search(_regex("A size over twice (or under half) the training area gets a warning"), _text(README)), (
      "README.md: the sentence on the size warning ('over twice (or under half)') is gone")
  assert far == 2, f"README.md says a size over twice the training area gets a warning; FAR_FROM_TRAINING is {far}"
  metrics = "handi_jax/evaluation/metrics.py"
  frames = (f"{metrics}'s FID_MINIMUM_FRAMES", _constant(metrics, "FID_MINIMUM_FRAMES"))
  clips = (f"{metrics}'s FVD_MINIMUM_CLIPS", _constant(metrics, "FVD_MINIMUM_CLIPS"))
  _agrees(README, "A FID from fewer than {frames} frames", frames=frames)
  _agrees(README, "a FVD from fewer than {clips} clips", clips=clips)
  _agrees("handi_jax/evaluate.py", "A value from fewer than {frames} frames (FID", frames=frames)
  _agrees("handi_jax/evaluate.py", "or {clips} clips (FVD", clips=clips)


def _pins() -> dict[str, str]:
  """package -> version pinned in requirements.txt and requirements-dev.txt."""
  lines = (_text("requirements.txt") + _text("requirements-dev.txt")).splitlines()
  return dict(re.match(r"([\w.-]+)==(\S+)", line).groups() for line in lines if "==" in line)


def test_docs_state_the_pinned_versions():
  pins, checked = _pins(), 0
  for doc in (README, DATA_PREP_README):
    text = _text(doc)
    # **mediapipe 0.10.21**, **jax/jaxlib at 0.7.1**, **pillow is 12.3.0**: statements of the pins themselves;
    # "jax[cuda12]==0.7.1" in install commands; the dev pins the prose names with their versions.
    stated = re.findall(r"\*\*([\w/.-]+) (?:at |is )?(\d[\w.]*)\*\*", text)
    stated += re.findall(r"([\w.-]+)(?:\[\w+\])?==(\d[\w.]*)", text)
    stated += re.findall(r"\b(torch|diffusers|selenium|tensorflow-datasets) (\d+\.\d+\.\d+)", text)
    for names, version in stated:
      for package in names.split("/"):
        assert package in pins, f"{doc} states {package} {version}, which the requirements files do not pin"
        assert pins[package] == version, f"{doc} says {package} {version}; the requirements pin {pins[package]}"
        checked += 1
  assert checked >= 15


def test_data_prep_readme_states_the_data_config():
  _agrees(DATA_PREP_README, "`config.data.num_frames` evenly sampled frames per clip ({frames} in the default "
          "`demo` variant", frames="data.num_frames")
  _agrees(DATA_PREP_README, "`demo` variant, {frames} with `:paper`;", "stage2.py:paper", frames="data.num_frames")
  _agrees(DATA_PREP_README, "(top {percent} % mask area)",
          percent=("100 x config.data.build.motion_intensive_fraction",
                   100 * _config().data.build.motion_intensive_fraction))
  _agrees(DATA_PREP_README, "default {clips} clips of {frames} x {height} x {width}", clips="data.demo.num_clips",
          frames="data.num_frames", height="data.height", width="data.width")


def test_config_docstrings_and_comments_state_their_own_numbers():
  demo, paper, h100, pod = (_config(spec) for spec in ("stage2.py", "stage2.py:paper", "stage2.py:paper,h100x8",
                                                       "stage2.py:paper,tpu_v5p_64"))
  _agrees(CONFIGS, "With the block-mean VAE, {steps} steps fit", steps="train.num_steps")
  _agrees(CONFIGS, "{frames} frames of {clips} clips, a high learning rate", frames="data.num_frames",
          clips="data.demo.num_clips")
  _agrees(CONFIGS, "its step also decodes {frames} frames for the soft mIoU loss", "stage1.py",
          frames="loss.miou_frames")
  _agrees(CONFIGS, "a stage-2 step, so {steps} steps", "stage1.py", steps="train.num_steps")
  _agrees(CONFIGS, "# {frames} of the {generated} generated frames", "stage2.py:paper", frames="loss.miou_frames",
          generated=("config.data.num_frames - 1", paper.data.num_frames - 1))
  _agrees(CONFIGS, "# {batch} clips on {gpus} GPUs", "stage2.py:paper,h100x8", gpus="num_devices_expected",
          batch=_batch(h100))
  _agrees(CONFIGS, "# {batch} clips: the paper's {paper_batch} does not split over {chips} chips",
          "stage2.py:paper,tpu_v5p_64", chips="num_devices_expected",
          batch=_batch(pod),
          paper_batch=("the paper variant's train.global_batch_size", paper.train.global_batch_size))
  _agrees(CONFIGS, "clip: {frames} for egovlp.pth", frames="evaluate.egovlp_frames")
  _agrees(CONFIGS, "the demo's {h} x {w} latents", h=("config.data.height / 8", demo.data.height / 8),
          w=("config.data.width / 8", demo.data.width / 8))
  _agrees(CONFIGS, "The demo scores {frames} frames without remat", frames="loss.miou_frames")
  assert demo.loss.hand_frames == demo.loss.miou_frames and not demo.loss.remat_decoder
  _agrees(CONFIGS, "One host with {gpus} H100: FSDP over the {fsdp} GPUs", "stage2.py:paper,h100x8",
          gpus="num_devices_expected", fsdp="mesh.fsdp")
  _agrees(CONFIGS, "A v5p-64 slice: {chips} chips", "stage2.py:paper,tpu_v5p_64", chips="num_devices_expected")


# Where `python -m` commands and config fields are written down: the two READMEs and the commands' docstrings.
COMMAND_MODULES = ("handi_jax.main", "handi_jax.generate", "handi_jax.evaluate", "handi_jax.app", "handi_jax.demo",
                   "handi_jax.export", "handi_jax.convert.cli", "data_prep.build")


def _docs() -> dict[str, str]:
  docs = {doc: _text(doc) for doc in (README, DATA_PREP_README)}
  for module in COMMAND_MODULES:
    path = _module_files(module)[0]
    docs[path] = ast.get_docstring(ast.parse(_text(path)))
  return docs


def _module_files(module: str) -> list[str]:
  """The source files that define `python -m module`'s flags: the module, or a package's __main__.py and the
  modules of the package it imports."""
  path = module.replace(".", "/")
  if not (REPO_ROOT / path).is_dir():
    return [path + ".py"]
  main = f"{path}/__main__.py"
  imported = [node.module for node in ast.walk(ast.parse(_text(main)))
              if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(module + ".")]
  return [main, *(name.replace(".", "/") + ".py" for name in imported)]


def _calls(module: str):
  for path in _module_files(module):
    for node in ast.walk(ast.parse(_text(path))):
      if isinstance(node, ast.Call):
        yield getattr(node.func, "attr", getattr(node.func, "id", "")), node


def _option_defaults(module: str) -> dict:
  """--name -> default of each command_line.Option the module defines."""
  return {node.args[0].value: ast.literal_eval(node.args[1]) for name, node in _calls(module) if name == "Option"}


def _flags(module: str) -> tuple[set[str], set[str]]:
  """The flags `python -m module` defines (command_line.run's --config, --workdir, --traceback, shortcuts and
  options, or argparse's) and its argparse subcommands, from its source."""
  flags, subcommands = {"help", "helpfull"}, set()
  for name, node in _calls(module):
    if name == "run" and getattr(getattr(node.func, "value", None), "id", "") == "command_line":
      flags |= {"config", "workdir", "traceback", *ast.literal_eval(node.args[1])}
    elif name == "Option":
      flags.add(node.args[0].value)
    elif name == "add_argument" and node.args[0].value.startswith("--"):
      flags.add(node.args[0].value[2:])
    elif name == "add_parser":
      subcommands.add(node.args[0].value)
  return flags, subcommands


def _modes() -> set[str]:
  """The keys of handi_jax.main.MODES, the values --mode takes."""
  for node in ast.walk(ast.parse(_text("handi_jax/main.py"))):
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MODES":
      return {key.value for key in node.value.keys}
  raise AssertionError("handi_jax/main.py has no MODES")


def _commands(text: str):
  """(line, module, arguments, command) of each `python -m handi_jax...` / `data_prep...` command in `text`, with
  its continuation lines, up to a comment, a backtick or the line's end."""
  for match in re.finditer(r"python -m ((?:handi_jax|data_prep)[\w.]*)((?:[^\n`#\\]|\\\n)*)", text):
    arguments = [argument.strip("[]") for argument in shlex.split(match[2].replace("\\\n", " "))]  # [--flag]: optional
    line = text.count("\n", 0, match.start()) + 1
    yield line, match[1], arguments, " ".join(match[0].replace("\\\n", " ").split())


def _check_command(where: str, module: str, arguments: list[str], command: str) -> None:
  flags, subcommands = _flags(module)
  positional = [a for a in arguments if not a.startswith("-")]
  if subcommands and "--help" not in arguments:
    named = set(re.split(r"[|,]", positional[0].strip("{}"))) if positional else set()  # import|inspect: either
    assert named and named <= subcommands, (
        f"{where}: `{command}` names no subcommand of {module} ({', '.join(sorted(subcommands))})")
  spec = "stage2.py"
  for argument in arguments:
    if argument.startswith("--config="):
      spec = argument.removeprefix("--config=").removeprefix("configs/")
      assert (REPO_ROOT / "configs" / spec.partition(":")[0]).is_file(), f"{where}: `{command}`: no such config file"
      try:
        _config(spec)
      except ValueError as error:  # an unknown variant, named with the valid ones
        raise AssertionError(f"{where}: `{command}`: {error}") from None
  for argument in arguments:
    name, _, value = argument.removeprefix("--").partition("=")
    if not argument.startswith("--") or name == "config":
      continue
    if name.startswith("config."):
      _assert_field(_config(spec), name.removeprefix("config."), f"{where}: `{command}`")
    else:
      assert name in flags, (f"{where}: `{command}`: {module} defines no --{name} "
                             f"(its flags: {', '.join(sorted(flags))})")
    if module == "handi_jax.main" and name == "mode" and not value.isupper():  # --mode=MODE: a placeholder
      assert value in _modes(), f"{where}: `{command}`: --mode={value} is not one of {sorted(_modes())}"


def _assert_field(config, path: str, where: str) -> None:
  node = config
  for key in path.split("."):
    assert hasattr(node, "keys") and key in node, f"{where}: config.{path} does not exist (no {key!r})"
    node = node[key]


def test_commands_in_docs_use_flags_fields_and_variants_that_exist():
  checked = 0
  for doc, text in _docs().items():
    for line, module, arguments, command in _commands(text):
      _check_command(f"{doc}:{line}" if doc.endswith(".md") else f"{doc}'s docstring, line {line}", module,
                     arguments, command)
      checked += 1
  assert checked > 25  # the READMEs' command blocks were found


@pytest.mark.parametrize("doc", [README, DATA_PREP_README])
def test_config_fields_named_in_docs_exist(doc):
  text = _text(doc)
  for match in re.finditer(r"(?<![\w./])config\.((?:\w+\.)*\w+)", text):
    if match[1] not in ("json", "yaml"):  # a file called config.json, not a field
      line = text.count("\n", 0, match.start()) + 1
      _assert_field(_config(), match[1], f"{doc}:{line}")


def test_make_targets_in_docs_exist():
  targets = set(re.findall(r"^([\w-]+):", _text("Makefile"), re.M))
  for doc in (README, DATA_PREP_README):
    named = set(re.findall(r"(?:`|^)make ([\w-]+)", _text(doc), re.M))
    assert named <= targets, f"{doc} names make targets the Makefile lacks: {sorted(named - targets)}"


def test_readme_lists_every_mode():
  listed = re.search(r"`--mode` is one of (.*?)\.\s", _text(README), re.S)
  assert listed, "README.md: the sentence '`--mode` is one of ...' is gone"
  assert set(re.findall(r"`(\w+)`", listed[1])) == _modes(), (
      f"README.md lists the modes {listed[1]!r}; handi_jax.main.MODES has {sorted(_modes())}")
