"""stats: streamed diff statistics equal a float64 numpy reference; chunking, vocab growth, refusals, CLI."""

import json

import numpy as np
import pytest

from ftjax.cli import main
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import HFCheckpoint
from ftjax.stats import diff_stats, format_table, group_of
from hf_models import make_hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    return {k: make_hf_model(root / k, seed=i) for i, k in enumerate(("s", "f", "t", "g"))}


def tensors(path):
    with HFCheckpoint(path) as c:
        return {n: np.asarray(c.get(n), np.float64).ravel() for n in c.names()}


def test_matches_numpy_reference(models):
    s, f, t, g = (tensors(models[k]) for k in "sftg")
    got = diff_stats(models["s"], models["f"], models["t"], models["g"])
    by_name = {e["name"]: e for e in got["tensors"]}
    assert set(by_name) == set(s)
    for name in s:
        ds, dt, ts = f[name] - s[name], g[name] - t[name], t[name] - s[name]
        e = by_name[name]
        assert e["delta_norm"] == pytest.approx(np.linalg.norm(ds), rel=1e-12)
        assert e["rel_delta"] == pytest.approx(np.linalg.norm(ds) / np.linalg.norm(s[name]), rel=1e-12)
        assert e["base_distance"] == pytest.approx(np.linalg.norm(ts), rel=1e-12)
        assert e["cos_delta"] == pytest.approx(ds @ dt / np.linalg.norm(ds) / np.linalg.norm(dt), abs=1e-12)
        assert e["rel_delta_target"] == pytest.approx(np.linalg.norm(dt) / np.linalg.norm(t[name]), rel=1e-12)
    layer1 = [n for n in s if n.startswith("model.layers.1.")]
    ds = np.concatenate([f[n] - s[n] for n in layer1])
    dt = np.concatenate([g[n] - t[n] for n in layer1])
    row = next(r for r in got["layers"] if r["layer"] == 1)
    assert row["delta_norm"] == pytest.approx(np.linalg.norm(ds), rel=1e-12)
    assert row["cos_delta"] == pytest.approx(ds @ dt / np.linalg.norm(ds) / np.linalg.norm(dt), abs=1e-12)
    all_ds = np.concatenate([f[n] - s[n] for n in s])
    assert got["total"]["delta_norm"] == pytest.approx(np.linalg.norm(all_ds), rel=1e-12)
    assert [r["group"] for r in got["layers"]][:2] == ["layer 0", "layer 1"]
    assert "cos(Δs,Δt)" in format_table(got)


def test_chunking_does_not_change_results(models):
    big = diff_stats(models["s"], models["f"], models["t"])
    small = diff_stats(models["s"], models["f"], models["t"], chunk_elems=50)  # many row chunks per tensor
    for a, b in zip(big["tensors"], small["tensors"]):
        assert a["delta_norm"] == pytest.approx(b["delta_norm"], rel=1e-12)
        assert a["cos_delta_base"] == pytest.approx(b["cos_delta_base"], abs=1e-12)
    assert "cos_delta" not in big["total"] and "base_distance" in big["total"]


def test_grown_vocabulary_compares_common_rows(models, tmp_path):
    grown = make_hf_model(tmp_path / "grown", vocab_size=136)
    got = diff_stats(models["s"], grown)
    embed = next(e for e in got["tensors"] if e["name"] == "model.embed_tokens.weight")
    assert embed["rows_compared"] == 128
    s, f = tensors(models["s"]), tensors(grown)
    want = np.linalg.norm(f["model.embed_tokens.weight"][:128 * 32] - s["model.embed_tokens.weight"])
    assert embed["delta_norm"] == pytest.approx(want, rel=1e-12)


def test_tied_embeddings_counted_once(tmp_path):
    a = make_hf_model(tmp_path / "a", tie_word_embeddings=True)
    b = make_hf_model(tmp_path / "b", tie_word_embeddings=True, seed=1)
    got = diff_stats(a, b)
    assert "lm_head.weight" not in {e["name"] for e in got["tensors"]}


def test_refusals(models, tmp_path):
    with pytest.raises(FtjaxError, match="shapes"):
        diff_stats(models["s"], make_hf_model(tmp_path / "wide", intermediate_size=96))
    with pytest.raises(FtjaxError, match="families"):
        diff_stats(models["s"], make_hf_model(tmp_path / "qwen", "qwen2"))
    with pytest.raises(FtjaxError, match="target base"):
        diff_stats(models["s"], models["f"], target_ft=models["g"])
    assert group_of("model.layers.12.mlp.up_proj.weight") == (12, "layer 12")
    assert group_of("lm_head.weight") == (None, "lm_head")


def test_cli_stats(models, tmp_path, capsys):
    out = tmp_path / "st"
    assert main(["stats", "--source-base", str(models["s"]), "--source-ft", str(models["f"]), "--target-base",
                 str(models["t"]), "--target-ft", str(models["g"]), "--out", str(out), "--json"]) == 0
    total = json.loads(capsys.readouterr().out)
    assert {"delta_norm", "rel_delta", "base_distance", "cos_delta"} <= set(total)
    saved = json.loads((out / "stats.json").read_text())
    assert len(saved["layers"]) >= 2 and saved["total"] == total
    assert (out / "stats.png").stat().st_size > 1000 and (out / "stats.pdf").stat().st_size > 1000


def test_table_shows_every_norm_computed(models):
    """With a target fine-tune the table has ‖Δt‖ and ‖Δt‖/‖T‖ beside ‖Δs‖, ‖T−S‖ and the cosine, per layer and
    in the total row; without one, no Δt columns."""
    result = diff_stats(models["s"], models["f"], models["t"], models["g"])
    lines = format_table(result).splitlines()
    header = lines[0].split()
    assert header == ["group", "‖Δs‖/‖S‖", "‖Δs‖", "‖T−S‖", "‖T−S‖/‖S‖", "‖Δt‖", "‖Δt‖/‖T‖", "cos(Δs,Δt)"]
    total = dict(zip(header, lines[-1].split()))
    assert total["group"] == "total"
    assert float(total["‖Δt‖"]) == pytest.approx(result["total"]["delta_target_norm"], rel=1e-3)
    assert float(total["‖Δt‖/‖T‖"]) == pytest.approx(result["total"]["rel_delta_target"], rel=1e-3)
    assert len(lines) == len(result["layers"]) + 2
    assert "‖Δt‖" not in format_table(diff_stats(models["s"], models["f"], models["t"]))
