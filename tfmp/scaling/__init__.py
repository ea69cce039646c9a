"""Loss scaling and the skip decision: an optimizer that cannot fail silently.

`DynamicLossScaleOptimizer` (the optimizer), `wrap_optimizer` (the loss scaling a
policy needs), `get_unscaled_gradients` (custom loops that clip by hand),
`guard_model_state` (a skipped step changes no model state), `build_optimizer` (built before
the first step: Keras then traces that step once), `half_weights` (`weights_dtype=`: the
compensated optimizer 16-bit weights need). The scale's rules are
`keras.ops` functions in `numerics`; the one decision for every replica, the only
TensorFlow-specific part, is in `replicas`.
"""

from tfmp.scaling.building import build_optimizer
from tfmp.scaling.optimizer import DynamicLossScaleOptimizer
from tfmp.scaling.state_guard import guard_model_state
from tfmp.scaling.wrapping import get_unscaled_gradients, wrap_optimizer

__all__ = ["DynamicLossScaleOptimizer", "build_optimizer", "get_unscaled_gradients",
           "guard_model_state", "wrap_optimizer"]
