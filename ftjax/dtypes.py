"""What kind of tensor a dtype is: the one place these rules live.

`np.issubdtype(bfloat16, np.floating)` is False (ml_dtypes' types are not numpy floats), so every "is this a
float tensor" test goes through `is_float`. ftjax computes with bfloat16, float16 and float32 tensors (`COMPUTE`:
the exact kernels, the model, training); integer and bool tensors are carried verbatim; any other floating dtype
(float64, float8 variants, float4 ...) is refused by `check_computable` with a message naming the tensor.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from ftjax.errors import FtjaxError

COMPUTE = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32))


def is_float(dtype: Any) -> bool:
    """True for every floating dtype: numpy's (float16/32/64) and ml_dtypes' (bfloat16, float8_*, float4_* ...)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return True
    try:
        ml_dtypes.finfo(dtype)
    except ValueError:
        return False
    return True


def is_computable(dtype: Any) -> bool:
    """True for the float dtypes ftjax computes with: bfloat16, float16, float32."""
    return np.dtype(dtype) in COMPUTE


def check_computable(dtype: Any, what: str) -> None:
    """FtjaxError unless `dtype` is an integer/bool dtype (carried verbatim) or a float ftjax computes with.

    what: names the tensor and file in the message, e.g. "model.safetensors: tensor lm_head.weight"."""
    if is_float(dtype) and not is_computable(dtype):
        raise FtjaxError(f"{what} is {np.dtype(dtype)}; ftjax computes with bfloat16, float16 and float32 tensors "
                         "only: use an unquantized checkpoint in one of those dtypes")
