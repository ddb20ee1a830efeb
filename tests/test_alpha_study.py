"""The learned-α study's table and verdicts are computed from the numbers (issue 18); its rows are held out."""

from __future__ import annotations

import dataclasses

import pytest

from ftjax.demo import alpha_study as A
from ftjax.demo import world
from ftjax.errors import FtjaxError


def _seed(nll: dict[str, float], em: dict[str, float]) -> dict:
    """Synthetic per-seed numbers, the same for both pairs."""
    pair = {m: {"nll": nll[m], "em": em[m]} for m in A.METHODS}
    return {label: {"pair": f"{i}+D{j}", "best_alpha": 0.75, **pair} for label, (i, j) in A.PAIRS.items()}


def _numbers(learned_nll: tuple[float, float, float]) -> list[dict]:
    base = {"alpha_1": 2.0, "best_scalar": 1.5, "plain_ft": 1.0}
    return [_seed({**base, "learned": x}, {"alpha_1": 10.0, "best_scalar": 20.0, "plain_ft": 30.0, "learned": 25.0})
            for x in learned_nll]


def test_verdict_rule():
    assert A.verdict([1.0, 1.0], [2.0, 3.0], lower_is_better=True) == "helps"
    assert A.verdict([1.0, 4.0], [2.0, 3.0], lower_is_better=True) == "mixed"
    assert A.verdict([3.0, 4.0], [2.0, 3.0], lower_is_better=True) == "hurts"
    assert A.verdict([3.0, 4.0], [2.0, 3.0], lower_is_better=False) == "helps"
    assert A.verdict([2.0, 3.0], [2.0, 3.0], lower_is_better=False) == "mixed"  # ties are neither


def test_summary_table_and_verdicts_follow_the_numbers():
    s = A.summarize(_numbers((1.4, 1.2, 1.3)))
    w = s["within-stage"]
    assert w["methods"]["learned"]["nll"] == pytest.approx({"mean": 1.3, "min": 1.2, "max": 1.4})
    assert w["verdict"]["vs_best_scalar"] == {"nll": "helps", "em": "helps"}
    assert w["verdict"]["vs_plain_ft"] == {"nll": "hurts", "em": "hurts"}
    assert "| within-stage M5+DM4 | learned per-layer α | 1.300 (1.200–1.400) | 25.0 (25.0–25.0) |" in A.table(s)
    # one seed where learned α loses to the best scalar α turns "helps" into "mixed", in the lines too
    s2 = A.summarize(_numbers((1.4, 1.6, 1.3)))
    assert s2["cross-stage"]["verdict"]["vs_best_scalar"]["nll"] == "mixed"
    assert "learned α vs best single α — NLL mixed" in A.verdict_lines(s2)[1]
    assert A.findings(s) == ("Learned per-layer α beats the best single α in every seed on: within-stage M5+DM4 "
                             "(NLL), within-stage M5+DM4 (EM), cross-stage M5+DM2 (NLL), cross-stage M5+DM2 (EM); "
                             "nowhere else.")
    s3 = A.summarize([_seed({"alpha_1": 2.0, "best_scalar": 1.5, "plain_ft": 1.0, "learned": 1.5},
                            {m: 10.0 for m in A.METHODS})])
    md = A.render({"design": "d", "per_seed": [{}] * 3, "summary": s, "seconds": 1.0})
    assert A.table(s) in md and A.findings(s) in md and "(3 seeds" in md and "What it means" not in md
    noted = A.render({"design": "d", "per_seed": [{}] * 3, "summary": s, "seconds": 1.0, "interpretation": "why\n"})
    assert noted.endswith("## What it means (written after the run, from the numbers above)\n\nwhy\n")
    assert A.findings(s3).startswith("Learned per-layer α beats the best single α in every seed nowhere")


def test_calibration_rows_are_held_out_from_the_demo():
    wc = world.WorldConfig()
    demo = world.task_rows(world.Writer(wc, 3), 3)
    heldout, calib = A._task_splits(wc, 3, 64)
    assert heldout == demo["eval"]
    prompts = {r["prompt"] for r in calib}
    assert len(prompts) == 64
    assert not prompts & {r["prompt"] for r in demo["train"] + demo["eval"]}
    with pytest.raises(FtjaxError, match="n_calib 101 exceeds the 100"):
        A._task_splits(dataclasses.replace(wc), 3, 101)


def test_committed_report_and_readme_are_the_json_numbers():
    """docs/alpha_study.md is `render` of docs/alpha_study.json, and the README table quotes the same cells."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "docs/alpha_study.json").read_text())
    assert (root / "docs/alpha_study.md").read_text() == A.render(result)
    readme = (root / "README.md").read_text()
    s = result["summary"]
    metrics = (("nll", ".3f"), ("em", ".1f"))
    for m in A.METHODS:
        cells = [A._cell(s[label]["methods"][m][k], fmt) for label in A.PAIRS for k, fmt in metrics]
        assert f"| {A.LABELS[m]} | {' | '.join(cells)} |" in readme
