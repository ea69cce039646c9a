"""Distribution through TensorFlow's own engines: strategies by name, clusters, a local launcher.

`get_strategy` builds one by its Model Garden name (`split_cpu` splits a CPU into
logical devices first); `cluster` reads `TF_CONFIG` and connects with a timeout;
`launch` runs N local workers on 127.0.0.1; `enable_multi_worker_fit` lets Keras 3
`fit` run under several workers (keras-team/keras#20585).
"""

from tfmp.distribute.cluster import connect
from tfmp.distribute.launcher import launch
from tfmp.distribute.multi_worker import enable_multi_worker_fit
from tfmp.distribute.strategies import get_strategy, split_cpu

__all__ = ["connect", "enable_multi_worker_fit", "get_strategy", "launch", "split_cpu"]
