"""The import graph is layered: no cycle, no module imports from a layer above its own, no job imports another
job, and the two packages are tied one way only (data_prep imports handi_jax, never the reverse).

Imports inside functions count too (a lazy import is still a dependency). Layers, bottom to top:
  0 configs
  1 pure pieces: models (NNX modules only), diffusion math, the hand landmark network, media (image/video files,
    clip decoding, MediaPipe hand detection, mask rules), data (schema, records, shard writer, reader),
    sharding, tokenizers, file IO, the command-line scaffold
  2 conversion of weights (convert/, the only place that knows PyTorch names), losses, conditioning
  3 components: where every model and the train state come from (build, load, restore, abstract, place); the
    pure train step
  4 what jobs share: the generation pipeline and its inputs (prompts files, samples), evaluation (clips, scores,
    extractors, reports, the evaluator that training is given)
  5 the jobs: train, generate, evaluate, export, app, compile_report, the convert command line, data_prep
  6 demo (data, then train / generate / export like a user)
  7 main (dispatches by name)
"""

import ast
import pathlib

from tests.conftest import REPO_ROOT

LAYERS = {
    0: ("configs",),
    1: ("handi_jax", "handi_jax.chips", "handi_jax.xla_stats", "handi_jax.fileio", "handi_jax.chunking",
        "handi_jax.command_line", "handi_jax.sharding", "handi_jax.tokenizers", "handi_jax.mask_cleanup",
        "handi_jax.media", "handi_jax.diffusion", "handi_jax.models", "handi_jax.hand_landmarks", "handi_jax.data"),
    2: ("handi_jax.convert", "handi_jax.losses", "handi_jax.conditioning"),
    3: ("handi_jax.components", "handi_jax.train_step"),
    4: ("handi_jax.pipeline", "handi_jax.prompts", "handi_jax.evaluation"),
    5: ("handi_jax.train", "handi_jax.generate", "handi_jax.evaluate", "handi_jax.export", "handi_jax.convert.cli",
        "handi_jax.convert.__main__", "handi_jax.app", "handi_jax.compile_report", "data_prep"),
    6: ("handi_jax.demo",),
    7: ("handi_jax.main",),
}
# Each job is a command of its own; what two jobs share lives below them (layer 4 or lower).
JOBS = ("handi_jax.train", "handi_jax.generate", "handi_jax.evaluate", "handi_jax.export", "handi_jax.app",
        "handi_jax.compile_report", "handi_jax.convert.cli", "data_prep")
PACKAGES = ("configs", "handi_jax", "data_prep")


def _modules() -> dict[str, pathlib.Path]:
  modules = {}
  for package in PACKAGES:
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
      parts = path.relative_to(REPO_ROOT).with_suffix("").parts
      modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return modules


def _imports(path: pathlib.Path, modules) -> set[str]:
  """Project modules `path` imports (`from a import b` names module a.b when it exists, else a)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
               for alias in node.names]
    else:
      continue
    found.update(name for name in names if name.split(".")[0] in PACKAGES)
  return found


def _prefix_of(module: str, prefixes) -> str | None:
  """The longest of `prefixes` that `module` is or lies under."""
  found = [p for p in prefixes if module == p or module.startswith(p + ".")]
  return max(found, key=len, default=None)


def job_of(module: str) -> str | None:
  return _prefix_of(module, JOBS)


def jobs_importing_jobs(graph: dict[str, set[str]]) -> list[str]:
  return [f"{module} (job {job_of(module)}) imports {target} (job {job_of(target)})"
          for module, targets in graph.items() for target in sorted(targets)
          if job_of(module) and job_of(target) and job_of(module) != job_of(target)]


def imports_against_the_package_direction(graph: dict[str, set[str]]) -> list[str]:
  """handi_jax never imports data_prep: the offline tool builds on the library, not the other way round."""
  return [f"{module} imports {target}" for module, targets in graph.items() for target in sorted(targets)
          if module.split(".")[0] == "handi_jax" and target.split(".")[0] == "data_prep"]


def layer_of(module: str) -> int:
  """The layer of the longest prefix listed in LAYERS."""
  best = None
  for layer, prefixes in LAYERS.items():
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
        best = (layer, prefix)
  assert best is not None, f"{module} has no layer: add it to LAYERS in tests/test_layers.py"
  return best[0]


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: {m for m in _imports(path, modules) if m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_import_graph_has_no_cycle():
  graph = import_graph()
  assert "handi_jax.train" in graph and "handi_jax.models.unet3d" in graph
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_module_imports_from_a_higher_layer():
  upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
            for module, targets in import_graph().items() for target in sorted(targets)
            if layer_of(target) > layer_of(module)]
  assert not upward, "\n".join(upward)


def test_the_checks_catch_a_cycle_and_an_upward_import():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None
  assert layer_of("handi_jax.models.unet3d") < layer_of("handi_jax.convert.unet") < layer_of("handi_jax.train")
  assert layer_of("handi_jax.convert.cli") > layer_of("handi_jax.convert.core")
  assert layer_of("handi_jax.models.clip_vision") < layer_of("handi_jax.convert.clip") <= layer_of(
      "handi_jax.evaluation.extractors") < layer_of("handi_jax.evaluate")


def test_no_job_imports_another_job():
  assert not (found := jobs_importing_jobs(import_graph())), "\n".join(found)


def test_handi_jax_never_imports_data_prep():
  assert not (found := imports_against_the_package_direction(import_graph())), "\n".join(found)


def test_the_checks_catch_a_job_importing_a_job_and_a_two_way_package_tie():
  graph = {"handi_jax.train": {"handi_jax.evaluate", "handi_jax.evaluation.runs"},
           "handi_jax.main": {"handi_jax.train"}, "handi_jax.demo": {"handi_jax.generate"},
           "handi_jax.pipeline": {"data_prep.clips"}, "data_prep.build": {"handi_jax.data.writer"}}
  assert jobs_importing_jobs(graph) == [
      "handi_jax.train (job handi_jax.train) imports handi_jax.evaluate (job handi_jax.evaluate)"]
  assert imports_against_the_package_direction(graph) == ["handi_jax.pipeline imports data_prep.clips"]
  assert job_of("handi_jax.compile_report.programs") == "handi_jax.compile_report"
  assert job_of("handi_jax.components.frozen") is None
