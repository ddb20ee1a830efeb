"""mergekit's `BASE+ADAPTER` model references in `ftjax merge` configs: the model with its LoRA adapter merged in."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hf_models import checkpoint_tensors, make_hf_model, write_yaml
from test_lora import make_adapter

from ftjax.errors import FtjaxError
from ftjax.merge import merge
from ftjax.transfer import apply


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_lora")
    base = make_hf_model(d / "base", dtype="bfloat16", seed=1)
    a1, a2 = d / "a1", d / "a2"
    make_adapter(base, a1, dtype="bfloat16", seed=2)
    make_adapter(base, a2, dtype="bfloat16", seed=3, target_modules=["k_proj", "down_proj"])
    applied = {}
    for name, adapter in (("a1", a1), ("a2", a2)):
        applied[name] = d / f"applied_{name}"
        apply(base, adapter, applied[name], progress=False)
    return d, base, a1, a2, applied


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].dtype == want[n].dtype and np.array_equal(got[n].view(np.uint16), want[n].view(np.uint16)), n


def _leftovers(parent) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".ftjax-adapters-"))


def test_base_plus_adapter_is_the_model_with_the_adapter_applied(world, tmp_path):
    d, base, a1, _, applied = world
    cfg = write_yaml(tmp_path, {"merge_method": "linear", "models": [{"model": f"{base}+{a1}",
                                                                      "parameters": {"weight": 1.0}}]})
    out = tmp_path / "out"
    report = merge(cfg, out, progress=False)
    _same(checkpoint_tensors(out), checkpoint_tensors(applied["a1"]))
    assert report.inputs["m0"] == f"{base}+{a1}"  # the reference, not the temporary directory
    record = json.loads((out / "ftjax_merge.json").read_text())
    assert f"{base}+{a1}" in json.dumps(record)
    assert _leftovers(tmp_path) == []


def test_adapters_in_a_task_arithmetic_merge_equal_the_applied_models(world, tmp_path):
    d, base, a1, a2, applied = world
    models = lambda m1, m2: {"merge_method": "task_arithmetic", "base_model": str(base), "models": [
        {"model": m1, "parameters": {"weight": 0.7}}, {"model": m2, "parameters": {"weight": 0.5}}]}
    # mergekit's dict form {model, lora} for the second one
    got, want = tmp_path / "got", tmp_path / "want"
    merge(write_yaml(tmp_path, models(f"{base}+{a1}", {"model": str(base), "lora": str(a2)}), "a.yml"), got,
          progress=False)
    merge(write_yaml(tmp_path, models(str(applied["a1"]), str(applied["a2"])), "b.yml"), want, progress=False)
    _same(checkpoint_tensors(got), checkpoint_tensors(want))
    assert _leftovers(tmp_path) == []


def test_dry_run_and_refusals_write_nothing(world, tmp_path):
    d, base, a1, _, _ = world
    cfg = write_yaml(tmp_path, {"merge_method": "linear", "models": [{"model": f"{base}+{a1}",
                                                                      "parameters": {"weight": 1.0}}]})
    report = merge(cfg, tmp_path / "dry", dry_run=True, progress=False)
    assert report.dry_run and report.tensors > 0 and not (tmp_path / "dry").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(FtjaxError, match="already exists"):  # refused before any adapter is merged
        merge(cfg, tmp_path / "taken", progress=False)
    bad = write_yaml(tmp_path, {"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'nope'}",
                                                                      "parameters": {"weight": 1.0}}]}, "bad.yml")
    with pytest.raises(FtjaxError) as e:
        merge(bad, tmp_path / "out", progress=False)
    assert "nope" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert sorted(p.name for p in a1.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
