import jax
import ml_collections
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import common
from handi_jax import sharding


def _mesh_config(**sizes):
  return ml_collections.ConfigDict(dict(mesh=ml_collections.ConfigDict(sizes), num_devices_expected=0))


@pytest.mark.parametrize("variant, expected", [
    ("demo", (8, 1, 1)),
    ("h100x8", (1, 8, 1)),
])
def test_mesh_shape_on_8_simulated_devices(variant, expected):
  assert jax.device_count() == 8
  config = common.get_config(2, variant)
  mesh = sharding.make_mesh(config)
  assert tuple(mesh.shape.values()) == expected
  assert mesh.axis_names == sharding.MESH_AXES


def test_pod_mesh_resolves_for_32_devices_and_refuses_8():
  config = common.get_config(2, "tpu_v5p_64")
  assert sharding.mesh_shape(config.mesh, 8, config.num_devices_expected).values() == (2, 16, 1)
  with pytest.raises(ValueError, match="needs 32 devices, but 8 exist"):
    sharding.make_mesh(config)


def test_free_axis_takes_the_rest():
  assert sharding.mesh_shape(_mesh_config(data=2, fsdp=-1, tensor=2).mesh, 8).values() == (2, 2, 2)
  with pytest.raises(ValueError, match="only one axis may be -1"):
    sharding.mesh_shape(_mesh_config(data=-1, fsdp=-1, tensor=1).mesh, 8)


def test_logical_rules_for_representative_parameters():
  rules = common.get_config(2, "h100x8").sharding_rules
  mesh = sharding.make_mesh(common.get_config(2, "h100x8"))
  # conv kernel HWIO: output channels over fsdp.
  assert sharding.logical_to_spec((None, None, "conv_in", "conv_out"), rules, (3, 3, 320, 640), mesh) == \
      P(None, None, None, "fsdp")
  # attention projection (in, heads*dim): input features over fsdp, heads over tensor (size 1 here).
  assert sharding.logical_to_spec(("embed", "heads"), rules, (320, 320), mesh) == P("fsdp", "tensor")
  # norm scale: replicated.
  assert sharding.logical_to_spec(("norm",), rules, (320,), mesh) == P(None)
  # a dimension that fsdp=8 does not divide stays replicated (conv_out of 4 latent channels).
  assert sharding.logical_to_spec((None, None, "conv_in", "conv_out"), rules, (3, 3, 320, 4), mesh) == \
      P(None, None, None, None)
  with pytest.raises(KeyError, match="'nope' has no sharding rule"):
    sharding.logical_to_spec(("nope",), rules)


def test_param_shardings_of_an_abstract_module():
  config = common.get_config(2, "h100x8")
  mesh = sharding.make_mesh(config)
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
  abstract = nnx.state(nnx.eval_shape(lambda: nnx.Linear(64, 128, kernel_init=init, rngs=nnx.Rngs(0))))
  shardings = sharding.param_shardings(abstract, mesh, config.sharding_rules)
  assert shardings["kernel"].spec == P("fsdp", "tensor")
  assert shardings["bias"].spec == P()
  params = jax.device_put(nnx.state(nnx.Linear(64, 128, kernel_init=init, rngs=nnx.Rngs(0))), shardings)
  assert params["kernel"].value.sharding.spec == P("fsdp", "tensor")


def test_min_size_threshold_replicates_small_arrays():
  config = common.get_config(2, "h100x8")
  mesh = sharding.make_mesh(config)
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
  abstract = nnx.state(nnx.eval_shape(lambda: nnx.Linear(64, 128, kernel_init=init, rngs=nnx.Rngs(0))))
  tree = dict(linear=abstract, plain=jax.ShapeDtypeStruct((1024, 64), jax.numpy.float32))
  at_size = sharding.param_shardings(tree, mesh, config.sharding_rules, min_size=64 * 128)
  assert at_size["linear"]["kernel"].spec == P("fsdp", "tensor")  # 8192 elements: not below the threshold
  above = sharding.param_shardings(tree, mesh, config.sharding_rules, min_size=64 * 128 + 1)
  assert above["linear"]["kernel"].spec == P()
  assert at_size["plain"].spec == P()  # no logical names: replicated at any size
  assert config.sharding_min_size == 2**16


_GATHER = """
import jax
import configs
from handi_jax import main, sharding
main._maybe_initialize_distributed(configs.load("configs/stage2.py"))
assert sharding.process_share(list("abcde")) == list("abcde")[jax.process_index()::2]
with jax.set_mesh(sharding.batch_mesh(jax.local_devices())):  # as inside the training evaluator
  parts = sharding.gather_from_processes({"process": jax.process_index(), "rows": list(range(jax.process_index() * 3))})
  sharding.wait_for_processes("gathered")
print("PARTS", parts, flush=True)
jax.distributed.shutdown()
"""


def test_two_processes_gather_their_parts_in_process_order_even_inside_a_local_mesh():
  """sharding.gather_from_processes between two CPU processes started by hand (objects of different sizes), under a
  mesh of each process's own devices."""
  import os
  import socket
  import subprocess
  import sys

  from tests.conftest import REPO_ROOT

  with socket.socket() as free:
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "JAX_"))}
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  processes = [subprocess.Popen([sys.executable, "-c", _GATHER], cwd=REPO_ROOT, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=dict(env, JAX_PROCESS_ID=str(i))) for i in range(2)]
  outputs = [p.communicate(timeout=180)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  expected = "PARTS [{'process': 0, 'rows': []}, {'process': 1, 'rows': [0, 1, 2]}]"
  assert [[line for line in out.splitlines() if line.startswith("PARTS")] for out in outputs] == [[expected]] * 2
