"""Distribution through TensorFlow's own engines: strategies by name, clusters, a local launcher.

`get_strategy` builds one by its Model Garden name (`split_cpu` splits a CPU into
logical devices first); `cluster` reads `TF_CONFIG` and connects with a timeout;
`launch` runs N local workers on 127.0.0.1; `enable_multi_worker_fit` lets Keras 3
`fit` run under several workers (keras-team/keras#20585).
"""

from tfmp.distribute.cluster import Cluster, WriteDirs, connect, read_tf_config, write_dirs
from tfmp.distribute.launcher import describe_exit, free_ports, launch, tf_config
from tfmp.distribute.multi_worker import FIX_ENV, enable_multi_worker_fit, in_multi_worker_mode
from tfmp.distribute.strategies import (STRATEGIES, choose_strategy, get_strategy,
                                        parse_strategy, split_cpu, xla_refusal)

__all__ = [
    "Cluster", "FIX_ENV", "STRATEGIES", "WriteDirs", "choose_strategy",
    "connect", "describe_exit", "enable_multi_worker_fit", "free_ports", "get_strategy",
    "in_multi_worker_mode", "launch", "parse_strategy", "read_tf_config", "split_cpu",
    "tf_config", "write_dirs", "xla_refusal",
]
