"""A TensorFlow Lite model read into a JAX params pytree and run as a pure, batched, differentiable function.

`load_tflite(path)` parses the flatbuffer (no TensorFlow runtime: only TF's generated schema module and the
`flatbuffers` package) into a `TFLiteGraph`: the constant tensors as float32 arrays (the params) plus the
operator list as static data. `run_tflite(graph, inputs)` executes that list with lax ops, so it jits,
vmaps over nothing (the batch axis is simply carried through), and differentiates with respect to its
inputs. The file's own batch size of 1 is ignored: every activation keeps the caller's leading axis.

Supported operators are exactly what MediaPipe's hand models use: DEQUANTIZE (float16 constants, folded
into float32 params at load time, which is exact), CONV_2D, DEPTHWISE_CONV_2D, ADD, MEAN, FULLY_CONNECTED
and LOGISTIC, with fused NONE / RELU / RELU6 / RELU_N1_TO_1 / TANH activations and SAME / VALID padding
(TFLite's SAME puts the odd padding pixel after, as XLA's SAME does).
"""

import dataclasses
import functools
import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@functools.cache
def _schema():
  """TensorFlow's generated TFLite flatbuffer schema, loaded by path so that TensorFlow itself is not imported."""
  spec = importlib.util.find_spec("tensorflow")
  path = None if spec is None or not spec.submodule_search_locations else (
      pathlib.Path(list(spec.submodule_search_locations)[0]) / "lite" / "python" / "schema_py_generated.py")
  if path is None or not path.is_file():
    raise ImportError("reading .tflite files needs TensorFlow's flatbuffer schema "
                      "(tensorflow/lite/python/schema_py_generated.py); install tensorflow-cpu==2.19.1")
  module_spec = importlib.util.spec_from_file_location("handi_jax_tflite_schema", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


_ACTIVATIONS = {
    "NONE": lambda x: x,
    "RELU": jax.nn.relu,
    "RELU6": lambda x: jnp.clip(x, 0.0, 6.0),
    "RELU_N1_TO_1": lambda x: jnp.clip(x, -1.0, 1.0),
    "TANH": jnp.tanh,
}
SUPPORTED_OPS = ("DEQUANTIZE", "CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED", "LOGISTIC")


@dataclasses.dataclass(frozen=True)
class Op:
  """One operator of the graph. `inputs` are activation tensor ids; constants live in params[`name`]."""

  name: str                      # params key, e.g. "conv_2d_3" (the 4th CONV_2D of the file)
  kind: str                      # TFLite builtin operator name
  inputs: tuple[int, ...]
  output: int
  strides: tuple[int, int] = (1, 1)
  dilation: tuple[int, int] = (1, 1)
  padding: str = "SAME"
  activation: str = "NONE"
  axes: tuple[int, ...] = ()     # MEAN
  keep_dims: bool = False        # MEAN, FULLY_CONNECTED


@dataclasses.dataclass(frozen=True)
class Program:
  """The static part of a graph: operators in execution order and the graph's input and output tensors."""

  ops: tuple[Op, ...]
  inputs: tuple[int, ...]
  input_shapes: tuple[tuple[int, ...], ...]
  outputs: tuple[int, ...]
  output_names: tuple[str, ...]


@struct.dataclass
class TFLiteGraph:
  """Params (float32 constants per operator) as pytree leaves; the program rides along as static data."""

  params: dict
  program: Program = struct.field(pytree_node=False)


def _enum_names(enum_class) -> dict[int, str]:
  return {v: k for k, v in vars(enum_class).items() if not k.startswith("_")}


_NUMPY_TYPES = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT32": np.int32, "INT64": np.int64}


class _FlatbufferReader:
  """The single subgraph of a .tflite file, read into the pieces `load_tflite` assembles: constants (float16 ones
  folded through DEQUANTIZE), operators with their params, the program's inputs and outputs."""

  def __init__(self, path: pathlib.Path):
    if not path.is_file():
      raise FileNotFoundError(f"TFLite model {path} does not exist")
    s = _schema()
    buffer = path.read_bytes()
    if not s.Model.ModelBufferHasIdentifier(buffer, 0):
      raise ValueError(f"{path} is not a TFLite flatbuffer (file identifier 'TFL3' missing)")
    self.model = s.ModelT.InitFromObj(s.Model.GetRootAsModel(buffer, 0))
    if len(self.model.subgraphs) != 1:
      raise ValueError(f"{path}: expected one subgraph, found {len(self.model.subgraphs)}")
    self.path = path
    self.graph = self.model.subgraphs[0]
    op_names = _enum_names(s.BuiltinOperator)
    self.codes = [op_names[max(c.builtinCode, c.deprecatedBuiltinCode)] for c in self.model.operatorCodes]
    self.type_names = _enum_names(s.TensorType)
    self.activation_names = _enum_names(s.ActivationFunctionType)
    self.padding_names = _enum_names(s.Padding)
    self.constants: dict[int, np.ndarray] = {}  # tensor id -> value, filled as operators use them

  def kind(self, op) -> str:
    kind = self.codes[op.opcodeIndex]
    if kind not in SUPPORTED_OPS:
      raise NotImplementedError(f"{self.path}: operator {kind} is not supported "
                                f"(supported: {', '.join(SUPPORTED_OPS)})")
    return kind

  def constant(self, index: int) -> np.ndarray | None:
    """The value of tensor `index`, or None for an activation (a tensor without data)."""
    if index < 0 or index in self.constants:
      return self.constants.get(index)
    tensor = self.graph.tensors[index]
    data = self.model.buffers[tensor.buffer].data if tensor.buffer < len(self.model.buffers) else None
    if data is None or len(data) == 0:
      return None
    dtype = _NUMPY_TYPES.get(self.type_names[tensor.type])
    if dtype is None:
      raise ValueError(f"{self.path}: constant tensor {tensor.name!r} has unsupported type "
                       f"{self.type_names[tensor.type]}")
    self.constants[index] = np.frombuffer(np.asarray(data, np.uint8).tobytes(), dtype=dtype).reshape(tensor.shape)
    return self.constants[index]

  def fold_dequantize(self, source: int, output: int) -> None:
    """DEQUANTIZE of a float16 constant becomes a float32 constant (exact); nothing is left to run."""
    value = self.constant(source)
    quant = self.graph.tensors[source].quantization
    if value is None or value.dtype != np.float16 or (quant is not None and quant.scale is not None):
      raise NotImplementedError(f"{self.path}: only DEQUANTIZE of float16 constants is supported "
                                f"(tensor {self.graph.tensors[source].name!r})")
    self.constants[output] = value.astype(np.float32)

  def operator(self, op, kind: str, name: str) -> tuple[Op, dict]:
    """The Op and its params (constants in JAX layouts; empty for an operator without constants)."""
    inputs = [int(i) for i in op.inputs]
    options = op.builtinOptions
    fields = dict(name=name, kind=kind, output=int(op.outputs[0]))
    if options is not None and hasattr(options, "fusedActivationFunction"):
      fields["activation"] = self.activation_names[options.fusedActivationFunction]
      if fields["activation"] not in _ACTIVATIONS:
        raise NotImplementedError(f"{self.path}: fused activation {fields['activation']} of {name} is not supported")
    params = {}
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
      x, kernel, bias = inputs
      fields.update(strides=(options.strideH, options.strideW), padding=self.padding_names[options.padding],
                    dilation=(options.dilationHFactor, options.dilationWFactor), inputs=(x,))
      # TFLite kernels: conv (O, H, W, I), depthwise (1, H, W, C * multiplier); both -> HWIO.
      layout = (1, 2, 3, 0) if kind == "CONV_2D" else (1, 2, 0, 3)
      params = self._kernel_and_bias(np.transpose(self.constant(kernel), layout), bias)
    elif kind == "FULLY_CONNECTED":
      x, kernel, bias = (inputs + [-1])[:3]
      fields.update(inputs=(x,), keep_dims=bool(options.keepNumDims))
      params = self._kernel_and_bias(self.constant(kernel).T, bias)  # (out, in) -> (in, out)
    elif kind == "MEAN":
      fields.update(inputs=(inputs[0],), axes=tuple(int(a) for a in self.constant(inputs[1]).reshape(-1)),
                    keep_dims=bool(options.keepDims))
    else:  # ADD, LOGISTIC
      if any(self.constant(i) is not None for i in inputs):
        raise NotImplementedError(f"{self.path}: {kind} with a constant operand is not supported")
      fields["inputs"] = tuple(inputs)
    return Op(**fields), params

  def _kernel_and_bias(self, kernel: np.ndarray, bias: int) -> dict:
    return {"kernel": kernel} if bias < 0 else {"kernel": kernel, "bias": self.constant(bias)}

  def program(self, ops: list[Op]) -> Program:
    graph = self.graph
    return Program(
        ops=tuple(ops), inputs=tuple(int(i) for i in graph.inputs),
        input_shapes=tuple(tuple(int(d) for d in graph.tensors[i].shape) for i in graph.inputs),
        outputs=tuple(int(i) for i in graph.outputs),
        output_names=tuple(graph.tensors[i].name.decode() for i in graph.outputs))


def load_tflite(path: str | os.PathLike) -> TFLiteGraph:
  """Parse a .tflite file into a `TFLiteGraph` (float32 params in JAX layouts: conv kernels HWIO)."""
  reader = _FlatbufferReader(pathlib.Path(path))
  ops, params, counts = [], {}, {}
  for op in reader.graph.operators:
    kind = reader.kind(op)
    if kind == "DEQUANTIZE":
      reader.fold_dequantize(int(op.inputs[0]), int(op.outputs[0]))
      continue
    name = f"{kind.lower()}_{counts.get(kind, 0)}"  # the n-th operator of its kind in the file
    counts[kind] = counts.get(kind, 0) + 1
    operator, operator_params = reader.operator(op, kind, name)
    ops.append(operator)
    if operator_params:
      params[name] = operator_params
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  return TFLiteGraph(params=params, program=reader.program(ops))


def _apply(op: Op, params: dict, args: list[jax.Array]) -> jax.Array:
  p = params.get(op.name, {})
  if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
    (x,) = args
    groups = x.shape[-1] if op.kind == "DEPTHWISE_CONV_2D" else 1
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], window_strides=op.strides, padding=op.padding, rhs_dilation=op.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    y = y + p["bias"] if "bias" in p else y
  elif op.kind == "FULLY_CONNECTED":
    (x,) = args
    kernel = p["kernel"]
    flat = x.reshape(-1, kernel.shape[0])  # TFLite flattens everything but the last axis
    y = flat @ kernel
    y = y + p["bias"] if "bias" in p else y
    if op.keep_dims:
      y = y.reshape(*x.shape[:-1], kernel.shape[1])
  elif op.kind == "ADD":
    y = args[0] + args[1]
  elif op.kind == "MEAN":
    y = jnp.mean(args[0], axis=op.axes, keepdims=op.keep_dims)
  elif op.kind == "LOGISTIC":
    y = jax.nn.sigmoid(args[0])
  else:
    raise NotImplementedError(f"operator {op.kind} ({op.name}) is not supported")
  return _ACTIVATIONS[op.activation](y)


def run_tflite(graph: TFLiteGraph, inputs: list[jax.Array]) -> list[jax.Array]:
  """Run the graph on batched inputs (leading axis = batch); returns the outputs in file order.

  Computes in the params' dtype (float32 as loaded; cast the params for another precision).
  """
  program = graph.program
  if len(inputs) != len(program.inputs):
    raise ValueError(f"the TFLite graph takes {len(program.inputs)} input(s), got {len(inputs)}")
  dtype = jax.tree.leaves(graph.params)[0].dtype
  values = {}
  for tensor, value, shape in zip(program.inputs, inputs, program.input_shapes, strict=True):
    if tuple(value.shape[1:]) != shape[1:]:
      raise ValueError(f"TFLite graph input {tensor}: expected (N, {', '.join(map(str, shape[1:]))}), "
                       f"got {tuple(value.shape)}; resize or crop the input to that size first")
    values[tensor] = jnp.asarray(value, dtype)
  for op in program.ops:
    values[op.output] = _apply(op, graph.params, [values[i] for i in op.inputs])
  return [values[i] for i in program.outputs]
