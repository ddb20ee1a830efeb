"""Is a learned per-layer α worth it? The demo's world, measured on held-out task rows (issue 18).

Design (fixed before the first run; written into the output):
    world       the demo's (`study.StudyConfig.quick()` sizes: 300 + 200 pretraining steps, the "gentle" stage
                boundary), seeds 0, 1, 2; versions M2 (stage 1), M4, M5 (stage 2) from one pretraining run, and
                FT(M2), FT(M4) with the demo's fine-tuning recipe, so Δi = FT(Mi) − Mi exactly as the demo builds them
    pairs       within-stage M5 + Δ4 and cross-stage M5 + Δ2 (stage-1 diff onto the stage-2 version)
    rows        calibration: `n_calib` task pairs the demo never uses (neither its fine-tuning `train` rows nor its
                `eval` rows: the next pairs of the world's own permutation, `_task_splits`); held-out: the demo's
                `eval` rows (its task score), on which nothing here is fitted or chosen
    methods     (1) α = 1 (the paper's transfer); (2) the best single α: `alphas` scanned, the one with the lowest
                calibration NLL, scored on held-out; (3) learned per-layer α: `ftjax.fit_alpha` (objective loss,
                groups layer, init 1, bounds [−0.5, 2], adam lr 0.05, `steps` steps of `batch` calibration rows);
                (4) plain fine-tuning of M5 on the same calibration rows, same steps and batch (same row order), the
                demo's fine-tuning recipe (AdamW, lr 3e-4, linear decay)
    metrics     held-out task NLL (nats per answer token, lower is better; what the fit optimises) and exact match
                (%, the demo's task score); mean (min–max) over seeds
    verdict     per pair and metric, learned α against the best scalar α (and against plain fine-tuning): "helps"
                when learned α is better in every seed, "hurts" when worse in every seed, else "mixed" (`verdict`)

`python -m ftjax.demo.alpha_study --out docs/alpha_study` runs it and writes OUT.json and OUT.md (`--render`: OUT.md
again from OUT.json; `--notes FILE` adds the interpretation written after the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from ftjax.data import examples_from_rows
from ftjax.errors import FtjaxError
from ftjax.fit_alpha import fit_alpha, prepare
from ftjax.rows import make_rows, training_examples

from ftjax.demo import engine, study, world

PAIRS = {"within-stage": ("M5", "M4"), "cross-stage": ("M5", "M2")}  # label -> (target Mi, diff source j of Δj)
METHODS = ("alpha_1", "best_scalar", "learned", "plain_ft")
LABELS = {"alpha_1": "α = 1", "best_scalar": "best single α (scan)", "learned": "learned per-layer α",
          "plain_ft": "plain fine-tuning"}


@dataclasses.dataclass(frozen=True)
class AlphaStudyConfig:
    """The study's sizes. study: the demo world's configuration; steps/batch: α-fit and plain-FT steps and rows per
    step; n_calib: calibration task pairs; alphas: the scalar scan; lr: adam lr of the α fit; bounds: α's range."""

    study: study.StudyConfig = study.StudyConfig.quick()
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 100
    batch: int = 16
    n_calib: int = 64
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    lr: float = 0.05
    bounds: tuple[float, float] = (-0.5, 2.0)

    @staticmethod
    def tiny() -> "AlphaStudyConfig":
        """CI sizes: structure only, too small for any phenomenon."""
        return AlphaStudyConfig(study=study.StudyConfig.tiny(), seeds=(0,), steps=4, batch=8, n_calib=16,
                                alphas=(0.0, 1.0, 2.0))


def _task_splits(wc: world.WorldConfig, seed: int, n_calib: int) -> tuple[list[dict], list[dict]]:
    """(the demo's held-out `eval` rows, `n_calib` calibration rows disjoint from its `train` and `eval` rows): the
    world's task permutation is prefix-stable, so asking for n_calib more eval pairs leaves the demo's eval rows
    first and appends unused pairs."""
    spare = (wc.operand_max + 1) ** 2 - wc.ft_pairs - wc.eval_pairs
    if n_calib > spare:
        raise FtjaxError(f"alpha study: n_calib {n_calib} exceeds the {spare} task pairs the demo leaves unused; "
                         "lower n_calib")
    writer = world.Writer(dataclasses.replace(wc, eval_pairs=wc.eval_pairs + n_calib), seed)
    rows = world.task_rows(writer, seed)["eval"]
    return rows[:wc.eval_pairs], rows[wc.eval_pairs:]


def _score(params: Any, s: study.Setup, data: engine.EvalSet) -> dict[str, float]:
    r = engine.score(params, s.cfg, data)
    return {"nll": r["loss"], "em": 100 * r["em"]}


def run_seed(ac: AlphaStudyConfig, seed: int, work: Path, log=print) -> dict[str, Any]:
    """One seed: the demo's versions and diffs, then every method on both pairs. Returns JSON-able numbers:
    {pair: {method: {"nll", "em"} on held-out, ...}, "timing": seconds}."""
    sc, t0 = ac.study, time.perf_counter()
    s, writer = study.setup(sc, seed, work)
    heldout_rows, calib_rows = _task_splits(sc.world, seed, ac.n_calib)
    if heldout_rows != s.rows["eval"]:
        raise FtjaxError("alpha study: the held-out rows differ from the demo's eval rows (world.task_rows changed)")
    tokenizer = world.make_tokenizer()
    calib = examples_from_rows(calib_rows, tokenizer, source="calibration")
    calib_set = engine.eval_set("calibration", calib, 128)
    heldout = s.sets["task"]  # the demo's eval rows
    max_len = study.ft_config(sc, seed).max_len
    s_calib = dataclasses.replace(s, ft_rows=make_rows(training_examples(calib, max_len), max_len))

    rng = random.Random(f"corpus-{seed}")  # the demo's corpora for this seed (study.run_seed)
    corpora = (world.corpus(writer, 1, sc.stage1_steps * sc.batch, rng),
               world.corpus(writer, 2, sc.stage2_steps * sc.batch, rng))
    need = sorted({n for pair in PAIRS.values() for n in pair})
    steps = sc.version_steps()
    models = study.pretrain(sc, s, corpora, init_seed=seed, data_seed=seed, capture={n: steps[n] for n in need})
    tc = study.ft_config(sc, seed)
    ft = {j: study.finetune(models[j], s, tc, sc.ft_every)[0] for _, j in PAIRS.values()}
    log(f"  [{seed}] versions and diffs: {time.perf_counter() - t0:.0f} s")

    out: dict[str, Any] = {}
    for label, (i, j) in PAIRS.items():
        problem = prepare(models[i], [(models[j], ft[j])], s.cfg, pairs=True)
        at = lambda a: problem.merged(jnp.asarray(a, jnp.float32))  # noqa: E731  θ(α), α [1, n_groups]
        one = np.ones(problem.shape)
        scan = {float(a): _score(at(a * one), s, calib_set)["nll"] for a in ac.alphas}
        best = min(scan, key=scan.get)
        fit = fit_alpha(models[i], (models[j], ft[j]), calib, cfg=s.cfg, groups="layer", steps=ac.steps, lr=ac.lr,
                        init=1.0, bounds=ac.bounds, seed=seed, batch_size=ac.batch, max_len=max_len)
        plain, _ = study.finetune(models[i], s_calib, dataclasses.replace(tc, steps=ac.steps,
                                                                          batch_size=ac.batch), ac.steps)
        out[label] = {"pair": f"{i}+D{j}",
                      "alpha_1": _score(at(one), s, heldout), "best_scalar": _score(at(best * one), s, heldout),
                      "learned": _score(at(fit["alpha"]), s, heldout), "plain_ft": _score(plain, s, heldout),
                      "best_alpha": best, "scan_calibration_nll": {str(a): v for a, v in scan.items()},
                      "learned_table": fit["table"][0], "fit_curve_first_last": [fit["curve"][0], fit["curve"][-1]]}
        log(f"  [{seed}] {label} {i}+D{j}: " + ", ".join(
            f"{m} {out[label][m]['nll']:.3f} nats / {out[label][m]['em']:.1f} %" for m in METHODS))
    out["timing"] = round(time.perf_counter() - t0, 1)
    return out


# ---------------------------------------------------------------------------------------------------------- summary
def verdict(learned: Sequence[float], other: Sequence[float], lower_is_better: bool) -> str:
    """'helps' when learned is strictly better than other in every seed, 'hurts' when strictly worse in every
    seed, else 'mixed' (ties count as neither)."""
    sign = -1.0 if lower_is_better else 1.0
    d = [sign * (a - b) for a, b in zip(learned, other, strict=True)]
    if d and all(x > 0 for x in d):
        return "helps"
    if d and all(x < 0 for x in d):
        return "hurts"
    return "mixed"


def _stat(xs: Sequence[float]) -> dict[str, float]:
    return {"mean": float(np.mean(xs)), "min": float(np.min(xs)), "max": float(np.max(xs))}


def summarize(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """From the per-seed numbers (`run_seed`): per pair, per method and metric mean/min/max over seeds, and the
    verdicts of learned α against the best scalar α and against plain fine-tuning, per metric (`verdict`)."""
    out = {}
    for label in PAIRS:
        rows = [r[label] for r in per_seed]
        col = lambda m, k: [r[m][k] for r in rows]  # noqa: E731
        out[label] = {
            "pair": rows[0]["pair"],
            "methods": {m: {k: _stat(col(m, k)) for k in ("nll", "em")} for m in METHODS},
            "best_alpha": [r["best_alpha"] for r in rows],
            "verdict": {f"vs_{o}": {"nll": verdict(col("learned", "nll"), col(o, "nll"), True),
                                    "em": verdict(col("learned", "em"), col(o, "em"), False)}
                        for o in ("best_scalar", "alpha_1", "plain_ft")}}
    return out


def _cell(st: Mapping[str, float], fmt: str) -> str:
    return f"{st['mean']:{fmt}} ({st['min']:{fmt}}–{st['max']:{fmt}})"


def table(summary: Mapping[str, Any]) -> str:
    """The markdown table: one row per pair and method, held-out NLL and EM as mean (min–max) over seeds."""
    lines = ["| pair | method | held-out task NLL (nats) | held-out task EM (%) |", "|---|---|---|---|"]
    for label, p in summary.items():
        for m in METHODS:
            st = p["methods"][m]
            nll, em = _cell(st["nll"], ".3f"), _cell(st["em"], ".1f")
            lines.append(f"| {label} {p['pair']} | {LABELS[m]} | {nll} | {em} |")
    return "\n".join(lines)


def verdict_lines(summary: Mapping[str, Any]) -> list[str]:
    """One line per pair: learned α against the best scalar α, α = 1 and plain fine-tuning, on each metric."""
    out = []
    for label, p in summary.items():
        v = p["verdict"]
        out.append(f"- {label} {p['pair']}: learned α vs best single α — NLL {v['vs_best_scalar']['nll']}, EM "
                   f"{v['vs_best_scalar']['em']}; vs α = 1 — NLL {v['vs_alpha_1']['nll']}, EM {v['vs_alpha_1']['em']}; "
                   f"vs plain fine-tuning — NLL {v['vs_plain_ft']['nll']}, EM {v['vs_plain_ft']['em']} "
                   f"(best single α per seed: {', '.join(f'{a:g}' for a in p['best_alpha'])})")
    return out


def findings(summary: Mapping[str, Any]) -> str:
    """One sentence from the verdicts: the pairs and metrics where learned α beats the best single α in every seed,
    or that it does so nowhere."""
    wins = [f"{label} {p['pair']} ({k.upper()})" for label, p in summary.items()
            for k in ("nll", "em") if p["verdict"]["vs_best_scalar"][k] == "helps"]
    if not wins:
        return ("Learned per-layer α beats the best single α in every seed nowhere: on no pair and on neither "
                "metric.")
    return f"Learned per-layer α beats the best single α in every seed on: {', '.join(wins)}; nowhere else."


def render(result: Mapping[str, Any]) -> str:
    """OUT.md from OUT.json's content: the design, the table, the verdicts, `findings` and, when OUT.json has one,
    the interpretation written after the run (`--render --notes FILE`)."""
    summary = result["summary"]
    notes = result.get("interpretation")
    return "\n".join([
        "# Learned per-layer α in the demo's world (issue 18)", "", "## Design", "", "```", result["design"], "```",
        "", f"## Results ({len(result['per_seed'])} seeds, mean (min–max); {result['seconds']:.0f} s)", "",
        table(summary), "",
        "Verdict rule: 'helps' = learned α better in every seed, 'hurts' = worse in every seed, else 'mixed'.", "",
        *verdict_lines(summary), "", findings(summary), "",
        *(["## What it means (written after the run, from the numbers above)", "", notes.strip(), ""]
          if notes else [])])


def run(ac: AlphaStudyConfig, out: Path, log=print) -> dict[str, Any]:
    """Every seed, then OUT.json (design, settings, per-seed numbers, summary) and OUT.md (`render`). Returns
    OUT.json's content."""
    t0 = time.perf_counter()
    per_seed = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in ac.seeds:
            log(f"alpha study: seed {seed}")
            per_seed.append(run_seed(ac, seed, Path(tmp) / f"seed{seed}", log=log))
    summary = summarize(per_seed)
    settings = dataclasses.asdict(ac)
    result = {"design": __doc__.split("Design", 1)[1].split("`python -m")[0].strip(), "settings": settings,
              "per_seed": [{"seed": s, **r} for s, r in zip(ac.seeds, per_seed)], "summary": summary,
              "seconds": round(time.perf_counter() - t0, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    out.with_suffix(".md").write_text(render(result))
    log(table(summary))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/alpha_study", help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--tiny", action="store_true", help="CI sizes (structure only)")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from an existing OUT.json")
    ap.add_argument("--notes", help="with --render: a text file, the interpretation to store in OUT.json and show")
    args = ap.parse_args(argv)
    if args.render:
        out = Path(args.out)
        result = json.loads(out.with_suffix(".json").read_text())
        if args.notes:
            result["interpretation"] = Path(args.notes).read_text()
            out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(render(result))
        return
    run(AlphaStudyConfig.tiny() if args.tiny else AlphaStudyConfig(), Path(args.out))


if __name__ == "__main__":
    main()
