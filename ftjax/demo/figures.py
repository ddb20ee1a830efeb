"""The demo's figures (PNG, matplotlib `Figure` objects only: no pyplot state, no GUI backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

CORE = ("M1", "M2", "M3", "M4", "M5")


def label(key: str) -> str:
    """"M5+DM4" -> "M5 + Δ4", "FT(M5+DM4)" -> "FT(M5 + Δ4)", "M1+DC" -> "M1 + ΔC"."""
    return key.replace("+DM", " + Δ").replace("+DC", " + ΔC")


def _pair(d: dict, a: str, b: str):
    return d.get(f"{a}-{b}", d.get(f"{b}-{a}"))


def plots(out: Path, summary: dict) -> list[str]:
    r = summary["results"][0]
    names = r["names"]
    written = []

    fig = Figure(figsize=(6.4, 5.0))
    ax = fig.subplots()
    grid = np.full((len(names) + 2, len(names)), np.nan)
    for a, j in enumerate(names):
        for b, i in enumerate(names):
            if i != j:
                grid[a + 1, b] = np.mean([x["grid"][f"{i}+D{j}"]["task"] for x in summary["results"]])
    for b, i in enumerate(names):
        grid[0, b] = np.mean([x["base"][i]["task"] for x in summary["results"]])
        grid[-1, b] = np.mean([x["ft"][i]["task"] for x in summary["results"]])
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100)
    for (y, x), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(x, y, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names) + 2), ["base", *[f"+Δ{n}" for n in names], "FT"])
    ax.set_xlabel("target version")
    ax.set_title("task exact match % of Mi + Δj (the paper's Table 3)")
    fig.colorbar(im, ax=ax)
    written.append(_save(fig, out / "grid.png"))

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
        ax.set_title(f"fine-tuning from {i} vs {i} + Δ")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("task exact match %")
    written.append(_save(fig, out / "finetune_curves.png"))

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for c, key in enumerate(k for k in ("M4-M5", "M3-M4", "M1-M5", "M0-M5", "M5-C") if k in r["scans"]):
        sc = r["scans"][key]
        ax.plot(sc["lambda"], sc["loss"], "o-", ms=3, color=f"C{c}", label=f"{key} (barrier {sc['barrier']:.2f})")
    ax.set_xlabel("λ  ((1−λ)·A + λ·B)")
    ax.set_ylabel("held-out LM loss (nats/token)")
    ax.set_title("linear interpolation between versions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "lmc.png"))

    pairs = [(i, j) for i in CORE for j in CORE if i != j]
    gain = [r["grid"][f"{i}+D{j}"]["task"] - r["base"][i]["task"] for i, j in pairs]
    fig = Figure(figsize=(10.5, 3.4))
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (xlabel, xs) in zip(axes, (("‖Mi − Mj‖", [_pair(r["distance"], i, j) for i, j in pairs]),
                                      ("cos(Δi, Δj)", [_pair(r["cos"], i, j) for i, j in pairs]),
                                      ("LM barrier Mi–Mj", [_pair(r["scans"], i, j)["barrier"] for i, j in pairs]))):
        ax.scatter(xs, gain, c=[int(i[1]) for i, _ in pairs], cmap="viridis", s=18)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gain of Mi + Δj over Mi (EM points)")
    fig.suptitle("what predicts transfer gain (colour: target version)")
    written.append(_save(fig, out / "predictors.png"))
    return written


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return path.name


