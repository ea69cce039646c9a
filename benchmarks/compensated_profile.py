"""The `profile` part of `benchmarks.compensated`: one training step cut into its pieces.

  python -m benchmarks.compensated --part=profile --rounds=12 --block=5 --clock=cpu
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Sequence

from benchmarks import interleave
from benchmarks.compensated import FLAGS, VARIANTS, Variant, build, wide_mlp

def profile_functions(model: Any, x: Any, y: Any, variant: Variant,
                      ) -> dict[str, Callable[[], Any]]:
    """The pieces of one training step of `model` (compiled) on the batch `(x, y)`."""
    import tensorflow as tf

    from tfmp.compensation.rounding import split_bits
    from tfmp.compensation.tf_ops import random_bits

    variables, opt = model.trainable_variables, model.optimizer

    def grads_of() -> Any:
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
        return tape.gradient(loss, variables)

    opt.build(variables)
    fixed = [tf.identity(g) for g in tf.function(grads_of)()]
    kernels = [v for v in variables if len(v.shape) == 2]
    dtype = model.layers[0].compute_dtype

    def matmuls() -> Any:  # forward x@W, backward dy@W^T and x^T@dy, per Dense layer
        out, h = [], tf.cast(x, dtype)
        for w in kernels:
            w = tf.cast(w, dtype)
            z = tf.matmul(h, w)
            out += [tf.matmul(z, w, transpose_b=True), tf.matmul(h, z, transpose_a=True)]
            h = z
        return out

    half = [(v, g) for v, g in zip(variables, fixed) if v.dtype == tf.bfloat16]
    slots = {v.path: v for v in opt.variables}

    def casts() -> Any:  # what a compensated update casts: weight, gradient, 2 slots, up and down
        out = []
        for v, g in half:
            ups = [tf.cast(t, tf.float32) for t in (v, g, *[s for p, s in slots.items()
                   if p.endswith(v.path.replace("/", "_") + "_momentum")
                   or p.endswith(v.path.replace("/", "_") + "_velocity")])]
            out += [tf.cast(u, tf.bfloat16) for u in ups]
        return out

    sets = ((variant.rounding == "stochastic")
            + 2 * (variant.slots_dtype == "bfloat16" and variant.rounding != "nearest"))
    draws = min(sets, 1)  # one 32-bit draw per weight serves its and its slots' roundings

    def bits() -> Any:  # stochastic rounding's draw and the 16-bit sets it is split into
        # (seeded from a variable, as the optimizer does: constant seeds are folded away)
        drawn = [random_bits(tf.shape(v), opt.iterations, i) for i, (v, _) in enumerate(half)]
        return [split_bits(d, k) for d in drawn for k in range(sets)]

    functions = {"step": lambda: opt.apply(grads_of(), variables), "forward+backward": grads_of,
                 "apply": lambda: opt.apply(fixed, variables), "matmuls": matmuls}
    if variant.rounding:
        functions["update casts"] = casts
    if variant.rounding and draws:
        functions["random bits"] = bits
    return {k: tf.function(f) for k, f in functions.items()}


def profile(names: Sequence[str], width: int, batch_size: int, rounds: int, warmup: int,
            steps: int) -> None:
    import keras

    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one tf.function per piece: "retracing" warnings
    x, y = next(iter(interleave.random_batches(width, batch_size)))
    blocks, clock = {}, interleave.CLOCKS[FLAGS.clock]
    for n in names:
        model = build(n, wide_mlp(width), 1e-4, 0,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for part, fn in profile_functions(model, x, y, VARIANTS[n]).items():
            fn()  # trace

            def run(fn=fn) -> float:
                start = clock()
                for _ in range(steps):
                    fn()  # eager CPU execution: done when it returns
                return (clock() - start) / steps
            blocks[n, part] = run
    times = interleave.interleaved(blocks, rounds, warmup)
    print(f"MLP {width}x4, batch {batch_size}: ms per call ({FLAGS.clock} clock, median of "
          f"{rounds} interleaved {steps}-call blocks) and share of the step")
    parts = ["step", "forward+backward", "matmuls", "apply", "update casts", "random bits"]
    print("| variant | " + " | ".join(parts) + " | rest (step - fwd/bwd - apply) |")
    print("|---|" + "---|" * (len(parts) + 1))
    for n in names:
        ms = {p: 1e3 * statistics.median(times[n, p]) for p in parts if (n, p) in times}
        rest = ms["step"] - ms["forward+backward"] - ms["apply"]
        print(f"| {n} | " + " | ".join(
            f"{ms[p]:.2f} ({ms[p] / ms['step']:.0%})" if p in ms else "-" for p in parts)
            + f" | {rest:.2f} ({rest / ms['step']:.0%}) |")
