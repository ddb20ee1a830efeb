"""ftjax.recycle: two versions iterative == direct; three versions == Algorithm 1's formula, bit for bit; zero steps
=> transfer-then-finetune == transfer; plot-curves."""

import json
from pathlib import Path

import numpy as np
import pytest

from ftjax.cli import main
from ftjax.errors import FtjaxError
from ftjax.io.safetensors import SafetensorsFile
from ftjax.recycle import recycle
from ftjax.train import TrainConfig, finetune
from ftjax.transfer import transfer
from hf_models import make_hf_model


def _tensors(model_dir: Path) -> dict[str, np.ndarray]:
    with SafetensorsFile(Path(model_dir) / "model.safetensors") as f:
        return {n: np.array(f.get(n)) for n in f.names()}


def _assert_same_bits(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].tobytes() == tb[name].tobytes(), name


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    rng = np.random.default_rng(0)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"input_ids": rng.integers(3, 128, rng.integers(6, 24)).tolist()}) + "\n"
                            for _ in range(16)))
    models = [make_hf_model(root / f"M{i}", seed=i, dtype="bfloat16") for i in (1, 2)]
    return root, models, data


def test_two_versions_iterative_equals_direct(versions, tmp_path, capsys):
    _, (m1, m2), data = versions
    tcfg = TrainConfig(steps=3, lr=1e-3, batch_size=4, max_len=32, warmup=0)
    runs = {mode: recycle([m1, m2], data, tmp_path / mode, config=tcfg, mode=mode, keep=0, progress=False)
            for mode in ("iterative", "direct")}
    for mode in runs:
        out = tmp_path / mode
        assert list((out / "M2_star" / "checkpoints").iterdir()) == []  # keep=0 reaches every fine-tuning run
        assert (out / "summary.md").is_file() and (out / "curves.png").is_file()
        assert (out / "delta_1" / "config.json").is_file() and (out / "M2_init" / "config.json").is_file()
    _assert_same_bits(tmp_path / "iterative" / "M1_star" / "final", tmp_path / "direct" / "M1_star" / "final")
    _assert_same_bits(tmp_path / "iterative" / "M2_star" / "final", tmp_path / "direct" / "M2_star" / "final")
    # M2* starts from M2 + (M1* - M1), and training moved it
    entry = runs["iterative"]["versions"][1]
    assert entry["init"].endswith("M2_init") and entry["delta_in"].endswith("delta_1")
    norm = "model.norm.weight"
    assert _tensors(entry["final"])[norm].tobytes() != _tensors(entry["init"])[norm].tobytes()
    assert [e["version"] for e in runs["direct"]["versions"]] == [1, 2]

    # re-running the same command resumes (everything is complete, so nothing is redone)
    again = recycle([m1, m2], data, tmp_path / "iterative", config=tcfg, mode="iterative", progress=False)
    assert again["versions"] == runs["iterative"]["versions"]
    with pytest.raises(FtjaxError, match="different"):
        recycle([m1, m2], data, tmp_path / "iterative", config=tcfg, mode="direct", progress=False)

    # plot-curves overlays the two versions' runs
    out = tmp_path / "plots"  # --out is a directory, as for every command
    assert main(["plot-curves", str(tmp_path / "iterative" / "M1_star"), str(tmp_path / "iterative" / "M2_star"),
                 "--labels", "FT(M1)", "FT(M2 + Δ)", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["curves.pdf", "curves.png"]
    capsys.readouterr()
    assert main(["plot-curves", str(tmp_path), "--out", str(out)]) == 2
    assert "no log.jsonl" in capsys.readouterr().err


def test_zero_steps_transfer_then_finetune_equals_transfer(versions, tmp_path):
    """FT with 0 steps is the identity, bitwise, through the trainer's float32 master copy and its exporter (bf16)."""
    root, (m1, m2), data = versions
    ft = make_hf_model(tmp_path / "M1_ft", seed=7, dtype="bfloat16")
    transfer(m1, ft, m2, tmp_path / "M2_plus_delta", progress=False)
    result = finetune(tmp_path / "M2_plus_delta", data, tmp_path / "run", config=TrainConfig(steps=0, max_len=32),
                      progress=False)
    _assert_same_bits(tmp_path / "M2_plus_delta", Path(result["final"]))

    summary = recycle([m1, m2], data, tmp_path / "rec", config=TrainConfig(steps=0, max_len=32), progress=False)
    _assert_same_bits(m2, summary["versions"][1]["final"])  # M1* = M1, so Δ = 0 and M2* = M2 exactly
    assert "M2*" in (tmp_path / "rec" / "summary.md").read_text()


def _round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 rounded once, to nearest even: to float32 rounding to odd (toward zero, lowest bit set
    when inexact), then float32 -> bfloat16 to nearest even (correct with the 16 spare bits)."""
    import ml_dtypes

    f = x.astype(np.float32)
    f = np.where(np.abs(f.astype(np.float64)) > np.abs(x), np.nextafter(f, np.float32(0)), f)
    inexact = (f.astype(np.float64) != x).astype(np.uint32)
    return (f.view(np.uint32) | inexact).view(np.float32).astype(ml_dtypes.bfloat16)


def test_three_versions_iterative_is_algorithm_1_bit_for_bit(versions, tmp_path):
    """Algorithm 1 over M1, M2, M3 against its formula: M1* = FT(M1), Mi* = FT(Mi + (M(i-1)* - M(i-1))), the sum
    formed exactly (float64: bfloat16 operands) and rounded once to bfloat16, FT = `finetune` with the same recipe.
    With three versions iterative and direct differ: M3's Δ carries M1's fine-tuning only in iterative mode."""
    root, (m1, m2), data = versions
    m3 = make_hf_model(root / "M3", seed=3, dtype="bfloat16")
    tcfg = TrainConfig(steps=2, lr=1e-3, batch_size=4, max_len=32, warmup=0)
    got = recycle([m1, m2, m3], data, tmp_path / "iterative", config=tcfg, mode="iterative", keep=0, progress=False)

    def plus_delta(target: Path, tuned: Path, base: Path, out: Path) -> Path:
        t, f, b = _tensors(target), _tensors(tuned), _tensors(base)
        exact = {n: t[n].astype(np.float64) + (f[n].astype(np.float64) - b[n].astype(np.float64)) for n in t}
        out.mkdir()
        for aux in ("config.json", "generation_config.json"):
            if (target / aux).is_file():
                (out / aux).write_bytes((target / aux).read_bytes())
        import safetensors.numpy

        safetensors.numpy.save_file({n: _round_to_bfloat16(x) for n, x in exact.items()},
                                    str(out / "model.safetensors"))
        return out

    star = Path(finetune(m1, data, tmp_path / "ref1", config=tcfg, keep=0, progress=False)["final"])
    _assert_same_bits(star, got["versions"][0]["final"])
    for i, (base, prev) in enumerate([(m2, m1), (m3, m2)], start=2):
        init = plus_delta(base, star, prev, tmp_path / f"ref_init{i}")
        _assert_same_bits(init, got["versions"][i - 1]["init"])
        star = Path(finetune(init, data, tmp_path / f"ref{i}", config=tcfg, keep=0, progress=False)["final"])
        _assert_same_bits(star, got["versions"][i - 1]["final"])

    direct = recycle([m1, m2, m3], data, tmp_path / "direct", config=tcfg, mode="direct", keep=0, progress=False)
    a, b = _tensors(direct["versions"][2]["final"]), _tensors(star)
    assert any(a[n].tobytes() != b[n].tobytes() for n in a)
