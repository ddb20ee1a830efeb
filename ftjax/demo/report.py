"""The demo's outputs: results.json, report.md (tables and the claims (a)–(f) against the paper) and the PNGs.

Every number in the report is computed from the per-seed results of `study.run_seed`; with several seeds, table
cells are "mean (min–max)" over seeds. The claims' verdicts come from `verdicts` (computed from the
numbers the claims print) and their text from `claims`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ftjax.demo import claims, figures, verdicts
from ftjax.demo.figures import label
from ftjax.results import finite_or_none

ALPHA_PATHS = (("M5", "M4"), ("M4", "M5"), ("M5", "M3"))
OUTPUTS = ("results.json", "report.md", *figures.PNGS)  # every file `write` may write under out


def design_notes(sc: dict) -> str:
    """Why the default world looks as it does, in words (the reasons for the defaults, not results)."""
    w = sc["world"]
    return "\n".join([
        f"- The task's own format (`Q: what is a plus b? A: c`) is {100 * w['stage1_task_qa']:g} % of stage-1 and "
        f"{100 * w['stage2_task_qa']:g} % of stage-2 documents, so that the bases can score above 0 zero-shot: "
        "only then can a transfer end below its base.",
        f"- Stage 2 shifts documents to arithmetic ({100 * w['stage1_arith']:g} % → {100 * w['stage2_arith']:g} %, "
        "with extra templates), as OLMo 2's mid-training shifts toward math, so the two stages teach different "
        "things and the stage boundary can matter.",
        f"- Stage 2 (world \"{sc.get('stage2', 'gentle')}\") restarts AdamW, re-warms the learning rate to "
        f"{sc['lr2']:g} ({'above' if sc['lr2'] > sc['lr1'] else 'below'} stage 1's peak {sc['lr1']:g}) and decays it "
        "linearly to 0. "
        + ("This is OLMo 2's second stage as the paper describes it (an annealing mid-training on a different, "
           "STEM-heavy mix), chosen so that the model can leave stage 1's basin at the boundary; whether it does is "
           "measured by the LM barriers, not assumed." if sc["lr2"] > sc["lr1"] else
           "The low peak disturbs the skill less when M4 is taken, but the LM barriers stay near 0 everywhere: this "
           "world cannot test whether the barrier predicts transfer (`--world rewarm` can)."),
        f"- Fine-tuning is gentle ({sc['ft_steps']} steps at lr {sc['ft_lr']:g} on {w['ft_pairs']} pairs), meant to "
        "keep each diff Δ small next to the distance between versions (compare ‖Δi‖ and ‖Mi − Mj‖ above).",
        "- The target must already hold the latent skill for a diff to carry the task (the probe row of the grid "
        "shows how much each version holds). This is a hypothesis the report lets you check, not a result.",
    ])


def _span(values: Sequence[float], digits: int = 1) -> str:
    """"mean (min–max)" of values; the value alone for one."""
    return _fmt(list(values), digits)


def sensitivity_notes(results: Sequence[dict]) -> str:
    """What M5 + Δ4 (claim (a)'s headline cell) is sensitive to, from this run's numbers: its spread over seeds,
    and the change when scored in bfloat16 or when Δ4 comes from a constant-lr fine-tuning (per seed, EM points)."""
    s = [r["sensitivity"] for r in results if "sensitivity" in r]
    if not s:
        return "- No sensitivity measurements in these results."
    m5d4 = [x["float32"] for x in s]
    per_seed = ", ".join(f"seed {r['seed']}: {r['sensitivity']['float32']:.1f}" for r in results if "sensitivity" in r)
    base = [r["base"]["M5"]["task"] for r in results]
    ft = [r["ft"]["M5"]["task"] for r in results]
    lines = [
        f"- Seeds: M5 + Δ4 = {_span(m5d4)} % task EM ({per_seed}; spread {max(m5d4) - min(m5d4):.1f} points), "
        f"against base M5 = {_span(base)} % and FT(M5) = {_span(ft)} %. A claim that rests on this cell can flip "
        "with the seed; the per-seed verdicts above say whether it does.",
        f"- Evaluation dtype: scoring M5 + Δ4 with bfloat16 weights instead of float32 changes its EM by "
        f"{_span([x['eval_bfloat16'] - x['float32'] for x in s])} points (per seed: "
        + ", ".join(f"{x['eval_bfloat16'] - x['float32']:+.1f}" for x in s) + ").",
        f"- Fine-tuning schedule: taking Δ4 from a fine-tuning of M4 with a constant learning rate (same steps, lr "
        f"and warm-up) instead of the linear decay changes M5 + Δ4 by "
        f"{_span([x['ft_schedule_constant'] - x['float32'] for x in s])} points (per seed: "
        + ", ".join(f"{x['ft_schedule_constant'] - x['float32']:+.1f}" for x in s) + ").",
        "- Between releases of this demo, bisected on seed 0 at each version's defaults (the repository's "
        "docs/demo_sensitivity.md has the table): the world's data never changed; the month-old M5 + Δ4 = 43 % (base 28) reproduces as 40.0 % (base 24.0) at "
        "that version today, and the first change is a one-step shift of the learning-rate schedule (f4a24ed: "
        "40.0 → 21.3 %, reverting only it gives 40.0 % again), then the shorter pretraining of the 3-seed default "
        "(21.3 → 9.3 %). Any numerical change to training moves this cell by more than its seed spread can show; "
        "read the per-seed verdicts, never one seed.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- helpers
def mean_range(values: Sequence[float | None]) -> tuple[float, float, float]:
    """(mean, min, max) of the finite values; NaNs when there are none."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if not len(v):
        return math.nan, math.nan, math.nan
    return float(v.mean()), float(v.min()), float(v.max())


def _fmt(values: Sequence[float | None], digits: int = 1) -> str:
    """A cell: the value (one seed) or "mean (min–max)" over seeds; "–" when undefined."""
    m, lo, hi = mean_range(values)
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _col(results, fn):
    return [fn(r) for r in results]


def _steps_cell(values: Sequence[int | None]) -> str:
    """Steps to a score: the seed mean if every seed got there, else how many did."""
    reached = [v for v in values if v is not None]
    if len(reached) == len(values):
        return f"{np.mean(reached):.0f}"
    return "never" if not reached else f"not in every seed ({len(reached)}/{len(values)})"


def aggregate(config: Any, results: list[dict], seconds: float) -> dict[str, Any]:
    """The summary written to results.json: config, seeds, per-seed results and the verdicts of (a)–(f)."""
    config = config if isinstance(config, dict) else dataclasses.asdict(config)
    results = finite_or_none(results)  # verdicts from exactly what results.json holds
    found = {k: dataclasses.asdict(v) for k, v in verdicts.all_verdicts(results).items()}
    return {"format": "ftjax-demo", "config": config, "seconds": round(seconds, 1),
            "seeds": [r["seed"] for r in results], "verdicts": found, "results": results}


# ---------------------------------------------------------------------------------------------------------- tables
def main_table(summary: dict) -> str:
    """The paper's Table 3 on the demo: task exact match % (column = target version, row = diff added)."""
    results = summary["results"]
    names = results[0]["names"]
    head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    lines = ["task exact match % (columns: target Mi; rows: what was added)" +
             (f", mean (min–max) over {len(results)} seeds" if len(results) > 1 else ""), "", head]
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
        lines.append(f"| {title} | " + " | ".join(_fmt(_col(results, lambda r, n=n, key=key: r["base"][n][key]), 3)
                                                   for n in names) + " |")
    lines.append("| FT(Mi): mean LM loss | " + " | ".join(_fmt(_col(results, lambda r, n=n: r["ft"][n]["lm"]), 3)
                                                          for n in names) + " |")
    lines.append("| ‖Δi‖ | " + " | ".join(_fmt(_col(results, lambda r, n=n: r["delta_norm"][n]), 2)
                                         for n in names) + " |")
    return "\n".join(lines)


def _alpha_table(results) -> str:
    """EM at α = 1, FT(target) and base as mean (min–max) over seeds; the best α and its EM on the seed-mean sweep
    (what claim (c) judges), with each seed's own best α."""
    lines = ["| path | EM % at α = 1 | best EM % (seed-mean sweep) | best α | best α per seed | FT(target) | base |",
             "|---|---|---|---|---|---|---|"]
    for i, j in ALPHA_PATHS:
        k = f"{i}+D{j}"
        alphas, scores = verdicts.sweep_scores(results, k)
        best, at = verdicts.best_alpha(alphas, scores)
        each = " / ".join(_g(verdicts.best_alpha(*verdicts.sweep_scores([r], k))[1]) for r in results)
        at_1 = _fmt([r["sweep"][k]["task"][r["sweep"][k]["alpha"].index(1.0)] for r in results])
        lines.append(f"| {label(k).replace('Δ', 'α·Δ')} | {at_1} | {'–' if best is None else f'{best:.1f}'} | "
                     f"{_g(at)} | {each} | {_fmt([r['ft'][i]['task'] for r in results])} | "
                     f"{_fmt([r['base'][i]['task'] for r in results])} |")
    return "\n".join(lines)


def _g(x: float | None) -> str:
    return "–" if x is None else f"{x:g}"


def _tft_table(results) -> str:
    keys = [k for k in results[0]["tft"] if "+D" in k]
    lines = ["| start | final EM % | EM % at step 0 | steps to reach FT(Mi)'s final EM | FT(Mi) final | "
             "FT(Mi) steps |", "|---|---|---|---|---|---|"]
    for k in keys:
        own = f"FT({k.split('+')[0]})"
        run, ref = [r["tft"][k] for r in results], [r["tft"][own] for r in results]
        lines.append(f"| {label(k)} | {_fmt([x['final'] for x in run])} | {_fmt([x['start'] for x in run])} | "
                     f"{_steps_cell([x['steps_to_ft'] for x in run])} | {_fmt([x['final'] for x in ref])} | "
                     f"{_steps_cell([x['steps_to_ft'] for x in ref])} |")
    return "\n".join(lines)


def _recycle_table(results) -> str:
    lines = ["| version | plain FT(Mi) | direct FT(Mi + Δi−1) | iterative (Alg. 1) |", "|---|---|---|---|"]
    for i in verdicts.RECYCLED:
        cells = []
        for mode in ("plain", "direct", "iterative"):
            fin = _fmt([r["recycle"][mode][i]["final"] for r in results])
            steps = _steps_cell([r["recycle"][mode][i]["steps_to_ft"] for r in results])
            cells.append(f"{fin} ({steps} steps)" if steps[0].isdigit() else f"{fin} ({steps})")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _lambda_cell(values: Sequence[float | None]) -> str:
    """Where each seed's barrier peaks ("–": no barrier on that path)."""
    return " / ".join("–" if v is None else f"{v:.2f}" for v in values)


def _connectivity_table(results) -> tuple[str, list[str]]:
    """The pair table and the notes lmc gave for paths without a barrier (distinct, in order)."""
    lines = ["| pair | LM barrier (nats) | barrier at λ | midpoint excess (nats) | barrier on stage-1 text | "
             "barrier on stage-2 text | ‖Mi − Mj‖ | cos(Δi, Δj) |", "|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    for k in results[0]["scans"]:
        scans = [r["scans"][k] for r in results]
        notes += [s["barrier_note"] for s in scans if s.get("barrier_note") and s["barrier_note"] not in notes]
        lines.append(f"| {k} | {_fmt([s['barrier'] for s in scans], 3)} | "
                     f"{_lambda_cell([s.get('barrier_lambda') for s in scans])} | "
                     f"{_fmt([s['mid_excess'] for s in scans], 3)} | "
                     f"{_fmt([s['stage1']['barrier'] for s in scans], 3)} | "
                     f"{_fmt([s['stage2']['barrier'] for s in scans], 3)} | "
                     f"{_fmt([r['distance'][k] for r in results], 2)} | {_fmt([r['cos'][k] for r in results], 2)} |")
    return "\n".join(lines), notes


def _predictor_table(results) -> str:
    rows = verdicts.predictor_rows(results)
    digits = dict(zip(verdicts.PREDICTORS, verdicts.PREDICTOR_DIGITS, strict=True))
    lines = ["| Mi + Δj | gain (EM points) | " + " | ".join(verdicts.PREDICTORS) + " |",
             "|---|---|" + "---|" * len(verdicts.PREDICTORS)]
    for row in rows:
        cells = ["–" if row[p] is None else f"{row[p]:.{digits[p]}f}" for p in verdicts.PREDICTORS]
        gain = "–" if row["gain"] is None else f"{row['gain']:+.1f}"
        lines.append(f"| {label(row['pair'])} | {gain} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- write
def _header(summary: dict, seconds: float) -> list[str]:
    res, sc = summary["results"], summary["config"]
    r0 = res[0]
    layers = f"{sc['layers']} layer" + ("s" if sc["layers"] != 1 else "")
    return [
        "# ftjax demo: a miniature of the version-transfer study",
        "",
        f"Seeds {summary['seeds']}, {r0['params']:,} parameters per version "
        f"(Llama, width {sc['width']}, {layers}), {seconds:.0f} s wall in all. "
        f"Pretraining: {sc['stage1_steps']} stage-1 + {sc['stage2_steps']} stage-2 steps of {sc['batch']} rows × "
        f"{sc['world']['row_len']} characters; versions at steps {r0['versions']}; the control C repeats the run from "
        f"another init and data order. Fine-tuning: {sc['ft_steps']} steps, lr {sc['ft_lr']}, batch {sc['ft_batch']}, "
        f"on {sc['world']['ft_pairs']} pairs `Q: what is a plus b? A:` → ` a+b</s>`; scored on "
        f"{sc['world']['eval_pairs']} held-out pairs by teacher-forced exact match (every answer token is the "
        "argmax). The probe scores the same pairs in pretraining format (`a plus b is` → ` c`), i.e. the latent "
        "skill. The paper is Lin et al., *Efficient Model Development through Fine-tuning Transfer* (EMNLP 2025): "
        "out = target base + (source FT − source base); its numbers quoted here are from its Table 3 (OLMo 2 7B, "
        "GSM8K) unless stated.",
        "",
        "Checkpoints (Hugging Face directories with tokenizer, usable by every ftjax command): "
        "`seed<k>/models/{M0..M5,C}`, `seed<k>/ft/<name>` = FT(name), `seed<k>/transfers/`, `seed<k>/recycle/M5_star`; "
        "data in `seed<k>/data/*.jsonl`.",
    ]


def write(out: Path, config: Any, results: list[dict], seconds: float) -> dict[str, Any]:
    """OUTPUTS under `out`: results.json, the PNGs and report.md; returns the summary."""
    summary = aggregate(config, results, seconds)
    (out / "results.json").write_text(json.dumps(finite_or_none(summary), indent=1) + "\n")
    pngs = figures.plots(out, summary)
    res, sc = summary["results"], summary["config"]
    found = verdicts.all_verdicts(res)
    seeds = len(res)
    connectivity, notes = _connectivity_table(res)
    lines = [
        *_header(summary, seconds),
        "",
        "## What was observed, against the paper",
        "",
        "Each claim prints the numbers its verdict uses — "
        + (f"seed means over {seeds} seeds, " if seeds > 1 else "")
        + "rounded as printed (EM % to 0.1, shares of a gain to whole %, nats to 0.001, ρ to 0.01) — and its "
          "checks; the comparisons are made on those printed numbers. Verdict: **agrees** when every check holds, "
          "**does not agree** when none does, **partly agrees** otherwise; a check whose numbers are undefined is "
          "left out, and with none left the claim **cannot be judged**."
        + (f" With {seeds} seeds the checks are also made in each seed alone, each claim lists its per-seed "
           f"verdicts, and its verdict {verdicts.SEED_RULE}; the per-seed numbers are in results.json "
           "(\"results\", one entry per seed)." if seeds > 1 else ""),
        "",
        *[f"- {c}" for c in claims.claim_lines(found, seeds)],
        "",
        "## Transfer grid (the paper's Table 3)",
        "",
        main_table(summary),
        "",
        "The paper's Table 3 (OLMo 2 7B, GSM8K) for comparison: base M1..M5 = "
        + " / ".join(f"{v}" for v in verdicts.PAPER["base"].values()) + "; FT(Mi) = "
        + " / ".join(f"{v}" for v in verdicts.PAPER["ft"].values())
        + "; " + ", ".join(f"{label(k)} = {v}" for k, v in verdicts.PAPER["grid"].items()) + ".",
        "",
        "![grid](grid.png)",
        "",
        "Identity check: max |(Mi + Δi) − FT(Mi)| over all tensors = "
        f"{max(max(r['identity_max_abs'].values()) for r in res):.3g} (0 means the transfer arithmetic is exact).",
        "",
        "## Language-model quality and diff sizes",
        "",
        _lm_table(res),
        "",
        "## α sweep",
        "",
        "![alpha](alpha.png)",
        "",
        _alpha_table(res),
        "",
        "Best α: among tied best scores, the α closest to 1.",
        "",
        "## Connectivity",
        "",
        "LM barrier (Entezari et al. 2022): the largest gap, over the interior grid points 0 < λ < 1, between the "
        "held-out LM loss L(λ) of (1−λ)·Mi + λ·Mj (stage-1 + stage-2 text) and the straight line (1−λ)L(0) + λL(1) "
        f"between the endpoint losses (λ grid {list(sc['lambdas'])}). It is 0, with no λ (\"–\"), when no interior "
        "point lies above that line. The midpoint excess L(½) − (L(0) + L(1))/2 is signed: negative when the path "
        "dips below the endpoints' mean. (Frankle et al. 2020's barrier is the maximum of L(λ) − (L(0) + L(1))/2, "
        "counted only when L peaks strictly inside (0, 1); the midpoint excess is that difference at λ = ½ alone.) "
        "The same barrier is also taken on each stage's own held-out text alone (stage-1 and stage-2 columns): on "
        "mixed text a path can dip below the chord on one stage's text and hide a bump on the other's. The task-NLL "
        "barrier is the same barrier on the task's NLL along the transfer path Mi + λ·Δj, λ in [0, 1] of the α grid.",
        "",
        "Connectivity measures over the ordered pairs of M1..M5 (claim (d) judges the marked one, chosen before the "
        "run; the method notes say why):",
        "",
        claims.measure_table(found["d"]),
        "",
        "![lmc](lmc.png) ![predictors](predictors.png)",
        "",
        connectivity,
        "",
        *([f"Paths without a barrier (\"–\"): {'; '.join(notes)}.", ""] if notes else []),
        "Predictors of transfer gain, per ordered pair (claim (d) ranks these against the gain).",
        "",
        _predictor_table(res),
        "",
        "## Transferring-then-finetuning (the paper's Tables 4–5, Figures 2–3)",
        "",
        _tft_table(res),
        "",
        "![curves](finetune_curves.png)",
        "",
        "## Recycling (Algorithm 1, Table 6): final EM % (steps to reach plain FT(Mi)'s final EM)",
        "",
        "M2 is left out: its direct and iterative runs are one run (both start from M2 + Δ1).",
        "",
        _recycle_table(res),
        "",
        "## Timing (seconds, per seed)",
        "",
        "| " + " | ".join(res[0]["timing"]) + " |",
        "|" + "---|" * len(res[0]["timing"]),
        *["| " + " | ".join(f"{v:.0f}" for v in r["timing"].values()) + " |" for r in res],
        "",
        f"Plots: {', '.join(pngs)}.",
        "",
        "## Method notes: what the outcome is sensitive to",
        "",
        "Measured in this run: M5 + Δ4 (claim (a)'s headline cell) over seeds, and re-measured under two cheap "
        "changes to the method (EM points, mean (min–max) over seeds).",
        "",
        sensitivity_notes(res),
        "",
        f"- Connectivity (claim (d)): decided before running, the barrier judged is the "
        f"{verdicts.MEASURES[verdicts.CHOSEN_MEASURE]}, i.e. {verdicts.CHOSEN_REASON}. The rule: the barrier "
        f"predicts transfer when Spearman ρ(barrier, recovered fraction) ≤ {verdicts.RHO_PREDICTS:g} over the "
        "(pair, seed) points. Every measure is in the Connectivity section, whatever it shows.",
        "",
        "## Learned per-layer α (a separate study)",
        "",
        "`python -m ftjax.demo.alpha_study` fits one α per layer (`ftjax fit-alpha`) for M5 + Δ4 and M5 + Δ2 of this "
        "world over three seeds and compares it on held-out rows with α = 1, the best single α of a scan and plain "
        "fine-tuning; its table and verdicts are in the repository's docs/alpha_study.md and the README (this run "
        "does not recompute them).",
        "",
        "## Why the world looks like this",
        "",
        design_notes(sc),
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary


README_CELLS = (("base M5", "base", "M5"), ("FT(M5)", "ft", "M5"), ("M5 + Δ4", "grid", "M5+DM4"),
                ("base M4", "base", "M4"), ("FT(M4)", "ft", "M4"), ("M4 + Δ5", "grid", "M4+DM5"))


def readme_numbers(summary: dict) -> dict[str, Any]:
    """The demo numbers the README quotes (docs/demo_results.json): task EM % of README_CELLS as mean / min / max
    over seeds (0.1) and each claim's verdict with how many seeds agree."""
    res = summary["results"]
    cells = {}
    for name, table, key in README_CELLS:
        m, lo, hi = mean_range([r[table][key]["task"] for r in res])
        cells[name] = {"mean": round(m, 1), "min": round(lo, 1), "max": round(hi, 1)}
    found = verdicts.all_verdicts(res)
    return {"seeds": [r["seed"] for r in res], "task_em": cells,
            "verdicts": {k: {"verdict": v.verdict, "agree": verdicts.seeds_agreeing(v), "of": len(v.per_seed),
                             "tally": verdicts.tally(v), "per_seed": v.per_seed} for k, v in found.items()}}


def readme_table(numbers: dict) -> str:
    """The README's markdown table of `readme_numbers` (what `scripts/demo_figures.py` prints)."""
    n = len(numbers["seeds"])
    lines = [f"| task exact match %, mean (min–max) over {n} seeds | |", "|---|---|"]
    lines += [f"| {k} | {c['mean']:.1f} ({c['min']:.1f}–{c['max']:.1f}) |" for k, c in numbers["task_em"].items()]
    lines += ["", "| claim | verdict over seeds (per-seed verdicts) |", "|---|---|"]
    lines += [f"| ({k}) | {v['verdict']} ({v['tally']}) |" for k, v in numbers["verdicts"].items()]
    return "\n".join(lines)


def rewrite(out: str | Path) -> dict[str, Any]:
    """Re-render report.md and the plots from an existing out/results.json (no training)."""
    out = Path(out)
    old = json.loads((out / "results.json").read_text())
    return write(out, old["config"], old["results"], old["seconds"])
