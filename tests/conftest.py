"""Test setup: 8 simulated CPU devices and sandboxed caches, set before JAX or TF is imported."""

import gc
import os
import pathlib
import tempfile

# Every program compiles as training compiles its step on CPU (train.compiler_options, config.cpu_fast_compile):
# LLVM at level 1 without its expensive passes, a quarter to a third less compile time, which dominates this suite.
_COMPILE_FLAGS = " --xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           + _COMPILE_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One sandbox for the whole run: pytest-xdist's workers inherit it from the controller, which imports this file
# first, so they and the subprocesses of tests share one persistent compilation cache.
_cache = os.environ.setdefault("HANDI_TEST_HOME", tempfile.mkdtemp(prefix="handi_jax_test_home_"))
os.environ.setdefault("KERAS_HOME", os.path.join(_cache, "keras"))
os.environ.setdefault("HF_HOME", os.path.join(_cache, "hf"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Tests compile the same small graphs again and again (a resumed run, the same model in two tests, in two workers):
# a persistent cache for this run turns the repeats into cache hits.
jax.config.update("jax_compilation_cache_dir", os.path.join(_cache, "jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)



def pytest_collection_finish(session):
  """Every test module is imported now (torch, TF, transformers: millions of objects that live to the end). Frozen,
  the garbage collector's full passes skip them: tracing and orbax's saves trigger many such passes."""
  if os.environ.get("HANDI_TEST_GC_FREEZE", "1") == "1":
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def whole_array_checkpoint_writes():
  """orbax writes a replicated array as one slice per device holding it (replica-parallel saves): on the 8 simulated
  CPU devices, 8 writes of every replicated array and a third of a small checkpoint's CPU time. They share one
  host's memory: whole arrays from replica 0, as orbax saves on GPUs. (Child processes keep orbax's default.)"""
  if os.environ.get("HANDI_TEST_WHOLE_ARRAYS", "1") != "1":
    yield
    return
  import orbax.checkpoint as ocp

  default = ocp.type_handlers.get_type_handler(jax.Array)
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
      use_replica_parallel=False, array_metadata_store=default._array_metadata_store), override=True)
  yield
  ocp.type_handlers.register_type_handler(jax.Array, default, override=True)


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """../shared/data (real frames and clips); tests that need it skip cleanly when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real test data not found at {SHARED_DATA}")
  return SHARED_DATA


# The tiny HANDI UNet and the release's forward in PyTorch with the same weights (test_unet, test_unet_sharding).
@pytest.fixture(scope="module")
def handi_pair():
  from tests import helpers, reference_torch

  reference = reference_torch.HandiReference(reference_torch.torch_unet(helpers.tiny_unet_config()))
  model = helpers.jax_unet(helpers.tiny_unet_config(), reference.state_dict_numpy())
  return reference, model


@pytest.fixture(scope="module")
def handi_outputs(handi_pair):
  """(ours, reference) on the mask + motion + context-frame path of the tiny UNet."""
  import torch

  from tests import helpers, reference_torch

  reference, model = handi_pair
  x = helpers.unet_inputs()
  ours = helpers.handi_forward(model, x["sample"], x["timesteps"], x["text"], x["condition"], x["mask"], x["motion"])
  with torch.no_grad():
    theirs = reference(reference_torch.to_torch_video(x["sample"]), torch.from_numpy(x["timesteps"]),
                       torch.from_numpy(x["text"]), reference_torch.to_torch_video(x["condition"]),
                       torch.from_numpy(x["mask"]).permute(0, 3, 1, 2)[:, :, None], torch.from_numpy(x["motion"]))
  return np.asarray(ours), theirs.permute(0, 2, 3, 4, 1).numpy()
