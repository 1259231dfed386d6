"""Device mesh from the config, logical-axis rules, and shardings for parameter trees and batches.

Models annotate each parameter with logical axis names (`nnx.with_partitioning(init, ("embed", "heads"))`);
`config.sharding_rules` maps those names onto the mesh axes below. One place decides how the model is laid
out on a TPU pod or an H100 host; the model code never names a mesh axis.
"""

import dataclasses
import math
import pickle
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshShape:
  data: int
  fsdp: int
  tensor: int

  def values(self):
    return (self.data, self.fsdp, self.tensor)

  @property
  def num_devices(self) -> int:
    return math.prod(self.values())

  @property
  def batch_devices(self) -> int:
    """Devices the batch is split over (BATCH_AXES)."""
    return self.data * self.fsdp


def global_batch_size(train_config, batch_devices: int) -> int:
  """config.train.per_device_batch_size x the batch devices when it is set (> 0), else .global_batch_size."""
  per_device = train_config.get("per_device_batch_size", 0)
  return per_device * batch_devices if per_device else train_config.global_batch_size


def mesh_shape(mesh_config, num_devices: int, num_devices_expected: int = 0) -> MeshShape:
  """Resolve the config's axis sizes; one size may be -1 (= the devices left over)."""
  unknown = [set(mesh_config.keys()) - set(MESH_AXES)]
  if unknown[0]:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown[0])}; valid axes: {MESH_AXES}")
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {free}")
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {sizes}")
  if free:
    total = num_devices_expected or num_devices
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if total % fixed:
      raise ValueError(f"config.mesh {sizes}: {total} devices are not divisible by the fixed axes ({fixed})")
    sizes[free[0]] = total // fixed
  return MeshShape(**sizes)


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh the config asks for, over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config.mesh, len(devices), config.get("num_devices_expected", 0))
  if shape.num_devices != len(devices):
    raise ValueError(
        f"config.mesh {dict(zip(MESH_AXES, shape.values(), strict=True))} needs {shape.num_devices} devices, "
        f"but {len(devices)} exist. Run on the hardware the variant targets, pick another variant, or set "
        "--config.mesh.data=-1 to use the devices there are.")
  # Auto axes: jit and the sharding rules place arrays; no explicit-sharding types in the model code.
  return jax.make_mesh(shape.values(), MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * 3)


def batch_mesh(devices: Sequence[jax.Device]) -> Mesh:
  """`devices` all on the batch axes: generation and evaluation split a batch over one process's devices and
  replicate the models."""
  return jax.make_mesh((len(devices), 1, 1), MESH_AXES, devices=list(devices), axis_types=(AxisType.Auto,) * 3)


def process_share(items: Sequence) -> list:
  """The items this process owns when a job splits a list over processes (generation, evaluation): the item at
  global index i belongs to process i % jax.process_count(), so no two processes handle the same item."""
  return list(items[jax.process_index()::jax.process_count()])


def _every_device():
  """A mesh context of every process's devices: the collectives between processes run there, also where a caller has
  set a mesh of its own devices (the training evaluator)."""
  return jax.set_mesh(Mesh(np.array(jax.devices()), ("processes",)))


def gather_from_processes(value) -> list:
  """`value` (any picklable object) of every process, in process order, on every process: the parts of a job split
  with process_share brought together (through the devices' all-gather, so no shared disk is needed)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils

  data = np.frombuffer(pickle.dumps(value), np.uint8)
  with _every_device():
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))[:, 0]
    gathered = multihost_utils.process_allgather(np.pad(data, (0, int(sizes.max()) - data.size)))
  return [pickle.loads(row[:size].tobytes()) for row, size in zip(gathered, sizes, strict=True)]


def wait_for_processes(name: str) -> None:
  """Return once every process has reached wait_for_processes(name) (e.g. all have written their share)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    with _every_device():
      multihost_utils.sync_global_devices(name)


def logical_to_spec(logical_axes: Sequence[str | None], rules, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
  """PartitionSpec for one array from its logical axis names.

  With `shape` and `mesh`, a dimension that the mapped mesh axes do not divide stays replicated (a 4-channel
  conv_out cannot be split 8 ways), and a mesh axis is used at most once per array.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
    target = table.get(name) if name is not None else None
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    axes = tuple(a for a in axes if a not in used)
    if axes and shape is not None and mesh is not None and shape[dim] % math.prod(mesh.shape[a] for a in axes):
      axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def _logical_axes(variable: nnx.Variable) -> tuple | None:
  return variable.get_metadata().get("sharding_names")


def param_shardings(abstract_tree, mesh: Mesh, rules, min_size: int = 0):
  """NamedShardings for an (abstract) pytree of nnx Variables and arrays, e.g. an nnx.State.

  A Variable with logical names is laid out by `rules`; arrays without names (plain arrays, unnamed
  Variables) and arrays of fewer than `min_size` elements (config.sharding_min_size) are replicated.
  The result has a NamedSharding where the tree has a Variable or an array: a pytree prefix that `jax.jit`
  in/out_shardings and `jax.device_put` accept.
  """
  replicated = NamedSharding(mesh, PartitionSpec())

  def sharding_for(leaf):
    axes = _logical_axes(leaf) if isinstance(leaf, nnx.Variable) else None
    value = leaf.value if isinstance(leaf, nnx.Variable) else leaf
    if axes is None or math.prod(value.shape) < min_size:
      return replicated
    if len(axes) != value.ndim:
      raise ValueError(f"logical axes {axes} do not match the parameter's shape {value.shape}")
    return NamedSharding(mesh, logical_to_spec(axes, rules, value.shape, mesh))

  return jax.tree.map(sharding_for, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis split over the batch axes of the mesh, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))
