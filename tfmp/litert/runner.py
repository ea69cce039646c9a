"""Running a LiteRT (TFLite) model: one small wrapper over whichever interpreter is installed.

The LiteRT interpreter (`ai-edge-litert`, `pip install -e ".[litert]"`) is
used when it is installed; otherwise TensorFlow's own `tf.lite.Interpreter`
(deprecated in favour of LiteRT, still shipped with TensorFlow 2.21). Both run
the same flatbuffer with the same kernels.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Optional, Union

import numpy as np

from tfmp import _compat

RUNTIMES = ("auto", "litert", "tf")
# Ops that move values between float32 and int8 at the edges of integer regions.
_CONVERSION_OPS = ("QUANTIZE", "DEQUANTIZE")


def _interpreter_class(runtime: str) -> tuple[Any, str]:
    if runtime not in RUNTIMES:
        raise ValueError(f"Unknown runtime {runtime!r}; accepted: {', '.join(RUNTIMES)}.")
    if runtime in ("auto", "litert"):
        try:
            from ai_edge_litert.interpreter import Interpreter

            return Interpreter, "litert"
        except ImportError:
            if runtime == "litert":
                raise ValueError("runtime 'litert' needs ai-edge-litert: "
                                 "pip install -e \".[litert]\"") from None
    import tensorflow as tf

    interpreter = getattr(tf.lite, "Interpreter", None)  # deprecated; gone in some future TF
    if interpreter is None:
        raise ValueError(f"TensorFlow {tf.__version__} has no tf.lite.Interpreter: "
                         "pip install -e \".[litert]\" (ai-edge-litert)")
    return interpreter, "tf"


class Runner:
    """A LiteRT model with one input and one output, called like a function.

    Attributes:
        runtime: `litert` (ai-edge-litert) or `tf` (tf.lite).
        num_threads: Threads the interpreter may use (default: this process's CPUs).
        ops: How many times each op (`FULLY_CONNECTED`, `QUANTIZE`, ...) occurs.
        float_ops: The ops that read or write float32 tensors, QUANTIZE and
            DEQUANTIZE aside. In a fully integer-quantized model these are the
            ops that had no int8 kernel, left in float32 between a DEQUANTIZE
            and a QUANTIZE.
    """

    def __init__(self, model: Union[bytes, str], runtime: str = "auto",
                 num_threads: Optional[int] = None) -> None:
        interpreter_class, self.runtime = _interpreter_class(runtime)
        self.num_threads = num_threads or len(os.sched_getaffinity(0))
        source = {"model_content": model} if isinstance(model, bytes) else {"model_path": model}
        self._interpreter = interpreter_class(**source, num_threads=self.num_threads)
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"the model has {len(inputs)} inputs and {len(outputs)} outputs; "
                             "tfmp runs models with one of each")
        self._input, self._output = inputs[0], outputs[0]
        self.input_dtype = np.dtype(self._input["dtype"])
        self._shape: Optional[tuple[int, ...]] = None
        # Read before the first allocation: delegates (XNNPACK) then replace ops.
        self.ops, self.float_ops = _op_counts(self._interpreter)

    def __call__(self, x: Any) -> np.ndarray:
        """The model's output for a batch `x` (resized to the batch's shape when it changes)."""
        x = np.asarray(x).astype(self.input_dtype, copy=False)
        if x.shape != self._shape:
            self._interpreter.resize_tensor_input(self._input["index"], x.shape, strict=False)
            self._interpreter.allocate_tensors()
            self._shape = x.shape
        self._interpreter.set_tensor(self._input["index"], x)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output["index"])


def _op_counts(interpreter: Any) -> tuple[collections.Counter, collections.Counter]:
    dtypes = {t["index"]: np.dtype(t["dtype"]) for t in interpreter.get_tensor_details()}
    ops, floats = collections.Counter(), collections.Counter()
    for op in _compat.interpreter_ops(interpreter):
        ops[op["op_name"]] += 1
        tensors = [i for i in (*op["inputs"], *op["outputs"]) if i >= 0]
        if op["op_name"] not in _CONVERSION_OPS and any(dtypes.get(i) == np.float32
                                                        for i in tensors):
            floats[op["op_name"]] += 1
    return ops, floats
