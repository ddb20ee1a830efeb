"""The report's claims (a)–(f) as text: each rendered from its `verdicts.Verdict` alone.

Every number in a claim is one of the verdict's numbers, printed at the precision it was rounded to, and the
verdict word is the verdict's own; each claim states its rule. Nothing here decides anything.
"""

from __future__ import annotations

from typing import Any

from ftjax.demo.verdicts import (CHOSEN_MEASURE, INERT, MEASURES, NEAR, PAPER, PREDICTORS, RECYCLED, RHO_PREDICTS,
                                 SEED_RULE, Verdict, label as _label, tally)


def _n(x: float | None, digits: int = 1, sign: bool = False) -> str:
    """A number as printed ("n/a" when undefined)."""
    return "n/a" if x is None else f"{x:{'+' if sign else ''}.{digits}f}"


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:g}"


def _pct(x: int | None) -> str:
    return "n/a" if x is None else f"{x} %"


def _v(v: Verdict, key: str, digits: int = 1, sign: bool = False, unit: str = "") -> str:
    """The number `key` ("key" or "key/sub") of a claim as printed: the seed mean and, over several seeds, its range
    "mean (min–max)", "mean (min to max)" with signs (each end computed on one seed alone); "n/a" when the mean is
    undefined."""
    x: Any = v.numbers
    for part in key.split("/"):
        x = x[part]
    if x is None:
        return "n/a"
    text = _n(x, digits, sign) + unit
    r = v.ranges.get(key)
    if r is not None and len(v.per_seed) > 1:
        lo, hi = _n(r[0], digits, sign), _n(r[1], digits, sign)
        dash = " to " if sign or r[0] < 0 else "–"  # "-67–-20" would read as a subtraction
        text += f" ({lo}{dash}{hi}{unit})"
    return text


def _vp(v: Verdict, key: str) -> str:
    """A share in whole % with its range over seeds ("51 % (30–70 %)")."""
    return _v(v, key, 0, unit=" %")


def _checks(v: Verdict) -> str:
    """"check: yes; check: no; check: undefined"."""
    word = {True: "yes", False: "no", None: "undefined"}
    return "; ".join(f"{name}: {word[ok]}" for name, ok in v.checks.items())


def _end(v: Verdict) -> str:
    """The checks, each seed's own verdict (several seeds) and the verdict."""
    if len(v.per_seed) <= 1:
        return f" Checks — {_checks(v)}. Verdict: **{v.verdict}**."
    seeds = "; ".join(f"seed {s}: {w}" for s, w in v.per_seed.items())
    return (f" Checks on the seed means — {_checks(v)}. Per seed (the same checks on that seed alone) — {seeds}; "
            f"{tally(v)}. Over seeds the claim {SEED_RULE}. Verdict: **{v.verdict}**.")


def claim_a(v: Verdict, seeds: int) -> str:
    n = v.numbers
    parts = [f"{_label(k)} = {_v(v, k)} % (base {_v(v, f'base_{i}')} %, FT({i}) = {_v(v, f'ft_{i}')} %, latent "
             f"skill by the probe {_v(v, f'probe_{i}', 0)} %) recovers {_vp(v, f'rec_{k}')} of FT({i})'s gain"
             for k, i in (("M5+DM4", "M5"), ("M4+DM5", "M4"))]
    return ("**(a) Same-stage transfer.** " + "; ".join(parts) + f"; mean {_vp(v, 'rec_mean')}. Within stage 1 "
            f"the mean recovery is {_vp(v, 'rec_stage1')}. The paper's GSM8K numbers give "
            f"{_pct(n['paper_rec_M5+DM4'])} (M5 + Δ4 = {PAPER['grid']['M5+DM4']} against FT(M5) = "
            f"{PAPER['ft']['M5']}) and {_pct(n['paper_rec_M4+DM5'])} (M4 + Δ5). Recovery = (transfer − base) / "
            "(FT − base), undefined without a gain."
            + (" One seed: the default (3 seeds) shows the spread." if seeds == 1 else "") + _end(v))


def claim_b(v: Verdict, seeds: int) -> str:
    n = v.numbers
    cross = ", ".join(_label(k) for k in n["below_base_cross_pairs"]) or "none"
    text = (f"**(b) Cross-stage, M0 and the control.** Stage-2 targets given stage-1 diffs recover "
            f"{_vp(v, 'rec_cross_to_stage2')} of their FT gain on average, against {_vp(v, 'rec_same_stage2')} "
            f"from their stage-2 neighbour (all cross-stage pairs: {_vp(v, 'rec_cross')}); the paper: M5 + Δ2 = "
            f"{PAPER['grid']['M5+DM2']} and M4 + Δ1 = {PAPER['grid']['M4+DM1']}, below their bases "
            f"{PAPER['base']['M5']} and {PAPER['base']['M4']}. Here {n['below_base']} of {n['below_base_of']} "
            f"transfers onto M1..M5 end below their base, {n['below_base_cross']} of the "
            f"{n['below_base_cross_of']} cross-stage ones ({cross}). Onto the near-initial M0, transfer gives "
            f"{_v(v, 'm0_transfer')} % on average, {_v(v, 'm0_gain', sign=True)} points over its base "
            f"{_v(v, 'm0_base')} % (FT(M0) itself: {_v(v, 'm0_ft')} %, {_v(v, 'm0_ft_gain', sign=True)}; the M0 check "
            f"is judged only when FT(M0) gains at least {INERT:g} points), and changes M0's LM loss by "
            f"{_v(v, 'm0_lm_change', 3, True)} nats.")
    if "c_mi_dc" in n:
        def effect(x: float | None) -> str:
            return "undefined" if x is None else "no change" if abs(x) < INERT else "a gain" if x > 0 else "a loss"

        text += (f" Control C (another init, reported, not judged): Mi + ΔC changes task EM by "
                 f"{_v(v, 'c_mi_dc', sign=True)} points on average ({effect(n['c_mi_dc'])}), C + Δj by "
                 f"{_v(v, 'c_c_dj', sign=True)} ({effect(n['c_c_dj'])}; LM loss {_v(v, 'c_lm_change', 3, True)} "
                 f"nats); |cos(ΔC, Δj)| = {_v(v, 'c_cos', 2)} and the {MEASURES[CHOSEN_MEASURE]} for C–M5 is "
                 f"{_v(v, 'c_barrier_m5', 3)} nats. \"No change\" = under {INERT:g} points either way.")
    return text + _end(v)


def _alpha_phrase(p: dict[str, Any]) -> str:
    if p["best_alpha"] is None:
        return "undefined"
    if p["best_alpha"] == 1.0:
        return "no α beats α = 1"
    return "the diff undershoots" if p["best_alpha"] > 1 else "the diff overshoots"


def claim_c(v: Verdict, seeds: int) -> str:
    parts = []
    for k, p in v.numbers.items():
        i = k.split("+")[0]
        parts.append(f"{_label(k).replace('Δ', 'α·Δ')} scores {_v(v, f'{k}/at_1')} % at α = 1 and at best "
                     f"{_v(v, f'{k}/best')} % at α = {_g(p['best_alpha'])} ({_alpha_phrase(p)}), against FT({i}) = "
                     f"{_v(v, f'{k}/ft')} % and base {_v(v, f'{k}/base')} %")
    return ("**(c) α sweep.** " + "; ".join(parts) + ". The paper used α = 1 only, where a same-stage diff came "
            f"close to FT(target); here the rule is \"best α within {NEAR:g} points of FT(target)\", undefined when "
            f"FT gains less than {NEAR:g} points over the base (ties between α go to the α closest to 1)." + _end(v))


def claim_d(v: Verdict, seeds: int) -> str:
    n = v.numbers
    rhos = "; ".join(f"{p}: " + ("undefined (constant over the pairs)" if n["rho"][p] is None else
                                 f"{_v(v, f'rho/{p}', 2, True)} [within targets {_n(n['rho_within'][p], 2, True)}]")
                     for p in PREDICTORS)
    strongest = (" The largest |ρ|: **" + "**, **".join(n["strongest"]) + "**.") if n["strongest"] else \
        " No ρ is defined (nothing varies)."
    chosen = MEASURES[n["measure"]]
    text = ("**(d) What predicts transfer gain.** Spearman ρ between each quantity and the gain of Mi + Δj over Mi "
            "over the 20 ordered pairs of M1..M5 (the predictor table below; in brackets the mean ρ within each "
            f"target column, which removes the strong-target confound): {rhos}.{strongest} The paper explains "
            "transfer by linear mode connectivity: it works when source and target lie in one linearly connected "
            f"region. Claim (d) measures it by the **{chosen}** (chosen before running; the method notes say why). "
            "Every measure, barrier in nats "
            "within a stage / across the boundary (mean over the pairs) and ρ with the recovered fraction: "
            + "; ".join(_measure(v, m) for m in MEASURES) + ". By the chosen measure the largest barrier between "
            f"versions of one stage is {_v(v, 'max_same_stage_barrier', 3)} nats and the smallest across the stage "
            f"boundary {_v(v, 'min_cross_stage_barrier', 3)} nats (largest within the run: "
            f"{_v(v, 'max_core_barrier', 3)})")
    if "c_barrier_m5" in n:
        text += (f"; the different-init control has {_v(v, 'c_barrier_m5', 3)} nats to M5 and its diff changes "
                 f"Mi's EM by {_v(v, 'c_mi_dc', sign=True)} points")
    text += (f". The stages are separated by these barriers (every same-stage barrier below every cross-stage one) "
             f"in {n['seeds_separated']} of {n['seeds']} seed{'s' if n['seeds'] != 1 else ''}. Does the barrier "
             f"predict how much transfer recovers? Spearman ρ between the {chosen} and the recovered "
             f"fraction of Mi + Δj over the {n['barrier_recovery_pairs']} (pair, seed) points where FT(Mi) gained: "
             + ("undefined (constant barriers or recoveries)" if n["rho_barrier_recovery"] is None
                else _n(n["rho_barrier_recovery"], 2, True))
             + f"; the rule: the barrier predicts recovery when ρ ≤ {RHO_PREDICTS:g}")
    return text + "." + _end(v)


def _measure(v: Verdict, m: str) -> str:
    """"name: within W / across A nats, stages separated in k of n seeds, ρ = R" for connectivity measure m."""
    x = v.numbers["measures"][m]
    rho = "undefined" if x["rho_recovery"] is None else _v(v, f"measures/{m}/rho_recovery", 2, True)
    return (f"{MEASURES[m]}: {_v(v, f'measures/{m}/within', 3)} / {_v(v, f'measures/{m}/across', 3)}, stages "
            f"separated in {x['seeds_separated']} of {v.numbers['seeds']} seeds, ρ = {rho}")


def measure_table(v: Verdict) -> str:
    """Claim (d)'s connectivity measures as a markdown table: barrier within a stage and across the boundary (nats,
    mean over pairs; "mean (min–max)" over seeds), seeds separated, ρ with the recovered fraction over the (pair,
    seed) points of all seeds with the range of the per-seed ρ (seeds where it is undefined left out); the chosen
    one marked."""
    lines = ["| measure | within a stage (nats) | across the boundary (nats) | seeds separating the stages | "
             "ρ with recovered fraction, pooled over seeds (min–max of each seed's own ρ) |", "|---|---|---|---|---|"]
    for m, name in MEASURES.items():
        x = v.numbers["measures"][m]
        rho = "undefined" if x["rho_recovery"] is None else _v(v, f"measures/{m}/rho_recovery", 2, True)
        mark = " (claim (d))" if m == v.numbers["measure"] else ""
        lines.append(f"| {name}{mark} | {_v(v, f'measures/{m}/within', 3)} | {_v(v, f'measures/{m}/across', 3)} | "
                     f"{x['seeds_separated']} of {v.numbers['seeds']} | {rho} |")
    return "\n".join(lines)


def claim_e(v: Verdict, seeds: int) -> str:
    n = v.numbers
    left = (f"; {n['left_out']} pairs left out because FT(Mi) gained nothing over Mi's base" if n["left_out"]
            else "")
    return (f"**(e) Transferring-then-finetuning.** FT(Mi + Δj) ends above FT(Mi) in {n['above']} of {n['pairs']} "
            f"pairs and reaches FT(Mi)'s final EM in fewer steps than FT(Mi) itself in {n['sooner']} of "
            f"{n['pairs']} (the table below; \"never\" counts as not sooner{left}). The paper's Tables 4–5 and "
            "Figures 2–3 find both." + _end(v))


def claim_f(v: Verdict, seeds: int) -> str:
    n = v.numbers
    rows = "; ".join(f"{i}: plain {_v(v, f'{i}/plain')}, direct {_v(v, f'{i}/direct')}, iterative "
                     f"{_v(v, f'{i}/iterative')}" for i in RECYCLED)
    return (f"**(f) Recycling** (final EM %, {', '.join(RECYCLED)}): {rows}. Direct above plain in "
            f"{n['direct_above_plain']} of {len(RECYCLED)}, iterative above plain in {n['iterative_above_plain']}, "
            f"iterative ≥ direct in {n['iterative_ge_direct']}; iterative − direct = "
            f"{_v(v, 'iterative_minus_direct', sign=True)} points on average. The paper reports plain < direct ≤ "
            "iterative (iterative ahead by at most 1.6 points); a version is not judged when its plain FT gained "
            "nothing over its base." + _end(v))


RENDER = {"a": claim_a, "b": claim_b, "c": claim_c, "d": claim_d, "e": claim_e, "f": claim_f}


def claim_lines(verdicts: dict[str, Verdict], seeds: int) -> list[str]:
    """One markdown paragraph per claim, in order (a)..(f)."""
    return [RENDER[k](verdicts[k], seeds) for k in sorted(verdicts)]
