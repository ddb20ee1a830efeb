"""Diff statistics streamed from checkpoints on disk: norms, relative norms, base distance, diff cosine.

Models: S = source base, F = source fine-tuned (Δs = F − S), optionally T = target base (base distance T − S)
and G = target fine-tuned (Δt = G − T, and cos(Δs, Δt): the paper's Δs ≈ Δt assumption). Tensors are read one
row-chunk at a time from the memory-mapped safetensors and reduced in float64 on the host, so no model is ever
whole in memory. Per-layer and total figures are derived from summed squares and dot products, never averaged.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ftjax.layout import Layout
from ftjax.engine.streaming import row_chunks
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import HFCheckpoint
from ftjax.results import absolute_paths

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Accumulated float64 sums: squares of S, Δs, T, T−S, Δt, and dots Δs·Δt, Δs·(T−S).
_KEYS = ("ss_s", "ss_ds", "ss_t", "ss_ts", "ss_dt", "dot_ds_dt", "dot_ds_ts")


def group_of(name: str) -> tuple[int | None, str]:
    """(layer index or None, group): `model.layers.3.mlp.up_proj.weight` -> (3, "layer 3"),
    `lm_head.weight` -> (None, "lm_head")."""
    m = _LAYER.match(name)
    if m:
        return int(m.group(1)), f"layer {m.group(1)}"
    return None, name.removeprefix("model.").removesuffix(".weight")


def _row_chunks(ckpts: list[HFCheckpoint], name: str, rows: int, chunk_elems: int) -> Iterator[list[np.ndarray]]:
    """float64 row chunks of `name` (its first `rows` rows), flattened, from every checkpoint."""
    shape = ckpts[0].info(name).shape
    if not shape:
        yield [np.asarray(c.get(name), np.float64).reshape(1) for c in ckpts]
        return
    for r0, r1 in row_chunks(shape, 0, rows, chunk_elems):
        yield [np.asarray(c.get(name)[r0:r1], np.float64).ravel() for c in ckpts]


def _derive(acc: dict[str, float], have_t: bool, have_g: bool) -> dict[str, Any]:
    """Norms, relative norms and cosines from accumulated sums."""
    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    out: dict[str, Any] = {"theta_norm": math.sqrt(acc["ss_s"]), "delta_norm": math.sqrt(acc["ss_ds"])}
    out["rel_delta"] = ratio(out["delta_norm"], out["theta_norm"])
    if have_t:
        out["base_distance"] = math.sqrt(acc["ss_ts"])
        out["rel_base_distance"] = ratio(out["base_distance"], out["theta_norm"])
        out["cos_delta_base"] = ratio(acc["dot_ds_ts"], out["delta_norm"] * out["base_distance"])
    if have_g:
        out["delta_target_norm"] = math.sqrt(acc["ss_dt"])
        out["rel_delta_target"] = ratio(out["delta_target_norm"], math.sqrt(acc["ss_t"]))
        out["cos_delta"] = ratio(acc["dot_ds_dt"], out["delta_norm"] * out["delta_target_norm"])
    return out


def diff_stats(source_base: str | Path, source_ft: str | Path, target_base: str | Path | None = None,
               target_ft: str | Path | None = None, *, chunk_elems: int = 1 << 23) -> dict[str, Any]:
    """Per-tensor, per-layer and total diff statistics, streamed (at most `chunk_elems` float64 values per model
    in memory at once).

    Returns {"models": {role: path}, "models_absolute": {role: absolute path}, "tensors": [...], "layers": [...],
    "total": {...}}; every entry has
    theta_norm = ‖S‖, delta_norm = ‖Δs‖, rel_delta = ‖Δs‖/‖S‖, and with a target base base_distance = ‖T − S‖,
    rel_base_distance, cos_delta_base = cos(Δs, T − S); with a target fine-tune delta_target_norm = ‖Δt‖,
    rel_delta_target = ‖Δt‖/‖T‖ and cos_delta = cos(Δs, Δt). Norms are L2 over the raw parameter values.
    Embedding rows beyond the smallest vocabulary (added tokens) are left out; `rows_compared` says so.
    """
    roles = {"source_base": source_base, "source_ft": source_ft, "target_base": target_base, "target_ft": target_ft}
    if target_ft is not None and target_base is None:
        raise FtjaxError("a target fine-tune needs its target base (Δt = target_ft − target_base)")
    ckpts = {role: HFCheckpoint(p) for role, p in roles.items() if p is not None}
    have_t, have_g = "target_base" in ckpts, "target_ft" in ckpts
    order = list(ckpts.values())
    families = {role: c.config.get("model_type") for role, c in ckpts.items()}
    if len(set(families.values())) > 1:
        raise FtjaxError(f"models of different families cannot be compared: {families}")
    layouts = {role: Layout.of_checkpoint(c) for role, c in ckpts.items()}
    names = list(layouts[next(iter(layouts))].float_names)
    if not names:
        raise FtjaxError(f"{order[0].path}: no floating-point tensors to compare")
    plans = []  # (name, rows to compare) -- all shapes checked before any tensor is read
    for role, c in ckpts.items():
        other = set(layouts[role].float_names)
        missing = [n for n in names if n not in other] + [n for n in other if n not in names]
        if missing:
            raise FtjaxError(f"{c.path}: tensor {missing[0]} is in one model but not the other; stats need the "
                             "same tensors in every model")
    for name in names:
        shapes = [c.info(name).shape for c in order]
        rows = min(s[0] for s in shapes) if shapes[0] else 0
        if any(s[1:] != shapes[0][1:] for s in shapes) or (len(set(shapes)) > 1 and group_of(name)[0] is not None):
            raise FtjaxError(f"tensor {name} has shapes {shapes} across the models; stats need identical shapes")
        plans.append((name, rows))

    tensors, groups, total = [], {}, dict.fromkeys(_KEYS, 0.0)
    for name, rows in plans:
        acc = dict.fromkeys(_KEYS, 0.0)
        for chunks in _row_chunks(order, name, rows, chunk_elems):
            s, f, *rest = chunks
            ds = f - s
            acc["ss_s"] += float(s @ s)
            acc["ss_ds"] += float(ds @ ds)
            if have_t:
                t = rest[0]
                ts = t - s
                acc["ss_ts"] += float(ts @ ts)
                acc["dot_ds_ts"] += float(ds @ ts)
                acc["ss_t"] += float(t @ t)
            if have_g:
                dt = rest[1] - rest[0]
                acc["ss_dt"] += float(dt @ dt)
                acc["dot_ds_dt"] += float(ds @ dt)
        layer, group = group_of(name)
        shape = order[0].info(name).shape
        entry = {"name": name, "layer": layer, "group": group, "numel": int(math.prod(shape)),
                 **_derive(acc, have_t, have_g)}
        if shape and rows != shape[0] or len({c.info(name).shape for c in order}) > 1:
            entry["rows_compared"] = rows
        tensors.append(entry)
        g = groups.setdefault(group, {"layer": layer, "group": group, "numel": 0, **dict.fromkeys(_KEYS, 0.0)})
        g["numel"] += entry["numel"]
        for k in _KEYS:
            g[k] += acc[k]
            total[k] += acc[k]
    layers = [{"layer": g["layer"], "group": g["group"], "numel": g["numel"], **_derive(g, have_t, have_g)}
              for g in sorted(groups.values(), key=lambda g: (g["layer"] is None, g["layer"] or 0, g["group"]))]
    for c in order:
        c.close()
    models = {r: str(ckpts[r].path) for r in ckpts}
    return {"models": models, "models_absolute": absolute_paths(models), "tensors": tensors, "layers": layers,
            "total": {"numel": sum(t["numel"] for t in tensors), **_derive(total, have_t, have_g)}}


def format_table(result: dict[str, Any]) -> str:
    """A plain-text per-layer table of the main figures: every norm `diff_stats` computed (‖Δs‖; with a target
    base ‖T−S‖; with a target fine-tune ‖Δt‖ and cos(Δs,Δt)) and its relative form."""
    cols = [("group", "group", "{}"), ("rel_delta", "‖Δs‖/‖S‖", "{:.3e}"), ("delta_norm", "‖Δs‖", "{:.4g}")]
    if "base_distance" in result["total"]:
        cols += [("base_distance", "‖T−S‖", "{:.4g}"), ("rel_base_distance", "‖T−S‖/‖S‖", "{:.3e}")]
    if "delta_target_norm" in result["total"]:
        cols += [("delta_target_norm", "‖Δt‖", "{:.4g}"), ("rel_delta_target", "‖Δt‖/‖T‖", "{:.3e}")]
    if "cos_delta" in result["total"]:
        cols += [("cos_delta", "cos(Δs,Δt)", "{:+.4f}")]
    rows = [[h for _, h, _ in cols]]
    for r in result["layers"] + [{**result["total"], "group": "total"}]:
        rows.append(["-" if r.get(k) is None else f.format(r[k]) for k, _, f in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
                     for row in rows)
