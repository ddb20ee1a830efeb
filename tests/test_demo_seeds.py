"""`ftjax demo`: the stage-boundary worlds, `--seeds N|list`, claim (d)'s barrier-vs-recovery test and the ranges
over seeds in the claim sentences (hand-made results; no training)."""

import pytest

from test_demo import DISAGREE, fake_result

from ftjax.errors import FtjaxError


def test_seeds_flag_takes_a_count_or_a_list():
    from ftjax.cli_args import build_parser
    from ftjax.demo import resolve_seeds

    parse = lambda *a: build_parser().parse_args(["demo", *a])  # noqa: E731
    assert parse("--seeds", "5").seeds == 5
    assert parse("--seeds", "0,1,2").seeds == (0, 1, 2)
    assert parse("--seeds", "7,").seeds == (7,)
    assert parse().seeds is None
    assert resolve_seeds(5, 2) == (2, 3, 4, 5, 6)
    assert resolve_seeds((0, 4), 2) == (0, 4)
    assert resolve_seeds(None, 2) is None
    for bad in ("0", "-1", "a", "1,1", ",", "1,x"):
        with pytest.raises(SystemExit):
            parse("--seeds", bad)


def _config_passed_to_run_seed(monkeypatch, tmp_path, argv):
    """The StudyConfig `ftjax demo ARGV` would run (run_seed stopped before any training; the seeds run in this
    process, where the stop is patched in, not in worker processes)."""
    import ftjax.demo
    from ftjax.cli import main
    from ftjax.demo import study

    seen = {}

    def stop(config, seed, *a, **k):
        seen["config"] = config
        raise RuntimeError("stopped before training")

    monkeypatch.setattr(study, "run_seed", stop)
    monkeypatch.setattr(ftjax.demo, "default_workers", lambda n: 1)
    assert main(["demo", "--out", str(tmp_path / "out"), "--quiet", *argv]) != 0
    return seen["config"]


def test_demo_flags_reach_the_study(monkeypatch, tmp_path):
    from ftjax.demo import study

    sc = _config_passed_to_run_seed(monkeypatch, tmp_path, ["--seed", "3", "--seeds", "4"])
    assert sc.seeds == (3, 4, 5, 6)
    sc = _config_passed_to_run_seed(monkeypatch, tmp_path, ["--seeds", "2,9", "--world", "gentle", "--overwrite"])
    assert sc.seeds == (2, 9) and sc.stage2 == "gentle" and sc.lr2 == study.STAGE2["gentle"][0]
    sc = _config_passed_to_run_seed(monkeypatch, tmp_path, ["--tiny", "--world", "rewarm", "--overwrite"])
    assert sc.stage2 == "rewarm" and sc.world.operand_max == study.StudyConfig.tiny().world.operand_max


def test_rewarm_world_crosses_a_harder_boundary():
    """rewarm: stage 2 re-warms above stage 1's peak on a more arithmetic mix; sizes unchanged; gentle is the first
    world (re-warm below stage 1's peak, 70 % arithmetic)."""
    from ftjax.demo import study

    quick = study.StudyConfig.quick()
    rewarm, gentle = quick.with_stage2("rewarm"), quick.with_stage2("gentle")
    assert rewarm.lr2 > rewarm.lr1 and gentle.lr2 < gentle.lr1
    assert rewarm.world.stage2_arith > gentle.world.stage2_arith
    assert (rewarm.stage1_steps, rewarm.stage2_steps, rewarm.seeds) == (quick.stage1_steps, quick.stage2_steps,
                                                                       quick.seeds)
    tc1, tc2 = study.pretrain_configs(rewarm, 0)
    assert tc2.lr == rewarm.lr2 and tc2.warmup > 0 and tc2.schedule == "linear"
    with pytest.raises(FtjaxError, match="unknown demo world 'steep'"):
        quick.with_stage2("steep")


def test_verdict_d_tests_whether_the_barrier_predicts_recovery():
    """Claim (d) computes ρ(LM barrier, recovered fraction) over pairs × seeds and judges it by RHO_PREDICTS."""
    from ftjax.demo import claims, verdicts

    # the barrier is high exactly where transfer fails (cross-stage): ρ < 0, the stages separate in every seed
    agree = verdicts.over_seeds(verdicts.verdict_d, [fake_result(seed=0), fake_result(seed=1, cross=-5.0)])
    n = agree.numbers
    assert n["rho_barrier_recovery"] is not None and n["rho_barrier_recovery"] <= verdicts.RHO_PREDICTS
    assert n["barrier_recovery_pairs"] == 40 and (n["seeds_separated"], n["seeds"]) == (2, 2)
    name = next(k for k in agree.checks if "predicts the recovered fraction" in k)
    assert agree.checks[name] is True
    text = claims.claim_d(agree, 2)
    assert "in 2 of 2 seeds" in text and f"{n['rho_barrier_recovery']:+.2f}" in text
    # the barrier is high where transfer works (same-stage): ρ > 0, the check fails, no seed separates the stages
    wrong = verdicts.verdict_d([fake_result(same_barrier=0.3, cross_barrier=0.0)])
    assert wrong.numbers["rho_barrier_recovery"] > 0 and wrong.checks[name] is False
    assert wrong.numbers["seeds_separated"] == 0
    # flat barriers (the gentle world): ρ undefined, the check is left out
    flat = verdicts.verdict_d([fake_result(**DISAGREE)])
    assert flat.numbers["rho_barrier_recovery"] is None and flat.checks[name] is None
    assert "undefined (constant barriers or recoveries)" in claims.claim_d(flat, 1)


def test_claim_sentences_print_means_with_ranges():
    """Over several seeds every mean a claim prints comes with its range over seeds, "mean (min–max)"."""
    from ftjax.demo import claims, verdicts

    results = [fake_result(seed=0, same=0.9), fake_result(seed=1, same=0.5)]
    found = verdicts.all_verdicts(results)
    a = claims.claim_a(found["a"], 2)
    # recovery of M5 + Δ4: 90 % in seed 0, 50 % in seed 1; on the seed means 70 %
    assert "recovers 70 % (50–90 %) of FT(M5)'s gain" in a
    assert found["a"].ranges["rec_M5+DM4"] == [50, 90]
    ft_m5 = results[0]["ft"]["M5"]["task"]
    assert f"FT(M5) = {ft_m5:.1f} ({ft_m5:.1f}–{ft_m5:.1f}) %" in a
    c = claims.claim_c(found["c"], 2)
    assert "% at α = 1" in c and ")–" not in c and " (" in c.split("% at α = 1")[0]
    f = claims.claim_f(found["f"], 2)
    assert "plain " in f and "–" in f.split("Direct above plain")[0]
    # one seed: the values alone, no ranges
    one = claims.claim_a(verdicts.all_verdicts(results[:1])["a"], 1)
    assert "recovers 90 % of FT(M5)'s gain" in one
