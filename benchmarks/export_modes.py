"""What `tfmp.litert.export_all` saves over one `tfmp.export` call per mode.

One reference model, trained a few steps under mixed_bfloat16, is exported in every mode
(`QUANTIZATIONS`, with evaluation) both ways, the two taking turns round by round (the order
alternating), after one unmeasured round of each. Both write the same files; `export_all`
makes the float32 copy, its SavedModel and the traced Keras inference once.

  python -m benchmarks.export_modes --model=transformer --rounds=5
"""

import os
import statistics
import tempfile
import time
from typing import Sequence

from absl import app, flags

from benchmarks import interleave

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "transformer", ("mlp", "cnn", "transformer"), "Reference model.")
flags.DEFINE_integer("rounds", 5, "Measured rounds (each way once per round).")


def main(argv: Sequence[str]) -> None:
    import keras
    import tfmp
    import models
    from tfmp.app import data
    from tfmp.litert import export_all
    from tfmp.litert.conversion import QUANTIZATIONS, export_filename

    build, kind = models.get(FLAGS.model)
    d = data.synthetic(kind, 64, seed=0, train_examples=1024, eval_examples=256)
    keras.utils.set_random_seed(0)
    tiny = {"mlp": dict(hidden=(64, 64)), "cnn": dict(width=16, stages=1),
            "transformer": dict(dim=32, heads=2, depth=1)}[FLAGS.model]
    model, optimizer = tfmp.prepare(build(**d.model_kwargs(), **tiny), "adam", "bf16")
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(d.train, steps_per_epoch=5, epochs=1, verbose=0)
    kwargs = dict(calibration_data=d.train, eval_data=d.eval)

    def together(directory: str) -> None:
        export_all(model, directory, **kwargs)

    def one_by_one(directory: str) -> None:
        for q in QUANTIZATIONS:
            tfmp.export(model, os.path.join(directory, export_filename(q)), q, **kwargs)

    arms = {"export_all": together, "one_by_one": one_by_one}
    wall = {name: [] for name in arms}
    cpu = {name: [] for name in arms}
    for round_ in range(FLAGS.rounds + 1):
        order = list(arms) if round_ % 2 == 0 else list(reversed(arms))
        for name in order:
            with tempfile.TemporaryDirectory() as directory:
                w, c = time.perf_counter(), time.process_time()
                arms[name](directory)
                if round_ > 0:  # the first round warms up (imports, first traces)
                    wall[name].append(time.perf_counter() - w)
                    cpu[name].append(time.process_time() - c)
    print(f"model={FLAGS.model} modes={len(QUANTIZATIONS)} rounds={FLAGS.rounds}")
    for name in arms:
        print(f"{name:11s} median wall {statistics.median(wall[name]):.2f} s, "
              f"CPU {statistics.median(cpu[name]):.2f} s")
    for label, times in (("wall", wall), ("CPU", cpu)):
        med, q1, q3 = interleave.ratio_summary(times["export_all"], times["one_by_one"])
        print(f"median per-round ratio export_all/one_by_one ({label}): {med:.3f} "
              f"(quartiles {q1:.3f} .. {q3:.3f})")


if __name__ == "__main__":
    app.run(main)
