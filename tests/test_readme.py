"""The README's evaluation section against the code: the config fields and modules it names exist, and its
conversion commands run (on small stand-in checkpoints with the released files' names and key layout)."""

import importlib.util
import re
import shutil

import numpy as np
import torch

from configs import common
from handi_jax.convert import core
from tests.conftest import REPO_ROOT


def _evaluation_section() -> str:
  readme = (REPO_ROOT / "README.md").read_text()
  start = readme.index("\n## Evaluation\n")
  return readme[start:readme.index("\n## ", start + 1)]


def test_the_evaluation_section_names_existing_fields_and_modules():
  section, fields = _evaluation_section(), common.get_config(2).evaluate
  named = set(re.findall(r"config\.evaluate\.(\w+)", section))
  named |= set(re.findall(r"^\| `(\w+)`", section, re.MULTILINE))   # first column of the weights table
  assert {"clip", "inception", "i3d", "egovlp", "egovlp_frames", "blip"} <= named
  assert named - set(fields) == set()
  command = re.search(r"python -m handi_jax\.evaluate (?:.*\\\n)*.*", section).group(0)  # with its continuations
  flags = set(re.findall(r"--(\w+)=", command))
  assert "clip" in flags and flags - set(fields) == set()   # the command's shortcuts are config.evaluate fields
  for module in set(re.findall(r"python -m ([\w.]+)", section)):
    assert importlib.util.find_spec(module) is not None, module


def _tensors(state):
  return {k: torch.from_numpy(v) for k, v in state.items()}


def test_the_evaluation_sections_conversion_commands_write_the_checkpoints_as_safetensors(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  array = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  inception = {"Conv2d_1a_3x3.conv.weight": array(4, 3, 3, 3), "Conv2d_1a_3x3.bn.running_var": array(4)}
  i3d = {"Conv3d_1a_7x7.conv3d.weight": array(4, 3, 3, 3, 3), "logits.conv3d.bias": array(5)}
  egovlp = {"module.video_model.cls_token": array(1, 1, 8), "module.vid_proj.0.weight": array(4, 8),
            "module.text_model.transformer.layer.0.ffn.lin1.weight": array(6, 8),
            "module.txt_proj.1.weight": array(4, 8), "module.txt_proj.1.bias": array(4)}
  weights = tmp_path / "weights"
  (weights / "blip" / "text_encoder").mkdir(parents=True)
  torch.save(_tensors(inception), weights / "pt_inception-2015-12-05-6726825d.pth")
  torch.save(_tensors(i3d), weights / "rgb_imagenet.pt")
  # EgoVLP's trainer checkpoint: the state dict beside the trainer's other entries
  torch.save({"arch": "FrozenInTime", "epoch": 1, "state_dict": _tensors(egovlp)}, weights / "epic_mir_plus.pth")
  shutil.copy(weights / "epic_mir_plus.pth", weights / "blip" / "text_encoder")
  commands = re.findall(r'^python -c "(.*)"$', _evaluation_section(), re.MULTILINE)
  assert len(commands) == 4
  monkeypatch.chdir(tmp_path)
  for command in commands:
    exec(compile(command, "README.md", "exec"), {})
  expected = {"pt_inception.safetensors": inception, "rgb_imagenet.safetensors": i3d,
              "epic_mir_plus.safetensors": egovlp,
              "blip/text_encoder/model.safetensors": {k.removeprefix("module."): v for k, v in egovlp.items()
                                                      if k.startswith(("module.text_model.", "module.txt_proj."))}}
  for name, state in expected.items():
    written = core.read_safetensors(weights / name)
    assert sorted(written) == sorted(state), name
    for key, value in state.items():
      np.testing.assert_array_equal(written[key], value, err_msg=f"{name}: {key}")
