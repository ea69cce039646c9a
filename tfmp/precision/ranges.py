"""What the 16-bit compute dtypes can hold, from numpy's and ml_dtypes' own `finfo`."""

import ml_dtypes
import numpy as np

# The 16-bit floating-point dtypes, for compute and for storage (bfloat16 first: `auto` prefers it).
HALF_DTYPES = ("bfloat16", "float16")
# The largest finite value of each 16-bit compute dtype (float16: 65504; bfloat16: 3.39e38).
HALF_MAX = {"float16": float(np.finfo(np.float16).max),
            "bfloat16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)}
# float16's smallest positive value, 2**-24: a magnitude at or below half of it rounds to zero.
FLOAT16_TINY = float(np.finfo(np.float16).smallest_subnormal)
