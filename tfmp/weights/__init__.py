"""Release weights in 16 bits: `save_weights` / `load_weights` (Keras' `.weights.h5` layout,
bfloat16 or float16 HDF5 types that read back as float32 under any policy), and
`save_model` (a `.keras` archive holding them)."""

from tfmp.weights.archive import save_model
from tfmp.weights.half import (DTYPES, HalfWeightsReport, WeightsFileError, check_arguments,
                               check_destination, load_weights, save_weights, write_weights)

__all__ = ["DTYPES", "HalfWeightsReport", "WeightsFileError", "check_arguments",
           "check_destination", "load_weights", "save_model", "save_weights", "write_weights"]
