"""16-bit weights that still learn: compensated updates (`tfmp.compensate`).

`compensate` makes any Keras optimizer compute the update of a 16-bit weight in
float32 and write it back by stochastic rounding or with a Kahan buffer, so that
updates smaller than the weight's precision are not lost; `CompensatedOptimizer` is
the type it returns. The rounding itself is `keras.ops` (`rounding`); the random bits
are TensorFlow's stateless random ops (`tf_ops`).
"""

from tfmp.compensation.factory import compensate
from tfmp.compensation.optimizer import CompensatedOptimizer

__all__ = ["CompensatedOptimizer", "compensate"]
