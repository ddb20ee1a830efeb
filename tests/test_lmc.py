"""lmc: one compilation for every λ, endpoints equal direct evaluation, paths, barriers, sharding, refusals, CLI."""

import json

import jax
import numpy as np
import pytest

from ftjax import lmc
from ftjax.cli import main
from ftjax.data import examples_from_rows
from ftjax.errors import FtjaxError
from ftjax.evaluate import evaluate_loss
from ftjax.params import load_params, make_mesh
from hf_models import make_hf_model, make_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmc")
    dirs = {k: make_hf_model(root / k, seed=i, std=0.08) for i, k in enumerate(("a", "b", "c"))}
    make_tokenizer(dirs["a"])
    return dirs


@pytest.fixture(scope="module")
def loaded(models):
    return {k: load_params(v) for k, v in models.items()}


@pytest.fixture(scope="module")
def examples():
    rng = np.random.default_rng(0)  # lengths <= 16: one bucket shape, so one compilation in all
    return examples_from_rows([{"input_ids": rng.integers(0, 128, int(n)).tolist()} for n in rng.integers(3, 16, 6)])


def params_of(loaded, k):
    return loaded[k][1]


def test_one_compilation_for_all_lambdas(loaded, examples, count_calls):
    cfg, a = loaded["a"]
    b = params_of(loaded, "b")
    jax.clear_caches()
    traced = count_calls(lmc, "row_stats")  # called by the jitted evaluator only while it is traced
    result = lmc.scan(a, b, cfg, examples, lmc.grid(7), batch_size=4)
    assert traced["n"] == 1 and len(result["loss"]) == 7
    lmc.scan(a, b, cfg, examples, [0.0, 0.3, 1.0, 2.5], batch_size=4)  # new λ values: still no new trace
    assert traced["n"] == 1


def test_endpoints_and_midpoint_equal_direct_evaluation(loaded, examples):
    cfg, a = loaded["a"]
    b = params_of(loaded, "b")
    result = lmc.scan(a, b, cfg, examples, [0.0, 0.5, 1.0], batch_size=4)
    mid = jax.tree.map(lambda x, y: 0.5 * x + 0.5 * y, a, b)
    for lam, params in zip(result["lambda"], (a, mid, b)):
        want = evaluate_loss(params, cfg, examples, batch_size=4)["loss"]
        assert abs(result["loss"][result["lambda"].index(lam)] - want) < 1e-6
    assert result["tokens"] == sum(len(e.tokens_t) - 1 for e in examples)


def test_along_diff_and_plane_paths(loaded, examples):
    cfg, t = loaded["a"]
    f, s = params_of(loaded, "b"), params_of(loaded, "c")
    along = lmc.scan_along_diff(t, f, s, cfg, examples, [0.0, 1.0], batch_size=4)
    transferred = jax.tree.map(lambda x, y, z: x + (y - z), t, f, s)
    assert abs(along["loss"][0] - evaluate_loss(t, cfg, examples, batch_size=4)["loss"]) < 1e-6
    assert abs(along["loss"][1] - evaluate_loss(transferred, cfg, examples, batch_size=4)["loss"]) < 1e-5
    assert along["path"] == "diff" and "barrier_linear" in along

    a, b, c = t, f, s
    res = lmc.plane(a, b, c, cfg, examples, [0.0, 1.0], [0.0, 0.5, 1.0], batch_size=4)
    assert np.shape(res["loss"]) == (3, 2)
    direct = {k: evaluate_loss(p, cfg, examples, batch_size=4)["loss"] for k, p in (("a", a), ("b", b), ("c", c))}
    assert abs(res["loss"][0][0] - direct["a"]) < 1e-6
    assert abs(res["loss"][0][1] - direct["b"]) < 1e-6
    assert abs(res["loss"][2][0] - direct["c"]) < 1e-6
    flat = lambda p: np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)]).astype(np.float64)  # noqa: E731
    ab, ac = flat(b) - flat(a), flat(c) - flat(a)
    assert abs(res["norm_ab"] - np.linalg.norm(ab)) < 1e-4 * np.linalg.norm(ab)
    assert abs(res["cos_ab_ac"] - ab @ ac / np.linalg.norm(ab) / np.linalg.norm(ac)) < 1e-4


LAM5 = [0.0, 0.25, 0.5, 0.75, 1.0]


def no_barrier(got, name, note):
    assert got[name] == 0.0 and got[f"{name}_lambda"] is None and note in got[f"{name}_note"]


def test_falling_loss_has_no_barrier():
    # the case: the loss only falls, so the highest point (2.6 nats above nothing) is model A itself
    got = lmc.barriers(LAM5, [5.2, 4.4, 3.8, 3.2, 2.6])  # straight line 5.2 - 2.6λ: gaps -0.15, -0.1, -0.05
    no_barrier(got, "barrier_linear", "never rises above the straight line")
    no_barrier(got, "barrier_mean", "highest at an endpoint (λ = 0)")
    straight = lmc.barriers(np.linspace(0, 1, 11), [3 - 0.1 * i for i in range(11)])  # gaps are float64 rounding
    assert straight["barrier_linear_lambda"] is None and straight["barrier_mean_lambda"] is None


def test_symmetric_bump():
    # both baselines are 1.0 at λ = 0.5; the peak 2.0 is 1.0 above them
    got = lmc.barriers(LAM5, [1.0, 1.5, 2.0, 1.5, 1.0])
    assert got == pytest.approx({"barrier_linear": 1.0, "barrier_linear_lambda": 0.5, "barrier_linear_note": None,
                                 "barrier_mean": 1.0, "barrier_mean_lambda": 0.5, "barrier_mean_note": None})


def test_asymmetric_bump_linear_and_mean_differ():
    loss = [1.0, 2.5, 2.9, 3.2, 3.0]
    # linear: baseline 1 + 2λ = 1.5, 2.0, 2.5 inside, gaps 1.0, 0.9, 0.7 -> 1.0 at λ = 0.25
    # mean: max L = 3.2 at λ = 0.75 > max(L(0), L(1)) = 3.0, so 3.2 - (1.0 + 3.0)/2 = 1.2 at λ = 0.75
    got = lmc.barriers(LAM5, loss)
    assert got == pytest.approx({"barrier_linear": 1.0, "barrier_linear_lambda": 0.25, "barrier_linear_note": None,
                                 "barrier_mean": 1.2, "barrier_mean_lambda": 0.75, "barrier_mean_note": None})


def test_concave_monotone_loss_has_only_a_linear_barrier():
    # straight line 3 - λ = 2.75, 2.5, 2.25 inside; gaps 0.15, 0.2, 0.15 -> 0.2 at λ = 0.5
    got = lmc.barriers(LAM5, [3.0, 2.9, 2.7, 2.4, 2.0])
    assert got["barrier_linear"] == pytest.approx(0.2) and got["barrier_linear_lambda"] == 0.5
    assert got["barrier_linear_note"] is None
    no_barrier(got, "barrier_mean", "highest at an endpoint (λ = 0)")  # the loss falls all the way
    # the old test curve: the loss ties its maximum 3.0 at λ = 0.75 and at λ = 1, so the maximum is an endpoint
    old = lmc.barriers(LAM5, [1.0, 1.2, 1.5, 3.0, 3.0])
    assert old["barrier_linear"] == pytest.approx(0.5) and old["barrier_linear_lambda"] == 0.75
    no_barrier(old, "barrier_mean", "highest at an endpoint (λ = 1)")
    no_barrier(lmc.barriers([0.0, 0.5, 1.0], [2.0, 1.0, 2.0]), "barrier_mean", "both endpoints")


def test_points_outside_the_segment_never_count():
    lam = [-0.5, 0.0, 0.5, 1.0, 1.5]
    bump = lmc.barriers(lam, [9.0, 1.0, 2.0, 1.0, 9.0])  # 9.0 outside [0, 1] is higher than the bump 2.0
    assert bump == pytest.approx({"barrier_linear": 1.0, "barrier_linear_lambda": 0.5, "barrier_linear_note": None,
                                  "barrier_mean": 1.0, "barrier_mean_lambda": 0.5, "barrier_mean_note": None})
    rising = lmc.barriers(lam, [9.0, 1.0, 1.25, 2.0, 9.0])  # baseline 1.5 at λ = 0.5: gap -0.25
    no_barrier(rising, "barrier_linear", "never rises")
    no_barrier(rising, "barrier_mean", "λ = 1")
    along_diff = lmc.barriers([0.0, 0.5, 1.0, 1.5, 2.0], [2.0, 1.5, 1.0, 1.2, 4.0])  # λ > 1 over-applies the diff
    assert along_diff["barrier_linear_lambda"] is None and along_diff["barrier_mean_lambda"] is None


def test_barrier_edge_cases_and_refusals():
    ends = lmc.barriers([0.0, 1.0], [1.0, 2.0])
    no_barrier(ends, "barrier_linear", "no grid point strictly between")
    nan = float("nan")
    skipped = lmc.barriers(LAM5, [1.0, nan, 2.0, 1.5, 1.0])  # the NaN point is skipped, not a barrier
    assert skipped["barrier_linear"] == pytest.approx(1.0) and skipped["barrier_mean_lambda"] == 0.5
    undefined = lmc.barriers(LAM5, [nan, 1.0, 2.0, 1.5, 1.0])
    assert np.isnan(undefined["barrier_linear"]) and undefined["barrier_linear_lambda"] is None
    assert "undefined" in undefined["barrier_mean_note"]
    spike = lmc.barriers([0.0, 0.5, 1.0], [1.0, float("inf"), 1.0])
    assert spike["barrier_linear"] == float("inf") and spike["barrier_mean_lambda"] == 0.5
    with pytest.raises(FtjaxError, match="contain 1"):
        lmc.barriers([0.0, 0.5], [1.0, 2.0])
    with pytest.raises(FtjaxError, match="contain 0"):
        lmc.barriers([0.25, 0.5, 1.0], [1.0, 2.0, 1.0])
    with pytest.raises(FtjaxError, match="one loss per λ"):
        lmc.barriers([0.0, 0.5, 1.0], [1.0, 2.0])


def test_grid_always_holds_both_endpoints():
    g = lmc.grid(5, -0.5, 1.5)
    assert g == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert 0.0 in lmc.grid(4, -0.5, 1.5) and 1.0 in lmc.grid(4, -0.5, 1.5) and len(lmc.grid(4, -0.5, 1.5)) == 6
    assert lmc.parse_range("-0.5:1.5") == (-0.5, 1.5)
    for bad in ("1:0", "x", "0:1:2"):
        with pytest.raises(FtjaxError):
            lmc.parse_range(bad)
    with pytest.raises(FtjaxError):
        lmc.grid(1)


def test_sharded_scan_matches_unsharded(models, loaded, examples):
    mesh = make_mesh("data=2,fsdp=4")
    cfg, a = load_params(models["a"], mesh=mesh)
    _, b = load_params(models["b"], mesh=mesh)
    assert not a["model"]["embed_tokens"]["weight"].sharding.is_fully_replicated
    lams = [0.0, 0.4, 1.0]
    sharded = lmc.scan(a, b, cfg, examples, lams, batch_size=4, mesh=mesh)
    plain = lmc.scan(params_of(loaded, "a"), params_of(loaded, "b"), cfg, examples, lams, batch_size=4)
    np.testing.assert_allclose(sharded["loss"], plain["loss"], atol=1e-6)


def test_bfloat16_compute(loaded, examples):
    cfg, a = loaded["a"]
    b = params_of(loaded, "b")
    f32 = lmc.scan(a, b, cfg, examples, [0.0, 1.0], batch_size=4)["loss"]
    bf16 = lmc.scan(a, b, cfg, examples, [0.0, 1.0], batch_size=4, dtype="bfloat16")["loss"]
    assert bf16 != f32 and np.allclose(bf16, f32, rtol=1e-3, atol=0)  # measured: 4e-5 relative


def test_incompatible_models_refused_before_compute(models, loaded, examples, tmp_path, capsys, count_calls):
    cfg, a = loaded["a"]
    wide = make_hf_model(tmp_path / "wide", intermediate_size=96)
    qwen = make_hf_model(tmp_path / "qwen", "qwen2")
    traced = count_calls(lmc, "row_stats")
    with pytest.raises(FtjaxError, match="mlp.*shape"):
        lmc.scan(a, load_params(wide)[1], cfg, examples, [0.0, 1.0])
    with pytest.raises(FtjaxError, match="qwen2.*llama|one family"):
        lmc.load_models({"a": models["a"], "qwen": qwen})
    assert traced["n"] == 0, "refused before anything was compiled"
    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n')
    capsys.readouterr()
    assert main(["scan", "--a", str(models["a"]), "--b", str(wide), "--data", str(data), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftjax: error: tensor model.layers.0.mlp") and not (tmp_path / "o").exists()


def test_cli_scan_writes_results_and_plots(models, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the answer is two plus two"}\n'
                    '{"question": "one plus one", "choices": ["two", "three"], "answer": 0}\n')
    out = tmp_path / "scan"
    assert main(["scan", "--a", str(models["a"]), "--b", str(models["b"]), "--data", str(data), "--points", "3",
                 "--range", "-0.5:1.5", "--out", str(out)]) == 0
    result = json.loads((out / "scan.json").read_text())
    assert result["lambda"] == [-0.5, 0.0, 0.5, 1.0, 1.5] and len(result["loss"]) == 5 and len(result["acc"]) == 5
    assert result["labels"] == ["a", "b"]
    assert (out / "scan.png").stat().st_size > 1000 and (out / "scan.pdf").stat().st_size > 1000
    printed = capsys.readouterr().out
    for name in ("barrier_linear", "barrier_mean"):
        value, lam, note = result[name], result[f"{name}_lambda"], result[f"{name}_note"]
        assert (lam is None) == (note is not None)
        want = f"{name} {value:.6f} nats (λ {lam:.3f})" if lam is not None else f"{name} 0 (no barrier: {note})"
        assert want in printed.splitlines()

    assert main(["scan", "--along-diff", "--target", str(models["c"]), "--source-ft", str(models["b"]),
                 "--source-base", str(models["a"]), "--data", str(data), "--points", "2", "--out", str(out / "d"),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["path"] == "diff" and printed["labels"] == ["c", "c + Δ"]
    assert main(["scan", "--along-diff", "--target", str(models["c"]), "--data", str(data), "--out",
                 str(out / "e")]) == 2
    assert "--source-ft" in capsys.readouterr().err


def test_cli_plane(models, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [1, 2, 3, 4, 5, 6]}\n')
    out = tmp_path / "plane"
    assert main(["plane", "--a", str(models["a"]), "--b", str(models["b"]), "--c", str(models["c"]),
                 "--data", str(data), "--points", "3", "--range", "-0.5:1.5", "--out", str(out)]) == 0
    result = json.loads((out / "plane.json").read_text())
    assert np.shape(result["loss"]) == (5, 5) and result["u"] == result["v"] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert (out / "plane.png").is_file() and (out / "plane.pdf").is_file()
