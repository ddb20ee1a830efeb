"""A diff as a LoRA adapter (ftjax.lora_extract), against PEFT itself: a rank-r change added to a tiny transformers
model's linear weights is extracted, loaded by PeftModel.from_pretrained, merged and run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hf_models import make_hf_model

from ftjax import lora_extract
from ftjax.cli import main
from ftjax.io.checkpoint import HFCheckpoint, save_hf
from ftjax.lora import load_adapter
from ftjax.lora_extract import extract_lora

import peft  # noqa: E402  (the reference: a required test dependency)
import torch  # noqa: E402
import transformers  # noqa: E402

RANK = 3
TARGETS = ("q_proj", "v_proj", "down_proj")


def tensors(path):
    ck = HFCheckpoint(path)
    return {n: np.asarray(ck.get(n)) for n in ck.names()}


def low_rank_ft(base, out, rank=RANK, targets=TARGETS, extra=(), seed=0, ranks=None):
    """base + B @ A (rank `rank`, or ranks[module suffix]) on the linear weights named by `targets`, plus a random
    change of the tensors in `extra` (e.g. the final norm); saved as a HF checkpoint; returns its tensors."""
    ck, rng = HFCheckpoint(base), np.random.default_rng(seed)
    out_t = {}
    for n in ck.names():
        w = np.asarray(ck.get(n)).astype(np.float32)
        suffix = n.removesuffix(".weight").rsplit(".", 1)[-1]
        if suffix in targets and w.ndim == 2:
            k = (ranks or {}).get(suffix, rank)
            w = w + (0.05 * rng.standard_normal((w.shape[0], k)) @ rng.standard_normal((k, w.shape[1]))
                     ).astype(np.float32)
        elif n in extra:
            w = w + 0.01 * rng.standard_normal(w.shape).astype(np.float32)
        out_t[n] = w
    save_hf(out, out_t, config=ck.config)
    return out_t


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("extract") / "base", seed=2)


@pytest.fixture(scope="module")
def ft(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("extract") / "ft"
    low_rank_ft(base, out, extra=("model.norm.weight",))
    return out


def peft_model(base, adapter):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, adapter)


def assert_forward_equals_ft(pm, ft, ids) -> None:
    """PEFT's forward with the adapter gives the fine-tuned model's logits (1e-4 relative)."""
    ft_model = transformers.AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32)
    with torch.no_grad():
        got, want = pm(input_ids=torch.tensor([ids])).logits, ft_model(input_ids=torch.tensor([ids])).logits
    assert torch.max(torch.abs(got - want)) <= 1e-4 * torch.max(torch.abs(want))


def assert_merge_equals_ft(pm, f) -> None:
    """PEFT's merge_and_unload() gives the fine-tuned tensors `f` ({name: array}, 1e-5 relative)."""
    merged = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    for name, w in f.items():
        assert np.max(np.abs(merged[name] - w)) <= 1e-5 * max(np.max(np.abs(w)), 1.0), name


def test_rank_r_delta_reproduced_and_peft_merge_equals_ft(base, ft, tmp_path):
    rep = extract_lora(base, ft, tmp_path / "ad", rank=RANK, progress=False)
    assert len(rep.modules) == 2 * len(TARGETS) and all(m["rank"] == RANK for m in rep.modules)
    assert max(m["rel_error"] for m in rep.modules) < 1e-5
    assert min(m["energy_kept"] for m in rep.modules) > 1 - 1e-6
    assert rep.whole == ["model.norm"] and rep.left_out["model.layers.0.self_attn.k_proj.weight"] == "unchanged"
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"]) == ("LORA", RANK, RANK, {})
    assert sorted(cfg["target_modules"]) == sorted(TARGETS) and cfg["modules_to_save"] == ["model.norm"]
    # the factors: B @ A is Δ to float32 precision
    loaded = load_adapter(tmp_path / "ad")
    b, f = tensors(base), tensors(ft)
    for name, m in loaded.modules.items():
        want = f[name].astype(np.float64) - b[name]
        assert np.max(np.abs(loaded.delta(m) - want)) <= 1e-5 * np.max(np.abs(want)), name
    # PEFT: load, merge -> the fine-tuned weights; forward with the adapter -> the ft model's logits
    pm = peft_model(base, tmp_path / "ad")
    assert_forward_equals_ft(pm, ft, [1, 5, 9, 33, 70, 2, 101, 17])
    assert_merge_equals_ft(pm, f)


def test_randomized_svd_path(base, ft, tmp_path, monkeypatch):
    monkeypatch.setattr(lora_extract, "EXACT_MAX", 8)  # every matrix of the tiny model takes the randomized path
    rep = extract_lora(base, ft, tmp_path / "ad", rank=RANK, skip=["norm"], progress=False)
    assert {m["method"] for m in rep.modules} == {"randomized"}
    assert max(m["rel_error"] for m in rep.modules) < 1e-5
    assert rep.whole == [] and rep.left_out["model.norm.weight"] == "--skip"
    rep2 = extract_lora(base, ft, tmp_path / "ad2", energy=0.999, skip=["norm"], progress=False)
    assert {m["rank"] for m in rep2.modules} == {RANK}


def spectrum_matrix(shape, kind, seed=0):
    """A float32 [m, n] matrix with a chosen spectrum: "low_rank_noise" (rank 5 + 1e-3 noise), "ill" (singular
    values 10^(-8 i/k): condition 1e8), "flat" (Gaussian noise: Marchenko-Pastur, nearly flat)."""
    rng = np.random.default_rng(seed)
    m, n = shape
    if kind == "flat":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "low_rank_noise":
        return (rng.standard_normal((m, 5)) @ rng.standard_normal((5, n)) + 1e-3 * rng.standard_normal(shape)
                ).astype(np.float32)
    k = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((u * 10.0 ** (-8 * np.arange(k) / k)) @ v.T).astype(np.float32)


@pytest.mark.parametrize("shape", [(200, 80), (80, 200)])
@pytest.mark.parametrize("kind", ["low_rank_noise", "ill", "flat"])
def test_factorize_error_is_eckart_young(shape, kind):
    """The reported ‖Δ − BA‖/‖Δ‖ is numpy's float64 truncated SVD's (the optimum) within 1e-3 relative (plus 1e-6,
    float32's rounding of B·A); B = U_k S_k, A = V_kᵀ (orthonormal rows where float32 resolves s_k); --energy picks the optimum's rank."""
    d = spectrum_matrix(shape, kind)
    s = np.linalg.svd(d.astype(np.float64), compute_uv=False)
    total = np.sum(s ** 2)
    for rank in (1, 5, 20, 40, 80):
        b, a, stats, _ = lora_extract.factorize(d, rank=rank)
        best = np.sqrt(np.sum(s[rank:] ** 2) / total)
        assert b.shape == (shape[0], rank) and a.shape == (rank, shape[1]) and stats["method"] == "exact"
        assert abs(stats["rel_error"] - best) <= 1e-3 * best + 1e-6, (rank, stats["rel_error"], best)
        j = int(np.sum(s[:rank] >= 1e-5 * s[0]))  # directions float32 resolves: below, any unit vectors do
        assert np.allclose(a[:j] @ a[:j].T, np.eye(j), atol=1e-5), rank
        assert np.allclose(np.linalg.norm(b, axis=0), s[:rank], rtol=1e-4, atol=1e-6 * s[0]), rank
    for energy in (0.5, 0.9, 0.99):
        want = int(np.searchsorted(np.cumsum(s ** 2) / total, energy)) + 1
        assert lora_extract.factorize(d, energy=energy)[2]["rank"] == want, energy


def test_exact_path_takes_no_svd_of_the_whole_delta(monkeypatch):
    """The exact path factorises through the smaller side's Gram matrix: no SVD of a full Δ (numpy's float64 SVD
    of 1408 x 512 took 4 s under load), and the curve still holds every singular value."""
    shapes, svd = [], np.linalg.svd
    monkeypatch.setattr(np.linalg, "svd", lambda x, *a, **k: shapes.append(np.shape(x)) or svd(x, *a, **k))
    d = spectrum_matrix((300, 120), "low_rank_noise")
    want = np.sqrt(np.clip(1 - np.cumsum(svd(d.astype(np.float64), compute_uv=False) ** 2)
                           / np.sum(d.astype(np.float64) ** 2), 0, None))
    shapes.clear()
    stats = lora_extract.factorize(d, rank=8)[2]
    assert all(min(sh) <= 8 for sh in shapes), shapes
    curve = lora_extract.factorize(d, rank=8, spectrum=True)[3]
    assert stats["method"] == "exact" and len(curve) == 120
    assert np.allclose(curve, want, atol=1e-6)


def test_energy_gives_per_module_ranks(base, tmp_path):
    ft = tmp_path / "ft"
    low_rank_ft(base, ft, ranks={"q_proj": 2, "v_proj": 5, "down_proj": 2}, seed=3)
    rep = extract_lora(base, ft, tmp_path / "ad", energy=0.99999, target_modules=["q_proj", "v_proj", "down_proj"],
                       progress=False)
    got = {m["module"]: m["rank"] for m in rep.modules}
    assert {k: v for k, v in got.items() if k.endswith("v_proj")} == {
        "model.layers.0.self_attn.v_proj": 5, "model.layers.1.self_attn.v_proj": 5}
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert set(cfg["rank_pattern"].values()) == {5} and len(cfg["rank_pattern"]) == 2
    pm = peft_model(base, tmp_path / "ad")
    assert pm.base_model.model.model.layers[1].self_attn.v_proj.r["default"] == 5
    assert pm.base_model.model.model.layers[1].self_attn.q_proj.r["default"] == 2
    assert_merge_equals_ft(pm, tensors(ft))


def test_target_modules_and_diff_input(base, ft, tmp_path):
    assert main(["diff", "--base", str(base), "--ft", str(ft), "--out", str(tmp_path / "d"), "--quiet"]) == 0
    rep = extract_lora(None, None, tmp_path / "ad", rank=RANK, diff=tmp_path / "d", target_modules=["v_proj"],
                       progress=False)
    assert {m["module"].rsplit(".", 1)[-1] for m in rep.modules} == {"v_proj"}
    assert rep.left_out["model.layers.0.self_attn.q_proj.weight"] == "not in --target-modules"
    assert "diff holds no fine-tuned values" in rep.left_out["model.norm.weight"]
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["v_proj"] and cfg["base_model_name_or_path"] == str(HFCheckpoint(base).path)


BAD = {
    "rank0": (["--rank", "0"], "--rank must be an integer >= 1"),
    "both": (["--rank", "2", "--energy", "0.9"], "give one of --rank"),
    "neither": ([], "give one of --rank"),
    "energy": (["--energy", "1.5"], "--energy must be in (0, 1]"),
    "skip": (["--rank", "2", "--skip", "no_such_tensor"], "--skip 'no_such_tensor' matches no tensor"),
    "targets": (["--rank", "2", "--target-modules", "q_proj,qproj"], "--target-modules 'qproj' matches no tensor"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments_one_line_nothing_written(base, ft, tmp_path, capsys, case):
    flags, message = BAD[case]
    code = main(["extract-lora", "--base", str(base), "--ft", str(ft), "--out", str(tmp_path / "ad"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "ad").exists() and list(tmp_path.iterdir()) == []


def test_mismatched_shapes_one_line_nothing_written(base, tmp_path, capsys):
    other = make_hf_model(tmp_path / "other", seed=3, intermediate_size=48)
    capsys.readouterr()
    code = main(["extract-lora", "--base", str(base), "--ft", str(other), "--out", str(tmp_path / "ad"),
                 "--rank", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "mlp.down_proj.weight is (32, 48) in ft, (32, 64) in base" in err and err.count("\n") == 1
    assert not (tmp_path / "ad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_cli_json_report_and_overwrite(base, ft, tmp_path, capsys):
    args = ["extract-lora", "--base", str(base), "--ft", str(ft), "--out", str(tmp_path / "ad"), "--rank", "2",
            "--target-modules", "q_proj,v_proj", "--json"]
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {m["rank"] for m in rep["modules"]} == {2} and 0 < rep["adapter_bytes"] < rep["diff_bytes"]
    assert all(0 < m["rel_error"] < 1 and 0 < m["energy_kept"] < 1 for m in rep["modules"])
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "ftjax_extract_lora.json"]
    assert main(args[:-1] + ["--overwrite"]) == 0
    assert "rel_error" in capsys.readouterr().out


def test_nothing_to_extract_is_an_error(base, tmp_path, capsys):
    code = main(["extract-lora", "--base", str(base), "--ft", str(base), "--out", str(tmp_path / "ad"), "--rank", "2",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "nothing to extract" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_plot_rank_error(base, ft, tmp_path):
    rep = extract_lora(base, ft, tmp_path / "ad", rank=RANK, plot=True, progress=False)
    assert 2 <= len(rep.curves) <= lora_extract.PLOTTED
    for module, errors in rep.curves.items():  # the error curve is the truncation error: ~0 from rank RANK on
        assert errors[0] > 0.1 and max(errors[RANK - 1:]) < 1e-5 and np.all(np.diff(errors) <= 1e-12), module
    png = tmp_path / "ad" / "rank_error.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "ad" / "rank_error.pdf").is_file()
    record = json.loads((tmp_path / "ad" / "ftjax_extract_lora.json").read_text())
    assert "rank_error.png" in record["files"]
    extract_lora(base, ft, tmp_path / "ad", rank=RANK, overwrite=True, progress=False)  # its own plot is replaced
    assert not png.exists()


def test_tied_embedding_saved_for_lm_head_too(tmp_path):
    """A tied model whose embedding changed: PEFT's output embedding must change with it (ensure_weight_tying)."""
    base = make_hf_model(tmp_path / "base", seed=4, tie_word_embeddings=True)
    low_rank_ft(base, tmp_path / "ft", extra=("model.embed_tokens.weight",))
    rep = extract_lora(base, tmp_path / "ft", tmp_path / "ad", rank=RANK, progress=False)
    assert rep.whole == ["model.embed_tokens", "lm_head"]
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["ensure_weight_tying"] is True
    assert_forward_equals_ft(peft_model(base, tmp_path / "ad"), tmp_path / "ft", [1, 5, 9, 33, 70, 2])


def test_changed_biases_saved_with_bias_all(tmp_path):
    """Qwen2's q/k/v biases: a changed bias of an adapted module (q_proj) and of a plain one (k_proj) both reach
    PEFT's merge and forward."""
    base = make_hf_model(tmp_path / "base", "qwen2", seed=5)
    extra = ("model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias")
    f = low_rank_ft(base, tmp_path / "ft", extra=extra)
    rep = extract_lora(base, tmp_path / "ft", tmp_path / "ad", rank=RANK, progress=False)
    assert rep.biases == list(extra) and not any(n.endswith(".bias") for n in rep.left_out)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["bias"] == "all"
    pm = peft_model(base, tmp_path / "ad")
    assert_forward_equals_ft(pm, tmp_path / "ft", [1, 5, 9, 33, 70, 2])
    assert_merge_equals_ft(pm, f)
