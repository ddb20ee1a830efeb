"""Linear mode connectivity: loss along a line or over a plane of parameter space, and loss barriers.

Paths (all formed inside one jitted function with the coefficients traced, so every grid point shares one
compilation per batch shape, no interpolated copies of the model live outside it, and the endpoints go through
the same code as every other point):
    lerp   θ(λ) = (1-λ)·A + λ·B                 (exactly A at λ=0 and B at λ=1)
    diff   θ(λ) = T + λ·(F - S)                 transfer setting: how much of the diff F - S to apply to T
    plane  θ(u, v) = (1-u-v)·A + u·B + v·C      = A + u(B-A) + v(C-A)
Arithmetic is float32, then the point is cast to the compute dtype. Endpoints keep their shardings.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ftjax import treeops
from ftjax.config import ModelConfig
from ftjax.data import Example, truncate
from ftjax.dtypes import is_float
from ftjax.errors import FtjaxError, finite
from ftjax.evaluate import device_batches, drop_cut_rows, row_stats, run_batches, summarize
from ftjax.results import finite_or_none  # noqa: F401 - kept importable from here

METRICS = ("loss", "acc", "acc_norm", "exact_match")


def _lerp(c, a, b):
    return (1.0 - c[0]) * a + c[0] * b


def _diff(c, t, f, s):
    return t + c[0] * (f - s)


def _plane(c, a, b, cc):
    return (1.0 - c[0] - c[1]) * a + c[0] * b + c[1] * cc


PATHS = {"lerp": _lerp, "diff": _diff, "plane": _plane}


def _point(coefs: jax.Array, thetas: tuple, path: str, dtype: str) -> Any:
    combine = PATHS[path]
    return jax.tree.map(
        lambda *xs: combine(coefs, *(x.astype(jnp.float32) for x in xs)).astype(dtype)
        if is_float(xs[0].dtype) else xs[0], *thetas)


@functools.partial(jax.jit, static_argnames=("path", "dtype"))
def point_params(coefs: jax.Array, thetas: tuple, *, path: str, dtype: str) -> Any:
    """The parameters at path coefficients `coefs` (f32 [1] or [2], traced): one compilation for every point.

    thetas: the path's endpoint pytrees (A, B for "lerp"; T, F, S for "diff"; A, B, C for "plane"). Float leaves
    are combined in float32 and cast to `dtype`; other leaves are the first endpoint's.
    """
    return _point(coefs, thetas, path, dtype)


@functools.partial(jax.jit, static_argnames=("path", "cfg", "dtype"))
def point_row_stats(coefs: jax.Array, thetas: tuple, tokens_bt, mask_bt, weights_bt, *, path: str,
                    cfg: ModelConfig, dtype: str):
    """Per-row (nll, count, greedy) of the model at path coefficients `coefs` (f32 [1] or [2], traced)."""
    return row_stats(_point(coefs, thetas, path, dtype), cfg, tokens_bt, mask_bt, weights_bt)


# ---------------------------------------------------------------------------------------------------------------
# Compatibility: refuse before any compute.


def check_compatible(models: dict[str, tuple[ModelConfig, Any]]) -> ModelConfig:
    """All models the same family and tensor shapes (FtjaxError otherwise); returns the first model's config.

    Other config differences (rope scaling, eps, context length) are allowed with a warning: the first model's
    config is used for every point.
    """
    (first, (cfg0, tree0)), *rest = models.items()
    shapes0 = _shapes(tree0)
    for label, (cfg, tree) in rest:
        if cfg.model_type != cfg0.model_type:
            raise FtjaxError(f"{label} is a {cfg.model_type} model but {first} is {cfg0.model_type}; "
                             "interpolation needs one family")
        shapes = _shapes(tree)
        for name in sorted(shapes0.keys() | shapes.keys()):
            for have, where in ((shapes, label), (shapes0, first)):
                if name not in have:
                    raise FtjaxError(f"tensor {name} is missing from {where}; interpolation needs the same tensors")
            if shapes0[name] != shapes[name]:
                raise FtjaxError(f"tensor {name} has shape {shapes[name]} in {label} but {shapes0[name]} "
                                 f"in {first}; interpolation needs identical shapes")
        if cfg != cfg0:
            print(f"ftjax: warning: {label}'s config differs from {first}'s; using {first}'s for the forward pass",
                  file=sys.stderr)
    return cfg0


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Dotted tensor name -> shape for a nested or flat dict of arrays / ShapeDtypeStructs."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {".".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape) for path, x in leaves}


def load_models(paths: dict[str, str | Path], *, mesh: Mesh | None = None) -> tuple[ModelConfig, list[Any]]:
    """Check configs and tensor shapes from the checkpoint headers (no weights read), then load each model."""
    from ftjax.io.checkpoint import HFCheckpoint
    from ftjax.layout import Layout
    from ftjax.params import load_params

    headers = {}
    for label, path in paths.items():
        ckpt = HFCheckpoint(path)
        cfg = ModelConfig.from_hf(ckpt.config, source=str(ckpt.path / "config.json"))
        layout = Layout.of_checkpoint(ckpt)
        shapes = {n: jax.ShapeDtypeStruct(layout.shapes[n], jnp.float32) for n in layout.names}
        headers[label] = (cfg, shapes)
        ckpt.close()
    cfg = check_compatible(headers)
    return cfg, [load_params(path, mesh=mesh)[1] for path in paths.values()]


# ---------------------------------------------------------------------------------------------------------------
# Grids and barriers.


def grid(points: int, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """`points` evenly spaced values in [lo, hi], plus 0 and 1 if missing (the barrier needs both endpoints)."""
    if points < 2 or not lo < hi:
        raise FtjaxError(f"a scan needs at least 2 points and lo < hi, got {points} points over {lo}:{hi}")
    values = set(np.round(np.linspace(lo, hi, points), 12).tolist()) | {0.0, 1.0}
    return sorted(values)


def parse_range(text: str) -> tuple[float, float]:
    """`"-0.5:1.5"` -> (-0.5, 1.5)."""
    try:
        lo, hi = (finite(f"--range {text}: LO and HI", float(x)) for x in text.split(":"))
    except ValueError:
        raise FtjaxError(f"bad range {text!r}: write LO:HI, e.g. -0.5:1.5") from None
    if not lo < hi:
        raise FtjaxError(f"bad range {text!r}: LO must be below HI")
    return lo, hi


def barriers(lambdas: Sequence[float], losses: Sequence[float]) -> dict[str, Any]:
    """Loss barriers (nats/token) on the segment between the two models: the grid's λ in [0, 1].

    Both endpoints must be grid points (FtjaxError otherwise); points outside [0, 1] never count. L(λ) is the
    loss at λ: L(0) is model A (or the target), L(1) model B (or the transferred model).

    barrier_linear  Entezari et al. 2022, "The Role of Permutation Invariance in Linear Mode Connectivity of
                    Neural Networks": max over λ in (0, 1) of L(λ) - ((1-λ)L(0) + λL(1)), the rise above the
                    straight line between the two models. A barrier only where that gap is positive at an
                    interior grid point.
    barrier_mean    Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis" (with test
                    error for L); Ainsworth et al. 2023, "Git Re-Basin": max over λ in [0, 1] of
                    L(λ) - (L(0) + L(1))/2. A barrier only where the maximum of L over [0, 1] is attained strictly
                    inside, L(λ*) > max(L(0), L(1)) at an interior grid point. The papers compare models of
                    about equal loss; between versions the endpoint losses differ, and a maximum at an endpoint is
                    one of the two models, not a barrier (there the formula would return half the endpoint gap).

    Returns, for each name in ("barrier_linear", "barrier_mean"): name (float, nats; 0.0 when there is no
    barrier), name + "_lambda" (the interior λ of the maximum, the smallest on ties; None when there is no
    barrier) and name + "_note" (None when there is a barrier, else the reason as a short phrase).
    Undefined (NaN, None, note) when the loss at λ = 0 or 1 is not finite or every interior loss is NaN; other
    interior NaN losses are skipped (the note says so). Linear gaps within float64 rounding of the baseline
    (1e-12 of the endpoint losses) are not barriers.
    """
    lam, loss = np.asarray(lambdas, np.float64), np.asarray(losses, np.float64)
    if lam.ndim != 1 or lam.shape != loss.shape:
        raise FtjaxError(f"barriers needs one loss per λ, got {lam.size} λ values and {loss.size} losses")
    at = {}
    for end in (0.0, 1.0):
        hits = np.flatnonzero(np.isclose(lam, end, rtol=0.0, atol=1e-9))
        if not len(hits):
            raise FtjaxError(f"the λ grid must contain {end:g} to compute a barrier")
        at[end] = float(loss[hits[0]])
    l0, l1 = at[0.0], at[1.0]
    for end, value in at.items():
        if not math.isfinite(value):
            note = f"the loss at λ = {end:g} is {value}, so the barrier is undefined"
            return {**_no_barrier("barrier_linear", note, math.nan), **_no_barrier("barrier_mean", note, math.nan)}
    inside = (lam > 1e-9) & (lam < 1 - 1e-9)
    nan = inside & np.isnan(loss)
    if not inside.any():
        note = "no grid point strictly between the two models (0 < λ < 1)"
        return {**_no_barrier("barrier_linear", note), **_no_barrier("barrier_mean", note)}
    keep = inside & ~nan
    if not keep.any():
        note = "the loss is NaN at every grid point strictly between the two models, so the barrier is undefined"
        return {**_no_barrier("barrier_linear", note, math.nan), **_no_barrier("barrier_mean", note, math.nan)}
    suffix = f" (NaN loss at {int(nan.sum())} grid points skipped)" if nan.any() else ""
    order = np.argsort(lam[keep], kind="stable")
    lam, loss = lam[keep][order], loss[keep][order]

    out: dict[str, Any] = {}
    gap = loss - ((1 - lam) * l0 + lam * l1)
    i = int(np.argmax(gap))
    if gap[i] > 1e-12 * max(1.0, abs(l0), abs(l1)):
        out.update(barrier_linear=float(gap[i]), barrier_linear_lambda=float(lam[i]), barrier_linear_note=None)
    else:
        out.update(_no_barrier("barrier_linear",
                               "the loss never rises above the straight line between the two models" + suffix))
    j = int(np.argmax(loss))
    if loss[j] > max(l0, l1):
        out.update(barrier_mean=float(loss[j] - 0.5 * (l0 + l1)), barrier_mean_lambda=float(lam[j]),
                   barrier_mean_note=None)
    else:
        where = "at both endpoints (λ = 0 and 1)" if l0 == l1 else f"at an endpoint (λ = {0 if l0 > l1 else 1})"
        out.update(_no_barrier("barrier_mean", f"the loss is highest {where}" + suffix))
    return out


def _no_barrier(name: str, note: str, value: float = 0.0) -> dict[str, Any]:
    return {name: value, f"{name}_lambda": None, f"{name}_note": note}


# ---------------------------------------------------------------------------------------------------------------
# Scans.


def _evaluate_points(path: str, thetas: Sequence[Any], coefs: Sequence[Sequence[float]], cfg: ModelConfig,
                     examples: Sequence[Example], *, batch_size: int, max_len: int | None, dtype: Any,
                     mesh: Mesh | None) -> tuple[list[dict[str, Any]], int]:
    """Metrics (ftjax.evaluate.summarize) at every coefficient vector; batches are put on device once."""
    max_len = max_len or cfg.max_position_embeddings or 4096
    examples = truncate(drop_cut_rows(examples, max_len)[0], max_len)
    dtype = jnp.dtype(dtype if dtype is not None else jax.tree.leaves(thetas[0])[0].dtype).name
    prepared = device_batches(examples, batch_size, max_len, mesh)
    thetas = tuple(thetas)
    results = []
    for c in coefs:
        c = np.asarray(c, np.float32)  # numpy: a replicated input in multi-process runs too
        fn = functools.partial(point_row_stats, c, thetas, path=path, cfg=cfg, dtype=dtype)
        results.append(summarize(examples, run_batches(fn, prepared, len(examples))))
    return results, sum(b.tokens_bt.size for b, _ in prepared)


def _line_result(path: str, lambdas: Sequence[float], points: list[dict[str, Any]], labels: Sequence[str],
                 tokens_seen: int) -> dict[str, Any]:
    out: dict[str, Any] = {"path": path, "labels": list(labels), "lambda": [float(x) for x in lambdas]}
    for m in METRICS:
        if m in points[0]:
            out[m] = [p[m] for p in points]
    out["tokens"] = points[0]["tokens"]
    out["forward_tokens"] = tokens_seen * len(lambdas)
    out.update(barriers(lambdas, out["loss"]))
    return out


def scan(theta_a: Any, theta_b: Any, cfg: ModelConfig, examples: Sequence[Example], lambdas: Sequence[float], *,
         labels: Sequence[str] = ("Model A", "Model B"), batch_size: int = 8, max_len: int | None = None,
         dtype: Any = None, mesh: Mesh | None = None) -> dict[str, Any]:
    """Loss of (1-λ)·A + λ·B at every λ (the grid must contain 0 and 1).

    Returns {"path", "labels", "lambda", "loss" (nats/token), optional "acc"/"acc_norm"/"exact_match" (one per
    λ), "tokens", "forward_tokens", and `barriers`' keys: "barrier_linear", "barrier_mean", each with its
    "_lambda" (None when there is no barrier) and "_note" (why there is none)}.
    dtype: compute dtype (None: A's dtype); the interpolation itself is float32.
    """
    check_compatible({labels[0]: (cfg, theta_a), labels[1]: (cfg, theta_b)})
    points, seen = _evaluate_points("lerp", (theta_a, theta_b), [[lam] for lam in lambdas], cfg, examples,
                                    batch_size=batch_size, max_len=max_len, dtype=dtype, mesh=mesh)
    return _line_result("lerp", lambdas, points, labels, seen)


def scan_along_diff(target: Any, source_ft: Any, source_base: Any, cfg: ModelConfig, examples: Sequence[Example],
                    lambdas: Sequence[float], *, labels: Sequence[str] = ("target", "target + Δ"),
                    batch_size: int = 8, max_len: int | None = None, dtype: Any = None,
                    mesh: Mesh | None = None) -> dict[str, Any]:
    """Loss of T + λ·(F - S) at every λ: λ=0 is the target, λ=1 the transferred model. Same result keys as `scan`.

    The barriers are those of the segment from the target to the transferred model T + (F - S); λ > 1
    (over-applying the diff) never counts.
    """
    check_compatible({"target": (cfg, target), "source-ft": (cfg, source_ft), "source-base": (cfg, source_base)})
    points, seen = _evaluate_points("diff", (target, source_ft, source_base), [[lam] for lam in lambdas], cfg,
                                    examples, batch_size=batch_size, max_len=max_len, dtype=dtype, mesh=mesh)
    return _line_result("diff", lambdas, points, labels, seen)


@jax.jit
def _plane_geometry(a: Any, b: Any, c: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """‖B-A‖, ‖C-A‖ and cos(B-A, C-A) in float32; inside one jit the diffs fuse into the reductions."""
    d_ab, d_ac = treeops.tree_diff(b, a), treeops.tree_diff(c, a)
    return treeops.tree_norm(d_ab), treeops.tree_norm(d_ac), treeops.tree_cosine(d_ab, d_ac)


def plane(theta_a: Any, theta_b: Any, theta_c: Any, cfg: ModelConfig, examples: Sequence[Example],
          us: Sequence[float], vs: Sequence[float], *, labels: Sequence[str] = ("A", "B", "C"),
          batch_size: int = 8, max_len: int | None = None, dtype: Any = None,
          mesh: Mesh | None = None) -> dict[str, Any]:
    """Loss over θ(u, v) = A + u(B-A) + v(C-A) on the grid us × vs.

    Returns {"u", "v", "loss": [len(v)][len(u)] nats/token, optional accuracy grids, "labels", and the plane's
    geometry "norm_ab" = ‖B-A‖, "norm_ac" = ‖C-A‖, "cos_ab_ac" (so plots can draw true angles and lengths)}.
    """
    check_compatible({labels[0]: (cfg, theta_a), labels[1]: (cfg, theta_b), labels[2]: (cfg, theta_c)})
    norm_ab, norm_ac, cos = _plane_geometry(theta_a, theta_b, theta_c)
    geometry = {"norm_ab": float(norm_ab), "norm_ac": float(norm_ac), "cos_ab_ac": float(cos)}
    coefs = [[u, v] for v in vs for u in us]
    points, seen = _evaluate_points("plane", (theta_a, theta_b, theta_c), coefs, cfg, examples,
                                    batch_size=batch_size, max_len=max_len, dtype=dtype, mesh=mesh)
    out: dict[str, Any] = {"path": "plane", "labels": list(labels), "u": [float(u) for u in us],
                           "v": [float(v) for v in vs], **geometry}
    for m in METRICS:
        if m in points[0]:
            flat = [p[m] for p in points]
            out[m] = [flat[i * len(us):(i + 1) * len(us)] for i in range(len(vs))]
    out["tokens"], out["forward_tokens"] = points[0]["tokens"], seen * len(coefs)
    return out
