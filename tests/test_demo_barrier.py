"""Issue 26: connectivity measured where a barrier can show (each stage's own text, the transfer path), claim (d)
judged on the measure chosen in advance, every measure reported."""

import json

import pytest

from test_demo import fake_result

LAMBDAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def test_own_text_barrier_shows_what_mixed_text_hides():
    """A bump on stage-1 text and a deeper dip on stage-2 text: the mixed loss dips below its chord (barrier 0) while
    the own-text barrier is the stage-1 bump."""
    from ftjax.demo import study

    bump = [2.0, 2.3, 2.5, 2.3, 2.0]  # rises 0.5 above the chord at λ = ½
    dip = [3.0, 1.5, 1.0, 1.5, 3.0]  # falls 2.0 below it
    rec = study.connectivity_record(LAMBDAS, {1: (bump, 100), 2: (dip, 300)})
    assert rec["loss"] == pytest.approx([(100 * x + 300 * y) / 400 for x, y in zip(bump, dip)])  # token-weighted
    assert rec["barrier"] == 0.0 and rec["barrier_lambda"] is None and rec["mid_excess"] < 0
    assert rec["stage1"]["barrier"] == pytest.approx(0.5) and rec["stage1"]["barrier_lambda"] == 0.5
    assert rec["stage2"]["barrier"] == 0.0 and rec["stage2"]["mid_excess"] == pytest.approx(-2.0)
    assert rec["barrier_own"] == pytest.approx(0.5) and rec["barrier_own_stage"] == 1
    assert (rec["stage1"]["tokens"], rec["stage2"]["tokens"]) == (100, 300)
    # both dip: no barrier anywhere; a bump on stage 2 only: the own-text barrier is stage 2's
    flat = study.connectivity_record(LAMBDAS, {1: (dip, 1), 2: (dip, 1)})
    assert flat["barrier_own"] == 0.0 and flat["barrier"] == 0.0
    assert study.connectivity_record(LAMBDAS, {1: (dip, 1), 2: (bump, 1)})["barrier_own_stage"] == 2


def test_verdict_d_judges_the_measure_chosen_in_advance():
    """The rewarm world's first outcome: every mixed-text barrier 0 while the own-text barriers are larger across
    the boundary. Claim (d) judges the own-text barrier (separation and ρ ≤ RHO_PREDICTS), and reports every
    measure with its within / across means and ρ."""
    from ftjax.demo import claims, verdicts

    assert verdicts.CHOSEN_MEASURE == "own" and set(verdicts.MEASURES) == {"own", "mixed", "transfer"}
    results = [fake_result(seed=0, mixed_barrier=0.0, same_barrier=0.01, cross_barrier=0.2),
               fake_result(seed=1, mixed_barrier=0.0, same_barrier=0.03, cross_barrier=0.4, cross=-5.0)]
    v = verdicts.over_seeds(verdicts.verdict_d, results)
    n = v.numbers
    own, mixed, transfer = (n["measures"][m] for m in ("own", "mixed", "transfer"))
    assert (own["within"], own["across"]) == (0.02, 0.3) and own["seeds_separated"] == 2
    assert own["rho_recovery"] <= verdicts.RHO_PREDICTS and n["rho_barrier_recovery"] == own["rho_recovery"]
    assert (mixed["within"], mixed["across"], mixed["rho_recovery"], mixed["seeds_separated"]) == (0.0, 0.0, None, 0)
    assert (transfer["within"], transfer["across"]) == (0.0, 0.1)  # fake_result's task-NLL barrier along Mi + λΔj
    assert v.ranges["measures/own/across"] == [0.2, 0.4]
    sep = next(k for k in v.checks if "separate the stages" in k)
    rho = next(k for k in v.checks if "predicts the recovered fraction" in k)
    assert "own-stage text" in sep and v.checks[sep] is True and v.checks[rho] is True
    assert (n["max_same_stage_barrier"], n["min_cross_stage_barrier"]) == (0.02, 0.3)
    # the same world judged with flat own-text barriers: the mixed-text bump does not count
    flat = verdicts.verdict_d([fake_result(mixed_barrier=0.5, same_barrier=0.0, cross_barrier=0.0, c_barrier=0.0)])
    assert flat.checks[sep] is False and flat.checks[rho] is None
    table = claims.measure_table(v)
    assert ("| LM barrier Mi–Mj on own-stage text (claim (d)) | 0.020 (0.010–0.030) | 0.300 (0.200–0.400) | 2 of 2 |"
            in table)
    assert ("| LM barrier Mi–Mj on mixed text | 0.000 (0.000–0.000) | 0.000 (0.000–0.000) | 0 of 2 | undefined |"
            in table)
    text = claims.claim_d(v, 2)
    assert all(name in text for name in verdicts.MEASURES.values()) and "**LM barrier Mi–Mj on own-stage text**" in text


def test_demo_computes_and_reports_every_measure(tiny_demo):
    """A real (tiny) run: every scan holds both stages' paths and the own-text barrier; the report prints the
    measure table and the method note naming the chosen measure; results.json's verdict (d) holds every measure."""
    from ftjax.demo import verdicts

    summary = json.loads((tiny_demo / "results.json").read_text())
    for scan in summary["results"][0]["scans"].values():
        assert scan["barrier_own"] == max(scan["stage1"]["barrier"], scan["stage2"]["barrier"])
        assert len(scan["stage1"]["loss"]) == len(scan["stage2"]["loss"]) == len(scan["lambda"])
    d = summary["verdicts"]["d"]["numbers"]
    assert d["measure"] == verdicts.CHOSEN_MEASURE and set(d["measures"]) == set(verdicts.MEASURES)
    report = (tiny_demo / "report.md").read_text()
    assert "| measure | within a stage (nats) | across the boundary (nats) |" in report
    assert "pooled over seeds (min–max of each seed's own ρ)" in report
    assert f"{verdicts.MEASURES['own']} (claim (d))" in report
    assert "- Connectivity (claim (d)): decided before running" in report
    assert "| barrier on stage-1 text | barrier on stage-2 text |" in report


def test_control_and_predictor_figure_use_the_chosen_measure():
    """Claim (b)'s control barrier C–M5 and the predictors figure's barrier panel are claim (d)'s measure (own-stage
    text), not the mixed-text barrier, which can read 0 where the own-text barrier does not."""
    from ftjax.demo import claims, figures, verdicts

    r = fake_result(mixed_barrier=0.0, c_barrier=0.7)
    b = verdicts.verdict_b([r])
    assert b.numbers["c_barrier_m5"] == 0.7
    assert "LM barrier Mi–Mj on own-stage text for C–M5 is 0.700 nats" in claims.claim_b(b, 1)
    fig = figures.predictors(r)
    assert fig.axes[2].get_xlabel() == "LM barrier Mi–Mj on own-stage text (nats)"
    assert not fig.axes[2].texts  # the own-text barriers vary over the pairs; the mixed ones are all 0
