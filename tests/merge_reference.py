"""Float64 numpy references of the merge methods, written from their published definitions (and mergekit's documented
choices where ftjax follows them), independent of ftjax's kernels: the tests check ftjax against these."""

from __future__ import annotations

import math

import numpy as np
from reference import round_f64


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def linear(xs, w, normalize=True):
    s = sum(wi * f64(x) for wi, x in zip(w, xs))
    return s / sum(w) if normalize else s


def task_arithmetic(base, xs, w, lam=1.0, normalize=False, delta_bases=None):
    b = f64(base)
    ds = [f64(x) - (b if d is None else f64(d)) for x, d in zip(xs, delta_bases or [None] * len(xs))]
    s = sum(wi * d for wi, d in zip(w, ds))
    if normalize:
        s = s / (sum(w) if abs(sum(w)) >= 1e-8 else 1.0)
    return b + lam * s


def topk_mask(d, density):
    """Keep |d| >= the k-th largest |fl32(d)|, k = max(1, int(density * N)) (ties at the threshold all kept)."""
    mag = np.abs(d.astype(np.float32)).reshape(-1)
    if density >= 1:
        return np.ones(d.shape, bool)
    k = max(1, int(density * mag.size))
    thr = np.sort(mag)[mag.size - k]
    return (np.abs(d.astype(np.float32)) >= thr)


TIE = 2.0**-40  # a vote this close to zero (relative to Σ|vᵢ|) is the decimal weights' exact tie: elected +1


def ties(base, xs, w, density, normalize=True, lam=1.0, weighted_election=True):
    b = f64(base)
    taus = [(f64(x) - b) * topk_mask(f64(x) - b, dens) for x, dens in zip(xs, density)]
    wt = [wi * t for wi, t in zip(w, taus)]
    votes = wt if weighted_election else taus
    elected = np.where(sum(votes) >= -TIE * sum(np.abs(v) for v in votes), 1.0, -1.0)
    agree = [(np.sign(v) == elected) & (t != 0) for v, t in zip(votes, taus)]
    mixed = sum(np.where(a, x, 0.0) for a, x in zip(agree, wt))
    if normalize:
        den = sum(np.where(a, wi, 0.0) for a, wi in zip(agree, w))
        mixed = np.where(den != 0, mixed / np.where(den != 0, den, 1.0), mixed)
    return b + lam * mixed


def slerp(a, b, t):
    a, b = f64(a), f64(b)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = float(np.sum(a * b)) / ((na if na > 1e-8 else 1.0) * (nb if nb > 1e-8 else 1.0))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    th = math.acos(dot)
    return math.sin(th * (1 - t)) / math.sin(th) * a + math.sin(th * t) / math.sin(th) * b


def karcher(xs, max_iter=10, tol=1e-5):
    """The Riemannian mean on the sphere of the unit vectors (equal weights), scaled by the mean norm."""
    xs = [f64(x).reshape(-1) for x in xs]
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / n for x, n in zip(xs, norms)]
    u = sum(units) / len(units)
    u /= np.linalg.norm(u)
    for _ in range(max_iter):
        tang = np.zeros_like(u)
        for x in units:
            d = np.clip(u @ x, -1, 1)
            th = math.acos(d)
            if th < tol:
                continue
            tang += (th / math.sin(th)) * (x - d * u) / len(units)
        nt = np.linalg.norm(tang)
        if nt < tol:
            break
        u = math.cos(nt) * u + math.sin(nt) * tang / nt
        u /= np.linalg.norm(u)
    return u * np.mean(norms)


def model_stock(base, xs):
    b = f64(base)
    offs = [(f64(x) - b).reshape(-1) for x in xs]
    cos = [offs[i] @ offs[j] / (np.linalg.norm(offs[i]) * np.linalg.norm(offs[j]))
           for i in range(len(offs)) for j in range(i + 1, len(offs))]
    c = float(np.mean(cos))
    n = len(xs)
    t = n * c / (1 + (n - 1) * c)
    return t * sum(f64(x) for x in xs) / n + (1 - t) * b


def ulps(got, want_f64, dtype) -> np.ndarray:
    """Distance of `got` from round(want_f64) in units in the last place of `dtype` (bf16, f16 or f32)."""
    dtype = np.dtype(dtype)
    w = round_f64(want_f64, dtype)
    g = np.asarray(got).astype(dtype)
    width = {2: np.int16, 4: np.int32}[dtype.itemsize]
    def ordered(x):  # sign-magnitude bits -> integers ordered like the values
        b = x.view(width).astype(np.int64)
        return np.where(b < 0, -(b & (2 ** (8 * dtype.itemsize - 1) - 1)), b)
    return np.abs(ordered(g) - ordered(w))


def ambiguous(want_f64, scale, dtype, rel: float = 2.0**-40) -> np.ndarray:
    """Where a float64 value lies so close to a rounding boundary of `dtype` (a midpoint between neighbours) that
    float64's own error (relative to `scale`, the size of the terms summed) could put it on either side."""
    want_f64 = np.asarray(want_f64, np.float64)
    lo = round_f64(want_f64, dtype).astype(np.float64)
    up = np.nextafter(lo.astype(dtype), np.asarray(np.inf, dtype)).astype(np.float64)
    down = np.nextafter(lo.astype(dtype), np.asarray(-np.inf, dtype)).astype(np.float64)
    near = np.minimum(np.abs(want_f64 - (lo + up) / 2), np.abs(want_f64 - (lo + down) / 2))
    return near <= rel * np.asarray(scale, np.float64)


def nuslerp(xs, w, base=None, flatten=True, row_wise=False):
    """mergekit's nuslerp of two inputs (or of their deltas from `base`) at t = w₁/(w₀ + w₁): over the whole tensor,
    per row, or per column (row_wise); unit vectors with norms clamped at 1e-7; lerp where 1 − cos² <= 1e-16."""
    t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    b = None if base is None else f64(base)
    v0, v1 = [f64(x) - (0.0 if b is None else b) for x in xs]
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif v0.ndim < 2:
        v0, v1 = v0[None], v1[None]
    elif row_wise:
        v0, v1 = v0.T, v1.T
    unit = lambda v: v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-7)
    cos = np.clip(np.sum(unit(v0) * unit(v1), axis=-1, keepdims=True), -1, 1)
    lin = (1 - cos**2) <= 1e-16
    th = np.arccos(np.where(lin, 0.0, cos))
    s = np.where(lin, 1.0, np.sin(th))
    out = np.where(lin, (1 - t) * v0 + t * v1, (np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / s)
    out = (out.T if row_wise and not flatten and len(shape) >= 2 else out).reshape(shape)
    return out if b is None else b + out


def multislerp(xs, w, base=None, eps=1e-8):
    """mergekit's multislerp (weights normalised), its tangent-space step included."""
    b = None if base is None else f64(base)
    vs = np.stack([(f64(x) - (0.0 if b is None else b)).reshape(-1) for x in xs])
    w = np.asarray(w, np.float64) / np.sum(w)
    norms = np.linalg.norm(vs, axis=-1, keepdims=True)
    units = vs / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / np.linalg.norm(mean)
    tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
    tn = np.linalg.norm(tangent) + eps
    out = (mean * math.cos(tn) + tangent * (math.sin(tn) / tn)) * float(norms[:, 0] @ w)
    out = out.reshape(np.shape(xs[0]))
    return out if b is None else b + out


def nearswap(base, x, t):
    """mergekit's nearswap: w·M + (1 − w)·B, w = clamp(t / max(|M − B|, 1e-6), 0, 1) per element."""
    b, m = f64(base), f64(x)
    w = np.clip(t / np.maximum(np.abs(m - b), 1e-6), 0, 1)
    return w * m + (1 - w) * b


def sce(base, xs, select_topk=1.0):
    """mergekit's sce: keep the k = int(count_nonzero(var)·select_topk) elements of largest population variance of
    the deltas over models (ties at the threshold, at float32 precision, all kept; mergekit's topk keeps exactly k
    and splits ties arbitrarily), elect signs from the
    unweighted sum of the kept deltas, weight each model by mean(kept δᵢ²) / Σⱼ mean(kept δⱼ²) (1/N when that sum
    is below 1e-6) and divide by max(Σ_agree wᵢ, 1e-6)."""
    b = f64(base)
    tv = np.stack([f64(x) - b for x in xs])
    if select_topk < 1:
        # Σ_{i<j} (δᵢ − δⱼ)² / N² (exact here for bf16 deltas, in any model order), selected at float32 precision
        var = sum((tv[i] - tv[j]) ** 2 for i in range(len(xs)) for j in range(i + 1, len(xs))) / len(xs) ** 2
        var = var.astype(np.float32)
        k = int(np.count_nonzero(var) * select_topk)
        keep = var >= np.sort(var.reshape(-1))[var.size - k] if k > 0 else np.zeros(var.shape, bool)
        tv = tv * keep
    elected = np.where(tv.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(tv) == elected
    ms = (tv ** 2).reshape(len(xs), -1).mean(axis=1)
    w = ms / ms.sum() if abs(ms.sum()) >= 1e-6 else np.full(len(xs), 1.0 / len(xs))
    ew = w.reshape((-1,) + (1,) * (tv.ndim - 1)) * agree
    return b + (tv * ew).sum(axis=0) / np.maximum(ew.sum(axis=0), 1e-6)


def arcee_fusion_scores(base, x):
    """mergekit's arcee_fusion score |M − B| · KL(p ‖ q) per element, p = softmax(M) + 1e-8, q = softmax(B) + 1e-8
    over the last axis (a vector is one row), and its threshold median + 1.5·(q₃ − q₁) with the quantiles
    sorted[int(q·(N − 1))] of the whole tensor (mergekit samples 1e6 elements of a larger tensor)."""
    b, m = f64(base), f64(x)
    if b.ndim < 2:
        b, m = b.reshape(1, -1), m.reshape(1, -1)

    def softmax(v):
        e = np.exp(v - v.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(m) + 1e-8, softmax(b) + 1e-8
    s = (np.abs(m - b) * np.sum(p * np.log(p / q), axis=-1, keepdims=True)).reshape(np.shape(base))
    srt = np.sort(s.reshape(-1))
    med, q1, q3 = (srt[int(qq * (srt.size - 1))] for qq in (0.5, 0.25, 0.75))
    return s, med + 1.5 * (q3 - q1)


def arcee_fusion(base, x):
    """M where the score reaches the threshold, else B."""
    s, thr = arcee_fusion_scores(base, x)
    return np.where(s >= thr, f64(x), f64(base))


def ram(base, xs, epsilon=1e-5, r=None, alpha=None):
    """mergekit's ram (r None) and ramplus_tl: δᵢ changes an element where |δᵢ| > epsilon (δᵢ exact here; mergekit
    subtracts and compares in the tensors' dtype); c models change it: B + λᵢδᵢ where c = 1, B + Σ δᵢ / c where
    c > 1; λᵢ = 1 for ram, 1 + r·clamp(shared_i / max(unique_i, epsilon), 0, alpha) for ramplus_tl (counts over
    the whole tensor)."""
    b = f64(base)
    tv = np.stack([f64(x) - b for x in xs])
    ch = np.abs(tv) > epsilon
    c = ch.sum(axis=0)
    lam = np.ones(len(xs))
    if r is not None:
        shared = (ch & (c > 1)).reshape(len(xs), -1).sum(axis=1)
        unique = (ch & (c == 1)).reshape(len(xs), -1).sum(axis=1)
        lam = 1 + r * np.clip(shared / np.maximum(unique, epsilon), 0, alpha)
    tvz = tv * ch
    lam = lam.reshape((-1,) + (1,) * (tv.ndim - 1))
    return b + (tvz * (c == 1) * lam + tvz * (c > 1) / np.maximum(c, 1)).sum(axis=0)
