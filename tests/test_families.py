"""The families of 2026 (Qwen3, OLMo 3, SmolLM3, Gemma 2, Gemma 3, Phi-3, Granite) against transformers: float32
logits through `load_params` + `forward`, greedy generation, a bit-exact load -> save round trip, and for each family
switch a check that turning it off moves the logits far beyond the tolerance (so the parity above can fail).

Every model has every switch on at once (windows shorter than the input, both layer types, NoPE layers, small
softcaps, multipliers far from 1, partial rotary with long-rope on both sides of its switch) and weights drawn at a
larger scale than transformers' initialisation, norm weights included: at the default scale most of these
differences hide below 1e-4 (shared/reference/families.md §4.3)."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ftjax.config import read_config
from ftjax.errors import FtjaxError
from ftjax.generate import generate_ids
from ftjax.model import forward
from ftjax.params import load_params, save_params

ATOL = 1e-4
SIZES = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, pad_token_id=0)
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.9, 2.5], "long_factor": [1.5, 2.0, 3.0, 6.0]}
FAMILIES = {  # name: config.json (as published configs spell it)
    "qwen3": dict(model_type="qwen3", num_hidden_layers=3, head_dim=24, use_sliding_window=True, sliding_window=5,
                  max_window_layers=1, rope_theta=1e6),
    "qwen3_bias_tied": dict(model_type="qwen3", num_hidden_layers=2, head_dim=16, attention_bias=True,
                            tie_word_embeddings=True),
    "olmo3": dict(model_type="olmo3", num_hidden_layers=4, sliding_window=5, rope_theta=10000.0,
                  rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "smollm3": dict(model_type="smollm3", num_hidden_layers=4, no_rope_layer_interval=2, use_sliding_window=True,
                    sliding_window=5, rope_theta=10000.0),
    "gemma2": dict(model_type="gemma2", num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3_text": dict(model_type="gemma3_text", num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=20,
                        sliding_window=5, sliding_window_pattern=2, rope_theta=10000.0, rope_local_base_freq=100.0,
                        rope_scaling={"rope_type": "linear", "factor": 4.0}, final_logit_softcapping=4.0),
    "phi3": dict(model_type="phi3", num_hidden_layers=2, partial_rotary_factor=0.5, rope_scaling=LONGROPE,
                 original_max_position_embeddings=16, sliding_window=7),
    "granite": dict(model_type="granite", num_hidden_layers=2, embedding_multiplier=3.0, attention_multiplier=0.09,
                    residual_multiplier=0.5, logits_scaling=2.5),
}
# What turning one family switch off does to the ftjax config (a value, or a function of the config; each must move
# the logits by >> ATOL). Phi-3 with its whole head rotated by a plain rope: partial rotary and long-rope at once.
SWITCHES = {
    "qwen3": dict(qk_norm="", sliding_window=None, layer_types=("full_attention",) * 3),
    "qwen3_bias_tied": dict(qk_norm=""),
    "olmo3": dict(local_rope=None, layer_types=("full_attention",) * 4, qk_norm=""),  # norm "w": equal in float32
    "smollm3": dict(rope_layers=(True,) * 4, layer_types=("full_attention",) * 4),
    "gemma2": dict(attn_softcap=None, final_softcap=None, embed_scale=1.0, attn_scale=None, norm="w", act="silu",
                   layout="pre", layer_types=("full_attention",) * 3),
    "gemma3_text": dict(local_rope=None, qk_norm="", final_softcap=None, layer_types=("full_attention",) * 4),
    "phi3": dict(rope=lambda c: dataclasses.replace(c.rope, rope_type="default", attention_factor=1.0),
                 rotary_dim=lambda c: c.head_dim, layer_types=("full_attention",) * 2),
    "granite": dict(embed_scale=1.0, attn_scale=None, residual_multiplier=1.0, logits_divisor=1.0),
}


def build(config: dict, path, seed: int = 0) -> transformers.PreTrainedModel:
    """A random float32 transformers model built from `config` (written as config.json and read back by
    AutoConfig, as a published checkpoint is), weights at a larger scale, saved to `path` with that exact file."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path),
                                                          dtype=torch.float32).eval()
    gemma = config["model_type"].startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma stores w of (1 + w)
                p.uniform_(-0.5, 0.5) if gemma else p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(config))  # the exact file, not transformers' rewrite
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (transformers model, path, cfg, params), built once per family."""
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(name) / "m"
            model = build({**SIZES, **FAMILIES[name]}, path)
            cache[name] = (model, path, *load_params(path))
        return cache[name]

    return get


def tokens(batch: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SIZES["vocab_size"], (batch, length)).astype(np.int32)


def hf_logits(model, tokens_bt) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens_bt)).logits.float().numpy()


def err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(name, models):
    model, _, cfg, params = models(name)
    for length in (12, 24):  # phi3: 12 below its original context of 16 (short factors), 24 above it (long)
        tokens_bt = tokens(2, length)
        e = err(forward(params, jnp.asarray(tokens_bt), cfg), hf_logits(model, tokens_bt))
        print(f"{name} T={length}: max |logit error| {e:.2e}")
        assert e <= ATOL


@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_family_switch_moves_the_logits(name, models):
    model, _, cfg, params = models(name)
    tokens_bt = tokens(2, 24)
    want = hf_logits(model, tokens_bt)
    for field, off in SWITCHES[name].items():
        changed = cfg.replace(**{field: off(cfg) if callable(off) else off})
        if field == "rotary_dim":
            changed = changed.replace(rope=dataclasses.replace(cfg.rope, rope_type="default"))
        moved = err(forward(params, jnp.asarray(tokens_bt), changed), want)
        assert moved > 100 * ATOL, f"{name}: switching {field} off moves the logits by only {moved:.1e}"


@pytest.mark.parametrize("name", ["qwen3", "olmo3", "smollm3", "gemma2", "gemma3_text", "phi3", "granite"])
def test_greedy_generation_matches_transformers(name, models):
    model, _, cfg, params = models(name)
    prompts = [tokens(1, 9, seed=3)[0].tolist(), tokens(1, 4, seed=4)[0].tolist()]
    got = generate_ids(params, cfg, prompts, max_new_tokens=20, batch_size=2)
    for prompt, completion in zip(prompts, got):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert completion.tokens == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["qwen3_bias_tied", "olmo3", "gemma3_text", "phi3"])
def test_load_save_round_trip_is_bit_exact(name, models, tmp_path):
    _, path, cfg, params = models(name)
    config = json.loads((path / "config.json").read_text())
    save_params(params, tmp_path / "out", config=config)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()
    assert read_config(cfg.to_hf()).config == cfg  # the config ftjax writes reads back as the same model


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_mixture_of_experts_is_refused_by_name(family):
    with pytest.raises(FtjaxError, match=f"model_type '{family}' is a mixture of experts"):
        read_config({**SIZES, "model_type": family, "num_hidden_layers": 2})


@pytest.mark.parametrize("name", ["qwen3", "olmo3", "smollm3", "gemma2", "gemma3_text", "phi3", "granite"])
def test_eval_scan_stats_and_finetune_run_on_every_family(name, models, tmp_path, capsys):
    """The commands beyond transfer: `eval` agrees with transformers' loss; `scan` (3 points), `stats` and a
    3-step `finetune` run on the family and write their results."""
    from ftjax.cli import main

    model, path, _, _ = models(name)
    other = tmp_path / "other"
    build({**SIZES, **FAMILIES[name]}, other, seed=1)
    rows_bt = tokens(4, 16, seed=5)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in rows_bt))
    logp = torch.log_softmax(torch.tensor(hf_logits(model, rows_bt)[:, :-1], dtype=torch.float64), -1)
    nll = -logp.gather(-1, torch.tensor(rows_bt[:, 1:, None], dtype=torch.long)).squeeze(-1)

    def run(*argv: str) -> str:
        capsys.readouterr()
        assert main(list(argv)) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    assert abs(json.loads(run("eval", "--model", str(path), "--data", str(data), "--json"))["loss"]
               - float(nll.mean())) <= ATOL
    run("scan", "--a", str(path), "--b", str(other), "--data", str(data), "--points", "3", "--out", str(tmp_path / "s"))
    assert len(json.loads((tmp_path / "s" / "scan.json").read_text())["loss"]) == 3
    run("stats", "--source-base", str(path), "--source-ft", str(other), "--out", str(tmp_path / "st"))
    assert (tmp_path / "st" / "stats.json").is_file()
    run("finetune", "--init", str(path), "--data", str(data), "--steps", "3", "--batch-size", "2", "--max-len", "16",
        "--out", str(tmp_path / "run"), "--quiet")
    assert read_config(json.loads((tmp_path / "run" / "final" / "config.json").read_text())).config.model_type == (
        FAMILIES[name]["model_type"])


def test_one_tying_rule_for_transfer_and_load_params(tmp_path):
    """A config without tie_word_embeddings means the family's transformers default, in the layout (transfer) and
    the config reader (load_params) alike: SmolLM3 ties by default, so a checkpoint without lm_head.weight loads as
    tied; Qwen3 does not, so one without lm_head.weight is refused by both (transformers would start that head at
    random), where before transfer took it as tied and load_params refused it."""
    from ftjax.io.checkpoint import HFCheckpoint
    from ftjax.layout import Layout
    from ftjax.transfer import transfer

    for name, tied in (("smollm3", True), ("qwen3_bias_tied", False)):
        config = {**SIZES, **FAMILIES[name]}
        config.pop("tie_word_embeddings", None)
        path = tmp_path / name
        build({**config, "tie_word_embeddings": True}, path)  # weights saved without lm_head.weight
        (path / "config.json").write_text(json.dumps(config))  # the config as published: no tie key
        assert "lm_head.weight" not in HFCheckpoint(path).names()
        if tied:
            cfg, params = load_params(path)
            assert cfg.tie_word_embeddings and Layout.of_checkpoint(HFCheckpoint(path)).tied
            transfer(path, path, path, tmp_path / "out", progress=False)
        else:
            for call in (lambda: load_params(path), lambda: transfer(path, path, path, tmp_path / "o2", progress=False)):
                with pytest.raises(FtjaxError, match="does not tie the embeddings.*no lm_head.weight"):
                    call()
            assert not (tmp_path / "o2").exists()
