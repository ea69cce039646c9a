"""What a model runs: its traced graph, op by op, each op credited to the layer that made it.

`run_model(model)` traces the model's forward pass (as in a training step) with
`tf.function` on a batch of the model's input shapes, or on a batch the caller
gives, and returns a `ModelRun`: every layer that ran, the dtypes of its
outputs, the ops it ran itself (not those of its sublayers) among those that
decide where the precision goes (matmuls and convolutions with their FLOPs,
softmax, exp/log, sums, square roots), and the dtype and producer of every model
output. Nothing is executed: no weight or statistic changes. Works for every
model Keras can call, subclassed ones included. TensorFlow-only (the graph).

What is not seen: ops inside a nested function that no layer call opened (a `tf.cond`
branch, the inner `tf.function` Keras runs grouped convolutions in); a recurrent layer's
loop body is counted once, not once per time step. The trace may build a layer that
only a training-mode branch calls.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import keras
import numpy as np
import tensorflow as tf

from tfmp import _compat
from tfmp.rewrite.calls import CallRecorder
from tfmp.precision.ranges import HALF_DTYPES
from tfmp.rewrite.classify import iter_layers

MATMUL_OPS = ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum")
CONV_OPS = ("Conv2D", "Conv3D", "DepthwiseConv2dNative", "Conv2DBackpropInput",
            "Conv3DBackpropInputV2")
HEAVY_OPS = MATMUL_OPS + CONV_OPS
SOFTMAX_OPS = ("Softmax", "LogSoftmax")
EXP_LOG_OPS = ("Exp", "Log", "Log1p")  # not Expm1: ELU/CELU take it of min(x, 0), bounded
SUM_OPS = ("Sum", "Mean", "Prod", "EuclideanNorm")
PASS_THROUGH_OPS = ("Cast", "Reshape", "Transpose")  # values kept, only their type or shape
ROOT_OPS = ("Rsqrt", "Sqrt")
RECORDED_OPS = frozenset(HEAVY_OPS + SOFTMAX_OPS + EXP_LOG_OPS + SUM_OPS + ROOT_OPS)

BATCH = 2  # the batch a model is traced on when no data is given
UNKNOWN_DIM = 32  # other dimensions the model leaves open (sequence length, image size)
MODEL_PATH = "<model>"  # the model's own ops (in its `call`, between its layers)


@dataclasses.dataclass(frozen=True)
class Op:
    """One op a layer ran.

    Attributes:
        type: The TensorFlow op type (`MatMul`, `Softmax`, ...).
        dtype: The dtype it computed in (of its output).
        flops: Multiply-adds x 2 of a matmul or convolution (0 for others, or unknown shapes).
        reduced: For `Sum`/`Mean`/...: how many elements go into each output.
        of_sum: For `Rsqrt`/`Sqrt`: its input comes from a `Sum`/`Mean` (a few element-wise
            ops away): a statistic's root, as in a normalization.
    """

    type: str
    dtype: str
    flops: int = 0
    reduced: int = 0
    of_sum: bool = False


@dataclasses.dataclass(frozen=True)
class LayerRun:
    """One layer (or nested model) as it ran.

    Attributes:
        path: Its path in the model (`outer/inner`), `<model>` for the model's own ops.
        class_name: Its class.
        policy: Its dtype policy's name.
        output_dtypes: The dtypes of its outputs (of its last call).
        ops: The recorded ops it ran itself, not those of its sublayers.
        layer: The layer object.
    """

    path: str
    class_name: str
    policy: str
    output_dtypes: tuple[str, ...]
    ops: tuple[Op, ...]
    layer: Any = dataclasses.field(compare=False, repr=False)

    def flops(self, dtypes: Optional[tuple[str, ...]] = None) -> int:
        """Matmul and convolution FLOPs of its own ops, in `dtypes` (default: any)."""
        return sum(op.flops for op in self.ops if dtypes is None or op.dtype in dtypes)

    def half_statistics(self) -> tuple[str, ...]:
        """The square-root ops of a sum (a normalization's statistics) it ran in 16 bits."""
        return tuple(sorted({op.type for op in self.ops
                             if op.type in ROOT_OPS and op.of_sum and op.dtype in HALF_DTYPES}))


@dataclasses.dataclass(frozen=True)
class ModelRun:
    """What `run_model` saw.

    Attributes:
        input_shapes: The shapes the model was traced on.
        layers: Every layer that ran, in the order its first call began; the model's
            own ops first, as `<model>`.
        output_dtypes: The dtype of each model output.
        output_producers: For each output, the path of the layer whose op made it,
            or `<model>` when an op of the model's own `call` did.
        output_sources: For each output, the op that computed its values, seen through
            casts and reshapes, and the path of the layer that ran it: `("Softmax",
            "dense_1")` (probabilities), `("BiasAdd", "logits")`.
    """

    input_shapes: tuple[tuple[int, ...], ...]
    layers: tuple[LayerRun, ...]
    output_dtypes: tuple[str, ...]
    output_producers: tuple[str, ...]
    output_sources: tuple[tuple[str, str], ...] = ()

    def flops(self, dtypes: Optional[tuple[str, ...]] = None) -> int:
        """Matmul and convolution FLOPs of the whole model, in `dtypes` (default: any)."""
        return sum(layer.flops(dtypes) for layer in self.layers)

    def share(self, dtypes: tuple[str, ...]) -> Optional[float]:
        """The share of matmul and convolution FLOPs computed in `dtypes` (None: no such op)."""
        total = self.flops()
        return self.flops(dtypes) / total if total else None

    def layer(self, path: str) -> LayerRun:
        """The run of the layer at `path` (KeyError: no layer at that path ran)."""
        for run in self.layers:
            if run.path == path:
                return run
        raise KeyError(f"no layer at {path!r} ran; the layers that ran: "
                       f"{', '.join(run.path for run in self.layers)}")


def _dims(shape: Any) -> Optional[list[int]]:
    dims = tf.TensorShape(shape).as_list() if shape is not None else None
    return None if dims is None or any(d is None for d in dims) else dims


def _einsum_flops(op: Any) -> int:
    equation = op.get_attr("equation").decode()
    operands = equation.split("->")[0].split(",")
    if len(operands) != 2:
        return 0
    sizes: dict[str, int] = {}
    for letters, tensor in zip(operands, op.inputs):
        dims = _dims(tensor.shape)
        if dims is None or "." in letters or len(letters) != len(dims):
            return 0
        sizes.update(zip(letters, dims))
    return 2 * math.prod(sizes.values())


def _heavy_flops(op: Any) -> int:
    shapes = [_dims(t.shape) for t in op.inputs]
    out = _dims(op.outputs[0].shape)
    if op.type == "Einsum":
        return _einsum_flops(op)
    if op.type == "MatMul" and None not in shapes[:2]:
        a, b = shapes[0], shapes[1]
        m, k = (a[1], a[0]) if op.get_attr("transpose_a") else (a[0], a[1])
        n = b[0] if op.get_attr("transpose_b") else b[1]
        return 2 * m * k * n
    if op.type.startswith("BatchMatMul") and out is not None and shapes[0] is not None:
        k = shapes[0][-2] if op.get_attr("adj_x") else shapes[0][-1]
        return 2 * math.prod(out) * k
    if op.type in ("Conv2D", "Conv3D") and out is not None and shapes[1] is not None:
        return 2 * math.prod(out) * math.prod(shapes[1][:-1])
    if op.type == "DepthwiseConv2dNative" and out is not None and shapes[1] is not None:
        return 2 * math.prod(out) * math.prod(shapes[1][:-2])
    if (op.type in ("Conv2DBackpropInput", "Conv3DBackpropInputV2") and len(shapes) == 3
            and shapes[1] is not None and shapes[2] is not None):
        return 2 * math.prod(shapes[2][:-1]) * math.prod(shapes[1])  # a transposed convolution
    return 0  # shapes not static


def _from_sum(op: Any, depth: int = 6) -> bool:
    """Whether a sum or mean is among the ops feeding `op`, at most `depth` ops back."""
    frontier, seen = [op], set()
    for _ in range(depth):
        frontier = [t.op for o in frontier for t in o.inputs if id(t.op) not in seen]
        seen.update(id(o) for o in frontier)
        if any(o.type in SUM_OPS for o in frontier):
            return True
    return False


def _op(op: Any) -> Op:
    dtype = op.outputs[0].dtype.name if op.outputs else ""
    if op.type in ROOT_OPS:
        return Op(op.type, dtype, of_sum=_from_sum(op))
    if op.type in HEAVY_OPS:
        return Op(op.type, dtype, flops=_heavy_flops(op))
    if op.type in SUM_OPS:
        inp, out = _dims(op.inputs[0].shape), _dims(op.outputs[0].shape)
        reduced = math.prod(inp) // max(1, math.prod(out)) if inp and out is not None else 0
        return Op(op.type, dtype, reduced=reduced)
    return Op(op.type, dtype)


def _is_x_y(data: Any, struct: Any) -> bool:
    """Whether a 2- or 3-tuple batch is `(x, y[, sample_weight])` rather than the inputs of a
    model taking two or three: by the model's input structure where it has one."""
    if struct is None:  # a subclassed model: its input structure is not known
        return True
    try:
        keras.tree.assert_same_structure(data, struct)
        return False  # the inputs themselves
    except (ValueError, TypeError):
        return True


def _input_structure(model: keras.Model) -> Any:
    """A Sequential or Functional model's input structure (None for other kinds)."""
    if isinstance(model, _compat.functional_class()):
        return model.input
    if isinstance(model, keras.Sequential):
        return model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return None


def split_batch(model: keras.Model, batch: Any) -> tuple[Any, Any]:
    """`(inputs, targets)` of one batch: `(x, y)` and `(x, y, sample_weight)` are split
    (for a Sequential or Functional model, only when `batch` is not the structure of its
    own inputs); anything else is all inputs (targets None).

    Args:
        model: The model the batch is for.
        batch: One batch.

    Returns:
        `(x, y)`; `y` is None when the batch has no targets.
    """
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3) and _is_x_y(
            batch, _input_structure(model)):
        return batch[0], batch[1]
    return batch, None


def example_inputs(model: keras.Model, data: Any = None) -> Any:
    """`tf.TensorSpec`s of the inputs to trace `model` on.

    Args:
        model: A Keras model.
        data: A batch of inputs (an array, a structure of arrays, `(x, y)`, or a
            `tf.data.Dataset` whose first batch is used); default: the model's input
            shapes (batch `BATCH`, other open dimensions `UNKNOWN_DIM`; a subclassed
            model: the shapes it was built with, taken as float32: give `data` for a
            model that takes integer ids, or inputs it was not built from).

    Returns:
        A structure of `tf.TensorSpec` matching what `model` is called on.

    Raises:
        ValueError: no data, and the model has neither inputs nor a build shape.
    """
    def spec(shape: Any, dtype: Any = "float32") -> tf.TensorSpec:
        dims = [BATCH if (i == 0 and d is None) else UNKNOWN_DIM if d is None else d
                for i, d in enumerate(shape)]
        return tf.TensorSpec(dims, tf.as_dtype(keras.backend.standardize_dtype(dtype)))

    functional = isinstance(model, (_compat.functional_class(), keras.Sequential))
    if data is not None:
        if isinstance(data, tf.data.Dataset):
            data = next(iter(data))
        data = split_batch(model, data)[0]
        return keras.tree.map_structure(
            lambda a: tf.TensorSpec(np.shape(a), tf.as_dtype(getattr(a, "dtype", "float32"))), data)
    if functional:
        return keras.tree.map_structure(lambda t: spec(t.shape, t.dtype), _input_structure(model))
    config = model.get_build_config() if model.built else None
    if config and "input_shape" in config:  # a shape, or a structure of shapes
        return keras.tree.map_shape_structure(spec, config["input_shape"])
    raise ValueError(f"cannot run {model.name!r} ({type(model).__name__}) without data: it has no "
                     "Input and no build shape; call it on a batch first, or pass data")


def first_input_spec(model: keras.Model) -> tf.TensorSpec:
    """The `tf.TensorSpec` of a model's first input, its batch dimension open: from its
    Input, or from the shape a subclassed model was built with (dtype float32 then).

    Args:
        model: A Keras model of any kind.

    Returns:
        The spec.

    Raises:
        ValueError: the model has neither inputs nor a build shape.
    """
    if getattr(model, "inputs", None):
        first = model.inputs[0]
        return tf.TensorSpec(first.shape, tf.as_dtype(keras.backend.standardize_dtype(first.dtype)))
    spec = keras.tree.flatten(example_inputs(model))[0]
    return tf.TensorSpec([None, *spec.shape[1:]], spec.dtype)


def _dtypes(outputs: Any) -> tuple[str, ...]:
    return tuple(t.dtype.name for t in keras.tree.flatten(outputs) if hasattr(t, "dtype"))


def run_model(model: keras.Model, data: Any = None, *, training: bool = True) -> ModelRun:
    """Traces `model`'s forward pass and says what ran in which dtype, layer by layer.

    Args:
        model: A built Keras model of any kind.
        data: A batch to trace on (see `example_inputs`); default: the model's input shapes.
        training: Trace the training-mode pass (BatchNormalization's batch statistics,
            dropout), as `fit` runs it.

    Returns:
        A `ModelRun`.

    Raises:
        ValueError: no data and no input shape to trace on.
        Exception: whatever the model's own code raises when traced.

    Example:
    >>> run = tfmp.rewrite.run_model(model)
    >>> run.share(("bfloat16",)), run.output_dtypes
    """
    specs = example_inputs(model, data)
    paths = {id(layer): path for path, layer in iter_layers(model)}
    paths[id(model)] = MODEL_PATH
    recorder = CallRecorder()
    with recorder.recording(model):
        function = tf.function(lambda x: model(x, training=training), autograph=False)
        try:
            concrete = function.get_concrete_function(specs)
        finally:
            _compat.clear_losses(model)  # add_loss left the trace's graph tensors there
    order = recorder.order
    outputs = {key: _dtypes(results[-1]) for key, results in recorder.results.items()}
    owned = recorder.owned_ops()
    runs = []
    for layer in order:
        ops = tuple(_op(o) for o, _ in owned.get(id(layer), []) if o.type in RECORDED_OPS)
        runs.append(LayerRun(paths.get(id(layer), layer.name), type(layer).__name__,
                             layer.dtype_policy.name, outputs.get(id(layer), ()), ops, layer))
    owner_of = {id(o): layer for items in owned.values() for o, layer in items}
    def path_of(operation: Any) -> str:
        return paths.get(id(owner_of.get(id(operation), model)), MODEL_PATH)

    producers, sources = [], []
    for tensor in keras.tree.flatten(concrete.structured_outputs):
        operation = tensor.op
        while id(operation) not in owner_of and operation.type == "Identity" and operation.inputs:
            operation = operation.inputs[0].op
        producers.append(path_of(operation))
        while operation.type in PASS_THROUGH_OPS + ("Identity",) and operation.inputs:
            operation = operation.inputs[0].op
        sources.append((operation.type, path_of(operation)))
    shapes = tuple(tuple(s.shape.as_list()) for s in keras.tree.flatten(specs))
    return ModelRun(shapes, tuple(runs), _dtypes(concrete.structured_outputs), tuple(producers),
                    tuple(sources))
