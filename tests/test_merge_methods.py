"""sce, arcee_fusion, ram and ramplus_tl (issue 28): each against a float64 reference of mergekit's formula written in
`merge_reference`, from a mergekit config through `ftjax merge` and from `ftjax.merge_params` (same bits), and their
bad parameters as one-line errors."""

from __future__ import annotations

import merge_reference as R
import ml_dtypes
import numpy as np
import pytest
from hf_models import checkpoint_tensors, make_hf_model, write_yaml
from reference import bits

from ftjax.cli import main
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import HFCheckpoint, save_hf
from ftjax.merge import merge_params
from ftjax.params import flatten, load_params

BF16 = ml_dtypes.bfloat16
NAME = "model.layers.0.mlp.down_proj.weight"


def _trees(seed=0, shape=(64, 96), n=3, scales=(0.02, 0.05, 0.03)):
    """A bf16 base and n models base + N(0, scale) (bf16)."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(shape).astype(BF16)
    return b, [(b.astype(np.float32) + s * rng.standard_normal(shape)).astype(BF16) for s in scales[:n]]


def _merge(method, b, xs, per_model=None, **params):
    models = [{"params": {NAME: x}, **(per_model[i] if per_model else {})} for i, x in enumerate(xs)]
    return np.asarray(flatten(merge_params(method, {NAME: b}, models, **params))[NAME])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("methods")
    base = make_hf_model(d / "base", dtype="bfloat16", seed=0)
    rng = np.random.default_rng(1)
    ck = HFCheckpoint(base)
    ms = []
    for i, s in enumerate((0.02, 0.05, 0.03)):
        tens = {n: (ck.get(n).astype(np.float32) + s * rng.standard_normal(ck.info(n).shape)).astype(BF16)
                for n in ck.names()}
        ms.append(save_hf(d / f"m{i}", tens, config=ck.config, aux_from=base))
    return base, ms


def _cli_and_memory(tmp_path, monkeypatch, method, base, ms, params=None, per_model=None):
    """Run a mergekit config through `ftjax merge` (in chunks of 512 elements: statistics and writes stream over
    several chunks per tensor) and the same merge through merge_params; assert the same bits; return (output
    tensors, base tensors, model tensors)."""
    import ftjax.engine.outputs

    monkeypatch.setattr(ftjax.engine.outputs, "CHUNK_ELEMS", 512)
    entries = [{"model": str(m), **({"parameters": per_model[i]} if per_model else {})} for i, m in enumerate(ms)]
    cfg = {"merge_method": method, "base_model": str(base), "models": entries, **({"parameters": params} if params
                                                                                   else {})}
    assert main(["merge", str(write_yaml(tmp_path, cfg)), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    monkeypatch.undo()
    out = checkpoint_tensors(tmp_path / "out")
    trees = {str(p): load_params(p, dtype=None)[1] for p in [base, *ms]}
    mem = flatten(merge_params(method, trees[str(base)], [{"params": trees[str(m)], **(per_model[i] if per_model
                                                                                        else {})}
                                                          for i, m in enumerate(ms)], **(params or {})))
    for n in out:
        np.testing.assert_array_equal(bits(out[n]), bits(np.asarray(mem[n])), err_msg=f"{method} {n}")
    return out, checkpoint_tensors(base), [checkpoint_tensors(m) for m in ms]


# --- sce -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [1.0, 0.3, 0.0])
def test_sce_matches_float64_reference_within_one_ulp(topk):
    """Error bound: 1 bf16 ulp. The variance mask and the sign election agree with float64 (bf16 deltas are exact in
    float32 and the vote is summed exactly); the weights mean(kept δ²) are float32 row sums (~2^-20 relative), so
    the disjoint mean can land one rounding away from the float64 value."""
    b, xs = _trees()
    got = _merge("sce", b, xs, select_topk=topk)
    want = R.sce(b, xs, topk)
    assert R.ulps(got, want, BF16).max() <= 1
    kept = (R.ulps(got, np.asarray(b, np.float64), BF16) > 0).mean()
    if topk == 0.0:
        np.testing.assert_array_equal(bits(got), bits(b))  # nothing selected: the base
    elif topk < 1:
        assert 0.2 < kept <= 0.31  # ~select_topk of the elements move


def test_sce_runs_from_a_mergekit_config_with_the_same_bits_as_merge_params(ckpts, tmp_path, monkeypatch):
    base, ms = ckpts
    out, b, xs = _cli_and_memory(tmp_path, monkeypatch, "sce", base, ms, {"select_topk": 0.5})
    assert max(x.size for x in b.values()) > 3 * 512
    for n in b:
        assert R.ulps(out[n], R.sce(b[n], [x[n] for x in xs], 0.5), BF16).max() <= 1, n


@pytest.mark.parametrize("params, message", [
    ({"select_topk": 1.5}, "select_topk is 1.5 .* must be in \\[0, 1\\]"),
    ({"select_topk": "most"}, "select_topk must be a number"),
    ({"int8_mask": "yes"}, "int8_mask must be true or false"),
])
def test_sce_bad_parameters_are_one_line_errors(params, message):
    b, xs = _trees(shape=(8, 16))
    with pytest.raises(FtjaxError, match=message) as e:
        _merge("sce", b, xs, **params)
    assert "\n" not in str(e.value)


def test_sce_per_model_weight_is_refused():
    b, xs = _trees(shape=(8, 16))
    with pytest.raises(FtjaxError) as e:
        _merge("sce", b, xs, per_model=[{"weight": 1.0}] * 3)
    assert "weight" in str(e.value) and "\n" not in str(e.value)


# --- arcee_fusion --------------------------------------------------------------------------------------------------


def _fusion_bound(b, x, got):
    """Error bound: each output element is M or B exactly; the choice agrees with float64 wherever the score lies
    more than 1e-4 (relative) from the threshold (float32 softmax, log and row sums: ~1e-6 relative)."""
    s, thr = R.arcee_fusion_scores(b, x)
    want = R.arcee_fusion(b, x)
    clear = np.abs(s - thr) > 1e-4 * abs(thr)
    np.testing.assert_array_equal(bits(np.asarray(got)[clear]), bits(want[clear].astype(BF16)))
    assert clear.mean() > 0.9  # bf16 deltas repeat: whole groups of equal scores can sit at the threshold
    moved = bits(got) != bits(np.asarray(b))  # near it, the choice still follows the score
    stayed = ~moved & (bits(np.asarray(x)) != bits(np.asarray(b)))
    if moved.any() and stayed.any():
        assert s[moved].min() >= s[stayed].max() * (1 - 1e-4)
    return (s >= thr).mean()


@pytest.mark.parametrize("shape", [(64, 96), (300,)])
def test_arcee_fusion_matches_float64_reference(shape):
    b, xs = _trees(shape=shape, n=1, scales=(0.3,))
    got = _merge("arcee_fusion", b, xs)
    fused = _fusion_bound(b, xs[0], got)
    assert 0.01 < fused < 0.5  # a real selection: some elements of M, most of B


def test_arcee_fusion_runs_from_a_mergekit_config_with_the_same_bits_as_merge_params(ckpts, tmp_path, monkeypatch):
    base, ms = ckpts
    out, b, xs = _cli_and_memory(tmp_path, monkeypatch, "arcee_fusion", base, ms[1:2])
    for n in b:
        _fusion_bound(b[n], xs[0][n], out[n])


def test_arcee_fusion_takes_one_model_and_no_parameters():
    b, xs = _trees(shape=(8, 16))
    with pytest.raises(FtjaxError, match="arcee_fusion") as e:
        _merge("arcee_fusion", b, xs[:2])
    assert "\n" not in str(e.value)
    with pytest.raises(FtjaxError, match="t") as e:
        _merge("arcee_fusion", b, xs[:1], t=0.5)
    assert "\n" not in str(e.value)


# --- ram, ramplus_tl -----------------------------------------------------------------------------------------------


def _sparse_trees(seed=2, shape=(64, 96)):
    """Three models, each changing a random ~40% of the base's elements (overlapping: c = 0..3 models per element)."""
    b, xs = _trees(seed, shape, 3, (0.05, 0.05, 0.05))
    rng = np.random.default_rng(seed + 1)
    return b, [np.where(rng.random(shape) < 0.4, x, b).astype(BF16) for x in xs]


@pytest.mark.parametrize("method, params", [("ram", {}), ("ramplus_tl", {}),
                                            ("ramplus_tl", {"r": 0.5, "alpha": 1.0, "epsilon": 0.01})])
def test_ram_matches_float64_reference(method, params):
    """Error bound: bit for bit where one or two models (or none) change an element (a sum of exact products, one
    rounding); within 1 bf16 ulp where three do (÷ 3 is not exact in float64 either)."""
    b, xs = _sparse_trees()
    got = _merge(method, b, xs, **params)
    kw = {"r": params.get("r", 0.1), "alpha": params.get("alpha", 0.2)} if method == "ramplus_tl" else {}
    want = R.ram(b, xs, params.get("epsilon", 1e-5), **kw)
    f = lambda x: np.asarray(x, np.float64)
    c = sum(np.abs(f(x) - f(b)) > params.get("epsilon", 1e-5) for x in xs)
    assert {0, 1, 2, 3} <= set(np.unique(c))
    exact = c < 3
    if method == "ramplus_tl":  # λ = 1 + r·ρ is a decimal: exact only where c != 1
        exact &= c != 1
    np.testing.assert_array_equal(bits(got[exact]), bits(want[exact].astype(BF16)))
    assert R.ulps(got, want, BF16).max() <= 1
    if method == "ramplus_tl":  # the unique changes are scaled: not ram's result
        assert not np.array_equal(bits(got), bits(_merge("ram", b, xs, **{k: v for k, v in params.items()
                                                                          if k == "epsilon"})))


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_runs_from_a_mergekit_config_with_the_same_bits_as_merge_params(ckpts, tmp_path, monkeypatch, method):
    base, ms = ckpts
    params = {"epsilon": 0.02} if method == "ram" else {"r": 0.3, "alpha": 0.5, "epsilon": 0.02}
    out, b, xs = _cli_and_memory(tmp_path, monkeypatch, method, base, ms, params)
    kw = {"r": 0.3, "alpha": 0.5} if method == "ramplus_tl" else {}
    for n in b:
        assert R.ulps(out[n], R.ram(b[n], [x[n] for x in xs], 0.02, **kw), BF16).max() <= 1, n


@pytest.mark.parametrize("method, params, message", [
    ("ram", {"epsilon": -1.0}, "epsilon is -1.0 .* must be >= 0"),
    ("ram", {"epsilon": "small"}, "epsilon must be a number"),
    ("ramplus_tl", {"alpha": -0.1}, "alpha is -0.1 .* must be >= 0"),
    ("ramplus_tl", {"r": "big"}, "r must be a number"),
])
def test_ram_bad_parameters_are_one_line_errors(method, params, message):
    b, xs = _trees(shape=(8, 16))
    with pytest.raises(FtjaxError, match=message) as e:
        _merge(method, b, xs, **params)
    assert "\n" not in str(e.value)
