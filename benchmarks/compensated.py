"""16-bit weights that still learn: what `tfmp.compensate` buys and costs.

Variants (`VARIANTS`): `float32`; `mixed_bfloat16` (float32 weights and Adam state);
`bfloat16` (stock Keras: weights, gradients and Adam's moments in bfloat16, plain Adam);
and `<rounding>/<slots>`: bfloat16 weights under `tfmp.compensate(Adam, rounding=...,
slots_dtype=...)`, rounding in stochastic / kahan / nearest, slots in bf16 / f32. The
output head is float32 everywhere. `float32/bf16init` (a control): float32 training from
the bfloat16 models' initial weights (Keras draws them in bfloat16: other values, same
seed). `+xla`: `model.compile(jit_compile=True)` (speed only).

Parts (`--part`):
- `accuracy`: scikit-learn digits (70/30 split, random_state 0), MLP 64-256-256-10 with a
  float32 softmax head, Adam, batch 64, `--epochs` epochs, test accuracy per learning
  rate: mean and min-max over `--seeds` seeds, and the compensated variants' lost-update
  share at the end.
- `losses`: each reference model (`models/`, `--size`) on its synthetic task
  (`tfmp.app.data.synthetic`), `--steps` steps of Adam 1e-3: loss on the 1,024 eval
  examples and mean training loss over the last 50 steps, as a ratio to float32's.
- `memory`: each reference model at `--size` (default large) in a spawned process per
  variant: training-state bytes per trainable parameter from the built optimizer's
  `variables` and the model's `trainable_variables` (weights + gradients, of the
  weights' dtypes, + slots + Kahan buffers; the optimizer's scalars and lost-update
  counts in "other"), and the process's peak resident set after `--memory_steps` steps.
- `speed`: an MLP of four 1024-wide Dense layers, batch `--batch_size`, every variant in
  one process taking turns in `--block`-step `fit` blocks (`benchmarks.interleave`),
  by wall clock and process CPU time; median speed ratio to float32 with quartiles.
- `profile`: the same MLP, per variant, interleaved `tf.function`s on one fixed batch:
  the whole step, forward+backward alone, `optimizer.apply` alone on fixed gradients,
  the forward+backward matmuls alone (3 per layer, in the compute dtype), and for the
  update the float32 up/down casts alone and the stochastic-rounding random bits alone.

  python -m benchmarks.compensated --part=accuracy --seeds=3
  python -m benchmarks.compensated --part=losses --steps=300 --seeds=2
  python -m benchmarks.compensated --part=memory --size=large
  python -m benchmarks.compensated --part=speed --rounds=20 --block=20
  python -m benchmarks.compensated --part=profile --rounds=12 --block=5 --clock=cpu
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import resource
import statistics
import time
from typing import Any, Callable, Optional, Sequence

from absl import app, flags

from benchmarks import interleave

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Variant:
    """A dtype policy for the hidden layers and, for `tfmp.compensate`, its options."""

    policy: str
    rounding: Optional[str] = None  # None: plain Adam
    slots_dtype: str = "bfloat16"
    init_from: Optional[str] = None  # start from the initial weights drawn under this policy
    jit_compile: bool = False  # model.compile(jit_compile=...): XLA


VARIANTS: dict[str, Variant] = {
    "float32": Variant("float32"),
    "mixed_bfloat16": Variant("mixed_bfloat16"),
    "bfloat16": Variant("bfloat16"),
    # A control: float32 training from the bfloat16 models' starting point (Keras draws a
    # bfloat16 initializer's values in bfloat16: other values than float32's, same seed).
    "float32/bf16init": Variant("float32", init_from="bfloat16"),
    "float32+xla": Variant("float32", jit_compile=True),  # speed: does XLA fuse the update?
    "stochastic/bf16+xla": Variant("bfloat16", "stochastic", "bfloat16", jit_compile=True),
    **{f"{r}/{s}": Variant("bfloat16", r, {"bf16": "bfloat16", "f32": "float32"}[s])
       for r in ("stochastic", "kahan", "nearest") for s in ("bf16", "f32")},
}
BASELINE, DEFAULT = "float32", "stochastic/bf16"  # DEFAULT: tfmp.compensate's defaults
CONTROL = "float32/bf16init"
SPEED_VARIANTS = "float32,mixed_bfloat16,bfloat16,stochastic/bf16,kahan/bf16"
PROFILE_VARIANTS = SPEED_VARIANTS + ",nearest/bf16,stochastic/f32"
ACCURACY_VARIANTS = [n for n in VARIANTS if not VARIANTS[n].jit_compile]
MEMORY_VARIANTS = [n for n in ACCURACY_VARIANTS if n != CONTROL]
PARTS = ("accuracy", "losses", "memory", "speed", "profile")


def define_flags() -> None:
    """The flags (defined only when run as a program: the memory part's spawned processes
    import this module again)."""
    interleave.define_flags(rounds=20, block=20, batch_size=128)
    flags.DEFINE_enum("part", "accuracy", PARTS, "What to measure (see the docstring).")
    flags.DEFINE_list("variants", None, f"Variants (default: all but the +xla ones; memory: "
                      f"not {CONTROL} either; speed: {SPEED_VARIANTS}; profile: also nearest/bf16, "
                      f"stochastic/f32). Accepted: {', '.join(VARIANTS)}.")
    flags.DEFINE_integer("seeds", 3, "accuracy: seeds 0..N-1 (losses: 1 unless given).")
    flags.DEFINE_integer("epochs", 30, "accuracy: epochs.")
    flags.DEFINE_list("lrs", "1e-3,1e-4,1e-5", "accuracy: Adam learning rates.")
    flags.DEFINE_list("models", "mlp,cnn,transformer", "losses, memory: reference models.")
    flags.DEFINE_enum("size", None, ("default", "large"), "losses (default: default), memory "
                      "(default: large): model size.")
    flags.DEFINE_integer("steps", 300, "losses: training steps.")
    flags.DEFINE_integer("memory_steps", 10, "memory: training steps before reading the RSS.")
    flags.DEFINE_integer("width", 1024, "speed, profile: width of the four Dense layers.")


def build(name: str, make: Callable[[], Any], lr: float, seed: int, **compile_kwargs) -> Any:
    """`make()` under the variant's policy, compiled with (compensated) Adam(lr)."""
    import keras

    import tfmp

    v = VARIANTS[name]
    keras.utils.set_random_seed(seed)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(v.policy)  # not tfmp.policy_scope: it reads bfloat16 as mixed
    try:
        model = make()
        if v.init_from:
            keras.utils.set_random_seed(seed)
            keras.config.set_dtype_policy(v.init_from)
            model.set_weights([keras.ops.cast(w, "float32") for w in make().get_weights()])
    finally:
        keras.config.set_dtype_policy(previous)
    optimizer = keras.optimizers.Adam(lr)
    if v.rounding:
        optimizer = tfmp.compensate(optimizer, rounding=v.rounding, slots_dtype=v.slots_dtype,
                                    seed=seed)
    model.compile(optimizer, jit_compile=v.jit_compile, **compile_kwargs)
    return model


def _variants(default: Sequence[str]) -> list[str]:
    names = FLAGS.variants or list(default)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise app.UsageError(f"--variants: {', '.join(unknown)} not accepted; accepted: "
                             f"{', '.join(VARIANTS)}")
    return [BASELINE, *[n for n in names if n != BASELINE]]


def _spread(values: Sequence[float], digits: int = 3) -> str:
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


# ------------------------------------------------------------------------------ accuracy

def digits_mlp() -> Any:
    import keras

    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, activation="relu"),
                             keras.layers.Dense(256, activation="relu"),
                             keras.layers.Dense(10, activation="softmax", dtype="float32")])


def accuracy(names: Sequence[str], lrs: Sequence[float], seeds: int, epochs: int) -> None:
    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = (digits.data / 16.0).astype("float32"), digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    acc: dict[tuple[str, float], list[float]] = {}
    lost: dict[tuple[str, float], list[float]] = {}
    for lr in lrs:
        for seed in range(seeds):
            for name in names:
                keras.backend.clear_session()
                model = build(name, digits_mlp, lr, seed, loss="sparse_categorical_crossentropy",
                              metrics=["accuracy"])
                model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
                acc.setdefault((name, lr), []).append(
                    model.evaluate(x_test, y_test, verbose=0)[1])
                if VARIANTS[name].rounding:
                    lost.setdefault((name, lr), []).append(model.optimizer.lost_updates)
                print(f"  lr {lr:.0e} seed {seed} {name}: {acc[name, lr][-1]:.4f}", flush=True)
    refs = [r for r in (BASELINE, CONTROL) if r in names]
    print(f"\ndigits MLP 64-256-256-10, Adam, batch 64, {epochs} epochs, test accuracy: mean "
          f"(min-max) over {seeds} seeds; worst vs X: the largest shortfall of the mean below "
          "X's over the learning rates (points)")
    print("| variant | " + " | ".join(f"lr {lr:.0e}" for lr in lrs) + " | "
          + " | ".join(f"worst vs {r}" for r in refs) + " | lost updates (mean) |")
    print("|---|" + "---|" * (len(lrs) + len(refs) + 1))
    for name in names:
        worst = [min(statistics.mean(acc[name, lr]) - statistics.mean(acc[r, lr]) for lr in lrs)
                 for r in refs]
        shares = [s for lr in lrs for s in lost.get((name, lr), [])]
        print(f"| {name} | " + " | ".join(_spread(acc[name, lr]) for lr in lrs) + " | "
              + " | ".join(f"{100 * w:+.1f}" for w in worst) + " | "
              + (f"{statistics.mean(shares):.3f}" if shares else "-") + " |")


# -------------------------------------------------------------------------------- losses

def losses(names: Sequence[str], model_names: Sequence[str], size: str, steps: int,
           seeds: int, batch_size: int) -> None:
    import keras

    import models
    from tfmp.app import data as app_data

    block = 50
    print(f"| model ({size}) | variant | eval loss after {steps} steps (ratio to float32) | "
          f"train loss, last {block} steps (ratio) |")
    print("|---|---|---|---|")
    for model_name in model_names:
        make, kind = models.get(model_name)
        kwargs = models.size_kwargs(model_name, size)
        rows: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
        for seed in range(seeds):
            data = app_data.synthetic(kind, batch_size, seed)
            for name in names:
                keras.backend.clear_session()
                model = build(name, lambda: make(**kwargs), 1e-3, seed,
                              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
                history = model.fit(data.train, epochs=steps // block, steps_per_epoch=block,
                                    verbose=0)
                rows[name][0].append(model.evaluate(data.eval, verbose=0))
                rows[name][1].append(history.history["loss"][-1])
                print(f"  {model_name} seed {seed} {name}: eval {rows[name][0][-1]:.4f} "
                      f"train {rows[name][1][-1]:.4f}", flush=True)
        base_eval, base_train = (statistics.mean(v) for v in rows[BASELINE])
        for name in names:
            ev, tr = (statistics.mean(v) for v in rows[name])
            print(f"| {model_name} | {name} | {ev:.4f} ({ev / base_eval:.3f}) | "
                  f"{tr:.4f} ({tr / base_train:.3f}) |", flush=True)


# -------------------------------------------------------------------------------- memory

def training_state_bytes(model: Any) -> dict[str, int]:
    """Bytes of the training state by part, from the variables' dtypes and shapes.

    `weights` and `gradients`: the trainable variables (a gradient has its variable's
    dtype); `slots`: the optimizer's per-weight variables (Adam's moments); `kahan`: the
    compensation buffers; `other`: the optimizer's scalars and bookkeeping.
    """
    import numpy as np

    def nbytes(v: Any) -> int:
        return int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize

    trainable = model.trainable_variables
    shapes = {tuple(v.shape) for v in trainable}
    parts = {"params": sum(int(np.prod(v.shape, dtype=np.int64)) for v in trainable),
             "weights": sum(nbytes(v) for v in trainable), "slots": 0, "kahan": 0, "other": 0}
    parts["gradients"] = parts["weights"]
    for v in model.optimizer.variables:
        if v.path.endswith("kahan"):
            parts["kahan"] += nbytes(v)
        elif tuple(v.shape) in shapes and v.path.rsplit("_", 1)[-1] in ("momentum", "velocity"):
            parts["slots"] += nbytes(v)
        else:
            parts["other"] += nbytes(v)
    return parts


def memory_worker(model_name: str, size: str, name: str, steps: int, batch_size: int) -> dict:
    """A spawned process: builds and trains one variant `steps` steps; its bytes and RSS."""
    import warnings

    warnings.filterwarnings("ignore", message=".*shuffle=True.*")  # fit on a tf.data pipeline
    import keras
    import tensorflow as tf

    import models
    import tfmp  # noqa: F401
    from tfmp.app import data as app_data

    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    make, kind = models.get(model_name)
    kwargs = models.size_kwargs(model_name, size)
    model = build(name, lambda: make(**kwargs), 1e-3, 0,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y, _ = app_data.synthetic_arrays(kind, batch_size * 4, 0)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).repeat()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    return {**training_state_bytes(model), "imported_rss": imported,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def memory(names: Sequence[str], model_names: Sequence[str], size: str, steps: int,
           batch_size: int) -> None:
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    print(f"| model ({size}) | variant | params | bytes/param: weights + grads + slots + kahan "
          f"(+ other) = total | peak RSS MiB | above import MiB |")
    print("|---|---|---|---|---|---|")
    for model_name in model_names:
        for name in names:
            with ProcessPoolExecutor(1, mp_context=context) as pool:  # a fresh process each
                r = pool.submit(memory_worker, model_name, size, name, steps, batch_size).result()
            n = r["params"]
            total = sum(r[k] for k in ("weights", "gradients", "slots", "kahan", "other")) / n
            print(f"| {model_name} | {name} | {n:,} | {r['weights'] / n:.2f} + "
                  f"{r['gradients'] / n:.2f} + {r['slots'] / n:.2f} + {r['kahan'] / n:.2f} "
                  f"(+ {r['other'] / n:.4f}) = **{total:.2f}** | {r['peak_rss'] / 2**20:.0f} | "
                  f"{(r['peak_rss'] - r['imported_rss']) / 2**20:.0f} |", flush=True)


# --------------------------------------------------------------------------- speed, profile

def wide_mlp(width: int) -> Callable[[], Any]:
    def make() -> Any:
        import keras

        return keras.Sequential([keras.Input((width,)),
                                 *[keras.layers.Dense(width, activation="relu") for _ in range(4)],
                                 keras.layers.Dense(10, dtype="float32")])
    return make


def speed(names: Sequence[str], width: int, batch_size: int, rounds: int, warmup: int,
          steps: int) -> None:
    import keras

    built = {n: build(n, wide_mlp(width), 1e-4, 0,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
             for n in names}
    data = interleave.random_batches(width, batch_size)
    cpu: dict[str, list[float]] = {n: [] for n in names}

    def block(name: str) -> Callable[[], float]:
        def run() -> float:
            timers = [interleave.BlockTimer(time.perf_counter),
                      interleave.BlockTimer(time.process_time)]
            built[name].fit(data, epochs=1, steps_per_epoch=steps + 1, verbose=0,
                            callbacks=timers)
            cpu[name].append(timers[1].per_step)
            return timers[0].per_step
        return run

    wall = interleave.interleaved({n: block(n) for n in names}, rounds, warmup)
    print(f"MLP {width}x4, batch {batch_size}, {rounds} rounds of {steps}-step blocks after "
          f"{warmup} warm-up; speed = float32's time / the variant's (above 1: faster)")
    print("| variant | step ms (wall, median) | speed, wall (q1-q3) | step ms (CPU) | "
          "speed, CPU time (q1-q3) |")
    print("|---|---|---|---|---|")
    for n in names:
        w = interleave.ratio_summary(wall[BASELINE], wall[n])
        c = interleave.ratio_summary(cpu[BASELINE][warmup:], cpu[n][warmup:])
        print(f"| {n} | {1e3 * statistics.median(wall[n]):.2f} | {w[0]:.2f}x ({w[1]:.2f}-"
              f"{w[2]:.2f}) | {1e3 * statistics.median(cpu[n][warmup:]):.2f} | {c[0]:.2f}x "
              f"({c[1]:.2f}-{c[2]:.2f}) |")


def main(argv: Sequence[str]) -> None:
    del argv
    if FLAGS.part == "accuracy":
        accuracy(_variants(ACCURACY_VARIANTS), [float(v) for v in FLAGS.lrs], FLAGS.seeds, FLAGS.epochs)
    elif FLAGS.part == "losses":
        losses(_variants(("float32", "mixed_bfloat16", "bfloat16", DEFAULT, "kahan/bf16")),
               FLAGS.models, FLAGS.size or "default", FLAGS.steps,
               FLAGS.seeds if FLAGS["seeds"].present else 1, FLAGS.batch_size)
    elif FLAGS.part == "memory":
        memory(_variants(MEMORY_VARIANTS), FLAGS.models, FLAGS.size or "large", FLAGS.memory_steps,
               FLAGS.batch_size)
    else:
        from benchmarks import compensated_profile

        run, default = ((speed, SPEED_VARIANTS) if FLAGS.part == "speed"
                        else (compensated_profile.profile, PROFILE_VARIANTS))
        run(_variants(default.split(",")), FLAGS.width, FLAGS.batch_size, FLAGS.rounds,
            FLAGS.warmup, FLAGS.block)


if __name__ == "__main__":
    define_flags()
    app.run(main)
