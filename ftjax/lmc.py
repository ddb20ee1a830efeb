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
from ftjax.errors import FtjaxError
from ftjax.evaluate import device_batches, row_stats, run_batches, summarize

METRICS = ("loss", "acc", "acc_norm", "exact_match")


def _lerp(c, a, b):
    return (1.0 - c[0]) * a + c[0] * b


def _diff(c, t, f, s):
    return t + c[0] * (f - s)


def _plane(c, a, b, cc):
    return (1.0 - c[0] - c[1]) * a + c[0] * b + c[1] * cc


PATHS = {"lerp": _lerp, "diff": _diff, "plane": _plane}


@functools.partial(jax.jit, static_argnames=("path", "cfg", "dtype"))
def point_row_stats(coefs: jax.Array, thetas: tuple, tokens_bt, mask_bt, weights_bt, *, path: str,
                    cfg: ModelConfig, dtype: str):
    """Per-row (nll, count, greedy) of the model at path coefficients `coefs` (f32 [1] or [2], traced)."""
    combine = PATHS[path]
    params = jax.tree.map(
        lambda *xs: combine(coefs, *(x.astype(jnp.float32) for x in xs)).astype(dtype)
        if is_float(xs[0].dtype) else xs[0], *thetas)
    return row_stats(params, cfg, tokens_bt, mask_bt, weights_bt)


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
        if _numerics(cfg) != _numerics(cfg0):
            print(f"ftjax: warning: {label}'s config differs from {first}'s; using {first}'s for the forward pass",
                  file=sys.stderr)
    return cfg0


def _numerics(cfg: ModelConfig) -> ModelConfig:
    """The config without fields that never change the forward pass (dtype, token ids, init scale)."""
    return cfg.replace(dtype=None, bos_token_id=None, eos_token_id=None, pad_token_id=None, initializer_range=0.0)


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
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise FtjaxError(f"bad range {text!r}: write LO:HI, e.g. -0.5:1.5") from None
    if not lo < hi:
        raise FtjaxError(f"bad range {text!r}: LO must be below HI")
    return lo, hi


def barriers(lambdas: Sequence[float], losses: Sequence[float]) -> dict[str, float]:
    """Loss barriers over the λ in [0, 1] on the grid (both endpoints must be grid points).

    barrier_linear = max_λ L(λ) - ((1-λ)L(0) + λL(1))    (Frankle et al.)
    barrier_mean   = max_λ L(λ) - (L(0) + L(1)) / 2      (git-re-basin's code)
    Each comes with the λ where the max is attained.
    """
    lam, loss = np.asarray(lambdas, np.float64), np.asarray(losses, np.float64)
    at = {}
    for end in (0.0, 1.0):
        hits = np.flatnonzero(np.isclose(lam, end, atol=1e-9))
        if not len(hits):
            raise FtjaxError(f"the λ grid must contain {end:g} to compute a barrier")
        at[end] = loss[hits[0]]
    inside = (lam >= -1e-9) & (lam <= 1 + 1e-9)
    lam, loss = lam[inside], loss[inside]
    linear = loss - ((1 - lam) * at[0.0] + lam * at[1.0])
    mean = loss - 0.5 * (at[0.0] + at[1.0])
    i, j = int(np.argmax(linear)), int(np.argmax(mean))
    return {"barrier_linear": float(linear[i]), "barrier_linear_lambda": float(lam[i]),
            "barrier_mean": float(mean[j]), "barrier_mean_lambda": float(lam[j])}


# ---------------------------------------------------------------------------------------------------------------
# Scans.


def _evaluate_points(path: str, thetas: Sequence[Any], coefs: Sequence[Sequence[float]], cfg: ModelConfig,
                     examples: Sequence[Example], *, batch_size: int, max_len: int | None, dtype: Any,
                     mesh: Mesh | None) -> tuple[list[dict[str, Any]], int]:
    """Metrics (ftjax.evaluate.summarize) at every coefficient vector; batches are put on device once."""
    max_len = max_len or cfg.max_position_embeddings or 4096
    examples = truncate(examples, max_len)
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
    λ), "tokens", "forward_tokens", "barrier_linear", "barrier_mean" and their argmax λ}.
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
    """Loss of T + λ·(F - S) at every λ: λ=0 is the target, λ=1 the transferred model. Same result keys as `scan`."""
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


def finite_or_none(value: Any) -> Any:
    """JSON-safe copy of a result: NaN / inf become null (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
