"""`ftjax demo`: structure, identities and reproducibility on the tiny configuration (never the scientific outcome)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

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
    assert jax.tree.structure(params) is not None


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    from ftjax.demo import run_demo

    with pytest.raises(FtjaxError, match="not empty"):
        run_demo(tmp_path, mode="tiny", quiet=True)
    with pytest.raises(FtjaxError, match="not a demo output"):
        run_demo(tmp_path, mode="tiny", overwrite=True, quiet=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"


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
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
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
