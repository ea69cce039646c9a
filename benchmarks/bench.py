"""The throughput and memory benchmark behind `python -m tools.bench`.

Every variant of a model trains in a fresh process of its own (spawned), so that
its peak resident set is its own and TensorFlow's graph rewrite (a process-wide
option) is on in its process only. The processes wait on a pipe; the parent asks
them in turn for one block of `model.fit` steps (`interleave.interleaved`: the
order rotates every round, warm-up rounds dropped), so the variants are timed
side by side in short blocks, never two at once, and each round gives a ratio to
float32. Quoted: the median ratio and its quartiles, by wall clock and by process
CPU time (immune to the machine's stalls).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import resource
import statistics
from typing import Any, Callable, Optional, Sequence

from absl import logging

from benchmarks import interleave

BASELINE = "float32"
VARIANTS: dict[str, str] = {
    BASELINE: "Keras, float32",
    "keras_bf16": "Keras, global policy mixed_bfloat16, plain Adam",
    "keras_fp16": "Keras, mixed_float16 with keras.optimizers.LossScaleOptimizer",
    "tf_rewrite": "float32 model under TF's auto_mixed_precision_onednn_bfloat16 graph rewrite",
    "tfmp_auto": "tfmp.prepare(model, Adam, 'auto'): policy from the hardware, float32 islands",
    "tfmp_auto_guarded": "as tfmp_auto plus guard=True, LossScaleMonitor and NanMonitor "
                         "(what tools/train runs)",
    "tfmp_bf16_weights": "tfmp.prepare(model, Adam, 'mixed_bfloat16', weights_dtype='bfloat16'): "
                         "bfloat16 weights, Adam compensated (tfmp.compensate)",
}
REWRITE_OPTION = "auto_mixed_precision_onednn_bfloat16"
READY_TIMEOUT = 900.0  # seconds a worker may take to import, build and warm up


@dataclasses.dataclass(frozen=True)
class Spec:
    """One variant of one model at one size, as a worker process builds it."""

    model: str
    size: str
    variant: str
    batch_size: int
    block_seconds: float
    seed: int = 0
    min_steps: int = 3  # per block; 1 for an emulated variant (a step can take seconds)


def computes_in(variant: str, hardware: Any) -> str:
    """The 16-bit type a variant's matmuls compute in on `hardware` (`float32` if none)."""
    if variant.startswith("tfmp_auto"):
        return {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(
            hardware.recommended_policy, "float32")
    return {"keras_bf16": "bfloat16", "tf_rewrite": "bfloat16", "tfmp_bf16_weights": "bfloat16",
            "keras_fp16": "float16"}.get(variant, "float32")


def emulated(variant: str, hardware: Any) -> Optional[str]:
    """Why a variant's 16-bit arithmetic is emulated on `hardware` (slow: labelled so in the
    table, its blocks cut to as few steps as the timing needs), else None."""
    from tfmp.precision.hardware import BF16_CPU_FEATURES
    from tfmp.precision.policy import trap_warnings

    dtype = computes_in(variant, hardware)
    if dtype == "float32":
        return None
    if hardware.accelerator == "cpu":
        if dtype == "float16":
            return "float16 is emulated on CPUs"
        if not hardware.cpu_features & BF16_CPU_FEATURES:
            return "bfloat16 is emulated on this CPU (no avx512_bf16 or amx_bf16)"
    if hardware.accelerator == "gpu" and dtype == "bfloat16" and trap_warnings(
            "mixed_bfloat16", hardware):
        return "bfloat16 is emulated on GPUs below compute capability 8.0"
    return None


def peak_device_memory(hardware: Any, read: Optional[Callable[[str], dict]] = None,
                       ) -> Optional[int]:
    """Peak bytes allocated on the first GPU since the process started, None off a GPU.

    TensorFlow's allocator statistics (`tf.config.experimental.get_memory_info`; each
    variant has a process of its own, so nothing needs resetting): on a GPU the
    process's resident set says little, the tensors live in device memory.

    Args:
        hardware: What the process trains on (`tfmp.detect_hardware()`).
        read: The statistics reader (default TensorFlow's `get_memory_info`).
    """
    if hardware.accelerator != "gpu":
        return None
    if read is None:
        import tensorflow as tf

        read = tf.config.experimental.get_memory_info
    return int(read("GPU:0")["peak"])


def skip_reason(variant: str, hardware: Any) -> Optional[str]:
    """Why a variant is not run on `hardware` (float16 where it is a trap), else None."""
    from tfmp.precision.policy import trap_warnings

    if variant == "keras_fp16":
        traps = trap_warnings("mixed_float16", hardware)
        if traps:
            return "skipped: " + traps[0].split(":")[0]
    return None


def activation_bytes(model: Any, batch_size: int) -> int:
    """Bytes of every layer's and op's outputs for one batch (what backprop keeps, roughly)."""
    import keras
    import numpy as np

    total = 0
    for op in model.operations:
        for tensor in keras.tree.flatten(op.output):
            count = int(np.prod([d for d in tensor.shape[1:]], dtype=np.int64)) * batch_size
            total += count * np.dtype(keras.backend.standardize_dtype(tensor.dtype)).itemsize
    return total


def _build(spec: Spec) -> tuple[Any, list, str]:
    """The compiled model, its callbacks and the policy it computes in."""
    import keras
    import tensorflow as tf

    import models
    import tfmp

    build = models.get(spec.model)[0]
    kwargs = models.size_kwargs(spec.model, spec.size)
    optimizer = keras.optimizers.Adam(1e-3)
    callbacks: list = []
    keras.utils.set_random_seed(spec.seed)
    if spec.variant.startswith("tfmp_auto"):
        guarded = spec.variant == "tfmp_auto_guarded"
        model, optimizer = tfmp.prepare(build(**kwargs), optimizer, "auto", guard=guarded)
        if guarded:
            callbacks = [tfmp.callbacks.LossScaleMonitor(), tfmp.callbacks.NanMonitor()]
    elif spec.variant == "tfmp_bf16_weights":
        model, optimizer = tfmp.prepare(build(**kwargs), optimizer, "mixed_bfloat16",
                                        weights_dtype="bfloat16")
    else:
        policy = {"keras_bf16": "mixed_bfloat16", "keras_fp16": "mixed_float16"}.get(
            spec.variant, "float32")
        if spec.variant == "tf_rewrite":
            tf.config.optimizer.set_experimental_options({REWRITE_OPTION: True})
        keras.config.set_dtype_policy(policy)
        model = build(**kwargs)
        if policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    policy = keras.config.dtype_policy().name
    if spec.variant == "tf_rewrite":
        policy += " + rewrite"
    return model, callbacks, policy


def _data(spec: Spec, model: Any) -> Any:
    import tensorflow as tf

    from tfmp.app import data

    x, y, _ = data.synthetic_arrays(data.input_kind(model), spec.batch_size * 8, spec.seed)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(spec.batch_size).repeat().prefetch(2)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(conn: Any, spec: Spec) -> None:
    """A variant's process: builds, warms up, then runs one block per `"run"` it receives.

    Sends `("ready", info)` (or `("error", line)`), then `(wall, cpu)` seconds per
    step for each `"run"`, and on `"stop"` its peak resident set and its peak device
    memory (None off a GPU) in bytes.
    """
    try:
        import time
        import warnings

        warnings.filterwarnings("ignore", message=".*shuffle=True.*")  # fit on a tf.data pipeline
        import tfmp  # noqa: F401  (imported before the baseline resident set is read)

        imported = _peak_rss()
        hardware = tfmp.detect_hardware()
        model, callbacks, policy = _build(spec)
        data = _data(spec, model)
        timers = [interleave.BlockTimer(time.perf_counter), interleave.BlockTimer(time.process_time)]
        model.fit(data, epochs=1, steps_per_epoch=spec.min_steps, verbose=0)  # tracing, warm-up

        def block(steps: int) -> tuple[float, float]:
            model.fit(data, epochs=1, steps_per_epoch=steps + 1, verbose=0,
                      callbacks=[*timers, *callbacks])
            return timers[0].per_step, timers[1].per_step

        per_step = block(spec.min_steps)[0]
        steps = max(spec.min_steps, min(500, math.ceil(spec.block_seconds / max(per_step, 1e-6))))
        conn.send(("ready", {"policy": policy, "steps_per_block": steps,
                             "activation_bytes": None if "rewrite" in policy
                             else activation_bytes(model, spec.batch_size),
                             "imported_rss": imported}))
    except Exception as e:  # reported by the parent as one line
        from tfmp.app.cli import first_line  # (importable: the parent imported it)

        conn.send(("error", f"{first_line(e, typed=True)}"))
        return
    while conn.recv() == "run":
        conn.send(block(steps))
    conn.send((_peak_rss(), peak_device_memory(hardware)))


class _Worker:
    def __init__(self, context: Any, spec: Spec) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=worker, args=(child, spec), daemon=True)
        self.process.start()
        self.cpu: list[float] = []

    def ready(self) -> tuple[str, Any]:
        if not self.conn.poll(READY_TIMEOUT):
            return "error", f"not ready within {READY_TIMEOUT:g} s"
        return self.conn.recv()

    def block(self) -> float:
        self.conn.send("run")
        wall, cpu = self.conn.recv()
        self.cpu.append(cpu)
        return wall

    def stop(self) -> tuple[int, Optional[int]]:
        self.conn.send("stop")
        memory = self.conn.recv()
        self.process.join(30)
        return memory

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(30)


def _median_and_quartiles(values: Sequence[float], base: Sequence[float]) -> list[float]:
    """Speed ratios per round (`base / value`: above 1 is faster than the baseline)."""
    return list(interleave.ratio_summary(base, values))


def bench_model(model: str, size: str, variants: Sequence[str], *, batch_size: int,
                rounds: int, warmup: int, block_seconds: float, hardware: Any,
                progress: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """One row per variant of `model` at `size`: speed and memory relative to float32.

    float32 is always run (it is the baseline). Raises RuntimeError when float32
    itself fails; another variant that fails gets its error in its row's note. Each
    phase is said in an absl log line: a skipped variant, the processes starting, each
    one ready (or failed), the measuring, and each measured variant's speed; `progress`
    is called after every block.
    """
    names = [BASELINE, *[v for v in variants if v != BASELINE]]
    rows = {v: {"model": model, "size": size, "variant": v, "batch_size": batch_size,
                "note": skip_reason(v, hardware), "emulated": emulated(v, hardware)}
            for v in names}
    context = multiprocessing.get_context("spawn")
    where = f"bench: {model} ({size})"
    for v in names:
        if rows[v]["note"] is not None:
            logging.info("%s %s: %s", where, v, rows[v]["note"])
    workers = {v: _Worker(context, Spec(model, size, v, batch_size, block_seconds,
                                        min_steps=1 if rows[v]["emulated"] else 3))
               for v in names if rows[v]["note"] is None}
    logging.info("%s: starting %s, a process each (import, build, warm-up)", where,
                 ", ".join(workers))
    try:
        for v, w in list(workers.items()):
            status, info = w.ready()
            if status == "error":
                if v == BASELINE:
                    raise RuntimeError(f"{model} ({size}) float32 failed: {info}")
                rows[v]["note"] = f"failed: {info}"
                logging.warning("%s %s failed: %s", where, v, info)
                w.kill()
                del workers[v]
            else:
                rows[v].update(info)
                logging.info("%s %s ready: policy %s, %d steps per block", where, v,
                             info["policy"], info["steps_per_block"])
        logging.info("%s: measuring %d rounds (after %d warm-up), one block per variant each",
                     where, rounds, warmup)

        def timed(w: _Worker) -> Callable[[], float]:
            def run() -> float:
                seconds = w.block()
                progress()
                return seconds
            return run

        wall = interleave.interleaved({v: timed(w) for v, w in workers.items()}, rounds, warmup)
        for v, w in workers.items():
            rows[v]["step_ms"] = 1e3 * statistics.median(wall[v])
            rows[v]["speed_wall"] = _median_and_quartiles(wall[v], wall[BASELINE])
            rows[v]["speed_cpu"] = _median_and_quartiles(w.cpu[warmup:],
                                                         workers[BASELINE].cpu[warmup:])
            rows[v]["peak_rss"], rows[v]["peak_device_memory"] = w.stop()
            logging.info("%s %s: %.2fx float32 (wall clock), %.1f ms per step", where, v,
                         rows[v]["speed_wall"][0], rows[v]["step_ms"])
    finally:
        for w in workers.values():
            w.kill()
    return [_with_memory_ratios(rows[v], rows[BASELINE]) for v in names]


def _with_memory_ratios(row: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    if "peak_rss" not in row:
        return row
    row["training_rss"] = row["peak_rss"] - row["imported_rss"]
    for key in ("peak_rss", "training_rss", "activation_bytes", "peak_device_memory"):
        ok = row.get(key) is not None and base.get(key)
        row[f"{key}_vs_float32"] = row[key] / base[key] if ok else None
    return row


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _shown_emulated(row: dict[str, Any]) -> bool:
    """The row is measured and its 16-bit arithmetic emulated (a skipped or failed row says
    why it was not measured instead)."""
    return bool(row.get("emulated")) and "speed_wall" in row


def footnotes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The lines below `markdown_table(rows)`: one per reason a row it marks `(emulated)` is
    emulated; none when it marks no row."""
    reasons = dict.fromkeys(r["emulated"] for r in rows if _shown_emulated(r))
    return [f"(emulated): {reason}; its blocks run as few steps as the timing needs"
            for reason in reasons]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table (speeds above 1: faster than float32).

    A measured variant whose 16-bit arithmetic is emulated on this hardware has `(emulated)`
    after its policy (`footnotes` says why); the device-memory column appears when a row has
    a GPU's figure.
    """
    header = ("model", "size", "variant", "policy", "speed vs float32 (wall, q1-q3)",
              "speed (CPU time)", "step ms", "peak RSS", "RSS above import", "activations")
    device = any(r.get("peak_device_memory") is not None for r in rows)
    header += ("peak device memory",) * device
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        policy = r.get("policy", "-") + (" (emulated)" if _shown_emulated(r) else "")
        if "speed_wall" not in r:
            cells = (r["model"], r["size"], r["variant"], policy, r["note"],
                     *("",) * (len(header) - 5))
        else:
            med, q1, q3 = r["speed_wall"]
            cells = (r["model"], r["size"], r["variant"], policy,
                     f"{med:.2f}x ({q1:.2f}-{q3:.2f})", _ratio(r["speed_cpu"][0]),
                     f"{r['step_ms']:.1f}", _ratio(r["peak_rss_vs_float32"]),
                     _ratio(r["training_rss_vs_float32"]), _ratio(r["activation_bytes_vs_float32"]),
                     *(_ratio(r.get("peak_device_memory_vs_float32")),) * device)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
