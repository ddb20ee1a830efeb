"""The demo's outputs: results.json, report.md (tables + an honest comparison with the paper) and PNG plots.

Every number in the report is computed from the per-seed results of `study.run_seed`; with several seeds, cells are
"mean ± standard deviation" over seeds. The verdicts are simple, stated thresholds, so a reader can re-derive them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ftjax.demo import figures
from ftjax.demo.figures import label
from ftjax.lmc import finite_or_none

CORE = ("M1", "M2", "M3", "M4", "M5")
STAGE = {"M1": 1, "M2": 1, "M3": 1, "M4": 2, "M5": 2}
# What was tried on the way to the default world (rendered into report.md; one seed each on 2 shared CPU cores).
TUNING = (
    ("width 96, 3 layers (342k params), operands 0..39, 450 + 200 steps",
     "too slow here: ftjax's Flax model trains at ~0.3 s CPU per 2048-token step at this size, so the two "
     "pretraining runs alone exceed the 5-minute budget"),
    ("width 64, 2 layers (115k), operands 0..19, no task-format text in pretraining",
     "the skill emerges (probe M1..M5 = 4/27/51/36/89) but every base scores 0 on the task, so 'below base' is "
     "unobservable; M5 + Δ4 = 27 vs FT(M5) = 59"),
    ("+ the task's own format in 1 % (stage 1) / 3 % (stage 2) of documents",
     "bases 5/5/11/15/41; cross-stage diffs now push M5 below its base (M5 + Δ1 = 13 < 41), but so does Δ4 "
     "(26 < 41): M4 was taken while the stage-2 learning-rate re-warm (2e-3) had disrupted the skill "
     "(probe M4 = 37 < M3 = 53)"),
    ("stage-2 peak lr 2e-3 → 1e-3, stage 2 200 → 300 steps",
     "probe M4 = 53; cos(Δ4, Δ5) = 0.79 and ‖M4 − M5‖ = 1.25 vs ‖Δ4‖ = 0.83, yet M5 + Δ4 = 27 "
     "(α = 0.5 gives 43, α = 1.5 gives 15)"),
    ("arithmetic share 0.25 → 0.30 (stage 1), 0.65 → 0.70 (stage 2): **the default**",
     "M5 + Δ4 = 43 (base 28, FT 66), M4 + Δ5 = 35 (base 12, FT 50), M5 + Δ3 = 11 and M5 + Δ1 = 5 "
     "(below base), cos(Δ4, Δ5) = 0.87"),
    ("the default, `--full` (seeds 0, 1, 2)",
     "M5 + Δ4 recovers 40 / 15 / 7 % of FT(M5)'s gain (M4 + Δ5: 61 / 58 / 36 %) although cos(Δ4, Δ5) = "
     "0.87 / 0.88 / 0.86 in all three: same-stage transfer is seed-fragile, as the prototype found; "
     "transfer-then-finetune beats plain FT in 41 of 60 runs and iterative ≥ direct in 7 of 9"),
)
TUNING_LESSON = ("Lessons, consistent with the prototype's (demo-spike.md): the target must already hold the latent "
                 "skill, and fine-tuning must stay gentle (lr 3e-4, 100 steps, 150 pairs). Our reading (a "
                 "hypothesis, not tested separately): same-stage transfer fails when the skill is still being "
                 "formed between the two versions, whatever the diff cosine.")


def _tuning_notes() -> str:
    rows = "\n".join(f"| {a} | {b} |" for a, b in TUNING)
    return f"| variant | outcome |\n|---|---|\n{rows}\n\n{TUNING_LESSON}"


PAPER_GSM8K = {  # Table 3 (GSM8K): base, +Δj, FT(Mi)
    "base": {"M1": 13.2, "M2": 19.4, "M3": 24.4, "M4": 64.5, "M5": 65.5},
    "FT": {"M1": 45.1, "M2": 50.7, "M3": 60.4, "M4": 75.7, "M5": 75.5},
}


# ---------------------------------------------------------------------------------------------------------- helpers
def _mean_sd(values: Sequence[float | None]) -> tuple[float, float]:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _fmt(values: Sequence[float | None], digits: int = 1) -> str:
    m, sd = _mean_sd(values)
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {sd:.{digits}f}"


def _nanmean(values) -> float:
    v = np.asarray([x for x in values if x is not None], np.float64)
    return float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else math.nan


def _pct(x: float) -> str:
    """A share as a percentage, "n/a" when undefined (e.g. fine-tuning gained nothing to recover)."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.0f} %"


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan
    return float(spearmanr(x[ok], y[ok]).statistic)


def _pair(d: dict, a: str, b: str) -> float:
    return d.get(f"{a}-{b}", d.get(f"{b}-{a}"))


def _recovery(r: dict, i: str, j: str) -> float:
    """(score of Mi + Δj − base) / (FT(Mi) − base): the share of Mi's own fine-tuning gain transfer recovers."""
    gain = r["ft"][i]["task"] - r["base"][i]["task"]
    return (r["grid"][f"{i}+D{j}"]["task"] - r["base"][i]["task"]) / gain if gain > 0 else math.nan


# ---------------------------------------------------------------------------------------------------------- analysis
def analyse(r: dict) -> dict[str, Any]:
    """The per-seed quantities behind claims (a)–(f)."""
    names = r["names"]
    same = [(i, j) for i in CORE for j in CORE if i != j and STAGE[i] == STAGE[j]]
    cross = [(i, j) for i in CORE for j in CORE if STAGE[i] != STAGE[j]]
    out: dict[str, Any] = {}
    out["a_same_stage2"] = {f"{i}+D{j}": _recovery(r, i, j) for i, j in (("M5", "M4"), ("M4", "M5"))}
    out["a_same_stage1"] = _nanmean([_recovery(r, i, j) for i, j in same if STAGE[i] == 1])
    out["b_cross_stage"] = _nanmean([_recovery(r, i, j) for i, j in cross])
    out["b_cross_to_stage2"] = _nanmean([_recovery(r, i, j) for i, j in cross if STAGE[i] == 2])
    below = [(i, j) for i in CORE for j in names if j != i and r["grid"][f"{i}+D{j}"]["task"] < r["base"][i]["task"]]
    out["b_below_base"] = [f"{i}+D{j}" for i, j in below]
    out["b_below_base_cross"] = sum(1 for i, j in below if j in STAGE and STAGE[i] != STAGE[j])
    m0 = [r["grid"][f"M0+D{j}"] for j in CORE]
    out["b_m0"] = {"task": float(np.mean([g["task"] for g in m0])), "ft_task": r["ft"]["M0"]["task"],
                   "lm_change": float(np.mean([g["lm"] for g in m0]) - r["base"]["M0"]["lm"]),
                   "probe_change": float(np.mean([g["probe"] for g in m0]) - r["base"]["M0"]["probe"])}
    if "C" in names:
        out["b_control"] = {
            "Mi+DC_minus_base": float(np.mean([r["grid"][f"{i}+DC"]["task"] - r["base"][i]["task"] for i in CORE])),
            "C+Dj_minus_base": float(np.mean([r["grid"][f"C+D{j}"]["task"] - r["base"]["C"]["task"] for j in CORE])),
            "lm_change_C+Dj": float(np.mean([r["grid"][f"C+D{j}"]["lm"] - r["base"]["C"]["lm"] for j in CORE])),
            "cos_DC_Dj": float(np.mean([abs(_pair(r["cos"], "C", j)) for j in CORE])),
            "barrier_C_M5": _pair(r["scans"], "C", "M5")["barrier"]}
    alpha = {}
    for i, j in (("M5", "M4"), ("M4", "M5"), ("M5", "M3")):
        sw = r["sweep"][f"{i}+D{j}"]
        k = int(np.argmax(sw["task"]))
        alpha[f"{i}+D{j}"] = {"at_1": sw["task"][sw["alpha"].index(1.0)], "best": sw["task"][k],
                              "best_alpha": sw["alpha"][k], "ft_target": r["ft"][i]["task"],
                              "base": r["base"][i]["task"]}
    out["c_alpha"] = alpha
    pairs = [(i, j) for i in CORE for j in CORE if i != j]
    gain = [r["grid"][f"{i}+D{j}"]["task"] - r["base"][i]["task"] for i, j in pairs]
    preds = {"LM barrier between Mi and Mj": [_pair(r["scans"], i, j)["barrier"] for i, j in pairs],
             "LM midpoint excess (signed)": [_pair(r["scans"], i, j)["mid_excess"] for i, j in pairs],
             "distance ‖Mi − Mj‖": [_pair(r["distance"], i, j) for i, j in pairs],
             "cos(Δi, Δj)": [_pair(r["cos"], i, j) for i, j in pairs],
             "task-NLL barrier along Mi + λΔj": [r["sweep"][f"{i}+D{j}"]["barrier"] for i, j in pairs]}
    out["d_spearman"] = {k: _spearman(v, gain) for k, v in preds.items()}
    within = {}  # mean rho inside each target column (removes the "strong target" confound)
    for k, v in preds.items():
        rhos = [_spearman([v[n] for n, (i, _) in enumerate(pairs) if i == t],
                          [gain[n] for n, (i, _) in enumerate(pairs) if i == t]) for t in CORE]
        within[k] = _nanmean(rhos)
    out["d_spearman_within_target"] = within
    tft = {k: v for k, v in r["tft"].items() if "+D" in k}
    out["e_tft_beats_ft"] = [sum(v["final"] > r["tft"][f"FT({k.split('+')[0]})"]["final"] for k, v in tft.items()),
                             len(tft)]
    faster = 0
    for k, v in tft.items():
        own = r["tft"][f"FT({k.split('+')[0]})"]["steps_to_ft"]
        faster += v["steps_to_ft"] is not None and own is not None and v["steps_to_ft"] < own
    out["e_tft_faster"] = [faster, len(tft)]
    out["f_recycle"] = r["recycle"]
    return out


def aggregate(config: Any, results: list[dict], seconds: float) -> dict[str, Any]:
    analyses = [analyse(r) for r in results]
    config = config if isinstance(config, dict) else dataclasses.asdict(config)
    return {"format": "ftjax-demo", "config": config, "seconds": round(seconds, 1),
            "seeds": [r["seed"] for r in results], "analysis": analyses, "results": results}


# ---------------------------------------------------------------------------------------------------------- tables
def _col(results, fn):
    return [fn(r) for r in results]


def main_table(summary: dict) -> str:
    """The paper's Table 3 on the demo: task exact match % (column = target version, row = diff added)."""
    results = summary["results"]
    names = results[0]["names"]
    head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    lines = ["task exact match % (columns: target Mi; rows: what was added)" +
             (f", mean ± sd over {len(results)} seeds" if len(results) > 1 else ""), "", head]
    lines.append("| base | " + " | ".join(_fmt(_col(results, lambda r, n=n: r["base"][n]["task"])) for n in names)
                 + " |")
    for j in names:
        cells = []
        for i in names:
            cells.append("–" if i == j else _fmt(_col(results, lambda r, k=f"{i}+D{j}": r["grid"][k]["task"])))
        lines.append(f"| +Δ{j[1:] if j != 'C' else 'C'} | " + " | ".join(cells) + " |")
    lines.append("| FT(Mi) | " + " | ".join(_fmt(_col(results, lambda r, n=n: r["ft"][n]["task"])) for n in names)
                 + " |")
    lines.append("| probe (latent skill) | " + " | ".join(
        _fmt(_col(results, lambda r, n=n: r["base"][n]["probe"]), 0) for n in names) + " |")
    return "\n".join(lines)


def _lm_table(results) -> str:
    names = results[0]["names"]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, title in (("lm1", "base: LM loss, stage-1 text"), ("lm2", "base: LM loss, stage-2 text")):
        lines.append(f"| {title} | " + " | ".join(_fmt(_col(results, lambda r, n=n: r["base"][n][key]), 3)
                                                   for n in names) + " |")
    lines.append("| FT(Mi): mean LM loss | " + " | ".join(_fmt(_col(results, lambda r, n=n: r["ft"][n]["lm"]), 3)
                                                          for n in names) + " |")
    lines.append("| ‖Δi‖ | " + " | ".join(_fmt(_col(results, lambda r, n=n: r["delta_norm"][n]), 2)
                                         for n in names) + " |")
    return "\n".join(lines)


def _tft_table(results) -> str:
    keys = [k for k in results[0]["tft"] if "+D" in k]
    lines = ["| start | final EM % | EM % at step 0 | steps to reach FT(Mi)'s final EM | FT(Mi) final | "
             "FT(Mi) steps |", "|---|---|---|---|---|---|"]

    def steps(vals):
        v = [x for x in vals if x is not None]
        return "never" if not v else (f"{np.mean(v):.0f}" + (f" ({len(v)}/{len(vals)} seeds)" if len(v) < len(vals)
                                                              else ""))

    for k in keys:
        i = k.split("+")[0]
        lines.append(f"| {label(k)} | {_fmt(_col(results, lambda r: r['tft'][k]['final']))} | "
                     f"{_fmt(_col(results, lambda r: r['tft'][k]['start']))} | "
                     f"{steps(_col(results, lambda r: r['tft'][k]['steps_to_ft']))} | "
                     f"{_fmt(_col(results, lambda r: r['tft'][f'FT({i})']['final']))} | "
                     f"{steps(_col(results, lambda r: r['tft'][f'FT({i})']['steps_to_ft']))} |")
    return "\n".join(lines)


def _recycle_table(results) -> str:
    lines = ["| version | plain FT(Mi) | direct FT(Mi + Δi−1) | iterative (Alg. 1) |", "|---|---|---|---|"]
    for i in ("M3", "M4", "M5"):
        cells = []
        for mode in ("plain", "direct", "iterative"):
            fin = _fmt(_col(results, lambda r: r["recycle"][mode][i]["final"]))
            st = [r["recycle"][mode][i]["steps_to_ft"] for r in results]
            st = [x for x in st if x is not None]
            cells.append(f"{fin} ({np.mean(st):.0f} steps)" if st else f"{fin} (never)")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _connectivity_table(results) -> str:
    names = results[0]["names"]
    lines = ["| pair | LM barrier (nats) | midpoint excess (nats) | ‖Mi − Mj‖ | cos(Δi, Δj) |",
             "|---|---|---|---|---|"]
    for k in results[0]["scans"]:
        lines.append(f"| {k} | {_fmt(_col(results, lambda r: r['scans'][k]['barrier']), 3)} | "
                     f"{_fmt(_col(results, lambda r: r['scans'][k]['mid_excess']), 3)} | "
                     f"{_fmt(_col(results, lambda r: r['distance'][k]), 2)} | "
                     f"{_fmt(_col(results, lambda r: r['cos'][k]), 2)} |")
    del names
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- claims
def claims(summary: dict) -> list[str]:
    """Plain statements (a)–(f): what was observed, and whether it agrees with the paper. Thresholds: "recovers
    much" = at least 50 % of the target's own FT gain; "approaches FT" = within 10 EM points; verdicts over seeds
    use the seed mean."""
    A, res = summary["analysis"], summary["results"]
    n = len(A)
    seeds = f" (mean of {n} seeds)" if n > 1 else ""
    m = lambda vals: _mean_sd(vals)[0]  # noqa: E731
    out = []

    rec54, rec45 = m([a["a_same_stage2"]["M5+DM4"] for a in A]), m([a["a_same_stage2"]["M4+DM5"] for a in A])
    probe4, probe5 = m([r["base"]["M4"]["probe"] for r in res]), m([r["base"]["M5"]["probe"] for r in res])
    same2 = _nanmean([rec54, rec45])
    if math.isfinite(same2) and same2 >= 0.9:
        verdict = "**agrees** with the paper (M5 + Δ4 = 77.1 vs FT(M5) = 75.5 on GSM8K)"
    elif math.isfinite(same2) and same2 >= 0.5:
        verdict = ("**agrees in direction**: about half or more of the gain transfers, but not the paper's "
                   "M5 + Δ4 = 77.1 ≥ FT(M5) = 75.5")
    else:
        verdict = "**does not reproduce** the paper's strong same-stage result (M5 + Δ4 ≥ FT(M5)) at this size"
    out.append(f"**(a) Same-stage transfer.** M5 + Δ4 recovers {_pct(rec54)} of FT(M5)'s gain over its base and "
               f"M4 + Δ5 {_pct(rec45)}{seeds}, on targets whose latent skill (probe) is {probe4:.0f} % (M4) and "
               f"{probe5:.0f} % (M5). Within stage 1 (weaker targets) the mean recovery is "
               f"{_pct(m([a['a_same_stage1'] for a in A]))}. This {verdict}."
               + (" One seed only: this effect varies strongly between seeds (see the tuning notes and `--full`)."
                  if n == 1 else ""))

    cross, cross2 = m([a["b_cross_stage"] for a in A]), m([a["b_cross_to_stage2"] for a in A])
    below = m([len(a["b_below_base"]) for a in A])
    below_cross = m([a["b_below_base_cross"] for a in A])
    m0 = {k: m([a["b_m0"][k] for a in A]) for k in A[0]["b_m0"]}
    prox = (math.isfinite(cross2) and math.isfinite(same2) and cross2 < same2)
    text = (f"**(b) Cross-stage, M0 and the control.** Cross-stage pairs recover {_pct(cross)} of the FT gain on "
            f"average; stage-2 targets given stage-1 diffs recover {_pct(cross2)}, against {_pct(same2)} from their "
            "stage-2 neighbour: "
            + ("**agrees** with the paper's proximity claim. " if prox else
               "**does not agree** with the paper's proximity claim. ")
            + f"Transfers ending below their base: {below:.1f} of 30 per seed, {below_cross:.1f} of them cross-stage "
            + ("(the paper's below-base failure, e.g. M5 + Δ2 = 17.3 < 65.5, is observed). " if below_cross >= 1 else
               "(the paper's below-base failure, e.g. M5 + Δ2 = 17.3 < 65.5, is **not** observed here). ")
            + f"Onto the near-initial M0, transfer gives {m0['task']:.1f} % (FT(M0) = {m0['ft_task']:.1f} %) and "
              f"changes M0's LM loss by {m0['lm_change']:+.3f} nats: "
            + ("transfer onto M0 does not work, as in the paper (whose M0 fell to 1.4 on MMLU; this M0 scores 0 "
               "before and after, so there is nothing to destroy)." if m0["task"] < 5 else
               "transfer onto M0 gives a non-trivial score, unlike the paper."))
    if "b_control" in A[0]:
        c = {k: m([a["b_control"][k] for a in A]) for k in A[0]["b_control"]}
        text += (f" Control C (another init): Mi + ΔC changes task EM by {c['Mi+DC_minus_base']:+.1f} points on "
                 f"average, C + Δj by {c['C+Dj_minus_base']:+.1f} (LM loss {c['lm_change_C+Dj']:+.3f} nats); "
                 f"|cos(ΔC, Δj)| = {c['cos_DC_Dj']:.2f} and the LM barrier C–M5 is {c['barrier_C_M5']:.2f} nats: "
                 + ("the foreign diff does nothing useful (inert rather than destructive)."
                    if abs(c["Mi+DC_minus_base"]) < 5 and abs(c["C+Dj_minus_base"]) < 5 else
                    "the foreign diff changes the scores noticeably (see the grid)."))
    out.append(text)

    parts = []
    for key, tgt in (("M5+DM4", "M5"), ("M4+DM5", "M4")):
        al = {k: m([a["c_alpha"][key][k] for a in A]) for k in A[0]["c_alpha"][key]}
        close = al["best"] >= al["ft_target"] - 10 and al["best"] > al["base"] + 5
        parts.append(f"{tgt} + α·Δ{key[-1]} scores {al['at_1']:.1f} % at α = 1 and at best {al['best']:.1f} % "
                     f"(α = {al['best_alpha']:.2g}), against FT({tgt}) = {al['ft_target']:.1f} % and base "
                     f"{al['base']:.1f} % — " + ("it approaches FT(target)" if close else "it stays well below "
                                                                                        "FT(target)"))
    out.append(f"**(c) α{seeds}.** " + "; ".join(parts) + ". The paper used α = 1 only; "
               "a best α above 1 means the neighbour's diff undershoots, below 1 that it overshoots.")

    rho = {k: m([a["d_spearman"][k] for a in A]) for k in A[0]["d_spearman"]}
    core = [v["barrier"] for r in res for k, v in r["scans"].items() if "C" not in k and "M0" not in k]
    max_core = max(core) if core else math.nan
    ctrl = m([a["b_control"]["barrier_C_M5"] for a in A]) if "b_control" in A[0] else math.nan
    rho_w = {k: m([a["d_spearman_within_target"][k] for a in A]) for k in A[0]["d_spearman"]}
    finite = {k: v for k, v in rho.items() if math.isfinite(v)}
    best = max(finite, key=lambda k: abs(finite[k])) if finite else None
    out.append("**(d) What predicts transfer gain** (Spearman ρ between each quantity and the gain of Mi + Δj over "
               "Mi, "
               "over the 20 ordered pairs of M1..M5; in parentheses the mean ρ within each target column, which "
               "removes the strong-target confound): "
               + "; ".join(f"{k}: " + (f"{rho[k]:+.2f} ({rho_w[k]:+.2f})" if math.isfinite(rho[k]) else
                                         "undefined (constant over the pairs)") for k in rho)
               + (f". The strongest is **{best}**." if best else ". Undefined here (no gain varies).")
               + " The paper never measured connectivity; it inferred a linearly connected region per stage from the "
                 "transfer pattern. "
               + (f"Here every pair of versions from one run, across the stage boundary too, has an LM barrier of "
                  f"at most {max_core:.3f} nats (the different-init control: {ctrl:.2f}), so connectivity alone "
                  "does not separate the stages that transfer does." if math.isfinite(max_core) else ""))

    beats, faster = [a["e_tft_beats_ft"] for a in A], [a["e_tft_faster"] for a in A]
    nb, nt, nf = sum(b[0] for b in beats), sum(b[1] for b in beats), sum(f[0] for f in faster)
    out.append(f"**(e) Transferring-then-finetuning.** FT(Mi + Δj) ends above FT(Mi) in {nb} of {nt} runs and "
               f"reaches FT(Mi)'s final score sooner than FT(Mi) itself in {nf} of {nt}: "
               + ("**agrees** with the paper's Tables 4–5 and Figures 2–3." if nb > nt / 2 else
                  "**does not agree** with the paper here."))

    rec = [a["f_recycle"] for a in A]
    ver = ("M3", "M4", "M5")
    it_dir = sum(r["iterative"][i]["final"] >= r["direct"][i]["final"] for r in rec for i in ver)
    dir_pl = sum(r["direct"][i]["final"] >= r["plain"][i]["final"] for r in rec for i in ver)
    it_pl = sum(r["iterative"][i]["final"] >= r["plain"][i]["final"] for r in rec for i in ver)
    gap = m([r["iterative"][i]["final"] - r["direct"][i]["final"] for r in rec for i in ver])
    out.append(f"**(f) Recycling** (M3–M5, {3 * n} cases): iterative ≥ direct in {it_dir}, direct ≥ plain in "
               f"{dir_pl}, iterative ≥ plain in {it_pl}; iterative − direct = {gap:+.1f} points on average. "
               "The paper "
               "reports iterative ≥ direct by at most 1.6 points, both above plain FT: "
               + ("**agrees**." if it_dir * 2 >= 3 * n and dir_pl * 2 > 3 * n else
                  "**partly agrees**." if dir_pl * 2 > 3 * n or it_pl * 2 > 3 * n else "**does not agree**."))
    return out


# ---------------------------------------------------------------------------------------------------------- write
def write(out: Path, config: Any, results: list[dict], seconds: float) -> dict[str, Any]:
    """results.json, the PNGs and report.md under `out`; returns the summary."""
    summary = aggregate(config, results, seconds)
    (out / "results.json").write_text(json.dumps(finite_or_none(summary), indent=1) + "\n")
    pngs = figures.plots(out, summary)
    res, sc = results, summary["config"]
    r0 = res[0]
    lines = [
        "# ftjax demo: a miniature of the version-transfer study",
        "",
        f"Seeds {summary['seeds']}, {r0['params']:,} parameters per version "
        f"(Llama, width {sc['width']}, {sc['layers']} layers), {seconds:.0f} s wall in all. "
        f"Pretraining: {sc['stage1_steps']} stage-1 + {sc['stage2_steps']} stage-2 steps of {sc['batch']} rows × "
        f"{sc['world']['row_len']} characters; versions at steps {r0['versions']}; the control C repeats the run from "
        f"another init and data order. Fine-tuning: {sc['ft_steps']} steps, lr {sc['ft_lr']}, batch {sc['ft_batch']}, "
        f"on {sc['world']['ft_pairs']} pairs `Q: what is a plus b? A:` → ` a+b</s>`; scored on "
        f"{sc['world']['eval_pairs']} held-out pairs by teacher-forced exact match (every answer token is the "
        "argmax). The probe scores the same pairs in pretraining format (`a plus b is` → ` c`), i.e. the latent "
        "skill.",
        "",
        "Checkpoints (Hugging Face directories with tokenizer, usable by every ftjax command): "
        "`seed<k>/models/{M0..M5,C}`, `seed<k>/ft/<name>` = FT(name), `seed<k>/transfers/`, `seed<k>/recycle/M5_star`; "
        "data in `seed<k>/data/*.jsonl`.",
        "",
        "## What was observed, against the paper",
        "",
        *[f"- {c}" for c in claims(summary)],
        "",
        "## Transfer grid (the paper's Table 3)",
        "",
        main_table(summary),
        "",
        "The paper's Table 3 (OLMo 2 7B, GSM8K) for comparison: base M1..M5 = "
        + " / ".join(f"{v}" for v in PAPER_GSM8K["base"].values()) + "; FT(Mi) = "
        + " / ".join(f"{v}" for v in PAPER_GSM8K["FT"].values())
        + "; M5 + Δ4 = 77.1, M4 + Δ5 = 72.9 (same stage); M5 + Δ2 = 17.3, M4 + Δ1 = 27.5 "
        "(cross-stage, below base).",
        "",
        "![grid](grid.png)",
        "",
        "Identity check: max |(Mi + Δi) − FT(Mi)| over all tensors = "
        f"{max(max(r['identity_max_abs'].values()) for r in res):.3g} (exact transfer arithmetic).",
        "",
        "## Language-model quality and diff sizes",
        "",
        _lm_table(res),
        "",
        "## α sweep",
        "",
        "![alpha](alpha.png)",
        "",
        "| path | EM % at α = 1 | best EM % | best α | FT(target) |",
        "|---|---|---|---|---|",
        *[f"| {label(k).replace('Δ', 'α·Δ')} | {_fmt([a['c_alpha'][k]['at_1'] for a in summary['analysis']])} | "
          f"{_fmt([a['c_alpha'][k]['best'] for a in summary['analysis']])} | "
          f"{_fmt([a['c_alpha'][k]['best_alpha'] for a in summary['analysis']], 2)} | "
          f"{_fmt([a['c_alpha'][k]['ft_target'] for a in summary['analysis']])} |"
          for k in summary["analysis"][0]["c_alpha"]],
        "",
        "## Connectivity (not measured in the paper)",
        "",
        "Barrier = max over λ of L(λ) − [(1−λ)L(0) + λL(1)] on held-out stage-1 + stage-2 text "
        f"(λ grid {list(sc['lambdas'])}); it is 0 when the path never rises above the straight line between the "
        "endpoints. The midpoint excess L(½) − (L(0) + L(1))/2 is signed: negative when the path dips below it.",
        "",
        "![lmc](lmc.png) ![predictors](predictors.png)",
        "",
        _connectivity_table(res),
        "",
        "## Transferring-then-finetuning (the paper's Tables 4–5, Figures 2–3)",
        "",
        _tft_table(res),
        "",
        "![curves](finetune_curves.png)",
        "",
        "## Recycling (Algorithm 1, Table 6): final EM % (steps to reach plain FT(Mi)'s final EM)",
        "",
        _recycle_table(res),
        "",
        "## Timing (seconds, per seed)",
        "",
        "| " + " | ".join(r0["timing"]) + " |",
        "|" + "---|" * len(r0["timing"]),
        *["| " + " | ".join(f"{v:.0f}" for v in r["timing"].values()) + " |" for r in res],
        "",
        f"Plots: {', '.join(pngs)}.",
        "",
        "## How the world was tuned",
        "",
        _tuning_notes(),
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary


def rewrite(out: str | Path) -> dict[str, Any]:
    """Re-render report.md and the plots from an existing out/results.json (no training)."""
    out = Path(out)
    old = json.loads((out / "results.json").read_text())
    return write(out, old["config"], old["results"], old["seconds"])
