"""Multi-worker training on this machine: N workers on 127.0.0.1, one TF_CONFIG each.

  python -m tools.launch_local --num_workers=2 -- --strategy=multi_worker_mirrored --epochs=2
  python -m tools.launch_local --num_workers=2 --port=23456 -- --strategy=multi_worker_mirrored \\
      --dtype=fp16 --model_dir=runs/mw

Everything after `--` is passed to every worker (`python -m tools.train` by
default; `--module` picks another). Each line the workers print is prefixed with
`[worker i]`. When one worker fails the others are stopped; the exit code is the
chief's (worker 0's), or the failing worker's (1 for a signal).
"""

import sys
from typing import Sequence

from absl import flags

from tfmp.app import cli
from tfmp.distribute import launch

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_workers", 2, "Worker processes to start.", lower_bound=1)
flags.DEFINE_integer("port", None, "First port of the workers (consecutive); default: free ports.")
flags.DEFINE_string("module", "tools.train", "Module each worker runs with `python -m`.")
flags.DEFINE_float("stop_grace", 5.0, "Seconds between SIGTERM and SIGKILL when stopping workers.",
                   lower_bound=0.0)


def main(argv: Sequence[str]) -> int:
    try:
        return launch([sys.executable, "-m", FLAGS.module, *argv[1:]], FLAGS.num_workers,
                             port=FLAGS.port, stop_grace=FLAGS.stop_grace)
    except ValueError as e:
        cli.fail(str(e))


if __name__ == "__main__":
    cli.run(main, positional=True)
