"""Trains a model in mixed precision: a reference model, or the user's own, on synthetic data,
a tensorflow-datasets name, an .npz file or the user's own data function.

  python -m tools.train                                   # mlp on the synthetic task, precision auto
  python -m tools.train --model=cnn --precision=bf16 --epochs=5 --model_dir=runs/cnn
  python -m tools.train --model=transformer --data=imdb_reviews --data_dir=~/tensorflow_datasets
  python -m tools.train --model=my_project.models:build --model_args=width=64 \\
      --data=my_project.data:make_dataset --loss=sparse_categorical_crossentropy
  python -m tools.train --model=runs/a/model.keras --data=arrays.npz --optimizer=sgd
  python -m tools.train --strategy=mirrored --num_cpu_devices=2 --batch_size=256

Re-running a command with the same --model_dir resumes after the last completed epoch; a
damaged backup or tune.json there stops the run with one line (exit 2) unless --restart,
which moves them aside under dated names and starts over. The flags are tfmp.app.flags',
which a binary of the user's own defines with tfmp.app.flags.define_flags().
"""

from typing import Sequence

import models
from tfmp.app import flags as tfmp_flags

tfmp_flags.define_flags(model_and_data=True, references=tuple(models.REGISTRY))


def main(argv: Sequence[str]) -> int:
    return tfmp_flags.train(references=models.REGISTRY)


if __name__ == "__main__":
    tfmp_flags.run(main)
