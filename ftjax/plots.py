"""Figures from result dicts (never models): λ scans, loss planes, per-layer diff statistics, training curves.
matplotlib only.

Each `plot_*` writes `<stem>.png` (notebooks) and `<stem>.pdf` (papers) and returns both paths. Figures are
built with `matplotlib.figure.Figure` directly, so no GUI backend or pyplot global state is involved.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

LOSS_LABEL = "loss (nats / token)"
_ACC_NAMES = {"acc": "accuracy", "acc_norm": "accuracy (length-normalised)", "exact_match": "exact match"}


def _save(fig: Figure, stem: str | Path) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=200, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def _nan(values: Any) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in np.ravel(values)], np.float64).reshape(np.shape(values))


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend only when something on `ax` is labelled (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _at(lam: np.ndarray, values: np.ndarray, x: float) -> float:
    """The value at grid point λ = x, NaN when x is not on the grid."""
    hits = np.flatnonzero(np.isclose(lam, x, rtol=0.0, atol=1e-9))
    return float(values[hits[0]]) if len(hits) else math.nan


def _barrier(result: dict[str, Any], name: str) -> tuple[float, float] | None:
    """(height, λ) of a barrier that exists: positive and finite, at an interior λ; None otherwise."""
    value, lam = result.get(name), result.get(f"{name}_lambda")
    if value is None or lam is None or not math.isfinite(value) or value <= 0 or not 0 < lam < 1:
        return None
    return float(value), float(lam)


def plot_scan(result: dict[str, Any], stem: str | Path, title: str | None = None) -> list[Path]:
    """`scan_figure(result, title)` written to `<stem>.png` and `<stem>.pdf`."""
    return _save(scan_figure(result, title), stem)


def _task_panel(ax: Any, lam: np.ndarray, curves: list[tuple[str, list]]) -> None:
    """Harness task metrics (scan.json "tasks") against λ; fractions on a 0..1 axis, anything else (perplexities)
    on a log axis of its own."""
    def values(v):
        return np.asarray([np.nan if x is None else x for x in v], np.float64)

    fractions = [(n, values(v)) for n, v in curves if np.nanmin(values(v), initial=0) >= 0
                 and np.nanmax(values(v), initial=0) <= 1]
    others = [(n, values(v)) for n, v in curves if not any(n == f for f, _ in fractions)]
    for i, (name, v) in enumerate(fractions):
        ax.plot(lam, v, "o-", color=f"C{i + 4}", label=name)
    ax.set_ylabel("task score (fraction)" if fractions else "task metric")
    if fractions:
        ax.set_ylim(-0.05, 1.05)
    target = ax.twinx() if fractions and others else ax
    for i, (name, v) in enumerate(others):
        target.plot(lam, v, "s--", color=f"C{i + 4 + len(fractions)}", label=name)
    if others:
        target.set_yscale("log")
        target.set_ylabel("task metric (log)" if fractions else "task metric (log scale)")
    if target is not ax:
        handles = [h for a in (ax, target) for h in a.get_legend_handles_labels()[0]]
        target.legend(handles, [h.get_label() for h in handles], framealpha=0.8, fontsize=7)  # above both
    else:
        _legend(ax, framealpha=0.5, fontsize=7)
    ax.grid(alpha=0.3)


def scan_figure(result: dict[str, Any], title: str | None = None) -> Figure:
    """Loss along the λ path, the straight line between the two models (dashed, λ in [0, 1] only) and each
    barrier (arrow) where there is one; the legend gives the heights in nats, or why there is no barrier.

    result: as returned by `ftjax.lmc.scan` / `scan_along_diff` (or read back from scan.json).
    """
    lam, loss = np.asarray(result["lambda"], np.float64), _nan(result["loss"])
    label_a, label_b = result.get("labels", ("Model A", "Model B"))
    diff = result.get("path") == "diff"
    acc_keys = [k for k in ("acc", "acc_norm", "exact_match") if k in result]
    curves = [(f"{task} {key.replace(',none', '')}", values) for task, metrics in result.get("tasks", {}).items()
              for key, values in metrics.items()]
    ratios = [2] + [1] * bool(acc_keys) + [1] * bool(curves)
    fig = Figure(figsize=(6.4, 4.2 + 2.2 * (len(ratios) - 1)))
    axes = fig.subplots(len(ratios), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": ratios})[:, 0]
    ax = axes[0]
    ax.plot(lam, loss, "o-", color="C0", label="target + λ·diff" if diff else "interpolated model")
    l0, l1 = _at(lam, loss, 0.0), _at(lam, loss, 1.0)
    if math.isfinite(l0) and math.isfinite(l1):
        ax.plot([0, 1], [l0, l1], "--", color="0.5", label="straight line between the two models")
    for x, y, name in ((0, l0, label_a), (1, l1, label_b)):
        if math.isfinite(y):
            ax.plot(x, y, "s", color="k", zorder=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=9)
    for name, kind, color in (("barrier_linear", "linear", "C3"), ("barrier_mean", "mean", "C4")):
        if name not in result:
            continue
        found = _barrier(result, name)
        if found is None:
            value, note = result.get(name), result.get(f"{name}_note")
            head = f"no {kind} barrier" if value == 0 else f"{kind} barrier"
            ax.plot([], [], " ", label=textwrap.fill(f"{head}: {note}" if note else head, 52))
            continue
        height, xb = found
        base = (1 - xb) * l0 + xb * l1 if kind == "linear" else 0.5 * (l0 + l1)
        if kind == "mean":
            ax.plot([0, 1], [base, base], ":", color=color, lw=1.0, label="mean of the two models' losses")
        ax.annotate("", xy=(xb, base + height), xytext=(xb, base), arrowprops={"arrowstyle": "<->", "color": color})
        ax.plot([], [], color=color, label=f"{kind} barrier = {height:.4g} nats at λ = {xb:.3g}")
    ax.set_ylabel(LOSS_LABEL)
    _legend(ax, framealpha=0.5, fontsize=8)
    ax.grid(alpha=0.3)
    for i, key in enumerate(acc_keys):
        axes[1].plot(lam, _nan(result[key]), "o-", color=f"C{i + 1}", label=_ACC_NAMES[key])
    if acc_keys:
        axes[1].set_ylabel("accuracy (fraction)")
        axes[1].set_ylim(-0.05, 1.05)
        _legend(axes[1], framealpha=0.5, fontsize=8)
        axes[1].grid(alpha=0.3)
    if curves:
        _task_panel(axes[-1], lam, curves)
    path = {"diff": "scale of the diff: T + λ·(F − S)", "lerp": "interpolation coefficient: (1-λ)·A + λ·B"}
    axes[-1].set_xlabel(f"λ  ({path.get(result.get('path'), 'interpolation coefficient')})")
    for a in axes:
        a.axvline(0, color="0.8", lw=0.8, zorder=0)
        a.axvline(1, color="0.8", lw=0.8, zorder=0)
    axes[0].set_title(title or f"{label_a} → {label_b}")
    return fig


def plane_coordinates(result: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]:
    """Orthonormal plane coordinates (parameter-space distance) of the grid and of the models A, B, C.

    A is the origin, B lies on the x axis at ‖B-A‖, C at its true angle; the grid is θ(u,v) = A + u(B-A) + v(C-A).
    """
    u, v = np.meshgrid(np.asarray(result["u"], np.float64), np.asarray(result["v"], np.float64))
    nab, nac, cos = result["norm_ab"], result["norm_ac"], result["cos_ab_ac"]
    sin = math.sqrt(max(0.0, 1.0 - cos * cos))
    x = u * nab + v * nac * cos
    y = v * nac * sin
    return x, y, [(0.0, 0.0), (nab, 0.0), (nac * cos, nac * sin)]


def plot_plane(result: dict[str, Any], stem: str | Path, title: str | None = None) -> list[Path]:
    """Filled contour plot of the loss over the plane through three models, in true parameter-space distances."""
    x, y, corners = plane_coordinates(result)
    loss = _nan(result["loss"])
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.subplots()
    finite = loss[np.isfinite(loss)]
    levels: Any = 20
    if finite.size and np.ptp(finite) > 0:
        top = np.quantile(finite, 0.95)
        top = top if top > finite.min() else finite.max()  # mostly constant: the top 5% holds the whole range
        levels = np.linspace(finite.min(), top, 20)
    filled = ax.contourf(x, y, loss if isinstance(levels, int) else np.clip(loss, None, levels[-1]),
                         levels=levels, cmap="viridis_r", extend="max")
    ax.contour(x, y, loss, levels=filled.levels[::4], colors="k", linewidths=0.4, alpha=0.5)
    fig.colorbar(filled, ax=ax, label=LOSS_LABEL)
    for (cx, cy), name in zip(corners, result.get("labels", ("A", "B", "C"))):
        ax.plot(cx, cy, "o", color="w", mec="k", ms=8)
        ax.annotate(name, (cx, cy), textcoords="offset points", xytext=(6, 6), fontsize=9,
                    bbox={"boxstyle": "round", "fc": "w", "alpha": 0.7})
    ax.set_aspect("equal")
    ax.set_xlabel("distance along B − A (parameter L2 norm)")
    ax.set_ylabel("distance orthogonal, towards C (parameter L2 norm)")
    ax.set_title(title or "loss over the plane through " + ", ".join(result.get("labels", ("A", "B", "C"))))
    return _save(fig, stem)


def log_ticks(lo: float, hi: float, most: int = 8) -> list[float]:
    """Labelled ticks for a log axis showing positive data in [lo, hi]: at least three readable values wherever
    the range lies. Over more than three decades, powers of ten (every k-th so at most `most`); over fewer, the
    1-2-5 values; within one 1-2-5 step, evenly spaced round values (a log axis there looks linear). Ticks
    reach one step beyond the data, so the autoscaled view keeps at least three of them."""
    lo_e, hi_e = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if hi_e - lo_e > 3:
        step = max(1, math.ceil((hi_e - lo_e + 1) / most))
        return [10.0 ** e for e in range(lo_e, hi_e + 1, step)]
    ticks = [m * 10.0 ** e for e in range(lo_e - 1, hi_e + 1) for m in (1, 2, 5)]
    inside = [t for t in ticks if lo <= t <= hi]
    if len(inside) >= 3:
        return inside
    spacing = 10.0 ** math.floor(math.log10((hi - lo) / 4)) if hi > lo else 10.0 ** (lo_e - 1)
    for m in (1, 2, 5, 10):
        if (hi - lo) / (m * spacing) <= 5:
            spacing *= m
            break
    first = math.floor(lo / spacing) * spacing
    return [first + k * spacing for k in range(int(math.ceil((hi - first) / spacing)) + 1) if first + k * spacing > 0]


def plot_stats(result: dict[str, Any], stem: str | Path, title: str | None = None) -> list[Path]:
    """`stats_figure` written as <stem>.png and <stem>.pdf."""
    return _save(stats_figure(result, title), stem)


def stats_figure(result: dict[str, Any], title: str | None = None) -> Figure:
    """Per-layer lines: relative diff norms (‖Δ‖/‖θ‖, base distance) and diff cosine similarity.

    result: as returned by `ftjax.stats.diff_stats` (its "layers" list, one entry per decoder layer). The norms
    go on a log axis when any is positive (ticks from `log_ticks`); a series that is 0 at every layer cannot show
    there and is only named in the legend, which says so.
    """
    layers = [r for r in result["layers"] if r.get("layer") is not None]
    idx = [r["layer"] for r in layers]
    has_cos = any(r.get("cos_delta") is not None for r in layers)
    fig = Figure(figsize=(6.4, 6.0 if has_cos else 4.0))
    axes = fig.subplots(2 if has_cos else 1, 1, sharex=True, squeeze=False)[:, 0]
    series = [("rel_delta", "‖Δ‖ / ‖θ‖  (source diff)"), ("rel_delta_target", "‖Δt‖ / ‖θt‖  (target diff)"),
              ("rel_base_distance", "‖T − S‖ / ‖S‖  (base versions)")]
    drawn = {key: _nan([r.get(key) for r in layers]) for key, _ in series}
    drawn = {key: v for key, v in drawn.items() if not np.isnan(v).all()}
    positive = np.concatenate([v[v > 0] for v in drawn.values()] + [np.zeros(0)])  # NaN compares False
    log = positive.size > 0
    for i, (key, label) in enumerate(series):
        if key not in drawn:
            continue
        if log and not (drawn[key] > 0).any():  # nothing of it can show on a log axis: say so instead
            axes[0].plot([], [], "o-", color=f"C{i}", label=f"{label}: 0 at every layer (not drawn, log axis)")
        else:
            axes[0].plot(idx, drawn[key], "o-", color=f"C{i}", label=label)
    axes[0].set_ylabel("relative L2 norm (fraction)")
    if log:
        axes[0].set_yscale("log")
        ticks = log_ticks(float(positive.min()), float(positive.max()))
        digits = next((d for d in range(3, 12) if len({f"{t:.{d}g}" for t in ticks}) == len(ticks)), 12)
        axes[0].yaxis.set_major_locator(FixedLocator(ticks))
        axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.{digits}g}"))  # distinct labels
        axes[0].yaxis.set_minor_formatter(NullFormatter())
    _legend(axes[0], framealpha=0.5, fontsize=8)
    axes[0].grid(alpha=0.3, which="both")
    if has_cos:
        axes[1].plot(idx, _nan([r.get("cos_delta") for r in layers]), "o-", color="C3", label="cos(Δs, Δt)")
        axes[1].axhline(0, color="0.5", ls="--", lw=0.8)
        axes[1].set_ylabel("cosine similarity")
        axes[1].set_ylim(-1.05, 1.05)
        _legend(axes[1], framealpha=0.5, fontsize=8)
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("decoder layer index")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title(title or "diff statistics per layer")
    return fig


def plot_curves(runs: dict[str, dict[str, list]], stem: str | Path, title: str | None = None) -> list[Path]:
    """Training loss (solid) and evaluation loss (dashed, markers) against optimizer step, one colour per run.

    runs: label -> curves as returned by `ftjax.train.read_curves` ("step", "loss", "eval_step", "eval_loss").
    """
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for i, (label, c) in enumerate(runs.items()):
        if c.get("step"):
            ax.plot(c["step"], _nan(c["loss"]), "-", color=f"C{i}", lw=1.2, label=f"{label} (train)")
        if c.get("eval_step"):
            ax.plot(c["eval_step"], _nan(c["eval_loss"]), "o--", color=f"C{i}", ms=4, label=f"{label} (eval)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(LOSS_LABEL)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    _legend(ax, framealpha=0.5, fontsize=8)
    ax.set_title(title or "fine-tuning curves")
    return _save(fig, stem)


def plot_rank_error(curves: dict[str, tuple[Any, int]], stem: str | Path, title: str | None = None) -> list[Path]:
    """Relative Frobenius error ‖Δ − B·A‖/‖Δ‖ of a truncated SVD against the LoRA rank, one line per module.

    curves: module -> (errors at ranks 1, 2, ... (fractions), the rank chosen; marked); as `ftjax extract-lora
    --plot` computes them (`ftjax.lora_extract.factorize`)."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for i, (module, (errors, rank)) in enumerate(curves.items()):
        errors = np.asarray(errors, np.float64)
        ranks = np.arange(1, len(errors) + 1)
        ax.plot(ranks, np.maximum(errors, 1e-12), "-", color=f"C{i}", label=module)
        if 1 <= rank <= len(errors):
            ax.plot([rank], [max(errors[rank - 1], 1e-12)], "o", color=f"C{i}")
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("relative error ‖Δ − BA‖ / ‖Δ‖ (fraction)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    _legend(ax, framealpha=0.5, fontsize=7)
    ax.set_title(title or "truncated SVD of each module's diff (dot: the rank written)", fontsize=9)
    return _save(fig, stem)


def plot_alpha(result: dict[str, Any], stem: str | Path, title: str | None = None) -> list[Path]:
    """Learned transfer coefficients (`ftjax.fit_alpha.fit_alpha`'s result): left, α against decoder layer, one line
    per diff and module type (attention / mlp, or the tensor kind with per-tensor groups), the other groups
    (embed, norm, lm_head) as labelled points beside the layers; right, the objective's curve against step."""
    import re

    layer = re.compile(r"^(?:model\.)?layers\.(\d+)(?:\.(.+?))?(?:\.weight|\.bias)?$")
    fig = Figure(figsize=(10.0, 4.0))
    ax, ax_c = fig.subplots(1, 2, width_ratios=(3, 2))
    parsed = [layer.match(g) for g in result["groups"]]
    n_layers = 1 + max((int(m.group(1)) for m in parsed if m), default=-1)
    multi = len(result["alpha"]) > 1
    for d, alphas in enumerate(result["alpha"]):
        lines: dict[str, list[tuple[int, float]]] = {}
        others = []
        for g, m, a in zip(result["groups"], parsed, alphas):
            if m:
                lines.setdefault(m.group(2) or "layer", []).append((int(m.group(1)), a))
            else:
                others.append((g, a))
        for i, (module, pts) in enumerate(lines.items()):
            x, y = zip(*sorted(pts))
            label = f"diff {d}: {module}" if multi else module
            ax.plot(x, y, "o-", ms=3, lw=1.2, color=f"C{(d * len(lines) + i) % 10}", label=label)
        after = [g for g in others if "embed" not in g[0]]
        after.sort(key=lambda ga: "lm_head" in ga[0])  # final norm, then the output embedding
        for g, a in others:
            x = -1 if "embed" in g else n_layers + after.index((g, a))
            ax.plot([x], [a], "s", color="0.3", ms=5)
            ax.annotate(g.removeprefix("model.").removesuffix(".weight"), (x, a), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.axhline(result["settings"]["init"], color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("α")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    many = len(ax.get_legend_handles_labels()[0]) > 4
    _legend(ax, framealpha=0.5, fontsize=7 if many else 8, ncol=2 if many else 1)
    ax.set_title(title or f"learned α per group ({result['settings']['groups']})")
    if result["curve"]:
        ax_c.plot(np.arange(1, len(result["curve"]) + 1), result["curve"], "-", lw=1.2)
    ax_c.set_xlabel("step")
    ax_c.set_ylabel(LOSS_LABEL if result["settings"]["objective"] == "loss" else "entropy (nats / token)")
    ax_c.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_c.grid(alpha=0.3)
    ax_c.set_title("calibration objective")
    return _save(fig, stem)
