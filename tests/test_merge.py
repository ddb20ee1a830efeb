"""ftjax.merge on tiny bf16 Llama checkpoints: exactness against float64 references, streaming == in memory for every
method, fine-tuning transfer as task arithmetic, reproducible random masks, bad configs, output as a HF model."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import merge_reference as R
import ml_dtypes
import numpy as np
import pytest
from hf_models import checkpoint_tensors, make_hf_model, write_yaml
from reference import bits, exact_round, round_f64

from ftjax.cli import main
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import HFCheckpoint, save_hf
from ftjax.merge import merge, merge_params, passes
from ftjax.params import flatten, load_params

BF16 = ml_dtypes.bfloat16


def _derive(src: Path, dst: Path, seed: int, std: float = 0.01, order=None, max_shard_bytes=None) -> Path:
    """dst = src + N(0, std) (bf16); `order` rewrites the tensors in another order (and shards)."""
    ck = HFCheckpoint(src)
    rng = np.random.default_rng(seed)
    names = ck.names() if order is None else order(ck.names())
    tens = {n: (ck.get(n).astype(np.float32) + rng.normal(0, std, ck.info(n).shape)).astype(BF16) if std else
            ck.get(n) for n in names}
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    return save_hf(dst, tens, config=ck.config, aux_from=src, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    base = make_hf_model(d / "base", dtype="bfloat16", seed=0)
    ms = [_derive(base, d / f"m{i}", 10 + i, std=0.02) for i in range(3)]
    return base, ms, d




# --- exactness: sums of products bit for bit ---------------------------------------------------------------------

DYADIC = [0.75, 0.5, -0.25]  # weights whose float64 formula is exact on bf16 inputs


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_sum_of_products_equals_float64_reference_bit_for_bit(models, tmp_path, method):
    base, ms, _ = models
    dens = [0.5, 0.3, 0.9]
    entries = [{"model": str(m), "parameters": {"weight": w, **({"density": d} if method == "ties" else {})}}
               for m, w, d in zip(ms, DYADIC, dens)]
    cfg = {"merge_method": method, "models": entries, **({} if method == "linear" else {"base_model": str(base)})}
    merge(write_yaml(tmp_path, cfg), tmp_path / "out", progress=False)
    out, b, xs = checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(base), [checkpoint_tensors(m) for m in ms]
    assert sorted(out) == sorted(b)
    for n in b:
        ins = [x[n] for x in xs]
        want = {"linear": lambda: R.linear(ins, DYADIC), "task_arithmetic": lambda: R.task_arithmetic(b[n], ins, DYADIC),
                "ties": lambda: R.ties(b[n], ins, DYADIC, dens)}[method]()
        np.testing.assert_array_equal(bits(out[n]), bits(round_f64(want, BF16)), err_msg=n)


def _random_trees(seed=0, shape=(64, 96)):
    rng = np.random.default_rng(seed)
    name = "model.layers.0.mlp.down_proj.weight"
    b = rng.standard_normal(shape).astype(BF16)
    ms = [(b.astype(np.float32) + 0.05 * rng.standard_normal(shape)).astype(BF16) for _ in range(3)]
    return name, b, ms


def _get(tree, name):
    return np.asarray(flatten(tree)[name])


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_general_weights_differ_from_float64_only_where_float64_cannot_decide(method):
    """Decimal weights (0.3, 0.7, -0.2) put many exact values on a bf16 rounding midpoint (or a vote sum on zero),
    where float64's own rounding decides; everywhere else ftjax equals the float64 formula rounded once."""
    name, b, xs = _random_trees()
    w, dens = [0.3, 0.7, -0.2], [0.5, 0.5, 0.5]
    extra = {"density": 0.5} if method == "ties" else {}
    got = _get(merge_params(method, None if method == "linear" else {name: b},
                            [{"params": {name: x}, "weight": wi, **extra} for x, wi in zip(xs, w)]), name)
    f = lambda x: np.asarray(x, np.float64)
    if method == "linear":
        want, scale = R.linear(xs, w), sum(abs(wi) * np.abs(f(x)) for wi, x in zip(w, xs))
    elif method == "task_arithmetic":
        want, scale = R.task_arithmetic(b, xs, w), np.abs(f(b)) + sum(abs(wi) * np.abs(f(x) - f(b)) for wi, x in zip(w, xs))
    else:
        want = R.ties(b, xs, w, dens)
        scale = np.abs(f(b)) + sum(abs(wi) * np.abs(f(x) - f(b)) for wi, x in zip(w, xs))
    diff = bits(got) != bits(round_f64(want, BF16))
    undecided = R.ambiguous(want, scale, BF16)
    if method == "ties":
        masks = [R.topk_mask(f(x) - f(b), 0.5) for x in xs]
        votes = sum(wi * (f(x) - f(b)) * m for wi, x, m in zip(w, xs, masks))
        undecided |= np.abs(votes) <= 2.0**-40 * scale
    assert undecided.mean() < 0.25  # bf16 inputs with decimal weights: exact midpoints are common
    assert not (diff & ~undecided).any(), np.argwhere(diff & ~undecided)[:5]
    if method != "ties":  # and where float64 cannot decide, ftjax matches the exact rational value except within
        #                   its own ~2^-44 of the boundary: check on the first few undecided elements
        for i, j in np.argwhere(undecided)[:20]:
            wf = [Fraction(float(wi)) for wi in w]
            vals = [Fraction(float(x[i, j])) for x in xs]
            if method == "linear":
                e = sum(a * v for a, v in zip(wf, vals)) / Fraction(float(sum(w)))
            else:
                bb = Fraction(float(b[i, j]))
                e = bb + sum(a * (v - bb) for a, v in zip(wf, vals))
            mid_gap = abs(e - Fraction(float(want[i, j])))
            if mid_gap > Fraction(1, 2**44) * Fraction(float(scale[i, j])):
                assert float(got[i, j]) == exact_round(e, BF16), (i, j)


def test_float32_output_is_one_rounding_of_the_float64_formula(models, tmp_path):
    base, ms, _ = models
    entries = [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(ms, DYADIC)]
    merge(write_yaml(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base), "models": entries,
                           "parameters": {"lambda": 0.5}, "dtype": "float32"}), tmp_path / "o", progress=False)
    out, b, xs = checkpoint_tensors(tmp_path / "o"), checkpoint_tensors(base), [checkpoint_tensors(m) for m in ms]
    for n in b:
        want = R.task_arithmetic(b[n], [x[n] for x in xs], DYADIC, lam=0.5).astype(np.float32)
        assert out[n].dtype == np.float32
        np.testing.assert_array_equal(bits(out[n]), bits(want), err_msg=n)


# --- the slerp family: stated error bounds ------------------------------------------------------------------------


def test_slerp_karcher_model_stock_nuslerp_multislerp_error_bound(models, tmp_path):
    """The bound ftjax states for the Gram-based methods: coefficients from float32 dot products (pairwise, then an
    exact sum) solved in float64, the combination exact, one rounding: |out - ref| <= half an ulp of the output
    dtype + 2^-20 * sum_i |x_i| elementwise (ref: the float64 formula). In bf16 nearly every element is the float64
    reference rounded once."""
    base, ms, _ = models
    b, xs = checkpoint_tensors(base), [checkpoint_tensors(m) for m in ms]
    f = lambda x: np.asarray(x, np.float64)
    cases = {
        "slerp": ({"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(ms[0])}],
                   "parameters": {"t": 0.3}}, lambda n: R.slerp(b[n], xs[0][n], 0.3), lambda n: [b[n], xs[0][n]]),
        "karcher": ({"merge_method": "karcher", "models": [{"model": str(m)} for m in ms]},
                    lambda n: R.karcher([x[n] for x in xs]).reshape(b[n].shape), lambda n: [x[n] for x in xs]),
        "model_stock": ({"merge_method": "model_stock", "base_model": str(base),
                         "models": [{"model": str(m)} for m in ms]}, lambda n: R.model_stock(b[n], [x[n] for x in xs]),
                        lambda n: [b[n], *(x[n] for x in xs)]),
        "nuslerp": ({"merge_method": "nuslerp", "models": [{"model": str(m), "parameters": {"weight": w}}
                                                           for m, w in zip(ms, [0.6, 0.4])]},
                    lambda n: R.nuslerp([xs[0][n], xs[1][n]], [0.6, 0.4]), lambda n: [xs[0][n], xs[1][n]]),
        "nuslerp_row_wise": ({"merge_method": "nuslerp", "base_model": str(base),
                              "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(ms, [0.6, 0.4])],
                              "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
                             lambda n: R.nuslerp([xs[0][n], xs[1][n]], [0.6, 0.4], b[n], flatten=False, row_wise=True),
                             lambda n: [b[n], xs[0][n], xs[1][n]]),
        "multislerp": ({"merge_method": "multislerp", "models": [{"model": str(m), "parameters": {"weight": w}}
                                                                 for m, w in zip(ms, [0.5, 0.3, 0.2])]},
                       lambda n: R.multislerp([x[n] for x in xs], [0.5, 0.3, 0.2]), lambda n: [x[n] for x in xs]),
    }
    for method, (cfg, ref, terms) in cases.items():
        for dtype in ("bfloat16", "float32"):
            out = tmp_path / f"{method}-{dtype}"
            merge(write_yaml(tmp_path, {**cfg, "dtype": dtype}), out, progress=False)
            got = checkpoint_tensors(out)
            same = total = 0
            for n in b:
                want = ref(n)
                g = f(got[n])
                half_ulp = np.maximum(*(np.abs(np.nextafter(got[n], np.asarray(s, got[n].dtype)).astype(np.float64) - g) for s in (np.inf, -np.inf))) / 2
                bound = half_ulp * (1 + 2.0**-20) + 2.0**-20 * sum(np.abs(f(x)) for x in terms(n))
                assert (np.abs(g - want) <= bound).all(), (method, dtype, n, float(np.max(np.abs(g - want) - bound)))
                same += int((R.ulps(got[n], want, dtype) == 0).sum())
                total += want.size
            if dtype == "bfloat16":
                assert same / total > 0.99, (method, same / total)


# --- one engine: streaming == in memory, for every method --------------------------------------------------------

METHOD_CONFIGS = {
    "linear": ({"weight": [1.0, 0.3, 0.5]}, {}, False),
    "task_arithmetic": ({"weight": [1.0, 0.3, -0.5]}, {"lambda": 0.8}, True),
    "ties": ({"weight": [1.0, 0.3, 0.5], "density": [0.5, 0.3, 0.9]}, {}, True),
    "dare_ties": ({"weight": [1.0, 0.3, 0.5], "density": [0.5, 0.3, 0.9]}, {}, True),
    "dare_linear": ({"weight": [1.0, 0.3, 0.5], "density": [0.5, 0.3, 0.9]}, {"rescale_mode": "inverse_density"}, True),
    "breadcrumbs": ({"weight": [1.0, 0.3, 0.5], "density": [0.8, 0.7, 0.9], "gamma": [0.01, 0.05, 0.1]}, {}, True),
    "breadcrumbs_ties": ({"weight": [1.0, 0.3, 0.5], "density": [0.8, 0.7, 0.9]}, {"sign_election": "unweighted"},
                         True),
    "della": ({"weight": [1.0, 0.3, 0.5], "density": [0.5, 0.4, 0.6], "epsilon": [0.1, 0.2, 0.05]}, {}, True),
    "della_linear": ({"weight": [1.0, 0.3, 0.5], "density": [0.5, 0.4, 0.6]}, {}, True),
    "slerp": ({}, {"t": [0.0, 0.3, 1.0]}, True),
    "nuslerp": ({"weight": [0.7, 0.3]}, {"nuslerp_flatten": False}, True),
    "multislerp": ({"weight": [0.5, 0.3, 0.2]}, {}, False),
    "karcher": ({}, {}, False),
    "model_stock": ({}, {"filter_wise": True}, True),
    "nearswap": ({}, {"t": 0.01}, True),
    "passthrough": ({}, {}, False),
}


def _method_config(method: str, base: Path, ms: list[Path]) -> dict:
    per, top, with_base = METHOD_CONFIGS[method]
    n = {"slerp": 1, "nearswap": 1, "passthrough": 1, "nuslerp": 2}.get(method, 3)
    entries = [{"model": str(m), **({"parameters": {k: v[i] for k, v in per.items()}} if per else {})}
               for i, m in enumerate(ms[:n])]
    return {"merge_method": method, **({"base_model": str(base)} if with_base else {}), "models": entries,
            **({"parameters": top} if top else {})}


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_streaming_equals_in_memory_for_every_method(models, tmp_path, method):
    base, ms, _ = models
    cfg = _method_config(method, base, ms)
    rc = main(["merge", str(write_yaml(tmp_path, cfg)), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    out = checkpoint_tensors(tmp_path / "out")
    trees = {str(p): load_params(p, dtype=None)[1] for p in [base, *ms]}
    models_in = [{"params": trees[e["model"]], **e.get("parameters", {})} for e in cfg["models"]]
    mem = flatten(merge_params(method, trees[str(base)] if "base_model" in cfg else None, models_in,
                               **cfg.get("parameters", {})))
    b = checkpoint_tensors(base)
    for n in b:
        np.testing.assert_array_equal(bits(out[n]), bits(np.asarray(mem[n])), err_msg=f"{method} {n}")
    if method not in ("passthrough",):  # a real merge: not a copy of an input
        assert any(not np.array_equal(bits(out[n]), bits(b[n])) for n in b)
    record = json.loads((tmp_path / "out" / "ftjax_merge.json").read_text())
    assert record["method"] == method and record["seed"] == 0 and "merge_method" in record["merge_config"]


# reads of every input (the statistics passes, then the write) when each tensor is streamed, not held
TWO_PASS_READS = {"slerp": 2, "model_stock": 2, "nuslerp": 2, "multislerp": 2, "karcher": 2, "ties": 3, "della": 2,
                  "breadcrumbs": 3}


@pytest.mark.parametrize("method", list(TWO_PASS_READS))
def test_one_pass_equals_two_pass_bit_for_bit_and_reads_each_input_once(models, tmp_path, method):
    """Tensors under the budget are read once and held (statistics and write from the same arrays); budget 0
    streams them in passes. Same bits; the report's bytes_read counts every pass."""
    base, ms, _ = models
    cfg = write_yaml(tmp_path, _method_config(method, base, ms))
    one = merge(cfg, tmp_path / "one", progress=False)
    two = merge(cfg, tmp_path / "two", progress=False, one_pass_bytes=0)
    a, b = checkpoint_tensors(tmp_path / "one"), checkpoint_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    for n in a:
        np.testing.assert_array_equal(bits(a[n]), bits(b[n]), err_msg=f"{method} {n}")
    n_inputs = len(_method_config(method, base, ms)["models"]) + METHOD_CONFIGS[method][2]  # + the base
    inputs = n_inputs * sum(t.nbytes for t in checkpoint_tensors(base).values())
    assert one.bytes_read == inputs
    assert two.bytes_read == TWO_PASS_READS[method] * inputs
    record = json.loads((tmp_path / "one" / "ftjax_merge.json").read_text())
    assert record["report"]["bytes_read"] == inputs


def test_passthrough_scale_and_nearswap_follow_their_formulas(models):
    base, ms, _ = models
    name, b, xs = _random_trees(3)
    got = _get(merge_params("passthrough", None, [{"params": {name: xs[0]}, "scale": 0.5}]), name)
    np.testing.assert_array_equal(bits(got), bits(round_f64(0.5 * np.asarray(xs[0], np.float64), BF16)))
    t = 0.02
    got = _get(merge_params("nearswap", {name: b}, [{name: xs[0]}], t=t), name)
    d = np.asarray(xs[0], np.float64) - np.asarray(b, np.float64)
    w = np.clip(t / np.maximum(np.abs(d), 1e-6), 0, 1)
    assert R.ulps(got, np.asarray(b, np.float64) + w * d, BF16).max() <= 1


# --- fine-tuning transfer is task arithmetic with a per-model delta base ------------------------------------------


def test_transfer_is_task_arithmetic_with_delta_base_bit_for_bit(models, tmp_path):
    base, ms, d = models
    target = make_hf_model(d / "target", dtype="bfloat16", seed=5) if not (d / "target").exists() else d / "target"
    assert main(["transfer", "--source-base", str(base), "--source-ft", str(ms[0]), "--target-base", str(target),
                 "--alpha", "0.3", "--out", str(tmp_path / "t"), "--quiet"]) == 0
    cfg = {"merge_method": "task_arithmetic", "base_model": str(target),
           "models": [{"model": str(ms[0]), "delta_base": str(base), "parameters": {"weight": 0.3}}]}
    assert main(["merge", str(write_yaml(tmp_path, cfg)), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    a, m = checkpoint_tensors(tmp_path / "t"), checkpoint_tensors(tmp_path / "m")
    assert sorted(a) == sorted(m)
    for n in a:
        np.testing.assert_array_equal(bits(a[n]), bits(m[n]), err_msg=n)


def test_two_diffs_from_two_source_versions_in_one_config(models, tmp_path):
    """Δ_1 = m0 − base (version 1) plus Δ_2 = m2 − m1 (version 2) onto a third base."""
    base, ms, d = models
    target = make_hf_model(d / "target", dtype="bfloat16", seed=5) if not (d / "target").exists() else d / "target"
    cfg = {"merge_method": "task_arithmetic", "base_model": str(target),
           "models": [{"model": str(ms[0]), "delta_base": str(base), "parameters": {"weight": 1.0}},
                      {"model": str(ms[2]), "delta_base": str(ms[1]), "parameters": {"weight": 0.5}}]}
    merge(write_yaml(tmp_path, cfg), tmp_path / "o", progress=False)
    out, t, b, x = checkpoint_tensors(tmp_path / "o"), checkpoint_tensors(target), checkpoint_tensors(base), [checkpoint_tensors(m) for m in ms]
    for n in t:
        want = R.task_arithmetic(t[n], [x[0][n], x[2][n]], [1.0, 0.5], delta_bases=[b[n], x[1][n]])
        np.testing.assert_array_equal(bits(out[n]), bits(round_f64(want, BF16)), err_msg=n)


# --- reproducible random masks ------------------------------------------------------------------------------------


def _dare(base, ms, **params):
    return {"merge_method": "dare_ties", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.4}} for m in ms[:2]],
            **({"parameters": params} if params else {})}


def test_dare_masks_do_not_depend_on_chunks_shards_or_tensor_order(models, tmp_path, monkeypatch):
    import ftjax.engine.outputs

    base, ms, d = models
    merge(write_yaml(tmp_path, _dare(base, ms)), tmp_path / "a", progress=False)
    a = checkpoint_tensors(tmp_path / "a")
    # smaller kernel chunks, a smaller output shard size
    monkeypatch.setattr(ftjax.engine.outputs, "CHUNK_ELEMS", 4096)
    merge(write_yaml(tmp_path, _dare(base, ms)), tmp_path / "b", progress=False, max_shard_bytes=100_000)
    monkeypatch.undo()
    # inputs rewritten in reverse tensor order, over several shards
    rev = [_derive(p, tmp_path / f"rev{i}", 0, std=0, order=lambda names: names[::-1], max_shard_bytes=60_000)
           for i, p in enumerate([base, *ms[:2]])]
    assert HFCheckpoint(rev[1]).names() != HFCheckpoint(ms[0]).names()
    merge(write_yaml(tmp_path, _dare(rev[0], rev[1:])), tmp_path / "c", progress=False)
    # one tensor fewer in the inputs (in memory): the others keep their masks
    trees = [load_params(p, dtype=None)[1] for p in [base, *ms[:2]]]
    drop = "model.layers.0.self_attn.q_proj.weight"
    cut = [{k: v for k, v in flatten(t).items() if k != drop} for t in trees]
    mem = flatten(merge_params("dare_ties", cut[0], [{"params": c, "weight": 0.5, "density": 0.4} for c in cut[1:]]))
    for other in (checkpoint_tensors(tmp_path / "b"), checkpoint_tensors(tmp_path / "c"), {k: np.asarray(v) for k, v in mem.items()}):
        for n in a:
            if n in other:
                np.testing.assert_array_equal(bits(a[n]), bits(other[n]), err_msg=n)
    # another seed: other masks
    merge(write_yaml(tmp_path, _dare(base, ms)), tmp_path / "s", progress=False, seed=1)
    s = checkpoint_tensors(tmp_path / "s")
    assert any(not np.array_equal(bits(a[n]), bits(s[n])) for n in a)
    assert json.loads((tmp_path / "s" / "ftjax_merge.json").read_text())["seed"] == 1


@pytest.mark.parametrize("method", ["dare_ties", "ties"])
def test_sign_vote_of_decimal_weights_cancelling_exactly_elects_plus(method):
    """mergekit's election: Σ wᵢ·δᵢ >= 0 elects +. With weights 0.6 and 0.4, deltas with 3·δ₀ = −2·δ₁ cancel exactly
    (bf16 checkpoints hold such pairs in every tensor); float64's 0.6 and 0.4 leave a residue of the wrong sign when
    δ₀ > 0, which elected − (mergekit elects +). Density 1: no trimming, so this is the sign election alone."""
    name = "model.layers.0.mlp.down_proj.weight"
    d0 = np.array([[29 / 1024, -29 / 1024, 0.01, -0.02]])
    b = np.zeros((1, 4), BF16)
    xs = [d0.astype(BF16), (-1.5 * d0 + np.array([[0, 0, 0.03, -0.01]])).astype(BF16)]
    assert np.all(3 * xs[0].astype(np.float64)[0, :2] == -2 * xs[1].astype(np.float64)[0, :2])  # exact ties
    w = [0.6, 0.4]
    got = _get(merge_params(method, {name: b}, [{"params": {name: x}, "weight": wi, "density": 1.0}
                                                for x, wi in zip(xs, w)]), name)
    want = R.ties(b, xs, w, [1.0, 1.0], normalize=method == "ties")
    np.testing.assert_array_equal(bits(got), bits(round_f64(want, BF16)))
    kept = 29 / 1024 if method == "ties" else 0.6 * 29 / 1024  # the tie keeps δ₀ (+), not δ₁ (−)
    assert float(got[0, 0]) == float(np.float64(kept).astype(BF16))


def test_dare_keeps_a_density_share_rescaled_by_exactly_one_over_density():
    """dare_linear, one model, weight 1, the papers' rescale: kept elements are B + δ/p rounded once, dropped ones B;
    the kept share is within binomial noise of p."""
    rng = np.random.default_rng(1)
    name = "model.embed_tokens.weight"
    b = rng.standard_normal((256, 512)).astype(BF16)
    x = (b.astype(np.float32) + rng.standard_normal(b.shape).astype(np.float32)).astype(BF16)
    p = 0.3
    got = _get(merge_params("dare_linear", {name: b}, [{"params": {name: x}, "weight": 1.0, "density": p}],
                            rescale=True, rescale_mode="inverse_density"), name)
    f = lambda v: np.asarray(v, np.float64)
    kept_want = round_f64(f(b) + (f(x) - f(b)) / np.float64(np.float32(p)), BF16)
    kept = bits(got) == bits(kept_want)
    dropped = bits(got) == bits(b)
    assert (kept | dropped).all()
    share = kept[f(x) != f(b)].mean()
    n = kept.size
    assert abs(share - p) < 5 * np.sqrt(p * (1 - p) / n)


def test_della_keeps_more_of_the_larger_magnitudes_of_each_row():
    rng = np.random.default_rng(2)
    name = "model.layers.0.mlp.up_proj.weight"
    b = np.zeros((64, 1024), BF16)
    x = rng.standard_normal(b.shape).astype(BF16)
    got = _get(merge_params("della_linear", {name: b}, [{"params": {name: x}, "weight": 1.0, "density": 0.5,
                                                          "epsilon": 0.4}]), name)
    mag = np.abs(np.asarray(x, np.float32))
    ranks = mag.argsort(axis=1).argsort(axis=1)
    kept = np.asarray(got, np.float32) != 0
    low, high = kept[ranks < 256].mean(), kept[ranks >= 768].mean()
    assert 0.1 < low < 0.3 and 0.7 < high < 0.9  # p runs from 0.1 to 0.9 across each row


def test_radix_select_finds_exact_ranks_with_many_ties():
    rng = np.random.default_rng(3)
    mag = np.abs(np.round(rng.standard_normal(50_000) * 8) / 8).astype(np.float32)  # few distinct values
    keys = mag.view(np.uint32)
    ranks = [0, 17, 25_000, 49_999]
    sel = passes.RadixSelect(ranks)
    for part in np.array_split(keys, 7):
        sel.add_hi((part >> 16).astype(np.uint16))
    sel.choose_bins()
    for j, bin_ in enumerate(sel.bins):
        for part in np.array_split(keys, 3):
            sel.add_lo(j, np.where((part >> 16) == bin_, part & 0xFFFF, 0).astype(np.uint16))
    assert sel.values() == [float(v) for v in np.sort(mag)[ranks]]


# --- bad input: one line, exit 2, nothing written ------------------------------------------------------------------

BAD = [
    ("merge_method: ties\nbase_model: B\nmodels:\n  - model: M\n    parameters: {weight: 1, densty: 0.5}\n",
     "no parameter 'densty'; did you mean 'density'"),
    ("merge_method: tie\nbase_model: B\nmodels: [{model: M}]\n", "unknown merge method 'tie'; did you mean 'ties'"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: M}]\n", "missing required parameter weight"),
    ("merge_method: ties\nbase_model: B\nmodels:\n  - model: M\n    parameters: {weight: 1, density: 1.5}\n",
     "must be in \\[0, 1\\]"),
    ("merge_method: ties\nbase_model: B\nmodels:\n  - model: M\n   parameters: {weight: 1}\n", ":5: YAML syntax error"),
    ("merge_method: ties\nbase_model: B\nmodel: [{model: M}]\n", "unknown key 'model'; did you mean 'models'"),
    ("merge_method: ties\nbase_model: B\nmodels:\n  - model: M\n    parameters: {weight: 1, normalize: true}\n",
     "'normalize' is a global parameter"),
    ("merge_method: ties\nbase_model: B\nmodels:\n  - model: M\n    parameters: {weight: 1}\ntokenizer_source: union\n",
     "union"),
    ("merge_method: ties\nbase_model: B\nmodels:\n  - model: M\n    parameters: {weight: 1}\ndtype: float8\n",
     "dtype 'float8'"),
    ("merge_method: slerp\nbase_model: B\nmodels: [{model: M}, {model: B2}]\nparameters: {t: 0.5}\n", "exactly 1"),
    ("slices:\n  - sources:\n    - {model: M, layer_range: [0, 3]}\nmerge_method: passthrough\n",
     "layer_range \\[0, 3\\] of .* is past its 2 layers"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_configs_are_one_line_errors_and_write_nothing(models, tmp_path, capsys, text, message):
    base, ms, _ = models
    text = text.replace("B2", str(ms[1])).replace("M", str(ms[0])).replace("base_model: B", f"base_model: {base}")
    cfg = tmp_path / "bad.yml"
    cfg.write_text(text)
    before = {p: p.stat().st_mtime_ns for p in Path(base).iterdir()}
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ftjax: error:")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert {p: p.stat().st_mtime_ns for p in Path(base).iterdir()} == before


def test_mismatched_shapes_are_refused_naming_the_tensors(models, tmp_path, capsys):
    base, ms, d = models
    other = make_hf_model(tmp_path / "wide", dtype="bfloat16", seed=3, intermediate_size=96)
    cfg = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(other), "parameters": {"weight": 1.0, "density": 0.5}}]}
    assert main(["merge", str(write_yaml(tmp_path, cfg)), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "mlp.up_proj.weight: shapes differ" in err or "intermediate_size" in err
    assert not (tmp_path / "out").exists()


def test_merge_params_rejects_what_the_config_rejects():
    name, b, xs = _random_trees()
    with pytest.raises(FtjaxError, match="missing required parameter weight"):
        merge_params("task_arithmetic", {name: b}, [{name: xs[0]}])
    with pytest.raises(FtjaxError, match="did you mean 'della'"):
        merge_params("dela", {name: b}, [{name: xs[0]}])


# --- the output ---------------------------------------------------------------------------------------------------


def test_output_loads_in_transformers_with_dry_run_and_json(models, tmp_path, capsys):
    import torch
    import transformers

    base, ms, _ = models
    cfg = write_yaml(tmp_path, _method_config("ties", base, ms))
    assert main(["merge", str(cfg), "--out", str(tmp_path / "dry"), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] and report["tensors"] > 0 and not (tmp_path / "dry").exists()
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    sd = model.state_dict()
    out = checkpoint_tensors(tmp_path / "out")
    w = sd["model.layers.1.mlp.down_proj.weight"].float().numpy()
    np.testing.assert_array_equal(w, out["model.layers.1.mlp.down_proj.weight"].astype(np.float32))
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2  # exists: --overwrite
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--quiet", "--overwrite"]) == 0


def test_chat_template_auto_and_literal(models, tmp_path):
    base, ms, _ = models
    cfg = {**_method_config("linear", base, ms), "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    merge(write_yaml(tmp_path, cfg), tmp_path / "o", progress=False)
    tok = json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())
    assert tok["chat_template"] == cfg["chat_template"]


def test_70b_sized_embedding_merges_with_ties_in_bounded_memory(tmp_path):
    """128256 x 8192 bf16 (2.1 GB per input, sparse files with a fixed pattern in a few rows), ties at density 0.5,
    in a subprocess: peak RSS under 1 GB."""
    import subprocess
    import sys

    from hf_models import sparse_model

    rows, cols = 128256, 8192
    paths = []
    for i in range(3):
        p = sparse_model(tmp_path / f"m{i}", rows, cols)
        if i:  # a fixed pattern of deltas in two blocks of rows
            with open(p / "model.safetensors", "r+b") as fh:
                head = 8 + int.from_bytes(fh.read(8), "little")
                block = (np.arange(64 * cols) % 251 - 125).astype(np.float32) * (0.01 * i)
                for r in (0, rows - 64):
                    fh.seek(head + r * cols * 2)
                    fh.write(block.astype(BF16).tobytes())
        paths.append(p)
    cfg = write_yaml(tmp_path, {"merge_method": "ties", "base_model": str(paths[0]), "models": [
        {"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in paths[1:]]})
    # The child's own peak (VmHWM of its address space): ru_maxrss would carry over this process's peak, which a
    # vfork + exec hands to the child (Linux keeps the old mm's high-water mark across execve).
    script = ("import re, sys\nfrom ftjax.cli import main\n"
              f"rc = main(['merge', {str(cfg)!r}, '--out', {str(tmp_path / 'out')!r}, '--quiet'])\n"
              "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
              "sys.stdout.flush()\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    peak_kb = int(res.stdout.split()[-1])
    assert peak_kb < 1_000_000, f"peak RSS {peak_kb / 1e3:.0f} MB"
    out = HFCheckpoint(tmp_path / "out")
    head = out.get_slice("model.embed_tokens.weight", slice(0, 64)).astype(np.float32)
    pattern = (np.arange(64 * cols) % 251 - 125).astype(np.float32).reshape(64, cols)
    v1, v2 = ((pattern * np.float32(0.01 * i)).astype(BF16).astype(np.float64) for i in (1, 2))
    np.testing.assert_array_equal(bits(head.astype(BF16)), bits(round_f64((v1 + v2) / 2, BF16)))


def test_a_base_listed_among_the_models_is_the_base(models, tmp_path):
    """mergekit's examples list the base among the models (examples/gradient-slerp.yml): it is not one more input."""
    base, ms, _ = models
    t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
         {"value": 0.5}]
    listed = {"slices": [{"sources": [{"model": str(ms[0]), "layer_range": [0, 2]},
                                      {"model": str(ms[1]), "layer_range": [0, 2]}]}],
              "merge_method": "slerp", "base_model": str(ms[0]), "parameters": {"t": t}}
    plain = {"merge_method": "slerp", "base_model": str(ms[0]), "models": [{"model": str(ms[1])}],
             "parameters": {"t": t}}
    merge(write_yaml(tmp_path, listed, "a.yml"), tmp_path / "a", progress=False)
    merge(write_yaml(tmp_path, plain, "b.yml"), tmp_path / "b", progress=False)
    a, b, m0, m1 = (checkpoint_tensors(p) for p in (tmp_path / "a", tmp_path / "b", ms[0], ms[1]))
    for n in a:
        np.testing.assert_array_equal(bits(a[n]), bits(b[n]), err_msg=n)
    n = "model.layers.0.self_attn.q_proj.weight"  # t = 0 at layer 0: the base
    np.testing.assert_array_equal(bits(a[n]), bits(m0[n]))
    n = "model.layers.1.self_attn.q_proj.weight"  # t = 1 at the last layer: the other model
    np.testing.assert_array_equal(bits(a[n]), bits(m1[n]))


def test_row_of_a_64_bit_element_index():
    """Per-row coefficients index rows of tensors beyond 2^32 elements (e.g. a 256000 x 16384 embedding)."""
    import jax.numpy as jnp

    from ftjax.merge.kernels import first_row

    for hi, lo, w in [(0, 12345678, 8192), (1, 5, 8192), (3, 4_000_000_000, 7168), (0, 2**31 + 5, 1000)]:
        assert int(first_row(jnp.uint32(hi), jnp.uint32(lo), w)) == (hi * 2**32 + lo) // w


def test_merge_params_on_sharded_trees_keeps_the_sharding_and_the_bits(models):
    from ftjax.params import make_mesh

    base, ms, _ = models
    mesh = make_mesh("data=2,fsdp=4")
    (_, sb), *loaded = (load_params(p, mesh=mesh, dtype=None) for p in [base, *ms[:2]])
    trees = [t for _, t in loaded]
    kw = dict(models=[{"params": t, "weight": 0.5, "density": 0.5} for t in trees])
    sharded = flatten(merge_params("ties", sb, **kw))
    plain = flatten(merge_params("ties", load_params(base, dtype=None)[1],
                                 [{"params": load_params(p, dtype=None)[1], "weight": 0.5, "density": 0.5}
                                  for p in ms[:2]]))
    flat_b = flatten(sb)
    for n, x in sharded.items():
        assert x.sharding == flat_b[n].sharding, n
        np.testing.assert_array_equal(bits(np.asarray(x)), bits(np.asarray(plain[n])), err_msg=n)
