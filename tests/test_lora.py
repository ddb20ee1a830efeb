"""LoRA adapters as diffs (ftjax.lora), against PEFT itself: adapters made by PEFT on tiny transformers models,
merged by PEFT's merge_and_unload, and applied / transferred by ftjax."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hf_models import make_hf_model
from reference import round_f64

from ftjax import lora
from ftjax.cli import main
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import HFCheckpoint, save_hf
from ftjax.transfer import apply, transfer

import peft  # noqa: E402  (the reference: a required test dependency)
import torch  # noqa: E402


def make_adapter(base_dir, out, family="llama", dtype="float32", seed=0, **lora_kwargs):
    """A PEFT LoRA adapter on the model at base_dir (A and B random, so the delta is not zero), saved to `out`;
    returns PEFT's merge_and_unload() of it as {name: float32 numpy}."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora_kwargs}
    pm = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name or (name.endswith(".bias") and p.requires_grad):
                p.copy_((0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))
    pm.save_pretrained(out)
    merged = pm.merge_and_unload()
    return {k: v.detach().float().numpy() for k, v in merged.state_dict().items()}


def peft_merge(base_dir, adapter_dir, dtype="float32"):
    """PEFT's own load + merge of a saved adapter (what a user of PEFT gets)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k: v.detach().float().numpy() for k, v in merged.state_dict().items()}


def tensors(path):
    ck = HFCheckpoint(path)
    return {n: np.asarray(ck.get(n)) for n in ck.names()}


def rel_err(got, want):
    return max(float(np.max(np.abs(got[n].astype(np.float64) - want[n]))) / max(float(np.max(np.abs(want[n]))), 1e-30)
               for n in got)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("lora") / "base", seed=1)


VARIANTS = {
    "subset": {},
    "rslora+patterns": {"use_rslora": True, "target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"],
                        "rank_pattern": {"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                        "alpha_pattern": {"o_proj": 3}},
    "modules_to_save+embedding": {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
    "all-linear": {"target_modules": "all-linear", "r": 2, "lora_alpha": 16},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_apply_equals_peft_merge(base, tmp_path, variant):
    merged = make_adapter(base, tmp_path / "ad", **VARIANTS[variant])
    rep = apply(base, tmp_path / "ad", tmp_path / "out", progress=False)
    got = tensors(tmp_path / "out")
    assert set(got) == set(tensors(base)) and rep.transferred > 0
    assert rel_err(got, merged) <= 1e-6
    assert rel_err(got, peft_merge(base, tmp_path / "ad")) <= 1e-6


def test_bias_all_on_qwen2_and_fan_in_fan_out(tmp_path):
    """Qwen2's q/k/v have biases: bias='all' saves every bias whole; a hand-edited fan_in_fan_out=true is ignored
    on nn.Linear, by PEFT and by ftjax."""
    b = make_hf_model(tmp_path / "qwen", "qwen2", seed=2)
    make_adapter(b, tmp_path / "ad", bias="all", target_modules=["q_proj", "up_proj"])
    cfg = json.loads((tmp_path / "ad" / lora.ADAPTER_CONFIG).read_text())
    assert any(k.endswith(".bias") for k in lora.load_adapter(tmp_path / "ad").whole)
    cfg["fan_in_fan_out"] = True
    (tmp_path / "ad" / lora.ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        want = peft_merge(b, tmp_path / "ad")
    rep = apply(b, tmp_path / "ad", tmp_path / "out", progress=False)
    assert any("fan_in_fan_out" in w for w in rep.warnings)
    assert rel_err(tensors(tmp_path / "out"), want) <= 1e-6


def test_bf16_exact_and_within_one_ulp_of_peft(tmp_path):
    """bf16: ftjax is T + delta rounded once (0 elements off the exact value); PEFT rounds the delta to bf16 and then
    the sum, so it is off by one ulp where the double rounding bites."""
    b = make_hf_model(tmp_path / "b", dtype="bfloat16", seed=3)
    make_adapter(b, tmp_path / "ad", dtype="bfloat16", target_modules=["q_proj", "v_proj", "gate_proj"])
    apply(b, tmp_path / "ad", tmp_path / "out", progress=False)
    got, base_t, pm = tensors(tmp_path / "out"), tensors(b), peft_merge(b, tmp_path / "ad", "bfloat16")
    ad = lora.load_adapter(tmp_path / "ad")
    off_exact = off_peft = total = 0
    for name, m in ad.modules.items():
        exact = round_f64(base_t[name].astype(np.float64) + ad.delta(m), got[name].dtype)
        off_exact += int(np.sum(exact.view(np.uint16) != got[name].view(np.uint16)))
        peft_bits = pm[name].astype(got[name].dtype)
        ulps = np.abs(peft_bits.view(np.int16).astype(np.int32) - got[name].view(np.int16).astype(np.int32))
        assert ulps.max() <= 1, name
        off_peft, total = off_peft + int(np.sum(ulps > 0)), total + ulps.size
    assert off_exact == 0
    print(f"PEFT's bf16 merge differs from the exact result in {off_peft} of {total} elements "
          f"({off_peft / total:.2%})")


def test_transfer_source_lora_equals_full_transfer(base, tmp_path):
    """--source-lora onto a second version = the full-checkpoint transfer with source_ft = merge_and_unload()."""
    merged = make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"])
    ft = save_hf(tmp_path / "ft", merged, config=HFCheckpoint(base).config, aux_from=base)
    target = make_hf_model(tmp_path / "v2", seed=7)
    transfer(base, ft, target, tmp_path / "full", alpha=0.8, progress=False)
    assert main(["transfer", "--source-lora", str(tmp_path / "ad"), "--source-base", str(base), "--target-base",
                 str(target), "--out", str(tmp_path / "viaLora"), "--alpha", "0.8", "--quiet"]) == 0
    full, via = tensors(tmp_path / "full"), tensors(tmp_path / "viaLora")
    assert rel_err(via, {k: v.astype(np.float64) for k, v in full.items()}) <= 1e-6
    untouched = [n for n in full if "q_proj" not in n and "down_proj" not in n and n != "lm_head.weight"]
    assert all(np.array_equal(via[n], tensors(target)[n]) for n in untouched)


def test_whole_tensors_and_the_source_base(base, tmp_path):
    """A whole tensor W adds its change W - S, with S the adapter's base_model_name_or_path when it is found; without
    a source base W replaces the target's, with a warning."""
    merged = make_adapter(base, tmp_path / "ad", modules_to_save=["lm_head"])
    target = make_hf_model(tmp_path / "v2", seed=8)
    assert lora.load_adapter(tmp_path / "ad").base == str(base)  # PEFT records the directory it loaded
    lora.transfer_lora(tmp_path / "ad", target, tmp_path / "found", progress=False)
    t, s = tensors(target)["lm_head.weight"], tensors(base)["lm_head.weight"]
    want = round_f64(t.astype(np.float64) + (merged["lm_head.weight"].astype(np.float64) - s), np.float32)
    assert np.array_equal(tensors(tmp_path / "found")["lm_head.weight"], want)
    cfg = json.loads((tmp_path / "ad" / lora.ADAPTER_CONFIG).read_text())
    (tmp_path / "ad" / lora.ADAPTER_CONFIG).write_text(json.dumps({**cfg, "base_model_name_or_path": "nobody/none"}))
    rep = lora.transfer_lora(tmp_path / "ad", target, tmp_path / "out", progress=False)
    assert any("replace the target's" in w for w in rep.warnings)
    assert np.array_equal(tensors(tmp_path / "out")["lm_head.weight"], merged["lm_head.weight"])


def test_adapter_tokenizer_files_travel(base, tmp_path):
    make_adapter(base, tmp_path / "ad")
    (tmp_path / "ad" / "chat_template.jinja").write_text("{{ messages }}")
    apply(base, tmp_path / "ad", tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert not (tmp_path / "out" / lora.ADAPTER_CONFIG).exists()
    apply(base, tmp_path / "ad", tmp_path / "out2", tokenizer_from="target", progress=False)
    assert not (tmp_path / "out2" / "chat_template.jinja").exists()


@pytest.mark.parametrize("edit, match", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "LOHA"}, "peft_type is 'LOHA'"),
    ({"init_lora_weights": "pissa_niter_4"}, "modified base"),
    ({"r": 0}, "r must be a positive"),
    ({"rank_pattern": {"q_proj": 3}}, "not a rank-3 LoRA pair"),
])
def test_bad_adapters_are_one_line_errors(base, tmp_path, edit, match):
    make_adapter(base, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / lora.ADAPTER_CONFIG).read_text())
    (tmp_path / "ad" / lora.ADAPTER_CONFIG).write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(FtjaxError, match=match):
        apply(base, tmp_path / "ad", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_pickled_adapter_refused(base, tmp_path):
    make_adapter(base, tmp_path / "ad")
    (tmp_path / "ad" / lora.ADAPTER_WEIGHTS).rename(tmp_path / "ad" / "adapter_model.bin")
    with pytest.raises(FtjaxError, match="never unpickles"):
        lora.load_adapter(tmp_path / "ad")


def test_shape_mismatch_names_the_module(base, tmp_path):
    make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "up_proj"])
    other = make_hf_model(tmp_path / "wide", seed=9, intermediate_size=96)
    before = sorted(p.name for p in other.iterdir())
    with pytest.raises(FtjaxError, match=r"module model\.layers\.0\.mlp\.up_proj: the adapter's delta is \(64, 32\)"):
        lora.transfer_lora(tmp_path / "ad", other, tmp_path / "out", progress=False)
    assert main(["transfer", "--source-lora", str(tmp_path / "ad"), "--target-base", str(other), "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    assert not (tmp_path / "out").exists() and sorted(p.name for p in other.iterdir()) == before


def test_cli_needs_one_source(base, tmp_path, capsys):
    assert main(["transfer", "--target-base", str(base), "--out", str(tmp_path / "o")]) == 2
    assert "one of --source-ft" in capsys.readouterr().err
