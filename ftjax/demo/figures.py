"""The demo's figures (PNG, matplotlib `Figure` objects only: no pyplot state, no GUI backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ftjax.demo.verdicts import CHOSEN_MEASURE, MEASURES, barrier_of

CORE = ("M1", "M2", "M3", "M4", "M5")
# what `plots` writes; the demo lists them in its record before it writes them
PNGS = ("grid.png", "alpha.png", "finetune_curves.png", "lmc.png", "predictors.png")


def label(key: str) -> str:
    """"M5+DM4" -> "M5 + Δ4", "FT(M5+DM4)" -> "FT(M5 + Δ4)", "M1+DC" -> "M1 + ΔC"."""
    return key.replace("+DM", " + Δ").replace("+DC", " + ΔC")


def _pair(d: dict, a: str, b: str):
    return d.get(f"{a}-{b}", d.get(f"{b}-{a}"))


def plots(out: Path, summary: dict) -> list[str]:
    """PNGS under out: grid.png (seed mean), alpha.png, finetune_curves.png, lmc.png and predictors.png (first
    seed); returns the file names."""
    r = summary["results"][0]
    names = r["names"]
    seeds = len(summary["results"])
    written = []

    written.append(_save(grid(summary["results"]), out / "grid.png"))

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for c, j in enumerate([n for n in names if n != "M5"]):
        sw = r["sweep"][f"M5+D{j}"]
        ax.plot(sw["alpha"], sw["task"], "o-", ms=3, color=f"C{c}", label=f"M5 + α·Δ{j[1:] if j != 'C' else 'C'}")
    ax.axhline(r["ft"]["M5"]["task"], ls="--", color="k", lw=1, label="FT(M5)")
    ax.set_xlabel("α")
    ax.set_ylabel("task exact match %")
    ax.set_title(f"α sweep onto M5 (seed {r['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "alpha.png"))

    fig = Figure(figsize=(9.6, 4.0))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, i in zip(axes, ("M4", "M5")):
        for c, key in enumerate([k for k in r["curves"] if k == f"FT({i})" or k.startswith(f"FT({i}+")
                                 or k == f"iter({i})"]):
            cur = np.asarray(r["curves"][key])
            ax.plot(cur[:, 0], cur[:, 1], "o-" if key == f"FT({i})" else ".-", ms=3, color=f"C{c}", label=label(key))
        ax.set_xlabel("fine-tuning step")
        ax.set_title(f"fine-tuning from {i} vs {i} + Δ (seed {r['seed']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("task exact match %")
    written.append(_save(fig, out / "finetune_curves.png"))

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for c, key in enumerate(k for k in ("M4-M5", "M3-M4", "M1-M5", "M0-M5", "M5-C") if k in r["scans"]):
        sc = r["scans"][key]
        where = "no barrier" if sc.get("barrier_lambda") is None else \
            f"barrier {sc['barrier']:.3f} at λ = {sc['barrier_lambda']:.2f}"
        ax.plot(sc["lambda"], sc["loss"], "o-", ms=3, color=f"C{c}", label=f"{key} ({where})")
    ax.set_xlabel("λ  ((1−λ)·A + λ·B)")
    ax.set_ylabel("held-out LM loss (nats/token)")
    ax.set_title(f"linear interpolation between versions (seed {r['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "lmc.png"))

    written.append(_save(predictors(r), out / "predictors.png"))
    return written


def grid(results: list[dict]) -> Figure:
    """The transfer grid (the paper's Table 3): task EM % of Mi + Δj, base and FT rows; each cell annotated with the
    seed mean and, with several seeds, its range (min–max) below it. The colour is the mean."""
    names = results[0]["names"]
    seeds = len(results)
    cells = np.full((len(names) + 2, len(names), seeds), np.nan)
    for b, i in enumerate(names):
        cells[0, b] = [x["base"][i]["task"] for x in results]
        cells[-1, b] = [x["ft"][i]["task"] for x in results]
        for a, j in enumerate(names):
            if i != j:
                cells[a + 1, b] = [x["grid"][f"{i}+D{j}"]["task"] for x in results]
    mean = cells.mean(axis=2)
    fig = Figure(figsize=(7.2, 5.6) if seeds > 1 else (6.4, 5.0))
    ax = fig.subplots()
    im = ax.imshow(mean, cmap="viridis", vmin=0, vmax=100)
    for (y, x), v in np.ndenumerate(mean):
        if np.isfinite(v):
            text = f"{v:.0f}" if seeds == 1 else f"{v:.0f}\n{cells[y, x].min():.0f}–{cells[y, x].max():.0f}"
            ax.text(x, y, text, ha="center", va="center", fontsize=7 if seeds == 1 else 6,
                    color="w" if v < 60 else "k")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names) + 2), ["base", *[f"+Δ{n}" for n in names], "FT"])
    ax.set_xlabel("target version")
    ax.set_title("task exact match % of Mi + Δj (the paper's Table 3)" +
                 (f"\nmean and range (min–max) over {seeds} seeds" if seeds > 1 else ""))
    fig.colorbar(im, ax=ax, label="task exact match % (mean)")
    return fig


def predictors(r: dict) -> Figure:
    """Gain of Mi + Δj over Mi against ‖Mi − Mj‖, cos(Δi, Δj) and claim (d)'s barrier (`verdicts.CHOSEN_MEASURE`),
    one colour per target Mi (legend);
    a panel whose quantity is the same for every pair says so."""
    pairs = [(i, j) for i in CORE for j in CORE if i != j]
    gain = [r["grid"][f"{i}+D{j}"]["task"] - r["base"][i]["task"] for i, j in pairs]
    fig = Figure(figsize=(10.5, 3.6))
    axes = fig.subplots(1, 3, sharey=True)
    colours = dict(zip(CORE, colormaps["viridis"](np.linspace(0, 0.9, len(CORE)))))
    panels = (("‖Mi − Mj‖", [_pair(r["distance"], i, j) for i, j in pairs]),
              ("cos(Δi, Δj)", [_pair(r["cos"], i, j) for i, j in pairs]),
              (f"{MEASURES[CHOSEN_MEASURE]} (nats)", [barrier_of(r, CHOSEN_MEASURE, i, j) for i, j in pairs]))
    for ax, (xlabel, xs) in zip(axes, panels):
        for t in CORE:
            idx = [k for k, (i, _) in enumerate(pairs) if i == t]
            ax.scatter([xs[k] for k in idx], [gain[k] for k in idx], color=colours[t], s=18, label=f"target {t}")
        if np.ptp(np.asarray(xs, np.float64)) == 0:
            what = "no barrier on any path" if xlabel.startswith("LM barrier") and xs[0] == 0 else "the same"
            ax.text(0.5, 0.5, f"{what}:\nall {len(xs)} pairs at {xs[0]:.3g}", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, bbox={"facecolor": "w", "alpha": 0.8, "lw": 0})
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gain of Mi + Δj over Mi (EM points)")
    axes[-1].legend(fontsize=7, title="colour: target Mi", title_fontsize=7, loc="best")
    fig.suptitle(f"what predicts transfer gain (seed {r['seed']}; one point per ordered pair Mi + Δj of M1..M5)")
    return fig


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return path.name


