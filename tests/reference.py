"""Independent references the tests (and benchmarks/transfer_bench.py) check ftjax's arithmetic against: numpy float64
and exact rationals, never ftjax's own kernels."""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import Any

import numpy as np


def round_f64(x: np.ndarray, dtype: Any) -> np.ndarray:
    """The reference rounding of the transfer semantics, in numpy: float64 `x` rounded once, to nearest even, to
    `dtype` (bfloat16, float16 or float32). It rounds to odd at float32 first (keeping the sticky bit), then to
    nearest even, so it is a single correct rounding without relying on how a library casts float64 to 16 bits."""
    x = np.asarray(x, np.float64)
    if np.dtype(dtype) == np.float32:
        return x.astype(np.float32)
    y = x.astype(np.float32)
    inexact = np.isfinite(y) & (y.astype(np.float64) != x) & (y != 0)
    toward_x = np.where((y.astype(np.float64) < x) == (y > 0), 1, -1)
    bits = y.view(np.uint32).astype(np.int64)
    bits = np.where(inexact & (bits % 2 == 0), bits + toward_x, bits).astype(np.uint32)
    return bits.view(np.float32).astype(dtype)


def reference(t, f, b, alpha, dtype):
    """The transfer semantics: round(float64(t) + alpha * (float64(f) - float64(b))), rounded once."""
    return round_f64(t.astype(np.float64) + alpha * (f.astype(np.float64) - b.astype(np.float64)), dtype)


def bits(x):
    """The bit patterns of a 16- or 32-bit float array (bitwise comparisons)."""
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


@functools.lru_cache(maxsize=None)
def _finite_values(dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Every finite value of a 16-bit float format (as float64) with its bits, sorted by value."""
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    with np.errstate(invalid="ignore"):  # NaN bit patterns
        vals = bits.view(dtype).astype(np.float64)
    keep = np.isfinite(vals)
    order = np.argsort(vals[keep], kind="stable")
    return vals[keep][order], bits[keep][order]


def exact_round(e: Fraction, dtype) -> float:
    """The value of `dtype` nearest to the rational e, ties to even: an independent reference on exact rationals
    (finite results only)."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == 4:  # float32: float64(e)'s float32 neighbours, decided on rationals
        y = np.float32(float(e))
        cands = [y, np.nextafter(y, np.float32(np.inf)), np.nextafter(y, np.float32(-np.inf))]
        cands = [(float(c), int(np.float32(c).view(np.uint32))) for c in cands]
    else:
        vals, bits = _finite_values(dtype)
        j = int(np.searchsorted(vals, float(e)))
        cands = [(float(vals[k]), int(bits[k])) for k in (j - 1, j, j + 1) if 0 <= k < len(vals)]
    return min(cands, key=lambda c: (abs(Fraction(c[0]) - e), c[1] & 1))[0]
