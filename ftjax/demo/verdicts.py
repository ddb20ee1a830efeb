"""The verdicts behind the demo report's claims (a)–(f): one pure function per claim, results -> `Verdict`.

Each function reads the per-seed results of `study.run_seed` (results.json["results"]) and returns the numbers
the report prints for that claim and the verdict computed from exactly those numbers: seed means (one seed: the
values themselves), rounded as the report prints them (EM % to 0.1, shares of a gain to whole %, nats to 0.001,
Spearman ρ to 0.01). Every comparison is made on the rounded values, so a reader can redo each verdict from the
report alone. A verdict combines named checks (`combine`): all true -> "agrees", none -> "does not agree", some ->
"partly agrees"; a check whose numbers are undefined (e.g. no fine-tuning gain to recover) is left out, and with
no check left the verdict is "cannot be judged".

Over several seeds (`over_seeds`, what `all_verdicts` returns) each claim is decided in every seed alone and the
per-seed verdicts are combined by `seed_rule` (SEED_RULE): "agrees" only when it agrees in every judged seed, "does
not agree" when it agrees in none, "partly agrees" otherwise; the printed numbers stay the seed means.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

CORE = ("M1", "M2", "M3", "M4", "M5")
STAGE = {"M1": 1, "M2": 1, "M3": 1, "M4": 2, "M5": 2}
AGREES, PARTLY, DISAGREES, UNJUDGED = "agrees", "partly agrees", "does not agree", "cannot be judged"
VERDICTS = (AGREES, PARTLY, DISAGREES, UNJUDGED)
NEAR = 10.0  # EM points: "within NEAR of FT(target)" = approaches fine-tuning
INERT = 5.0  # EM points: a change smaller than this is no change
PAPER = {  # the paper's Table 3 (OLMo 2 7B, GSM8K), EM %
    "base": {"M1": 13.2, "M2": 19.4, "M3": 24.4, "M4": 64.5, "M5": 65.5},
    "ft": {"M1": 45.1, "M2": 50.7, "M3": 60.4, "M4": 75.7, "M5": 75.5},
    "grid": {"M5+DM4": 77.1, "M4+DM5": 72.9, "M5+DM2": 17.3, "M4+DM1": 27.5},
}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One claim's outcome. numbers: what the claim prints (rounded; None where undefined); checks: each named
    comparison on those numbers (None: undefined, left out of the verdict); verdict: `combine(checks)`."""

    claim: str
    verdict: str
    numbers: dict[str, Any]
    checks: dict[str, bool | None]
    per_seed: dict[str, str] = dataclasses.field(default_factory=dict)  # seed -> that seed's own verdict
    # "key" or "key/sub" -> [min, max] of that number computed on each seed alone (several seeds only)
    ranges: dict[str, list[float]] = dataclasses.field(default_factory=dict)


def combine(checks: dict[str, bool | None]) -> str:
    """"agrees" if every defined check holds, "does not agree" if none does, "partly agrees" otherwise;
    "cannot be judged" when no check is defined."""
    defined = [bool(v) for v in checks.values() if v is not None]
    if not defined:
        return UNJUDGED
    return AGREES if all(defined) else DISAGREES if not any(defined) else PARTLY


def _verdict(claim: str, numbers: dict[str, Any], checks: dict[str, bool | None]) -> Verdict:
    return Verdict(claim, combine(checks), numbers, checks)


# ---------------------------------------------------------------------------------------------------------- numbers
def seed_mean(values: Sequence[float | None]) -> float | None:
    """Mean of the finite values; None if there are none."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def rounded(x: float | None, digits: int) -> float | None:
    """x rounded to `digits` decimals as the report prints it (None stays None)."""
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def mean_of(results: Sequence[dict], fn: Callable[[dict], float | None], digits: int = 1) -> float | None:
    """The seed mean of fn(result), rounded (EM %: 1 decimal)."""
    return rounded(seed_mean([fn(r) for r in results]), digits)


def em(results: Sequence[dict], table: str, key: str) -> float | None:
    """Task EM % of `key` in results[*][table] ("base", "ft" by name; "grid" by "Mi+DMj"), seed mean, 0.1."""
    return mean_of(results, lambda r: r[table][key]["task"])


def recovery(transfer: float | None, base: float | None, ft: float | None) -> int | None:
    """(transfer − base) / (FT − base) in whole %: the share of the target's own fine-tuning gain that transfer
    recovers; None without a positive gain."""
    if transfer is None or base is None or ft is None or ft - base <= 0:
        return None
    return round(100 * (transfer - base) / (ft - base))


def label(key: str) -> str:
    """"M5+DM4" -> "M5 + Δ4", "M1+DC" -> "M1 + ΔC"."""
    return key.replace("+DM", " + Δ").replace("+DC", " + ΔC")


def gained(results: Sequence[dict], name: str) -> bool | None:
    """Whether FT(name) scores above name's base (printed EM); None if either is undefined."""
    ft, base = em(results, "ft", name), em(results, "base", name)
    return None if ft is None or base is None else ft > base


def pair_value(d: dict, a: str, b: str) -> Any:
    """d["a-b"] or d["b-a"] (unordered pair keys)."""
    return d[f"{a}-{b}"] if f"{a}-{b}" in d else d[f"{b}-{a}"]


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> float | None:
    """Spearman rank correlation over the pairs where both are defined, rounded to 0.01; None with fewer than 3
    pairs or a constant side (ρ undefined)."""
    from scipy.stats import spearmanr

    ok = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(ok) < 3:
        return None
    xs, ys = np.asarray(ok, np.float64).T
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return None
    return rounded(float(spearmanr(xs, ys).statistic), 2)


def _recoveries(results: Sequence[dict], pairs: Sequence[tuple[str, str]]) -> list[int | None]:
    return [recovery(em(results, "grid", f"{i}+D{j}"), em(results, "base", i), em(results, "ft", i)) for i, j in pairs]


def _mean_int(values: Sequence[float | None]) -> int | None:
    m = seed_mean(values)
    return None if m is None else round(m)


def _extreme(fn: Callable, values) -> float | None:
    """max / min of the defined values; None if there are none."""
    v = [x for x in values if x is not None]
    return fn(v) if v else None


def _lt(a: float | None, b: float | None) -> bool | None:
    return None if a is None or b is None else a < b


# ---------------------------------------------------------------------------------------------------------- claims
def verdict_a(results: Sequence[dict]) -> Verdict:
    """(a) Same-stage transfer: M5 + Δ4 and M4 + Δ5 should recover most of the target's own FT gain (the paper:
    116 % and 75 %). Checks on the mean recovery of the two: ≥ 50 % and ≥ 90 %."""
    n: dict[str, Any] = {}
    for i, j in (("M5", "M4"), ("M4", "M5")):
        k = f"{i}+D{j}"
        n[f"{k}"], n[f"base_{i}"], n[f"ft_{i}"] = em(results, "grid", k), em(results, "base", i), em(results, "ft", i)
        n[f"rec_{k}"] = recovery(n[k], n[f"base_{i}"], n[f"ft_{i}"])
        n[f"probe_{i}"] = mean_of(results, lambda r, i=i: r["base"][i]["probe"], 0)
        n[f"paper_rec_{k}"] = recovery(PAPER["grid"][k], PAPER["base"][i], PAPER["ft"][i])
    n["rec_mean"] = _mean_int([n["rec_M5+DM4"], n["rec_M4+DM5"]])
    same1 = [(i, j) for i in CORE for j in CORE if i != j and STAGE[i] == STAGE[j] == 1]
    n["rec_stage1"] = _mean_int(_recoveries(results, same1))
    m = n["rec_mean"]
    return _verdict("a", n, {"at least half of the gain (mean ≥ 50 %)": None if m is None else m >= 50,
                             "most of the gain (mean ≥ 90 %)": None if m is None else m >= 90})


def verdict_b(results: Sequence[dict]) -> Verdict:
    """(b) Cross-stage transfer, M0 and the control. Checks: stage-2 targets recover less from stage-1 diffs than
    from their stage-2 neighbour (proximity); some cross-stage transfer ends below its target's base; transfer onto
    the near-initial M0 gains less than INERT points (undefined when FT(M0) itself gains less than INERT: then M0
    cannot learn the task in this recipe and a failed transfer says nothing). The control C (another init) is
    reported, not judged: the paper has no such model."""
    names = results[0]["names"]
    same2 = _recoveries(results, (("M5", "M4"), ("M4", "M5")))
    cross = [(i, j) for i in CORE for j in CORE if STAGE[i] != STAGE[j]]
    n: dict[str, Any] = {"rec_same_stage2": _mean_int(same2),
                         "rec_cross_to_stage2": _mean_int(_recoveries(results, [p for p in cross if STAGE[p[0]] == 2])),
                         "rec_cross": _mean_int(_recoveries(results, cross))}
    below = [(i, j) for i in CORE for j in names if j != i
             and _lt(em(results, "grid", f"{i}+D{j}"), em(results, "base", i))]
    n["below_base"], n["below_base_of"] = len(below), len(CORE) * (len(names) - 1)
    n["below_base_cross"] = sum(1 for i, j in below if j in STAGE and STAGE[i] != STAGE[j])
    n["below_base_cross_of"] = len(cross)
    n["below_base_cross_pairs"] = [f"{i}+D{j}" for i, j in below if j in STAGE and STAGE[i] != STAGE[j]]
    n["m0_base"], n["m0_ft"] = em(results, "base", "M0"), em(results, "ft", "M0")
    n["m0_transfer"] = mean_of(results, lambda r: np.mean([r["grid"][f"M0+D{j}"]["task"] for j in CORE]))
    n["m0_lm_change"] = mean_of(results, lambda r: np.mean([r["grid"][f"M0+D{j}"]["lm"] for j in CORE])
                                - r["base"]["M0"]["lm"], 3)
    m0_gain = None if n["m0_transfer"] is None or n["m0_base"] is None else round(n["m0_transfer"] - n["m0_base"], 1)
    n["m0_gain"] = m0_gain
    n["m0_ft_gain"] = None if n["m0_ft"] is None or n["m0_base"] is None else round(n["m0_ft"] - n["m0_base"], 1)
    m0_judged = m0_gain is not None and n["m0_ft_gain"] is not None and n["m0_ft_gain"] >= INERT
    if "C" in names:
        n["c_mi_dc"] = mean_of(results, lambda r: np.mean([r["grid"][f"{i}+DC"]["task"] - r["base"][i]["task"]
                                                           for i in CORE]))
        n["c_c_dj"] = mean_of(results, lambda r: np.mean([r["grid"][f"C+D{j}"]["task"] - r["base"]["C"]["task"]
                                                          for j in CORE]))
        n["c_lm_change"] = mean_of(results, lambda r: np.mean([r["grid"][f"C+D{j}"]["lm"] - r["base"]["C"]["lm"]
                                                               for j in CORE]), 3)
        n["c_cos"] = mean_of(results, lambda r: np.mean([abs(pair_value(r["cos"], "C", j)) for j in CORE]), 2)
        n["c_barrier_m5"] = mean_of(results, lambda r: barrier_of(r, CHOSEN_MEASURE, "C", "M5"), 3)
    return _verdict("b", n, {
        "proximity: stage-2 targets recover less from stage-1 diffs than from their neighbour":
            _lt(n["rec_cross_to_stage2"], n["rec_same_stage2"]),
        "some cross-stage transfer ends below its target's base": n["below_base_cross"] >= 1,
        f"transfer onto M0 gains less than {INERT:g} points": m0_gain < INERT if m0_judged else None})


def sweep_scores(results: Sequence[dict], key: str) -> tuple[list[float], list[float | None]]:
    """(α grid, seed-mean task EM % at each α, 0.1) of the sweep Mi + α·Δj, key "Mi+DMj"."""
    alphas = list(results[0]["sweep"][key]["alpha"])

    def at(r: dict, x: float) -> float:
        return r["sweep"][key]["task"][r["sweep"][key]["alpha"].index(x)]

    return alphas, [mean_of(results, lambda r, x=x: at(r, x)) for x in alphas]


def best_alpha(alphas: Sequence[float], scores: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(best score, its α) over a sweep; among tied maxima the α closest to 1 (so a flat sweep says α = 1)."""
    ok = [(a, s) for a, s in zip(alphas, scores) if s is not None]
    if not ok:
        return None, None
    top = max(s for _, s in ok)
    return top, min((a for a, s in ok if s == top), key=lambda a: (abs(a - 1.0), a))


def verdict_c(results: Sequence[dict]) -> Verdict:
    """(c) α sweep of the same-stage paths M5 + α·Δ4 and M4 + α·Δ5. The paper used α = 1 only and found the
    neighbour's diff close to FT(target); check, per path: its best α comes within NEAR points of FT(target)
    (undefined when FT(target) − base < NEAR, where "approaching FT" cannot be told from staying at the base)."""
    n: dict[str, Any] = {}
    checks: dict[str, bool | None] = {}
    for i, j in (("M5", "M4"), ("M4", "M5")):
        k = f"{i}+D{j}"
        alphas, scores = sweep_scores(results, k)
        best, at = best_alpha(alphas, scores)
        ft, base = em(results, "ft", i), em(results, "base", i)
        n[k] = {"alpha": list(alphas), "task": scores, "at_1": scores[alphas.index(1.0)], "best": best,
                "best_alpha": at, "ft": ft, "base": base}
        judged = ft is not None and base is not None and best is not None and ft - base >= NEAR
        checks[f"{label(k).replace('Δ', 'α·Δ')}: best α within {NEAR:g} points of FT({i})"] = \
            best >= ft - NEAR if judged else None
    return _verdict("c", n, checks)


# Connectivity measures (barriers in nats, Entezari et al.'s form: the largest rise of the loss above the chord
# between the path's endpoints, over the interior λ grid points; 0 when the path never rises above it).
MEASURES: dict[str, str] = {
    "own": "LM barrier Mi–Mj on own-stage text",  # the larger of the barriers on stage-1 and on stage-2 text
    "mixed": "LM barrier Mi–Mj on mixed text",  # stage-1 + stage-2 held-out text scored together
    "transfer": "task-NLL barrier along Mi + λΔj",  # the transfer path itself, λ in [0, 1], on the task's NLL
}
# Claim (d)'s measure, fixed before the first run that computed it. The paper's explanation is that transfer works
# when the versions lie in one linearly connected region, a property of Mi and Mj alone; the own-text barrier
# measures it where it can show (an average of a stage-1 and a stage-2 model can do well on mixed text while
# failing on each stage's own text). The transfer-path barrier is reported but not judged: at λ = 1 it scores
# Mi + Δj on the task itself, so its correlation with recovery would be partly the outcome measured twice.
CHOSEN_MEASURE = "own"
CHOSEN_REASON = ("the larger of the version-interpolation barriers on stage-1 and on stage-2 held-out text: the "
                 "paper's mechanism is that the versions Mi and Mj lie in one linearly connected region, a property "
                 "of the two versions alone, and each stage's own text is where falling off that region can show (on "
                 "mixed text an average of a stage-1 and a stage-2 model can do well while failing on each stage's "
                 "own text). The task-NLL barrier along Mi + λ·Δj is reported, not judged: at λ = 1 it scores "
                 "Mi + Δj on the task itself, so its correlation with recovery would partly be the outcome measured "
                 "twice. Chosen before the first run that computed it")


def barrier_of(result: dict, measure: str, i: str, j: str) -> float | None:
    """One seed's barrier (nats) between target Mi and source Mj under `measure` (a key of MEASURES)."""
    if measure == "transfer":
        return result["sweep"][f"{i}+D{j}"]["barrier"]
    return pair_value(result["scans"], i, j)["barrier_own" if measure == "own" else "barrier"]


PREDICTORS = ("LM barrier Mi–Mj", "LM barrier on own-stage text", "LM midpoint excess", "distance ‖Mi − Mj‖",
              "cos(Δi, Δj)", "task-NLL barrier along Mi + λΔj")
PREDICTOR_DIGITS = (3, 3, 3, 2, 2, 3)


def predictor_rows(results: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per ordered pair (Mi target, Mj source) of M1..M5: the gain of Mi + Δj over Mi (EM points) and each
    predictor, as the report's predictor table prints them (seed means, rounded)."""
    def values(r: dict, i: str, j: str) -> list[float]:
        scan = pair_value(r["scans"], i, j)
        return [scan["barrier"], barrier_of(r, "own", i, j), scan["mid_excess"], pair_value(r["distance"], i, j),
                pair_value(r["cos"], i, j), barrier_of(r, "transfer", i, j)]

    rows = []
    for i, j in ((i, j) for i in CORE for j in CORE if i != j):
        t, b = em(results, "grid", f"{i}+D{j}"), em(results, "base", i)
        row = {"pair": f"{i}+D{j}", "target": i, "gain": None if t is None or b is None else round(t - b, 1)}
        for k, (p, digits) in enumerate(zip(PREDICTORS, PREDICTOR_DIGITS, strict=True)):
            row[p] = mean_of(results, lambda r, i=i, j=j, k=k: values(r, i, j)[k], digits)
        rows.append(row)
    return rows


RHO_PREDICTS = -0.3  # Spearman ρ at or below which the barrier "predicts" recovery (a moderate negative rank
# correlation; fixed before any run of the rewarm world)

ORDERED = [(i, j) for i in CORE for j in CORE if i != j]


def barrier_recovery(results: Sequence[dict], measure: str = CHOSEN_MEASURE) -> list[tuple[float | None, int | None]]:
    """(barrier Mi–Mj under `measure` in nats to 0.001, recovered fraction of Mi + Δj in whole %) for every ordered
    pair of M1..M5 in every seed (20 per seed; the recovery is undefined where FT(Mi) gained nothing in that seed)."""
    return [(rounded(barrier_of(r, measure, i, j), 3),
             recovery(em([r], "grid", f"{i}+D{j}"), em([r], "base", i), em([r], "ft", i)))
            for r in results for i, j in ORDERED]


def stages_separated(result: dict, measure: str = CHOSEN_MEASURE) -> bool:
    """Whether one seed's barriers under `measure` separate the stages: every same-stage barrier (to 0.001) below
    every cross-stage one (over the ordered pairs of M1..M5)."""
    bar = {(a, b): rounded(barrier_of(result, measure, a, b), 3) for a, b in ORDERED}
    same = [v for (a, b), v in bar.items() if STAGE[a] == STAGE[b] and v is not None]
    cross = [v for (a, b), v in bar.items() if STAGE[a] != STAGE[b] and v is not None]
    return bool(same and cross) and max(same) < min(cross)


def measure_summary(results: Sequence[dict], measure: str) -> dict[str, Any]:
    """One connectivity measure over the ordered pairs of M1..M5: the mean barrier within a stage and across the
    boundary (seed means, nats to 0.001), how many seeds it separates the stages in (`stages_separated`) and the
    Spearman ρ between it and the recovered fraction over pairs × seeds (`barrier_recovery`; None if undefined)."""
    def side(same: bool) -> float | None:
        return mean_of(results, lambda r: seed_mean([barrier_of(r, measure, i, j) for i, j in ORDERED
                                                     if (STAGE[i] == STAGE[j]) == same]), 3)

    pooled = [(b, c) for b, c in barrier_recovery(results, measure) if b is not None and c is not None]
    return {"within": side(True), "across": side(False),
            "seeds_separated": sum(stages_separated(r, measure) for r in results),
            "rho_recovery": spearman([b for b, _ in pooled], [c for _, c in pooled]), "pairs": len(pooled)}


def verdict_d(results: Sequence[dict]) -> Verdict:
    """(d) What predicts transfer gain, and the paper's explanation (transfer works when source and target lie in
    one linearly connected region). Spearman ρ of each predictor with the gain over the 20 ordered pairs (and the
    mean ρ within each target column), and every connectivity measure of MEASURES summarised (`measure_summary`).
    Checks, all on the barrier CHOSEN_MEASURE (see CHOSEN_REASON): the barriers separate the stages (every
    same-stage barrier below every cross-stage one, on the seed means); the barrier predicts how much transfer
    recovers (Spearman ρ between the barrier Mi–Mj and the recovered fraction of Mi + Δj over the ordered pairs of
    every seed, at most RHO_PREDICTS); the different-init control C is further from linear connectivity than any
    within-run pair (barrier C–M5 above every M1..M5 barrier) and its diff does not help (Mi + ΔC gains less than
    INERT points)."""
    rows = predictor_rows(results)
    gain = [r["gain"] for r in rows]
    rho = {p: spearman([r[p] for r in rows], gain) for p in PREDICTORS}
    within = {p: rounded(seed_mean([spearman([r[p] for r in rows if r["target"] == t],
                                             [r["gain"] for r in rows if r["target"] == t]) for t in CORE]), 2)
              for p in PREDICTORS}
    defined = {p: abs(v) for p, v in rho.items() if v is not None}
    top = max(defined.values()) if defined else None
    barrier = {f"{a}-{b}": mean_of(results, lambda r, a=a, b=b: barrier_of(r, CHOSEN_MEASURE, a, b), 3)
               for a, b in ORDERED}
    same = [v for k, v in barrier.items() if STAGE[k[:2]] == STAGE[k[3:]]]
    cross = [v for k, v in barrier.items() if STAGE[k[:2]] != STAGE[k[3:]]]
    measures = {m: measure_summary(results, m) for m in MEASURES}
    rho_rec = measures[CHOSEN_MEASURE]["rho_recovery"]
    n: dict[str, Any] = {"rho": rho, "rho_within": within,
                         "strongest": [p for p, v in defined.items() if v == top],
                         "max_same_stage_barrier": _extreme(max, same), "min_cross_stage_barrier": _extreme(min, cross),
                         "max_core_barrier": _extreme(max, barrier.values()),
                         "rho_barrier_recovery": rho_rec, "barrier_recovery_pairs": measures[CHOSEN_MEASURE]["pairs"],
                         "seeds_separated": measures[CHOSEN_MEASURE]["seeds_separated"], "seeds": len(results),
                         "measure": CHOSEN_MEASURE, "measures": measures}
    control = None
    if "C" in results[0]["names"]:
        n["c_barrier_m5"] = mean_of(results, lambda r: barrier_of(r, CHOSEN_MEASURE, "C", "M5"), 3)
        n["c_mi_dc"] = mean_of(results, lambda r: np.mean([r["grid"][f"{i}+DC"]["task"] - r["base"][i]["task"]
                                                           for i in CORE]))
        if None not in (n["c_barrier_m5"], n["max_core_barrier"], n["c_mi_dc"]):
            control = n["c_barrier_m5"] > n["max_core_barrier"] and n["c_mi_dc"] < INERT
    return _verdict("d", n, {
        f"the barriers ({MEASURES[CHOSEN_MEASURE]}) separate the stages (max same-stage < min cross-stage)":
            _lt(n["max_same_stage_barrier"], n["min_cross_stage_barrier"]),
        f"the barrier predicts the recovered fraction (ρ over pairs and seeds ≤ {RHO_PREDICTS:g})":
            None if rho_rec is None else rho_rec <= RHO_PREDICTS,
        "the different-init control is less connected than any within-run pair and its diff does not help": control})


def _steps(values: Sequence[int | None]) -> int | None:
    """Mean steps over seeds, whole steps; None unless reached in every seed."""
    return None if any(v is None for v in values) else round(float(np.mean(values)))


def verdict_e(results: Sequence[dict]) -> Verdict:
    """(e) Transferring-then-finetuning (the paper's Tables 4–5, Figures 2–3): FT(Mi + Δj) should end above FT(Mi)
    and reach FT(Mi)'s final EM in fewer steps. Checks: each holds in more than half of the pairs run, counting
    only pairs whose plain FT(Mi) gained over Mi's base (else there is no fine-tuning result to beat)."""
    keys = [k for k in results[0]["tft"] if "+D" in k]
    rows = []
    for k in keys:
        i = k.split("+")[0]
        own = f"FT({i})"
        rows.append({"pair": k, "judged": bool(gained(results, i)),
                     "final": mean_of(results, lambda r, k=k: r["tft"][k]["final"]),
                     "ft_final": mean_of(results, lambda r, own=own: r["tft"][own]["final"]),
                     "steps": _steps([r["tft"][k]["steps_to_ft"] for r in results]),
                     "ft_steps": _steps([r["tft"][own]["steps_to_ft"] for r in results])})
    used = [r for r in rows if r["judged"]]
    above = sum(bool(_lt(r["ft_final"], r["final"])) for r in used)
    sooner = sum(bool(_lt(r["steps"], r["ft_steps"])) for r in used)
    n = {"rows": rows, "above": above, "sooner": sooner, "pairs": len(used), "left_out": len(rows) - len(used)}
    return _verdict("e", n, {"ends above FT(Mi) in more than half of the pairs": above > len(used) / 2 if used
                             else None,
                             "reaches FT(Mi)'s final EM sooner in more than half of the pairs":
                                 sooner > len(used) / 2 if used else None})


RECYCLED = ("M3", "M4", "M5")  # M2's direct and iterative runs are the same run (both start from M2 + Δ1)


def verdict_f(results: Sequence[dict]) -> Verdict:
    """(f) Recycling (Algorithm 1, Table 6). The paper: iterative ≥ direct (by at most 1.6 points), both above
    plain FT. Check, per version M3..M5: plain < direct ≤ iterative (final EM %); undefined for a version whose
    plain FT(Mi) gained nothing over Mi's base."""
    n: dict[str, Any] = {}
    checks: dict[str, bool | None] = {}
    for i in RECYCLED:
        row = {mode: mean_of(results, lambda r, m=mode, i=i: r["recycle"][m][i]["final"])
               for mode in ("plain", "direct", "iterative")}
        n[i] = row
        ok = None if None in row.values() or not gained(results, i) else \
            row["plain"] < row["direct"] <= row["iterative"]
        checks[f"{i}: plain < direct ≤ iterative"] = ok
    gaps = [n[i]["iterative"] - n[i]["direct"] for i in RECYCLED if None not in (n[i]["iterative"], n[i]["direct"])]
    n["iterative_minus_direct"] = rounded(seed_mean(gaps), 1)
    n["direct_above_plain"] = sum(bool(_lt(n[i]["plain"], n[i]["direct"])) for i in RECYCLED)
    n["iterative_above_plain"] = sum(bool(_lt(n[i]["plain"], n[i]["iterative"])) for i in RECYCLED)
    n["iterative_ge_direct"] = sum(bool(n[i]["iterative"] >= n[i]["direct"]) for i in RECYCLED
                                   if None not in (n[i]["iterative"], n[i]["direct"]))
    return _verdict("f", n, checks)


CLAIMS: dict[str, Callable[[Sequence[dict]], Verdict]] = {
    "a": verdict_a, "b": verdict_b, "c": verdict_c, "d": verdict_d, "e": verdict_e, "f": verdict_f}


SEED_RULE = ("agrees only when every seed agrees, does not agree only when no seed agrees even partly, partly agrees "
             "otherwise; seeds where the claim cannot be judged are left out")


def seed_rule(per_seed: Sequence[str]) -> str:
    """Combine per-seed verdicts (SEED_RULE): AGREES if every judged seed agrees, DISAGREES if every judged seed does
    not agree, PARTLY otherwise (some seeds agree, or a seed partly agrees); UNJUDGED when no seed is judged."""
    judged = [v for v in per_seed if v != UNJUDGED]
    if not judged:
        return UNJUDGED
    if all(v == AGREES for v in judged):
        return AGREES
    return DISAGREES if all(v == DISAGREES for v in judged) else PARTLY


def _leaves(numbers: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a claim's numbers, keyed "key" or "key/sub" (lists and booleans left out)."""
    out: dict[str, float] = {}
    for k, x in numbers.items():
        if isinstance(x, dict):
            out.update(_leaves(x, f"{prefix}{k}/"))
        elif isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
            out[f"{prefix}{k}"] = x
    return out


def seed_ranges(per_seed: Sequence[Verdict]) -> dict[str, list[float]]:
    """"key" -> [min, max] over seeds of each number the claim prints, each computed on one seed alone (keys
    undefined in every seed are left out)."""
    leaves = [_leaves(v.numbers) for v in per_seed]
    keys = dict.fromkeys(k for leaf in leaves for k in leaf)
    return {k: [min(v), max(v)] for k in keys if (v := [leaf[k] for leaf in leaves if k in leaf])}


def over_seeds(fn: Callable[[Sequence[dict]], Verdict], results: Sequence[dict]) -> Verdict:
    """A claim over all seeds: the numbers and checks of `fn` on the seed means, each seed's own verdict
    (`fn([result])`, keyed by its seed as a string), the verdict `seed_rule` gives from those and, with several
    seeds, the range of every printed number over the seeds (`seed_ranges`)."""
    mean = fn(results)
    alone = {str(r["seed"]): fn([r]) for r in results}
    per_seed = {s: v.verdict for s, v in alone.items()}
    ranges = seed_ranges(list(alone.values())) if len(results) > 1 else {}
    return dataclasses.replace(mean, verdict=seed_rule(list(per_seed.values())), per_seed=per_seed, ranges=ranges)


def seeds_agreeing(v: Verdict) -> int:
    """How many seeds the claim agrees in."""
    return sum(w == AGREES for w in v.per_seed.values())


def tally(v: Verdict) -> str:
    """How many seeds gave each verdict, e.g. "agrees in 1, partly agrees in 2 of 3 seeds" (verdicts never given
    are left out)."""
    counts = [(w, sum(x == w for x in v.per_seed.values())) for w in VERDICTS]
    return ", ".join(f"{w} in {k}" for w, k in counts if k) + f" of {len(v.per_seed)} seeds"


def all_verdicts(results: Sequence[dict]) -> dict[str, Verdict]:
    """Every claim's verdict over all seeds (`over_seeds`), keyed "a".."f"."""
    return {k: over_seeds(fn, results) for k, fn in CLAIMS.items()}
