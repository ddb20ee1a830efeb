"""`ftjax demo`: structure, identities and reproducibility on the tiny configuration (never the scientific outcome)."""

import contextlib
import dataclasses
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from ftjax.demo import world
from ftjax.errors import FtjaxError

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["M0", "M1", "M2", "M3", "M4", "M5", "C"]


@pytest.fixture(scope="module")
def demo(tiny_demo):
    return tiny_demo


def test_outputs_exist(demo):
    for name in ("report.md", "results.json", "grid.png", "alpha.png", "finetune_curves.png", "lmc.png",
                 "predictors.png"):
        assert (demo / name).stat().st_size > 0, name
    report = (demo / "report.md").read_text()
    for heading in ("What was observed", "Table 3", "α sweep", "Connectivity", "Transferring-then-finetuning",
                    "Recycling"):
        assert heading in report
    for claim in ("(a)", "(b)", "(c)", "(d)", "(e)", "(f)"):
        assert f"**{claim}" in report


def test_results_are_complete_and_finite(demo):
    summary = json.loads((demo / "results.json").read_text())
    (r,) = summary["results"]
    assert r["names"] == NAMES
    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
    for table in ("base", "ft"):
        for name in NAMES:
            assert all(finite(v) for v in r[table][name].values()), (table, name)
    assert len(r["grid"]) == len(NAMES) * (len(NAMES) - 1)
    assert all(finite(v) for cell in r["grid"].values() for v in cell.values())
    assert len(r["sweep"]) == len(NAMES) * (len(NAMES) - 1)
    for sweep in r["sweep"].values():
        assert sweep["alpha"] == summary["config"]["alphas"]
        assert all(finite(v) for v in sweep["task"] + sweep["task_nll"])
    assert len(r["scans"]) == len(NAMES) * (len(NAMES) - 1) // 2
    assert all(finite(s["barrier"]) for s in r["scans"].values())
    assert all(finite(v) for v in list(r["distance"].values()) + list(r["cos"].values()))
    for mode in ("plain", "direct", "iterative"):
        assert set(r["recycle"][mode]) == {"M2", "M3", "M4", "M5"}
    # the scores are percentages, the LM losses positive
    assert all(0 <= r["grid"][k]["task"] <= 100 for k in r["grid"])
    assert all(r["base"][n]["lm"] > 0 for n in NAMES)


def test_transfer_identity_and_consistency(demo):
    """Mi + Δi == FT(Mi) exactly; at α = 1 the sweep equals the grid cell; α = 0 gives the target's own score."""
    (r,) = json.loads((demo / "results.json").read_text())["results"]
    assert all(v == 0.0 for v in r["identity_max_abs"].values())
    for key, sweep in r["sweep"].items():
        target = key.split("+")[0]
        assert sweep["task"][sweep["alpha"].index(1.0)] == pytest.approx(r["grid"][key]["task"])
        assert sweep["task"][sweep["alpha"].index(0.0)] == pytest.approx(r["base"][target]["task"])
    # Δ of a version with itself is zero length; each version's diff cosine with itself would be 1
    assert all(r["delta_norm"][n] > 0 for n in NAMES)
    # direct recycling for M2 starts from M2 + Δ1, the same run as transfer-then-finetune (M2, M1)
    assert r["recycle"]["direct"]["M2"]["final"] == r["recycle"]["iterative"]["M2"]["final"]


def test_checkpoints_are_hf_directories(demo, tmp_path):
    """Every kept model loads through the public API; streaming M5 + (FT(M5) − M5) reproduces FT(M5) bit for bit;
    the public evaluator scores the saved transfer exactly as the report does."""
    from ftjax.data import examples_from_rows, load_tokenizer, read_jsonl
    from ftjax.evaluate import evaluate_loss
    from ftjax.params import flatten, load_params
    from ftjax.transfer import transfer

    seed = demo / "seed0"
    for sub in [f"models/{n}" for n in NAMES] + [f"ft/{n}" for n in NAMES] + ["transfers/M5+DM4",
                                                                               "recycle/M5_star"]:
        assert (seed / sub / "config.json").is_file() and (seed / sub / "tokenizer.json").is_file(), sub
    transfer(seed / "models/M5", seed / "ft/M5", seed / "models/M5", tmp_path / "t", progress=False)
    (_, got), (_, want) = load_params(tmp_path / "t"), load_params(seed / "ft/M5")
    for name, x in flatten(want).items():
        np.testing.assert_array_equal(np.asarray(flatten(got)[name]), np.asarray(x), err_msg=name)
    cfg, params = load_params(seed / "transfers/M5+DM4")
    rows = read_jsonl(seed / "data/eval.jsonl")
    examples = examples_from_rows(rows, load_tokenizer(seed / "transfers/M5+DM4"))
    score = evaluate_loss(params, cfg, examples, batch_size=len(examples))
    (r,) = json.loads((demo / "results.json").read_text())["results"]
    assert 100 * score["exact_match"] == pytest.approx(r["grid"]["M5+DM4"]["task"])
    # the saved transfer is M5 + (FT(M4) - M4), the float64 formula rounded once to float32
    (_, m5), (_, ft4), (_, m4) = (load_params(seed / d) for d in ("models/M5", "ft/M4", "models/M4"))
    m5, ft4, m4 = flatten(m5), flatten(ft4), flatten(m4)
    saved = flatten(params)
    assert set(saved) == set(m5)
    for name, t in m5.items():
        want = (np.asarray(t, np.float64) + (np.asarray(ft4[name], np.float64) - np.asarray(m4[name], np.float64)))
        np.testing.assert_array_equal(np.asarray(saved[name]), want.astype(np.float32), err_msg=name)


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    from ftjax.demo import run_demo

    with pytest.raises(FtjaxError, match="not empty"):
        run_demo(tmp_path, mode="tiny", quiet=True)
    with pytest.raises(FtjaxError, match="holds keep.txt, which ftjax did not write"):
        run_demo(tmp_path, mode="tiny", overwrite=True, quiet=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def _replay_seeds(monkeypatch, demo):
    """study.run_seed replaced by a replay of the tiny demo's results (it writes one file under seed<k>/, as a
    real seed would, and trains nothing)."""
    from ftjax.demo import study

    (recorded,) = json.loads((demo / "results.json").read_text())["results"]

    def replay(config, seed, out, **kwargs):
        out.mkdir(parents=True)
        (out / "weights.bin").write_bytes(b"0")
        return dict(recorded, seed=seed)

    monkeypatch.setattr(study, "run_seed", replay)


def test_failed_report_leaves_a_folder_overwrite_replaces(demo, tmp_path, monkeypatch, capsys):
    """A run that fails after results.json is written says so in one line, exits non-zero and leaves a folder whose
    record lists everything in it: --overwrite replaces it, a file the user added later is refused and kept, and a
    successful run's record lists exactly what it wrote."""
    from ftjax.cli import main
    from ftjax.demo import RECORD, figures, run_demo

    _replay_seeds(monkeypatch, demo)
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise RuntimeError("renderer broke")

    with monkeypatch.context() as m:
        m.setattr(figures, "predictors", broken)
        assert main(["demo", "--tiny", "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "writing the report" in err and "renderer broke" in err and "--overwrite" in err and str(out) in err
    assert (out / "results.json").exists() and (out / "grid.png").exists() and not (out / "report.md").exists()
    listed = set(json.loads((out / RECORD).read_text())["files"])
    assert {p.name for p in out.iterdir()} <= listed

    (out / "notes.txt").write_text("mine")  # the user's own file: never deleted
    with pytest.raises(FtjaxError, match="holds notes.txt"):
        run_demo(out, mode="tiny", overwrite=True, quiet=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()

    run_demo(out, mode="tiny", overwrite=True, quiet=True)
    assert (out / "report.md").stat().st_size > 0
    assert {p.name for p in out.iterdir()} == set(json.loads((out / RECORD).read_text())["files"])
    assert figures.plots(tmp_path, json.loads((out / "results.json").read_text())) == list(figures.PNGS)


def test_refusals_come_before_the_old_output_is_removed(demo, tmp_path, monkeypatch):
    """An unknown mode, world or seed count with --overwrite keeps the earlier output it would have replaced."""
    from ftjax.demo import run_demo

    _replay_seeds(monkeypatch, demo)
    out = tmp_path / "out"
    run_demo(out, mode="tiny", quiet=True)
    before = sorted(p.name for p in out.iterdir())
    for bad in (dict(mode="huge"), dict(world="cliff"), dict(seeds=0)):
        with pytest.raises(FtjaxError):
            run_demo(out, mode=bad.pop("mode", "tiny"), overwrite=True, quiet=True, **bad)
        assert sorted(p.name for p in out.iterdir()) == before, bad


def test_world_is_deterministic_and_tokenizer_matches():
    cfg = world.WorldConfig()
    a = world.corpus(world.Writer(cfg, 0), 2, 64, __import__("random").Random("x"))
    b = world.corpus(world.Writer(cfg, 0), 2, 64, __import__("random").Random("x"))
    np.testing.assert_array_equal(a.tokens_nt, b.tokens_nt)
    assert a.tokens_nt.shape == (64, cfg.row_len)
    tok = world.make_tokenizer()
    text = "Q: what is 23 plus 14? A: 37"
    enc = tok.encode(text + world.EOS)
    assert enc.ids == [world.BOS_ID, *world.encode(text).tolist(), world.EOS_ID]
    assert tok.decode(enc.ids) == text
    rows = world.task_rows(world.Writer(cfg, 0), 0)
    train = {r["prompt"] for r in rows["train"]}
    assert not train & {r["prompt"] for r in rows["eval"]}  # held-out pairs never fine-tuned on
    assert len(rows["eval"]) == cfg.eval_pairs and len(rows["train"]) == cfg.ft_pairs


def test_readme_demo_command_help():
    for cmd in ([sys.executable, "scripts/transfer.py", "--demo", "--help"],
                [sys.executable, "-m", "ftjax.cli", "demo", "--help"]):
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "--full" in done.stdout and "--out" in done.stdout


def test_checkpoints_load_in_transformers(demo):
    """The demo's directories are ordinary Hugging Face models: transformers loads model and tokenizer, and its
    logits match ftjax's forward pass."""
    from ftjax.model import forward
    from ftjax.params import load_params

    path = demo / "seed0/models/M5"
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("Q: what is 3 plus 4? A:")["input_ids"]
    assert ids[0] == world.BOS_ID and tok.decode(ids, skip_special_tokens=True) == "Q: what is 3 plus 4? A:"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits.numpy()
    cfg, params = load_params(path)
    got = np.asarray(forward(params, np.asarray([ids], np.int32), cfg))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------- verdicts
STAGE1, STAGE2 = ("M1", "M2", "M3"), ("M4", "M5")
CORE = STAGE1 + STAGE2


def same_stage(i, j):
    return (i in STAGE1) == (j in STAGE1)


def fake_result(*, same=0.95, cross=-10.0, m0=1.0, gain=True, same_barrier=0.0, cross_barrier=0.2, c_barrier=1.0,
                tft_delta=5.0, tft_steps=30, recycle=(3.0, 4.0), alpha_best=None, seed=0, mixed_barrier=None):
    """A hand-made per-seed result with the keys the verdicts read. same: share of FT's gain a same-stage diff
    recovers; cross: EM points a cross-stage diff adds; m0: EM points M0 + Δj gains; gain: whether FT gains at all;
    recycle: (direct, iterative) − plain; alpha_best: EM of the best α point (default: the α = 1 score);
    *_barrier: LM barriers on own-stage text (claim (d)'s measure); mixed_barrier: the mixed-text LM barrier of
    every pair (default: the same as on own-stage text)."""
    base = {"M0": 0.0, "M1": 10.0, "M2": 15.0, "M3": 20.0, "M4": 60.0, "M5": 65.0, "C": 10.0}
    ft = {n: (b + (20.0 if n == "M0" else 15.0 if n in STAGE2 else 30.0)) if gain else b for n, b in base.items()}
    row = lambda task: {"task": task, "task_nll": 1.0, "probe": 50.0, "lm1": 3.0, "lm2": 3.0, "lm": 3.0}  # noqa: E731
    grid = {}
    for i in NAMES:
        for j in NAMES:
            if i == j:
                continue
            if i in CORE and j in CORE:
                task = base[i] + (same * (ft[i] - base[i]) if same_stage(i, j) else cross)
            elif i == "M0":
                task = base[i] + m0
            else:
                task = base[i]
            grid[f"{i}+D{j}"] = row(task)
    sweep = {}
    for k, g in grid.items():
        at1 = g["task"]
        best = at1 if alpha_best is None or k not in ("M5+DM4", "M4+DM5") else alpha_best
        sweep[k] = {"alpha": [0.0, 0.5, 1.0, 2.0], "task": [base[k.split("+")[0]], best, at1, at1 - 5],
                    "task_nll": [1.0] * 4, "barrier": 0.0 if same_stage(k[:2], k[-2:]) else 0.1,
                    "barrier_lambda": None, "barrier_note": "no interior λ above the line"}
    scans, dist, cos = {}, {}, {}
    for a_i, a in enumerate(NAMES):
        for b in NAMES[a_i + 1:]:
            if "C" in (a, b):
                bar = c_barrier
            elif "M0" in (a, b):
                bar = 0.3
            else:
                bar = same_barrier if same_stage(a, b) else cross_barrier
            mixed = bar if mixed_barrier is None else mixed_barrier
            scans[f"{a}-{b}"] = {"lambda": [0.0, 0.5, 1.0], "loss": [3.0, 3.0 + mixed, 3.0], "barrier": mixed,
                                 "barrier_lambda": 0.5 if mixed > 0 else None, "barrier_note": None,
                                 "mid_excess": mixed, "barrier_own": bar, "barrier_own_stage": 1}
            near = "C" not in (a, b) and "M0" not in (a, b) and same_stage(a, b)
            dist[f"{a}-{b}"], cos[f"{a}-{b}"] = (1.0, 0.9) if near else (3.0, 0.3)
    adjacent = [(i, j) for i in CORE for j in CORE if abs(int(i[1]) - int(j[1])) == 1]
    tft = {f"{i}+D{j}": {"final": ft[i] + tft_delta, "start": grid[f"{i}+D{j}"]["task"], "steps_to_ft": tft_steps}
           for i, j in adjacent}
    tft.update({f"FT({i})": {"final": ft[i], "start": base[i], "steps_to_ft": 90} for i in CORE})
    rec = {"plain": {}, "direct": {}, "iterative": {}}
    for i in ("M2", "M3", "M4", "M5"):
        for mode, d in zip(rec, (0.0, *recycle)):
            rec[mode][i] = {"final": ft[i] + d, "start": base[i], "steps_to_ft": 90}
    return {"seed": seed, "names": list(NAMES), "base": {n: row(v) for n, v in base.items()},
            "ft": {n: row(v) for n, v in ft.items()}, "grid": grid, "sweep": sweep, "scans": scans,
            "distance": dist, "cos": cos, "tft": tft, "recycle": rec}


AGREE = dict()
DISAGREE = dict(same=0.0, cross=7.5, m0=10.0, same_barrier=0.0, cross_barrier=0.0, c_barrier=0.0, tft_delta=-5.0,
                tft_steps=None, recycle=(-3.0, -4.0))


@pytest.mark.parametrize("claim", list("abcdef"))
def test_verdicts_agree_and_disagree_on_hand_made_results(claim):
    from ftjax.demo import verdicts

    assert verdicts.CLAIMS[claim]([fake_result(**AGREE)]).verdict == verdicts.AGREES
    assert verdicts.CLAIMS[claim]([fake_result(**DISAGREE)]).verdict == verdicts.DISAGREES


def test_verdict_a_thresholds_and_undefined():
    from ftjax.demo import verdicts

    v = verdicts.verdict_a([fake_result(same=0.7)])
    # M5: base 65, FT 80, M5 + Δ4 = 65 + 0.7·15 = 75.5 -> 70 %; M4 likewise
    assert v.numbers["M5+DM4"] == 75.5 and v.numbers["rec_M5+DM4"] == 70 and v.numbers["rec_mean"] == 70
    assert v.verdict == verdicts.PARTLY
    assert v.numbers["paper_rec_M5+DM4"] == 116 and v.numbers["paper_rec_M4+DM5"] == 75
    assert verdicts.verdict_a([fake_result(gain=False)]).verdict == verdicts.UNJUDGED


def test_verdict_f_the_m5_case():
    """plain 66.0, direct 62.0, iterative 65.3 for M5 is not "both above plain": partly, with M3 and M4 agreeing."""
    from ftjax.demo import claims, verdicts

    r = fake_result()
    for mode, value in (("plain", 66.0), ("direct", 62.0), ("iterative", 65.3)):
        r["recycle"][mode]["M5"]["final"] = value
    r["ft"]["M5"]["task"] = 66.0
    v = verdicts.verdict_f([r])
    assert v.checks == {"M3: plain < direct ≤ iterative": True, "M4: plain < direct ≤ iterative": True,
                        "M5: plain < direct ≤ iterative": False}
    assert v.verdict == verdicts.PARTLY
    text = claims.claim_f(v, 1)
    assert "M5: plain 66.0, direct 62.0, iterative 65.3" in text and text.endswith("Verdict: **partly agrees**.")


def test_verdict_f_compares_printed_numbers():
    """62.04 and 62.0 print alike, so direct is not above plain although the unrounded value is."""
    from ftjax.demo import verdicts

    r = fake_result(recycle=(3.0, 4.0))
    r["recycle"]["plain"]["M4"]["final"], r["recycle"]["direct"]["M4"]["final"] = 62.0, 62.04
    assert verdicts.verdict_f([r]).checks["M4: plain < direct ≤ iterative"] is False


def test_partial_verdicts():
    from ftjax.demo import verdicts

    # (b): proximity holds (cross −10 < same 95 %) but no transfer onto M0 is judged a failure (M0 gains 10)
    assert verdicts.verdict_b([fake_result(m0=10.0)]).verdict == verdicts.PARTLY
    # (c): only M5 + α·Δ4 comes near FT(M5) (at α = 0.5), M4 + α·Δ5 stays at 0 % recovery
    r = fake_result(same=0.0)
    r["sweep"]["M5+DM4"]["task"][1] = 78.0
    v = verdicts.verdict_c([r])
    assert v.numbers["M5+DM4"]["best_alpha"] == 0.5 and v.numbers["M4+DM5"]["best_alpha"] == 1.0
    assert v.verdict == verdicts.PARTLY
    # (d): stages separated by barrier, but the control is as connected as the run
    assert verdicts.verdict_d([fake_result(c_barrier=0.0)]).verdict == verdicts.PARTLY
    # (e): ends above FT(Mi) but never reaches its score sooner
    assert verdicts.verdict_e([fake_result(tft_steps=None)]).verdict == verdicts.PARTLY
    # nothing learned: (e) and (f) cannot be judged rather than "do not agree"
    assert verdicts.verdict_e([fake_result(gain=False)]).verdict == verdicts.UNJUDGED
    assert verdicts.verdict_f([fake_result(gain=False)]).verdict == verdicts.UNJUDGED


def test_verdicts_use_seed_means():
    """Two seeds: the verdict is computed from the seed means the tables print."""
    from ftjax.demo import verdicts

    a, b = fake_result(same=1.0, seed=0), fake_result(same=0.0, seed=1)
    v = verdicts.verdict_a([a, b])
    assert v.numbers["M5+DM4"] == 72.5 and v.numbers["rec_mean"] == 50 and v.verdict == verdicts.PARTLY


def test_best_alpha_prefers_one_on_ties():
    from ftjax.demo.verdicts import best_alpha

    assert best_alpha([0.0, 0.5, 1.0, 2.0], [3.0, 3.0, 3.0, 1.0]) == (3.0, 1.0)
    assert best_alpha([0.0, 0.75, 1.25, 2.0], [1.0, 4.0, 4.0, 0.0]) == (4.0, 0.75)


def test_report_verdicts_match_results_json(demo):
    """Every verdict is re-derived from results.json, equals the stored one, and the report prints that claim text
    (whose verdict word is the derived one) and no other verdict."""
    from ftjax.demo import claims, verdicts

    summary = json.loads((demo / "results.json").read_text())
    report = (demo / "report.md").read_text()
    derived = verdicts.all_verdicts(summary["results"])
    assert set(derived) == set("abcdef")
    lines = [line for line in report.splitlines() if line.startswith("- **(")]
    assert len(lines) == 6
    for (key, v), line in zip(sorted(derived.items()), lines):
        assert json.loads(json.dumps(dataclasses.asdict(v))) == summary["verdicts"][key], key
        text = claims.RENDER[key](v, len(summary["results"]))
        assert line == f"- {text}", key
        assert line.startswith(f"- **({key})") and line.endswith(f"Verdict: **{v.verdict}**.")
        others = [w for w in verdicts.VERDICTS if w != v.verdict]
        assert not any(f"Verdict: **{w}**" in line for w in others)


def test_report_stands_alone(demo):
    """No reference to files or work outside the repository, barrier text with its citations."""
    report = (demo / "report.md").read_text()
    for phrase in ("demo-spike", "prototype", ".md)", "tuning notes"):
        assert phrase not in report, phrase
    assert "Entezari et al. 2022" in report and "Frankle et al. 2020" in report
    for path in sorted((ROOT / "ftjax" / "demo").glob("*.py")):
        text = path.read_text()
        assert "demo-spike" not in text and "prototype" not in text, path.name


# ---------------------------------------------------------------------------------------------------------- progress
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal():
    from ftjax.demo.progress import Progress

    for enabled, stream, drawn in ((True, _Terminal(), True), (True, io.StringIO(), False),
                                   (False, _Terminal(), False)):
        with Progress(enabled, stream).stage("seed 0: pretraining", 20, "step") as tick:
            for _ in range(4):
                tick(5)
        out = stream.getvalue()
        assert ("seed 0: pretraining" in out and "20/20" in out and "<" in out) == drawn, (enabled, out)


# ---------------------------------------------------------------------------------------------------------- barriers
def test_demo_under_the_barrier_contract_and_with_progress(tmp_path, monkeypatch, capfd):
    """The demo stores what lmc.barriers returns for each scan (None λ and its note where there is no barrier),
    prints "–" and the note, and every stage's progress bar reaches its total; nothing is drawn on a non-terminal
    stderr."""
    from ftjax import lmc
    from ftjax.demo import progress, run_demo

    stages = []
    real = progress.Progress.stage

    def recording(self, desc, total, unit="it"):
        stages.append({"desc": desc, "total": total, "done": 0})
        ctx = real(self, desc, total, unit)
        with ctx as tick:
            def count(n):
                stages[-1]["done"] += n
                tick(n)
            yield count

    monkeypatch.setattr(progress.Progress, "stage", contextlib.contextmanager(recording))
    run_demo(tmp_path / "out", mode="tiny")
    err = capfd.readouterr().err
    assert "%|" not in err and "it/s" not in err  # stderr is not a terminal here
    assert len(stages) == 7 and all(s["done"] == s["total"] > 0 for s in stages), stages
    (r,) = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    for scan in r["scans"].values():
        b = lmc.barriers(scan["lambda"], scan["loss"])
        assert (scan["barrier"], scan["barrier_lambda"], scan["barrier_note"]) == (
            b["barrier_linear"], b["barrier_linear_lambda"], b["barrier_linear_note"])
    flat = [s for s in r["scans"].values() if s["barrier"] == 0.0]
    assert flat and all(s["barrier_lambda"] is None and s["barrier_note"] for s in flat)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| – |" in report and all(s["barrier_note"] in report for s in flat)


# ---------------------------------------------------------------------------------------------------------- figures
def test_predictors_figure_has_a_legend_and_says_when_no_barrier():
    from ftjax.demo import figures

    fig = figures.predictors(fake_result(same_barrier=0.0, cross_barrier=0.0))
    axes = fig.axes
    labels = [t.get_text() for t in axes[-1].get_legend().get_texts()]
    assert labels == [f"target {n}" for n in CORE]
    assert any("no barrier on any path" in t.get_text() for t in axes[2].texts)
    assert not any("no barrier" in t.get_text() for t in axes[0].texts)
    fig = figures.predictors(fake_result())
    assert not fig.axes[2].texts


# ---------------------------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("claim", list("abcdef"))
def test_verdicts_over_seeds_all_some_none(claim):
    """Each claim is decided in every seed alone: agrees in all -> agrees, in some -> partly, in none -> does not."""
    from ftjax.demo import verdicts

    good = [fake_result(**AGREE, seed=s) for s in range(3)]
    bad = [fake_result(**DISAGREE, seed=s) for s in range(3)]
    fn = verdicts.CLAIMS[claim]
    for results, want, agreeing in ((good, verdicts.AGREES, 3), (bad, verdicts.DISAGREES, 0),
                                    (good[:2] + bad[2:], verdicts.PARTLY, 2)):
        v = verdicts.over_seeds(fn, results)
        assert v.verdict == want and verdicts.seeds_agreeing(v) == agreeing, (claim, want)
        assert list(v.per_seed) == ["0", "1", "2"]
        assert v.numbers == fn(results).numbers  # the printed numbers stay the seed means
    assert verdicts.all_verdicts(good)[claim].verdict == verdicts.AGREES


def test_seed_rule():
    from ftjax.demo.verdicts import AGREES, DISAGREES, PARTLY, UNJUDGED, seed_rule

    assert seed_rule([AGREES, AGREES, UNJUDGED]) == AGREES
    assert seed_rule([DISAGREES, DISAGREES]) == DISAGREES
    assert seed_rule([AGREES, DISAGREES, DISAGREES]) == PARTLY
    assert seed_rule([PARTLY, PARTLY]) == PARTLY  # holding partly in each seed is not holding in every seed
    assert seed_rule([UNJUDGED, UNJUDGED]) == UNJUDGED
    assert seed_rule([PARTLY]) == PARTLY  # one seed: its own verdict


def test_claim_text_lists_per_seed_verdicts():
    from ftjax.demo import claims, verdicts

    results = [fake_result(seed=0), fake_result(seed=1), fake_result(**DISAGREE, seed=2)]
    v = verdicts.over_seeds(verdicts.verdict_e, results)
    text = claims.claim_e(v, 3)
    assert "seed 0: agrees; seed 1: agrees; seed 2: does not agree; agrees in 2, does not agree in 1 of 3 seeds" in text
    assert verdicts.SEED_RULE in text and text.endswith("Verdict: **partly agrees**.")


def test_sensitivity_is_measured(demo):
    """M5 + Δ4 as the grid scores it is the sensitivity baseline; the report states the measured changes."""
    summary = json.loads((demo / "results.json").read_text())
    report = (demo / "report.md").read_text()
    for r in summary["results"]:
        s = r["sensitivity"]
        assert s["float32"] == pytest.approx(r["grid"]["M5+DM4"]["task"])
        assert all(0 <= v <= 100 for v in s.values())
        assert f"seed {r['seed']}: {s['float32']:.1f}" in report
    assert "## Method notes: what the outcome is sensitive to" in report
    assert "Evaluation dtype" in report and "Fine-tuning schedule" in report


def test_report_over_several_seeds(demo, tmp_path):
    """The report of several seeds (the tiny run's seed repeated with shifted scores): table cells are
    "mean (min–max)", each claim lists its per-seed verdicts, results.json keeps each seed's numbers."""
    from ftjax.demo import report

    summary = json.loads((demo / "results.json").read_text())
    first = summary["results"][0]
    second = json.loads(json.dumps(first))
    second["seed"] = first["seed"] + 1
    second["base"]["M5"]["task"] = first["base"]["M5"]["task"] + 10.0
    out = tmp_path / "two"
    out.mkdir()
    got = report.write(out, summary["config"], [first, second], seconds=1.0)
    text = (out / "report.md").read_text()
    b = first["base"]["M5"]["task"]
    assert f"{b + 5:.1f} ({b:.1f}–{b + 10:.1f})" in text and "mean (min–max) over 2 seeds" in text
    assert "±" not in text
    claim_lines = [line for line in text.splitlines() if line.startswith("- **(")]
    assert len(claim_lines) == 6 and all(f"seed {second['seed']}: " in line for line in claim_lines)
    assert [r["seed"] for r in json.loads((out / "results.json").read_text())["results"]] == [0, 1]
    assert got["verdicts"]["a"]["per_seed"].keys() == {"0", "1"}
    assert (out / "grid.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------- README
def _readme_demo_rows(text: str) -> dict[str, str]:
    """The demo section's table rows `| name | value |` (README.md, between "## The demo" and the next "## ")."""
    section = text.split("## The demo\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        separator = cells and set(cells[0]) == {"-"}
        if len(cells) == 2 and not separator:
            rows[cells[0]] = cells[1]
    return rows


def _check_quoted(rows: dict[str, str], numbers: dict) -> None:
    """Every number the table quotes equals docs/demo_results.json's; every quoted quantity is there."""
    import re

    for name, cell in numbers["task_em"].items():
        got = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", rows[name])]
        assert got == [cell["mean"], cell["min"], cell["max"]], name
    for k, v in numbers["verdicts"].items():
        assert rows[f"({k})"] == f"{v['verdict']} ({v['tally']})", k
        assert v["agree"] == sum(w == "agrees" for w in v["per_seed"].values()) and v["of"] == len(v["per_seed"])
    header = [k for k in rows if k.startswith("task exact match %")]
    assert header == [f"task exact match %, mean (min–max) over {len(numbers['seeds'])} seeds"]


def test_readme_quotes_the_committed_demo_numbers():
    """The README's demo numbers are those of docs/demo_results.json, which scripts/demo_figures.py wrote from the
    run that made docs/demo_grid.png."""
    numbers = json.loads((ROOT / "docs" / "demo_results.json").read_text())
    assert len(numbers["seeds"]) >= 3
    rows = _readme_demo_rows((ROOT / "README.md").read_text())
    _check_quoted(rows, numbers)
    assert (ROOT / "docs" / "demo_grid.png").stat().st_size > 0


def test_demo_figures_script(demo, tmp_path):
    """scripts/demo_figures.py RUN_DIR writes the grid and the numbers, and prints a table that quotes them; a
    directory without results.json is a one-line error."""
    done = subprocess.run([sys.executable, "scripts/demo_figures.py", str(demo), "--docs", str(tmp_path / "docs")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    numbers = json.loads((tmp_path / "docs" / "demo_results.json").read_text())
    r = json.loads((demo / "results.json").read_text())["results"][0]
    assert numbers["task_em"]["M5 + Δ4"]["mean"] == round(r["grid"]["M5+DM4"]["task"], 1)
    assert (tmp_path / "docs" / "demo_grid.png").stat().st_size > 0
    _check_quoted(_readme_demo_rows("## The demo\n" + done.stdout), numbers)
    bad = subprocess.run([sys.executable, "scripts/demo_figures.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "results.json not found" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_seeds_run_concurrently_give_the_sequential_results(demo, tmp_path):
    """Seeds 0 and 1 in two worker processes: seed 0's results (every number but the stage times) equal the
    in-process sequential run's bit for bit, seed 1 differs, and the report covers both in seed order."""
    from ftjax.demo import run_demo

    summary = run_demo(tmp_path / "out", mode="tiny", seeds=(0, 1), workers=2, quiet=True)
    (sequential,) = json.loads((demo / "results.json").read_text())["results"]
    concurrent = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert [r["seed"] for r in concurrent] == [r["seed"] for r in summary["results"]] == [0, 1]
    strip = lambda r: {k: v for k, v in r.items() if k != "timing"}  # noqa: E731
    assert strip(concurrent[0]) == strip(sequential)
    assert strip(concurrent[1])["grid"] != strip(sequential)["grid"]
    assert (tmp_path / "out" / "seed1" / "models" / "M5" / "config.json").exists()


def test_default_workers_one_per_seed_up_to_cores_plus_one(monkeypatch):
    from ftjax.demo import default_workers

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert [default_workers(n) for n in (1, 2, 3, 5)] == [1, 2, 3, 3]
