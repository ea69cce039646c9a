"""`tfmp.locate_overflows`: the layers that leave a 16-bit range, found by running the model.

float16 fails in one or two layers: activations past 65504 (a sum of squares, an
attention logit), or a statistic that underflows (a variance plus an epsilon that
float16 flushes to zero). Loss scaling cannot fix a forward pass that overflows.
The locator runs a few batches through the model under the 16-bit policy (as
`tfmp.prepare` would convert it; the caller's model is left as it was) and checks
every 16-bit value each layer's own ops compute: an op whose inputs are finite and
whose output is not made the overflow, and is charged to the layer that ran it.
Those layers, and those whose values come within `margin` of the 16-bit maximum,
must compute in float32. Keeping a layer in float32 may move the overflow to the
next one (its float32 output is past float16's range too), so the search runs
again with the found layers in float32 until nothing new is found.

With targets in the data and a loss, it also runs the batches forward and
backward in float32 and reports, per layer, the share of its activation
gradients (of the loss times the loss scale) too small for float16: what a
larger loss scale would save. TensorFlow-only (the traced graph).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfmp import _compat
from tfmp.precision import resolve_policy
from tfmp.precision.ranges import FLOAT16_TINY, HALF_DTYPES, HALF_MAX
from tfmp.rewrite.calls import CallRecorder
from tfmp.rewrite.classify import iter_layers, model_policy
from tfmp.rewrite.conversion import convert_policy
from tfmp.rewrite.enforcement import LayerSpec
from tfmp.rewrite.inplace import policies_of, restore_policies
from tfmp.rewrite.overflow_report import LayerOverflow, OverflowReport
from tfmp.rewrite.tracing import MODEL_PATH, split_batch
from tfmp.scaling.arguments import DEFAULT_INITIAL_SCALE

DEFAULT_MARGIN = 0.5
MAX_ROUNDS = 4
# Ops that cannot make a value larger than their inputs' or a non-finite one from finite
# inputs: not checked (a third of a convolutional network's ops).
PASS_THROUGH_OPS = frozenset((
    "Identity", "IdentityN", "Reshape", "Transpose", "Squeeze", "ExpandDims", "ConcatV2",
    "Pack", "Unpack", "Split", "SplitV", "Slice", "StridedSlice", "GatherV2", "Tile", "Pad",
    "PadV2", "MirrorPad", "Relu", "Relu6", "MaxPool", "Maximum", "Minimum", "Neg", "Abs",
    "Sigmoid", "Tanh", "Select", "SelectV2", "ZerosLike", "OnesLike", "StopGradient",
    "Floor", "Ceil", "Round", "Sign", "ClipByValue", "BroadcastTo"))


def _batches(data: Any, steps: int, batch_size: int) -> list[Any]:
    """The first `steps` batches of `data` (a dataset, or arrays cut into batches)."""
    if not isinstance(data, tf.data.Dataset):
        data = tf.data.Dataset.from_tensor_slices(
            tuple(data) if isinstance(data, list) else data).batch(batch_size)
    batches = list(data.take(steps))
    if not batches:
        raise ValueError("locate_overflows: the data has no batches")
    return batches


def _casts_to_their_consumer(owned: dict[int, list[tuple[Any, Any]]]) -> dict[int, list[Any]]:
    """Each layer's own ops, with the input casts Keras makes in `Layer.__call__` (outside
    `call`, so among the caller's ops) given to the one layer whose ops consume them."""
    owner = {id(op): layer for items in owned.values() for op, layer in items}
    ops_of: dict[int, list[Any]] = {key: [op for op, _ in items] for key, items in owned.items()}
    for key, items in owned.items():
        for op, _ in items:
            if op.type != "Cast" or not op.outputs:
                continue
            consumers = {id(owner[id(c)]) for c in op.outputs[0].consumers() if id(c) in owner}
            if len(consumers) == 1 and key not in consumers:
                ops_of[key].remove(op)
                ops_of.setdefault(consumers.pop(), []).append(op)
    return ops_of


def holds_nonfinite(structure: Any) -> bool:
    """Whether a batch's floating arrays (inputs, targets, sample weights) hold inf/NaN: bad data."""
    arrays = [np.asarray(a) for a in keras.tree.flatten(structure) if a is not None]
    return any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in arrays)


def _floating(structure: Any, graph: Any) -> list[Any]:
    return [t for t in keras.tree.flatten(structure)
            if tf.is_tensor(t) and t.dtype.is_floating and getattr(t, "graph", None) is graph]


@contextlib.contextmanager
def non_trainable_state_kept(model: keras.Model) -> Iterator[None]:
    """The model's non-trainable variables (a BatchNormalization's moving statistics, which
    a training-mode call updates) given back their values on exit."""
    saved = [(v, np.array(v.numpy())) for v in model.non_trainable_variables]
    try:
        yield
    finally:
        for variable, value in saved:
            variable.assign(value)


class Probe:
    """One instrumented pass of a model: per layer, what its own ops computed in the
    `checked` dtypes (largest finite value, inf/NaN made from finite inputs), whether its
    outputs were finite, and with a loss, its activation gradients' size."""

    def __init__(self, model: keras.Model, checked: tuple[str, ...],
                 loss: Optional[Callable[[Any, Any], Any]], scale: float) -> None:
        self.model, self.loss, self.scale = model, loss, scale
        self.checked = {tf.as_dtype(dtype) for dtype in checked}
        self.paths = {id(layer): path for path, layer in iter_layers(model)}
        self.paths[id(model)] = MODEL_PATH
        self.recorder = CallRecorder()
        self.origin_ops: dict[str, list[str]] = {}  # op types, in the order of the flags
        self.layers: dict[str, Any] = {}
        # A closure, not the bound method: TensorFlow's retracing warning counts traces per
        # Python function, and every probe traces its own.
        self.function = tf.function(lambda x, y: self._step(x, y), autograph=False)

    def _step(self, x: Any, y: Any) -> dict[str, Any]:
        self.recorder.reset()
        with tf.GradientTape(persistent=False, watch_accessed_variables=self.loss is not None) as tape:
            if self.loss is not None:  # ops on the inputs alone are recorded too
                tape.watch([t for t in keras.tree.flatten(x) if t.dtype.is_floating])
            outputs = self.model(x, training=True)
            scaled = (None if self.loss is None or y is None
                      else tf.cast(self.loss(y, outputs), tf.float32) * self.scale)
        _compat.clear_losses(self.model)
        graph = _compat.current_graph()
        owned = _casts_to_their_consumer(self.recorder.owned_ops())
        finite_of: dict[Any, Any] = {}

        def finite(t: Any) -> Any:
            if t.ref() not in finite_of:
                finite_of[t.ref()] = tf.reduce_all(tf.math.is_finite(t))
            return finite_of[t.ref()]

        stats: dict[str, Any] = {}
        layer_outputs: dict[str, list[Any]] = {}
        for layer in self.recorder.order:
            path = self.paths.get(id(layer), layer.name)
            self.layers[path] = layer
            largest, made, types = [tf.constant(0.0)], [], []
            for op in owned.get(id(layer), []):
                if op.graph is not graph:
                    continue
                checked = [t for t in op.outputs if t.dtype in self.checked]
                floats = [t for t in op.inputs if t.dtype.is_floating]
                if (not checked or op.type in PASS_THROUGH_OPS
                        or all(t.op.type == "Const" for t in floats)):
                    continue  # a constant (a -inf mask, its cast) is not a value the data made
                inputs_ok = [finite(t) for t in floats]
                for t in checked:
                    size = tf.abs(tf.cast(tf.reshape(t, [-1]), tf.float32))
                    largest.append(tf.reduce_max(tf.concat(
                        [tf.where(tf.math.is_finite(size), size, 0.0), [0.0]], 0)))
                    made.append(tf.logical_and(tf.logical_not(finite(t)),
                                               tf.reduce_all(tf.stack(inputs_ok + [True]))))
                    types.append(op.type)
            outs = [t for result in self.recorder.results.get(id(layer), [])
                    for t in _floating(result, graph)]
            layer_outputs[path] = outs
            self.origin_ops[path] = types
            stats[path] = {
                "largest": tf.reduce_max(tf.stack(largest)),
                "made": tf.stack(made) if made else tf.zeros([0], tf.bool),
                "outputs_ok": tf.reduce_all(tf.stack([finite(t) for t in outs] + [True])),
            }
        if scaled is not None:
            flat = [(path, t) for path, outs in layer_outputs.items() for t in outs]
            grads = tape.gradient(scaled, [t for _, t in flat],
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            for path in layer_outputs:
                mine = [tf.abs(tf.cast(tf.reshape(g, [-1]), tf.float32))
                        for (p, _), g in zip(flat, grads) if p == path and g is not None]
                values = tf.concat(mine + [tf.zeros([0])], 0)
                stats[path]["nonzero"] = tf.reduce_sum(tf.cast(values > 0, tf.float32))
                stats[path]["tiny"] = tf.reduce_sum(
                    tf.cast(tf.logical_and(values > 0, values < FLOAT16_TINY), tf.float32))
        return stats

    def run(self, batches: list[Any]) -> list[dict[str, dict[str, np.ndarray]]]:
        """The stats of each batch, as numpy values; the model's variables as they were."""
        with non_trainable_state_kept(self.model), self.recorder.recording(self.model):
            return [keras.tree.map_structure(np.asarray, self.function(*batch))
                    for batch in batches]


def _one_loss(loss: Any) -> Callable[[Any, Any], Any]:
    fn = keras.losses.get(loss) if isinstance(loss, str) else loss
    if not callable(fn):
        raise ValueError(f"locate_overflows: loss={loss!r} is not a Keras loss or a callable")
    return fn


def compiled_loss(model: keras.Model, loss: Any) -> Optional[Callable[[Any, Any], Any]]:
    """The loss of the gradient pass: `loss`, else the model's compiled one (one per output
    as a list, or a dict by output name); None when there is none, or a compiled one that
    cannot be read (logged: no gradient figures then)."""
    given = loss is not None
    loss = loss if given else getattr(model, "loss", None)
    if loss is None:
        return None
    try:
        if isinstance(loss, dict):
            names = list(getattr(model, "output_names", None) or [])
            fns = [_one_loss(loss[name]) for name in names]
        elif isinstance(loss, (list, tuple)):
            fns = [_one_loss(item) for item in loss]
        else:
            fns = [_one_loss(loss)]
    except (ValueError, KeyError, TypeError) as e:
        if given:
            raise ValueError(str(e) if isinstance(e, ValueError) else
                             f"locate_overflows: loss={loss!r} does not fit the outputs") from None
        logging.info("tfmp.locate_overflows: the compiled loss %r cannot be used (%s); no "
                     "gradient figures", loss, e)
        return None

    def total(y: Any, outputs: Any) -> Any:
        ys, outs = keras.tree.flatten(y), keras.tree.flatten(outputs)
        pairs = zip(fns * len(outs) if len(fns) == 1 else fns, ys, outs)
        return tf.add_n([tf.reduce_mean(tf.cast(fn(a, b), tf.float32)) for fn, a, b in pairs])

    return total


def _under(model: keras.Model, policy: str, float32_layers: Iterable[LayerSpec],
           x: Any, probe: Callable[[keras.Model], Any]) -> Any:
    """`probe(m)` on `model` converted to `policy` with `float32_layers`; `model` as it was."""
    before = policies_of(model)
    # float32 and already so: run as it is (no copy); a 16-bit pass always sees prepare's model
    same = policy == "float32" and model_policy(model) == policy and not list(float32_layers)
    converted = model if same else convert_policy(model, policy, data=x,
                                                  float32_layers=float32_layers)
    try:
        return probe(converted)
    finally:
        if converted is model and not same:
            restore_policies(model, before)


def _judge(path: str, layer: Any, stats: list[dict], types: list[str], limit: float,
           half: str) -> LayerOverflow:
    largest = max(float(s[path]["largest"]) for s in stats)
    made_steps = [i for i, s in enumerate(stats) if s[path]["made"].any()]
    bad_outputs = sum(1 for s in stats if not s[path]["outputs_ok"])
    reason, op = "", None
    if made_steps:
        first = stats[made_steps[0]][path]["made"]
        op = types[int(np.argmax(first))] if len(types) == len(first) else None
        reason = (f"{op or 'an op'} made inf/NaN in {half} from finite inputs at step "
                  f"{made_steps[0]} ({len(made_steps)} of {len(stats)} steps)")
    elif largest > limit:
        reason = (f"computes {largest:.4g} in {half}, {largest / HALF_MAX[half]:.2f}x its "
                  f"largest value {HALF_MAX[half]:.5g}")
    return LayerOverflow(path, type(layer).__name__, largest, len(made_steps),
                         made_steps[0] if made_steps else None, op, bad_outputs, None, reason)


def locate_overflows(
    model: keras.Model,
    data: Any,
    *,
    steps: int = 8,
    policy: str = "mixed_float16",
    margin: float = DEFAULT_MARGIN,
    loss: Any = None,
    loss_scale: Optional[float] = None,
    batch_size: int = 32,
) -> OverflowReport:
    """Finds the layers that must compute in float32 for `model` to run in 16 bits.

    Runs `steps` batches of `data` through the model converted to `policy` (as
    `tfmp.prepare` converts it: outputs, softmax and normalization statistics in
    float32) and checks every 16-bit value each layer's own ops compute. A layer is
    condemned when one of its ops makes inf/NaN from finite inputs (an overflow, or a
    division by a statistic that underflowed), or when it computes a value past
    `margin` x the 16-bit maximum. The search repeats with the condemned layers in
    float32 (at most 4 rounds) until nothing new is found. With targets and a loss,
    the same batches also run forward and backward in float32 to measure each layer's
    activation gradients that underflow float16 at `loss_scale`. The caller's model
    is not changed (a model converted in place gets its policies and its
    non-trainable variables back).

    Args:
        model: A built Keras model of any kind `tfmp.prepare` accepts.
        data: A `tf.data.Dataset` of batches (`x` or `(x, y[, sample_weight])`), or
            arrays (`x` or `(x, y)`) cut into `batch_size` batches.
        steps: Batches to run (at least 1).
        policy: The 16-bit policy to check (`mixed_float16`, `mixed_bfloat16`, or any
            spelling `tfmp.set_policy` accepts).
        margin: A layer computing more than `margin` x the 16-bit maximum (65504 for
            float16) is condemned too; in (0, 1].
        loss: A Keras loss (name or object) for the backward pass; default the model's
            compiled loss; without one (or without targets) no gradients are measured.
        loss_scale: The scale the gradients are measured at; default 32768 (tfmp's
            initial dynamic scale) under float16, 1 under bfloat16.
        batch_size: The batch size when `data` are arrays.

    Returns:
        An `OverflowReport`: `report.layers` (the condemned, in model order, each with
        the figure that condemned it), `report.paths` (for `tfmp.prepare(...,
        float32_layers=...)`), `report.policy_map`, `str(report)` (a table).

    Raises:
        ValueError: a policy that is not 16-bit, a bad `steps`/`margin`/`loss`, data
            without batches, or an unbuilt model.

    Example:
    >>> report = tfmp.locate_overflows(model, train_ds.take(8))
    >>> print(report)
    >>> model, opt = tfmp.prepare(model, "adam", "fp16", float32_layers=report.paths)
    """
    target, half = _checked_arguments(model, policy, steps, margin)
    scale = float(loss_scale if loss_scale is not None
                  else DEFAULT_INITIAL_SCALE if half == "float16" else 1.0)
    batches = [split_batch(model, b) for b in _batches(data, steps, batch_size)]
    rows = _search(model, target, half, batches, scale, margin * HALF_MAX[half])
    fn = compiled_loss(model, loss)
    if fn is not None and half == "float16" and all(y is not None for _, y in batches):
        _measure_underflow(model, rows, batches, fn, scale)
    original = dict(iter_layers(model))
    bad_inputs = tuple(i for i, (x, _) in enumerate(batches) if holds_nonfinite(x))
    return OverflowReport(target, len(batches), scale, margin, tuple(rows.values()), bad_inputs,
                          {p: original[p].path for p in rows if getattr(original.get(p), "path", None)})


def _checked_arguments(model: keras.Model, policy: str, steps: Any, margin: Any) -> tuple[str, str]:
    """`(policy name, its 16-bit compute dtype)`, or the ValueError `locate_overflows` raises."""
    target = resolve_policy(policy).name
    half = keras.dtype_policies.get(target).compute_dtype
    if half not in HALF_DTYPES:
        raise ValueError(f"locate_overflows: policy={policy!r} computes in {half}; give a 16-bit "
                         "policy (mixed_float16 or mixed_bfloat16)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"locate_overflows: steps must be a positive integer; got steps={steps!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin <= 1:
        raise ValueError(f"locate_overflows: margin must be in (0, 1]; got margin={margin!r}")
    if not model.built:
        raise ValueError(f"locate_overflows: {model.name!r} is not built; call it on a batch first")
    return target, half


def _search(model: keras.Model, target: str, half: str, batches: list, scale: float,
            limit: float) -> dict[str, LayerOverflow]:
    """Every layer's row, in model order: rounds under `target`, each with the layers condemned
    so far in float32, until a round condemns none (at most `MAX_ROUNDS`)."""
    found: dict[str, LayerOverflow] = {}
    rows: dict[str, LayerOverflow] = {}
    for _ in range(MAX_ROUNDS):
        def probe16(converted: keras.Model) -> tuple[Any, list]:
            p = Probe(converted, (half,), None, scale)
            return p, p.run([(x, None) for x, _ in batches])

        try:
            p, stats = _under(model, target, [k for k in found if k != MODEL_PATH],
                              batches[0][0], probe16)
        except ValueError as e:  # a found layer no policy can reach (see convert_policy)
            if not found:
                raise
            logging.warning("tfmp.locate_overflows: %s; the search stops there", e)
            break
        new = {}
        for path, layer in p.layers.items():
            if path == MODEL_PATH and not p.origin_ops.get(path):
                continue  # a Sequential or Functional model's own call: nothing it computes
            if path in found:  # kept in float32 this round: its row is the one that condemned it
                continue
            rows[path] = _judge(path, layer, stats, p.origin_ops.get(path, []), limit, half)
            if rows[path].reason:
                new[path] = rows[path]
        if not new:
            break
        found.update(new)
    else:
        logging.warning("tfmp.locate_overflows: still finding layers after %d rounds (%s); "
                        "run it again with those in float32 to check the rest", MAX_ROUNDS,
                        ", ".join(found))
    return rows


def _measure_underflow(model: keras.Model, rows: dict[str, LayerOverflow], batches: list,
                       loss: Any, scale: float) -> None:
    """Adds to each row the share of its activation gradients that underflow float16 at
    `scale`, measured forward and backward in float32 on the same batches."""
    def probe32(converted: keras.Model) -> list:
        return Probe(converted, (), loss, scale).run(batches)

    grad_stats = _under(model, "float32", [], batches[0][0], probe32)
    for path in rows:
        nonzero = sum(float(s[path]["nonzero"]) for s in grad_stats if path in s)
        tiny = sum(float(s[path]["tiny"]) for s in grad_stats if path in s)
        if nonzero:
            rows[path] = rows[path].with_underflow(tiny / nonzero)
