"""Release weights in 16 bits: `save_weights` / `load_weights` (Keras' `.weights.h5` layout,
bfloat16 or float16 HDF5 types that read back as float32 under any policy), and
`save_model` (a `.keras` archive holding them)."""

from tfmp.weights.archive import save_model
from tfmp.weights.half import HalfWeightsReport, WeightsFileError, load_weights, save_weights

__all__ = ["HalfWeightsReport", "WeightsFileError", "load_weights", "save_model", "save_weights"]
