"""Statistics passes: what some methods must know about a whole tensor before they can write any of it, computed in
extra passes over the tensor (never by holding it), reduced on the host in an order that does not depend on chunking.

- `KeysHi` / `KeysLo`: the exact k-th largest (or smallest) |δ| of a tensor, by a radix select over the float32
  bits in two passes (a 2^16-bin histogram of the high 16 bits, then of the low 16 bits inside the chosen bin):
  TIES' top-k, breadcrumbs' two cuts, sce's top-k of the variance over models, arcee_fusion's quartiles. Counts are integers, so the thresholds are exact and chunk-invariant.
- `Sq`: Σ kept δ² per model (sce's weights), summed as `L1` is.
- `Counts`: per model, how many elements it changes alone and together with others (ramplus_tl's ρ), exact integers.
- `L1`: ‖δ‖₁ and ‖kept δ‖₁ per model (DARE / DELLA / TIES rescaling): float32 row sums in a fixed pairwise order
  (elementwise adds only, so the same on every device), then an exact `math.fsum` over rows on the host.
- `Gram`: the dot products of every pair of inputs (or deltas) over the whole tensor, per row, or per column: the
  angle of slerp and nuslerp, multislerp's and karcher's mean directions, model_stock's cosines. Then the method's
  coefficients are computed on the host in float64 and the write pass is a linear combination.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.buckets import pow2_bucket
from ftjax.merge import kernels as K

# --- kernels (the engine calls fn(*inputs, *args, [index words,] *static); static = (spec,)) ---------------------


LANES = 256  # row sums add blocks of this many elements as vectors (RESULTS.md: 3-6x the speed of one flat tree)


def row_sums(x: jax.Array, width: int) -> jax.Array:
    """Sums of consecutive rows of `width` elements of flat x (length a multiple of width; or [k, n]: k such
    vectors at once), each in a fixed order of elementwise adds that depends on `width` only, so the same bits for
    any chunking or device: a row is cut into blocks of LANES elements (zero-padded), the blocks are added pairwise
    as vectors (an odd block out carried to the next level), then the LANES sums pairwise. Error: ~log2(width)
    roundings, as one pairwise tree."""
    r = x.reshape(x.shape[:-1] + (-1, width))
    lanes = min(LANES, pow2_bucket(width))
    padded = -(-width // lanes) * lanes
    if padded != width:
        r = jnp.pad(r, [(0, 0)] * (r.ndim - 1) + [(0, padded - width)])
    r = r.reshape(r.shape[:-1] + (padded // lanes, lanes))
    while r.shape[-2] > 1:
        n, h = r.shape[-2], r.shape[-2] // 2
        top = r[..., :h, :] + r[..., h: 2 * h, :]
        r = jnp.concatenate([top, r[..., 2 * h:, :]], axis=-2) if n % 2 else top
    r = r[..., 0, :]
    while r.shape[-1] > 1:
        h = r.shape[-1] // 2
        r = r[..., :h] + r[..., h:]
    return r[..., 0]


def _keys(xs, spec) -> tuple:
    """The uint32 keys a radix select ranks: |δ| per model (`kernels.gta_stats`), or arcee_fusion's score."""
    if isinstance(spec, K.FusionSpec):
        return (K.ordered_key(K.fusion_importance(*xs, width=spec.width)),)
    return K.gta_stats(*xs, spec=spec, what="keys")


def keys_hi_fn(*a):
    *xs, spec = a
    return tuple((k >> 16).astype(jnp.uint16) for k in _keys(xs, spec))


def keys_lo_fn(*a):
    """Low 16 bits of the keys in bin[i, j] (high 16 bits), else 0 (host subtracts the elements outside the bin)."""
    *xs, bins, spec = a
    out = []
    for i, k in enumerate(_keys(xs, spec)):
        for j in range(bins.shape[1]):
            out.append(jnp.where((k >> 16) == bins[i, j], k & 0xFFFF, 0).astype(jnp.uint16))
    return tuple(out)


def l1_fn(*a):
    return _masked_row_sums(a, "l1")


def sq_fn(*a):
    """Per model, row sums of the kept δᵢ² (sce's weights)."""
    return _masked_row_sums(a, "sq")


def ram_counts_fn(*a):
    *xs, spec = a
    return K.ram_counts(*xs, spec=spec)


def _masked_row_sums(a: tuple, what: str) -> tuple:
    *xs, dens, thr_lo, thr_hi, keys, idx_hi, idx_lo, spec = a
    vals = K.gta_stats(*xs, dens, thr_lo, thr_hi, keys, idx_hi, idx_lo, spec=spec, what=what)
    sums = row_sums(jnp.stack(vals), spec.width or 1)  # one reduction over all (XLA:CPU would re-derive the masks
    return tuple(sums[i] for i in range(len(vals)))  # for each of separate ones)


def gram_fn(*a):
    """Per row (of `width`), the dot products v_i·v_j for i <= j of the inputs' vectors (`kernels.vectors`)."""
    *xs, (delta, n, width, per_element) = a
    vs = K.vectors(*xs, delta=delta, n=n)
    prods = [vs[i] * vs[j] for i, j in pairs(n)]
    if per_element:
        return tuple(prods)
    return tuple(row_sums(p, width) for p in prods)  # one reduction each: products are cheap to recompute, and
    #                                                   XLA:CPU vectorises a lone tree better than a stacked one


def pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i, n)]


# --- host reductions ----------------------------------------------------------------------------------------------


class RadixSelect:
    """The exact value of given ascending ranks (0-based) of a tensor's |δ| keys, one model: feed the high-16-bit
    keys (`hi`), then, for the chosen bins, the low 16 bits (`lo`)."""

    def __init__(self, ranks: list[int], ordered: bool = False):
        self.ranks = ranks
        self.ordered = ordered  # keys are `kernels.ordered_key`s of signed values, not bits of magnitudes
        self.hist = np.zeros(1 << 16, np.int64)
        self.n = 0

    def add_hi(self, keys: np.ndarray) -> None:
        self.hist += np.bincount(keys.reshape(-1), minlength=1 << 16)
        self.n += keys.size

    def choose_bins(self) -> None:
        cum = np.cumsum(self.hist)
        self.bins = [int(np.searchsorted(cum, r, side="right")) for r in self.ranks]
        self.within = [r - (int(cum[b - 1]) if b else 0) for r, b in zip(self.ranks, self.bins)]
        self.lo = [np.zeros(1 << 16, np.int64) for _ in self.ranks]
        self.bin_counts = [int(self.hist[b]) if b < self.hist.size else 0 for b in self.bins]
        del self.hist

    def add_lo(self, j: int, low: np.ndarray) -> None:
        """Low 16 bits of the keys in bin j, 0 for every key outside it: only the non-zero ones are counted (the bin
        holds few elements; the zeros of the bin are its count minus the rest)."""
        low = low.reshape(-1)
        self.lo[j] += np.bincount(low[low != 0], minlength=1 << 16)

    def values(self) -> list[float]:
        """The exact |δ| (float32 value) at each rank."""
        out = []
        for j, (b, within) in enumerate(zip(self.bins, self.within)):
            lo = self.lo[j].copy()
            lo[0] = self.bin_counts[j] - int(lo[1:].sum())
            low = int(np.searchsorted(np.cumsum(lo), within, side="right"))
            key = (b << 16) | low
            if self.ordered:
                key = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
            out.append(float(np.array([key], np.uint32).view(np.float32)[0]))
        return out


def fsum_rows(parts: list[np.ndarray]) -> float:
    """The exact (correctly rounded) sum of float32 row sums."""
    return math.fsum(float(v) for p in parts for v in np.asarray(p, np.float64).reshape(-1))


# --- method coefficients from Gram matrices (float64) -------------------------------------------------------------


def slerp_coefs(g: np.ndarray, t: float) -> tuple[float, float]:
    """mergekit's slerp of a (the base, t = 0) and b: the angle from the unit vectors (a vector of norm <= 1e-8 is
    left unnormalised); |cos| > 0.9995 interpolates linearly."""
    na, nb = math.sqrt(max(g[0, 0], 0.0)), math.sqrt(max(g[1, 1], 0.0))
    dot = g[0, 1] / ((na if na > 1e-8 else 1.0) * (nb if nb > 1e-8 else 1.0))
    if abs(dot) > 0.9995:
        return 1.0 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin(theta - theta * t) / s, math.sin(theta * t) / s


def nuslerp_coefs(g: np.ndarray, t: float) -> tuple[float, float]:
    """mergekit's nuslerp of v0, v1: unit vectors with norms clamped at 1e-7; |sin θ| < 1e-8 interpolates linearly."""
    n0, n1 = max(math.sqrt(max(g[0, 0], 0.0)), 1e-7), max(math.sqrt(max(g[1, 1], 0.0)), 1e-7)
    cos = min(max(g[0, 1] / (n0 * n1), -1.0), 1.0)
    theta = math.acos(cos)
    s = math.sin(theta)
    if abs(s) < 1e-8:
        return 1.0 - t, t
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def multislerp_coefs(g: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray | None:
    """Coefficients of the inputs in mergekit's multislerp: the normalised weighted mean of the unit vectors, scaled
    by Σ wᵢ‖vᵢ‖. (Its tangent-space step is zero in exact arithmetic: the tangent vectors' weighted sum vanishes, so
    the mean direction is the result.) None: the weighted mean is zero (mergekit then refuses, or for two inputs
    averages linearly)."""
    n = np.sqrt(np.maximum(np.diag(g), 0.0))
    a = w / (n + eps)
    mn = math.sqrt(max(float(a @ g @ a), 0.0))
    if mn < eps:
        return None
    return a * float(np.sum(w * n)) / mn


def karcher_coefs(g: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """Coefficients of the inputs in mergekit's Karcher mean (equal weights): the iteration on the unit sphere run in
    the span of the unit inputs (u = Σ cⱼ·x̂ⱼ, dots from the Gram matrix), then scaled by the mean norm."""
    n = np.sqrt(np.maximum(np.diag(g), 0.0))
    k = len(n)
    alpha = np.full(k, 1.0 / k)
    valid = n > tol
    if not valid.any():
        return np.zeros(k)
    gu = g / np.outer(np.where(valid, n, 1.0), np.where(valid, n, 1.0))  # Gram of the unit vectors
    a = np.where(valid, alpha, 0.0) / alpha[valid].sum()
    norm = lambda c: math.sqrt(max(float(c @ gu @ c), 0.0))
    c = a.copy()
    nu = norm(c)
    c = np.eye(k)[int(np.argmax(valid))] if nu < tol else c / nu
    for _ in range(max_iter):
        tangent = np.zeros(k)
        dots = gu @ c
        for i in np.flatnonzero(valid):
            d = min(max(float(dots[i]), -1.0), 1.0)
            theta = math.acos(d)
            if theta < tol:
                continue
            tangent += a[i] * (theta / math.sin(theta)) * (np.eye(k)[i] - d * c)
        nt = norm(tangent)
        if nt < tol:
            break
        c = math.cos(nt) * c + math.sin(nt) * tangent / nt
        un = norm(c)
        if un > tol:
            c = c / un
    scale = float(np.sum(alpha * n))
    return np.where(valid, c * scale / np.where(valid, n, 1.0), 0.0)


def model_stock_t(g: np.ndarray) -> float:
    """mergekit's model_stock ratio t = N·c / (1 + (N − 1)·c), c the mean pairwise cosine of the deltas (t = 0, keep
    the base, when the denominator vanishes)."""
    k = g.shape[0]
    cos = [min(max(g[i, j] / max(math.sqrt(max(g[i, i] * g[j, j], 0.0)), 1e-6), -1.0), 1.0)
           for i in range(k) for j in range(i + 1, k)]
    c = float(np.mean(cos))
    den = 1 + (k - 1) * c
    return 0.0 if abs(den) < 1e-6 else k * c / den


def gram_matrix(totals: list[Any], n: int) -> np.ndarray:
    """A symmetric [n, n] float64 matrix (or [..., n, n] per row / column) from the i <= j values of `pairs(n)`."""
    first = np.asarray(totals[0], np.float64)
    g = np.zeros(first.shape + (n, n))
    for (i, j), v in zip(pairs(n), totals):
        g[..., i, j] = g[..., j, i] = v
    return g
