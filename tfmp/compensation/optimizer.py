"""`tfmp.compensate`: any Keras optimizer, made to keep the small updates of 16-bit weights.

Under a `"bfloat16"` policy Keras keeps the weights, the gradients and the slots in
bfloat16 and computes the update in bfloat16: every update smaller than half a unit
in the last place of its weight is lost (keras-team/keras-hub#2629). A compensated
optimizer is the same optimizer class (`isinstance(opt, keras.optimizers.Adam)` still
holds) whose update of a 16-bit weight is computed in float32 from the weight and
written back without that loss (`tfmp.compensation.rounding`): by stochastic rounding
or with a Kahan buffer. Float32 weights (the float32 output layer) are updated as Keras
does.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Any, Optional

import keras
from keras import ops

from tfmp import _compat
from tfmp.compensation import rounding as rounding_lib
from tfmp.compensation.tf_ops import random_bits, several_replicas
from tfmp.precision.ranges import HALF_DTYPES

ROUNDINGS = ("stochastic", "kahan", "nearest")
SLOT_DTYPES = ("bfloat16", "float32")
DEFAULT_ROUNDING = "stochastic"
DEFAULT_SLOTS_DTYPE = "bfloat16"
DEFAULT_LOST_UPDATES_EVERY = 50
SAMPLED_ELEMENTS = 4096  # per weight and sample: the lost share is a statistic, not a census
_FLOAT32_SLOTS = ("gradient_accumulator", "average")  # sums and averages: kept in float32
OPTIONS = ("rounding", "slots_dtype", "lost_updates_every", "seed")


def is_half(variable: Any) -> bool:
    """True if `variable` (a Keras or TensorFlow variable, or a tensor) is 16-bit."""
    return keras.backend.standardize_dtype(variable.dtype) in HALF_DTYPES


def _dense(value: Any) -> Any:
    """A sparse update (`IndexedSlices`: an embedding's gradient) as a dense tensor."""
    return ops.convert_to_tensor(value) if hasattr(value, "dense_shape") else value


def checked_seed(rounding: str, slots_dtype: str, lost_updates_every: int,
                  seed: Optional[int]) -> int:
    """Checks the options (see `CompensatedOptimizer`); returns the seed to use."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: use one of {', '.join(ROUNDINGS)}")
    if slots_dtype not in SLOT_DTYPES:
        raise ValueError(f"slots_dtype={slots_dtype!r}: use one of {', '.join(SLOT_DTYPES)}")
    if (isinstance(lost_updates_every, bool) or not isinstance(lost_updates_every, int)
            or lost_updates_every < 0):
        raise ValueError(f"lost_updates_every={lost_updates_every!r}: use a whole number "
                         ">= 0 (0: never measure)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2 ** 63):
        raise ValueError(f"seed={seed!r}: use a whole number in [0, 2**63) or None")
    return random.randrange(2 ** 31) if seed is None else seed


class _View:
    """A 16-bit variable's float32 stand-in in one `update_step`."""

    def __init__(self, variable: Any, before: Any, decay: Any) -> None:
        self.variable, self.before, self.decay, self.written = variable, before, decay, False
        self.draw, self.used = None, 0  # 32 random bits per element, and the sets taken


class _Scratch:
    """Trace-time bookkeeping (not tracked by Keras)."""

    def __init__(self) -> None:
        self.views: dict[int, _View] = {}
        self.current: Optional[_View] = None  # the 16-bit weight whose update_step runs
        self.streams: dict[int, int] = {}


class CompensatedOptimizer(_compat.ViewedUpdates):
    """An optimizer that keeps the small updates of 16-bit weights.

    Made by `tfmp.compensate(optimizer)`: a subclass of the optimizer's own class
    (`CompensatedAdam` is an `Adam`), registered for `.keras` saving. For every 16-bit
    trainable variable, `update_step` runs in float32 (the gradient, the learning rate
    and the weight cast up; weight decay folded into the same write), and the new value
    is written back by `rounding`:

    - `"stochastic"` (bfloat16 weights): rounded up or down at random, unbiased; the
      random bits are a function of `seed`, the step and the variable, the same on every
      replica and after a resume. 2 bytes per weight.
    - `"kahan"`: a 16-bit buffer per weight (an optimizer variable, saved with it)
      carries what rounding dropped into the next step. 4 bytes per weight.
    - `"nearest"`: Keras' rounding, every small update lost: a baseline that measures.

    Slots of 16-bit weights (Adam's moments, SGD's momentum) are created in
    `slots_dtype`; bfloat16 slots are written by stochastic rounding (by nearest under
    `"nearest"`). Gradient accumulators and EMA averages are float32.

    The options below are `tfmp.compensate`'s, saved in the optimizer's config.
    Every `lost_updates_every` updates, the share of the updates a float32 weight would
    have kept that the 16-bit write lost (`tfmp.compensation.rounding.lost_counts`) is
    measured: `lost_updates` (about 0.9 with `"nearest"` at a small learning rate, a
    few percent with `"kahan"`; stochastic rounding loses none in expectation and is
    not measured: None).

    Args:
        rounding: `"stochastic"` (default), `"kahan"` or `"nearest"`.
        slots_dtype: `"bfloat16"` (default) or `"float32"`.
        lost_updates_every: Measure the lost share every this many updates (0: never).
        seed: Seed of the stochastic rounding; default: drawn from Python's `random`
            (set by `keras.utils.set_random_seed`). Kept in an optimizer variable, so a
            run restored from a checkpoint rounds as the uninterrupted one.
    """

    def __init__(self, *args: Any, rounding: str = DEFAULT_ROUNDING,
                 slots_dtype: str = DEFAULT_SLOTS_DTYPE,
                 lost_updates_every: int = DEFAULT_LOST_UPDATES_EVERY,
                 seed: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.init_compensation(rounding, slots_dtype, lost_updates_every, seed)

    def init_compensation(self, rounding: str, slots_dtype: str, lost_updates_every: int,
                          seed: Optional[int]) -> None:
        """Checks and sets the options (see the class docstring); called once."""
        seed = checked_seed(rounding, slots_dtype, lost_updates_every, seed)
        self.rounding, self.slots_dtype = rounding, slots_dtype
        self.lost_updates_every = lost_updates_every
        self.seed = seed
        self._scratch = _Scratch()

    # ------------------------------------------------------------------ build

    def build(self, var_list: Any) -> None:
        """Keras' build, then the Kahan buffers, the rounding seed and the lost-update counts.

        Args:
            var_list: The trainable variables.

        Raises:
            ValueError: `rounding="stochastic"` with float16 weights (it is bfloat16's).
        """
        if self.built:
            return
        var_list = list(var_list)
        if self.rounding == "stochastic" and any(
                keras.backend.standardize_dtype(v.dtype) == "float16" for v in var_list):
            raise ValueError("rounding='stochastic' rounds float32 to bfloat16; this model has "
                             "float16 weights: use rounding='kahan'")
        super().build(var_list)
        # Kahan buffers in their weight's own dtype: Keras' slot, not this class's choice
        self._kahan = [super(CompensatedOptimizer, self).add_variable_from_reference(v, "kahan")
                       if self.rounding == "kahan" and is_half(v) else None for v in var_list]
        measured = self.lost_updates_every and self.rounding != "stochastic"
        self._counts = [  # per 16-bit weight: [lost, counted] at its last sample
            self.add_variable((2,), initializer="zeros", dtype="float32",
                              name=f"{v.path.replace('/', '_')}_lost_updates")
            if measured and is_half(v) else None for v in var_list]
        self._rounding_seed = self.add_variable(
            (), initializer=keras.initializers.Constant(self.seed), dtype="int64",
            name="rounding_seed")
        streams = {id(v): i for i, v in enumerate(self.variables)}
        self._scratch.streams = {k: len(var_list) + i for k, i in streams.items()}

    def add_variable_from_reference(self, reference_variable: Any, name: Optional[str] = None,
                                    initializer: Any = "zeros") -> Any:
        """Keras' slot, in `slots_dtype` for a 16-bit weight (float32 for accumulators)."""
        dtype = keras.backend.standardize_dtype(reference_variable.dtype)
        wanted = None
        if dtype in HALF_DTYPES:
            wanted = "float32" if name in _FLOAT32_SLOTS else self.slots_dtype
        if wanted is None or wanted == dtype:
            return super().add_variable_from_reference(reference_variable, name, initializer)
        with _compat.reading_dtype(reference_variable, wanted):
            return super().add_variable_from_reference(reference_variable, name, initializer)

    # ----------------------------------------------------------------- update

    def apply(self, grads: Any, trainable_variables: Any = None) -> None:
        """Keras' `apply`, with `gradients_for_apply(grads)`."""
        return super().apply(self.gradients_for_apply(grads), trainable_variables)

    def gradients_for_apply(self, grads: Any) -> list:
        """The gradients of 16-bit weights in float32 where Keras adds them to a float32
        buffer (gradient accumulation), or mixes them with float32 ones in one sum (the
        global norm of `global_clipnorm`; the all-reduce over replicas, which takes one
        dtype); otherwise as they are (`update_step` casts each in turn, so no
        float32 copy of every gradient is held at once).

        Args:
            grads: The gradients, one per variable (None allowed).

        Returns:
            The gradients, some cast to float32.
        """
        grads = list(grads)
        if not (self.gradient_accumulation_steps or self.global_clipnorm or several_replicas()):
            return grads
        return [g if g is None or not is_half(g) else ops.cast(_dense(g), "float32")
                for g in grads]

    def view_owner(self, variable: Any) -> Any:
        view = self._scratch.views.get(id(variable))
        return None if view is None else view.variable

    def decays_itself(self, variable: Any) -> bool:
        return is_half(variable)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """The wrapped class's update, in float32 for a 16-bit `variable`.

        Args:
            gradient: The variable's gradient.
            variable: The variable (a TensorFlow variable on Keras' TensorFlow path).
            learning_rate: The learning rate.
        """
        if not is_half(variable):
            return super().update_step(gradient, variable, learning_rate)
        before = ops.cast(variable, "float32")
        decay = None
        if _compat.uses_weight_decay(self, variable):
            rate = ops.cast(learning_rate, "float32") * ops.cast(self.weight_decay, "float32")
            decay = ops.multiply(before, -rate)
        stand_in = before if decay is None else ops.add(before, decay)
        view = _View(variable, before, decay)
        if self.rounding == "stochastic" or (self.rounding == "kahan"
                                             and self.slots_dtype == "bfloat16"):
            # one draw for the weight and its slots (`rounding.split_bits`): a third of the bits
            view.draw = random_bits(ops.shape(before), self._rounding_seed,
                                    self._stream(_compat.variable_index(self, variable)))
        self._scratch.views[id(stand_in)] = view
        self._scratch.current = view
        try:
            super().update_step(ops.cast(_dense(gradient), "float32"), stand_in, learning_rate)
            if not view.written and decay is not None:
                self._write_weight(view, ops.zeros_like(before))
        finally:
            del self._scratch.views[id(stand_in)]
            self._scratch.current = None

    def assign(self, variable: Any, value: Any) -> None:
        if not self._write(variable, value, None):
            super().assign(variable, value)

    def assign_add(self, variable: Any, value: Any) -> None:
        if not self._write(variable, value, 1.0):
            super().assign_add(variable, value)

    def assign_sub(self, variable: Any, value: Any) -> None:
        if not self._write(variable, value, -1.0):
            super().assign_sub(variable, value)

    def _write(self, target: Any, value: Any, sign: Optional[float]) -> bool:
        """A compensated write, if `target` is a 16-bit weight's stand-in or a 16-bit slot."""
        view = self._scratch.views.get(id(target))
        value = ops.cast(_dense(value), "float32")
        if view is not None:
            if sign is None:
                update = ops.subtract(value, view.before)
            else:
                update = value if sign > 0 else ops.negative(value)
                if view.decay is not None:
                    update = ops.add(update, view.decay)
            self._write_weight(view, update)
            return True
        stream = self._scratch.streams.get(id(target))
        if stream is None or self.rounding == "nearest" or not is_half(target):
            return False
        new = value if sign is None else ops.add(ops.cast(target, "float32"), sign * value)
        super().assign(target, rounding_lib.stochastic_round(new, self._bits(new, stream)))
        return True

    def _stream(self, stream: int) -> Any:
        return ops.add(ops.multiply(ops.cast(self.iterations, "int64"), 2 ** 24), stream)

    def _bits(self, like: Any, stream: int) -> Any:
        """16 random bits per element of `like`: a set of the running weight's draw while one
        is left and the shapes agree, else a draw of its own (`stream`: distinct per write)."""
        view = self._scratch.current
        if (view is not None and view.draw is not None and view.used < rounding_lib.SPLITS
                and tuple(like.shape) == tuple(view.draw.shape)):
            view.used += 1
            return rounding_lib.split_bits(view.draw, view.used - 1)
        return rounding_lib.split_bits(
            random_bits(ops.shape(like), self._rounding_seed, self._stream(stream)), 0)

    def _write_weight(self, view: _View, update: Any) -> None:
        variable, before = view.variable, view.before
        index = _compat.variable_index(self, variable)
        compensation = None
        if self.rounding == "kahan":
            buffer = self._kahan[index]
            held = ops.cast(buffer, "float32")  # each cast once: the weight's is `before`
            new, carried = rounding_lib.kahan_add(before, held, update, dtype=variable.dtype)
            compensation = (held, carried)
            super().assign(buffer, carried)
        elif self.rounding == "stochastic":
            total = ops.add(before, update)
            new = rounding_lib.stochastic_round(total, self._bits(total, index))
        else:
            new = rounding_lib.nearest(ops.add(before, update), variable.dtype)
        if self._counts[index] is not None:  # measured (stochastic rounding loses none)
            self._sample_lost(self._counts[index], update, before, new, compensation)
        super().assign(variable, new)
        view.written = True

    def _sample_lost(self, counts: Any, update: Any, before: Any, new: Any,
                     compensation: Any) -> None:
        """Every `lost_updates_every` updates, `counts` = [lost, counted] over at most
        `SAMPLED_ELEMENTS` evenly spaced elements of the weight (its own counts: no write
        shared between weights, which would order their updates one after the other)."""
        size = math.prod(int(d) for d in update.shape)
        stride = -(-size // SAMPLED_ELEMENTS)  # at most that many elements
        last = int(update.shape[-1]) if len(update.shape) else 1
        while math.gcd(stride, last) != 1:  # coprime: every column is visited, not a few
            stride += 1
        picked = ops.arange(0, size, stride)

        def sample() -> None:
            def pick(tensor: Any) -> Any:
                return ops.take(ops.reshape(tensor, (-1,)), picked)

            kept = None if compensation is None else tuple(  # float32, on the picked only
                ops.cast(pick(c), "float32") for c in compensation)
            counts.assign(ops.stack(rounding_lib.lost_counts(
                pick(update), pick(before), pick(new), self.rounding, kept)))

        due = ops.equal(ops.mod(self.iterations, self.lost_updates_every), 0)
        ops.cond(due, sample, lambda: None)

    # ---------------------------------------------------------------- reading

    @property
    def measures_lost_updates(self) -> bool:
        """True if the lost share is measured: built, `lost_updates_every` > 0 and a rounding
        that can lose an update (not `"stochastic"`, which loses none in expectation)."""
        return any(c is not None for c in getattr(self, "_counts", []))

    def lost_updates_share(self) -> Any:
        """The share of the updates a float32 weight would have kept that the 16-bit writes
        lost, at each weight's last sample (a float32 tensor; 0 before the first sample).

        Raises:
            ValueError: nothing is measured (`measures_lost_updates` is False).
        """
        counts = [c for c in getattr(self, "_counts", []) if c is not None]
        if not counts:
            raise ValueError(f"{type(self).__name__} measures no lost updates (rounding="
                             f"{self.rounding!r}, lost_updates_every={self.lost_updates_every}"
                             f"{'' if self.built else ', not built yet'})")
        total = functools.reduce(ops.add, counts, ops.zeros((2,), "float32"))
        return ops.divide(total[0], ops.maximum(total[1], 1.0))

    @property
    def lost_updates(self) -> Optional[float]:
        """`lost_updates_share()` as a Python float; None where nothing is measured."""
        if not self.measures_lost_updates:
            return None
        return float(ops.convert_to_numpy(self.lost_updates_share()))

    def get_config(self) -> dict[str, Any]:
        """The wrapped class's config plus the compensation options."""
        config = super().get_config()
        config.update({name: getattr(self, name) for name in OPTIONS})
        return config


def compensated_part(optimizer: Any) -> Optional[CompensatedOptimizer]:
    """The `CompensatedOptimizer` `optimizer` is, or wraps (a loss-scale optimizer's inner
    one), else None.

    Args:
        optimizer: Any optimizer, or None.

    Returns:
        The compensated optimizer, or None.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if isinstance(inner, CompensatedOptimizer) else None
