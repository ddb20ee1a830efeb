"""ModelConfig.from_hf / to_hf: both rope schemas, the unhandled-key guard, family rules, transformers round trip."""

import json

import numpy as np
import pytest
import torch
import transformers

from ftjax.config import ModelConfig, RopeConfig, read_config
from ftjax.errors import FtjaxError

LLAMA = {  # a Llama-3.1-style config.json in the older schema (transformers 4.x)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "hidden_act": "silu", "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 256},
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
    "bos_token_id": 1, "eos_token_id": [2, 3], "torch_dtype": "bfloat16", "transformers_version": "4.45.0",
    "use_cache": True, "initializer_range": 0.02, "attention_dropout": 0.0,
}
LLAMA3_ROPE = RopeConfig("llama3", 500000.0, 8.0, 1.0, 4.0, 256)


def cfg_of(base=LLAMA, drop=(), **changes):
    return ModelConfig.from_hf({**{k: v for k, v in base.items() if k not in drop}, **changes})


def test_llama_fields():
    cfg = cfg_of()
    assert (cfg.model_type, cfg.head_dim, cfg.num_key_value_heads, cfg.rms_norm_eps) == ("llama", 16, 2, 1e-5)
    assert cfg.rope == LLAMA3_ROPE and cfg.layer_types == ("full_attention",) * 2 and cfg.window(0) is None
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.tie_word_embeddings) == (False,) * 4
    assert (cfg.qk_norm, cfg.layout, cfg.norm) == ("", "pre", "w")
    meta = read_config(LLAMA).meta
    assert (meta.dtype, meta.eos_token_id, meta.bos_token_id, meta.initializer_range) == ("bfloat16", (2, 3), 1, 0.02)
    assert hash(cfg) == hash(cfg_of())  # usable as a static jit argument
    assert cfg_of(head_dim=32).head_dim == 32 and cfg_of(head_dim=None).head_dim == 16
    assert cfg_of(num_key_value_heads=None).num_key_value_heads == 4


def test_rope_schemas_agree():
    new = {k: v for k, v in LLAMA.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {**LLAMA["rope_scaling"], "rope_theta": 500000.0}
    legacy_type = {**LLAMA, "rope_scaling": {**LLAMA["rope_scaling"]}}
    legacy_type["rope_scaling"]["type"] = legacy_type["rope_scaling"].pop("rope_type")
    both = {**LLAMA, "rope_parameters": new["rope_parameters"]}
    for c in (new, legacy_type, both):
        assert ModelConfig.from_hf(c) == cfg_of()
        assert read_config(c).notes == ()
    # transformers reads rope_scaling when it is set and then never looks at rope_parameters: so does ftjax
    report = read_config({**both, "rope_parameters": {**new["rope_parameters"], "factor": 2.0}})
    assert report.config == cfg_of() and "rope_parameters" in report.notes[0]


def test_rope_defaults_and_linear():
    assert cfg_of(rope_scaling=None).rope == RopeConfig("default", 500000.0)
    assert cfg_of(drop=("rope_scaling", "rope_theta")).rope == RopeConfig("default", 10000.0)
    assert cfg_of(rope_scaling=None, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
                  ).rope == RopeConfig("default", 1e6)
    assert cfg_of(rope_scaling={"type": "linear", "factor": 2.0}).rope == RopeConfig("linear", 500000.0, 2.0)
    # llama3 falls back to max_position_embeddings for original_max_position_embeddings, as transformers does
    scaling = {k: v for k, v in LLAMA["rope_scaling"].items() if k != "original_max_position_embeddings"}
    assert cfg_of(rope_scaling=scaling).rope.original_max_position_embeddings == 1024


@pytest.mark.parametrize("rope_type", ["dynamic", "su", "proportional"])
def test_unsupported_rope_type(rope_type):
    with pytest.raises(FtjaxError, match=f"unsupported rope type '{rope_type}'.*llama3"):
        cfg_of(rope_scaling={"rope_type": rope_type, "factor": 4.0})


def test_rope_missing_parameter():
    with pytest.raises(FtjaxError, match="low_freq_factor"):
        cfg_of(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0})


def test_keys_no_modeling_code_reads_are_inert_and_listed():
    # Leftovers of training frameworks and runtimes (SmolLM2's), keys of other families (Gemma's softcapping,
    # Mistral's window on a Llama), keys transformers 5's Llama no longer reads (pretraining_tp): all inert.
    extra = {"is_llama_config": True, "rope_interleaved": False, "transformers.js_config": {"kv_cache_dtype": {}},
             "attn_logit_softcapping": 50.0, "sliding_window": 4096, "pretraining_tp": 2, "some_null_key": None}
    report = read_config({**LLAMA, **extra})
    assert report.config == cfg_of()
    assert set(report.ignored) == set(extra)  # boilerplate (use_cache, transformers_version ...) is not listed
    assert list(report.ignored) == [k for k in {**LLAMA, **extra} if k in extra]  # in file order
    assert read_config(LLAMA).ignored == ("pretraining_tp",)
    mistral = read_config({**MISTRAL, "attention_bias": True, "mlp_bias": True})  # MistralAttention has no biases
    assert mistral.config.qkv_bias is False and mistral.ignored == ("attention_bias", "mlp_bias")
    rope = read_config({**LLAMA, "rope_scaling": {**LLAMA["rope_scaling"], "mscale": 0.7}})
    assert rope.config == cfg_of() and rope.ignored == ("pretraining_tp", "rope_scaling.mscale")


@pytest.mark.parametrize("changes, message", [
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantized checkpoint.*gptq"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "unsupported rope type 'dynamic'"),
    ({"vocab_size": None}, "'vocab_size' is missing"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
])
def test_values_ftjax_does_not_implement_are_refused(changes, message):
    with pytest.raises(FtjaxError, match=message):
        cfg_of(**changes)
    assert cfg_of(hidden_act="swish") == cfg_of()  # transformers' ACT2FN maps swish to SiLU too


@pytest.mark.parametrize("config_cls", [transformers.LlamaConfig, transformers.MistralConfig,
                                        transformers.Qwen2Config, transformers.Olmo2Config])
def test_transformers_boilerplate_is_harmless(config_cls):
    full = config_cls().to_dict()  # every PretrainedConfig field transformers 5 writes
    legacy = {"output_attentions": False, "torchscript": False, "use_bfloat16": False, "num_beams": 1,
              "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "max_length": 20,
              "do_sample": False, "pruned_heads": {}, "tie_encoder_decoder": False, "_name_or_path": "x",
              "bad_words_ids": None, "chunk_size_feed_forward": 0, "torch_dtype": "float32", "is_decoder": False}
    report = read_config({**full, **legacy})
    assert report.config == ModelConfig.from_hf(full) and report.notes == ()
    assert (report.config.hidden_size, report.config.num_hidden_layers) == (full["hidden_size"],
                                                                            full["num_hidden_layers"])


@pytest.mark.parametrize("model_type, arch", [("gpt2", ["GPT2LMHeadModel"]), ("falcon", None)])
def test_unsupported_architecture(model_type, arch):
    with pytest.raises(FtjaxError, match=f"unsupported model_type '{model_type}'.*llama, mistral, qwen2, qwen3"):
        ModelConfig.from_hf({"model_type": model_type, "architectures": arch, "vocab_size": 10})


def test_family_comes_from_model_type():
    report = read_config({**LLAMA, "architectures": ["LlamaForSequenceClassification"]})
    assert report.config == cfg_of() and "LlamaForSequenceClassification" in report.notes[0]
    inferred = read_config({k: v for k, v in LLAMA.items() if k != "model_type"})
    assert inferred.config.model_type == "llama" and "from architectures" in inferred.notes[0]


MISTRAL = {"model_type": "mistral", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1e6,
           "sliding_window": 8}
QWEN2 = {**MISTRAL, "model_type": "qwen2", "sliding_window": 8, "use_sliding_window": False, "max_window_layers": 1}


def test_mistral_window():
    cfg = ModelConfig.from_hf(MISTRAL)
    assert cfg.sliding_window == 8 and [cfg.window(i) for i in range(3)] == [8, 8, 8]
    cfg = ModelConfig.from_hf({**MISTRAL, "sliding_window": None})
    assert [cfg.window(i) for i in range(3)] == [None] * 3
    assert ModelConfig.from_hf({k: v for k, v in MISTRAL.items() if k != "sliding_window"}).sliding_window == 4096
    report = read_config({**MISTRAL, "layer_types": ["full_attention", "sliding_attention", "full_attention"]})
    assert [report.config.window(i) for i in range(3)] == [8, 8, 8] and "layer_types ignored" in report.notes[0]
    assert ModelConfig.from_hf({**MISTRAL, "num_key_value_heads": None}).num_key_value_heads == 4  # null: = heads
    no_kv = {k: v for k, v in MISTRAL.items() if k != "num_key_value_heads"}
    assert ModelConfig.from_hf({**no_kv, "num_attention_heads": 16}).num_key_value_heads == 8  # MistralConfig's


def test_qwen2_window_rules():
    cfg = ModelConfig.from_hf(QWEN2)  # sliding_window is set but use_sliding_window is false: no window
    assert cfg.qkv_bias and not cfg.o_bias and [cfg.window(i) for i in range(3)] == [None] * 3
    cfg = ModelConfig.from_hf({**QWEN2, "use_sliding_window": True})  # layers >= max_window_layers slide
    assert [cfg.window(i) for i in range(3)] == [None, 8, 8]
    types = ["sliding_attention", "full_attention", "sliding_attention"]  # explicit layer_types win
    cfg = ModelConfig.from_hf({**QWEN2, "use_sliding_window": True, "layer_types": types})
    assert [cfg.window(i) for i in range(3)] == [8, None, 8]
    with pytest.raises(FtjaxError, match="no sliding_window is in effect"):
        ModelConfig.from_hf({**QWEN2, "layer_types": types})
    with pytest.raises(FtjaxError, match="layer_types must be 3 entries"):
        ModelConfig.from_hf({**QWEN2, "layer_types": ["full_attention"]})
    with pytest.raises(FtjaxError, match="chunked_attention"):
        ModelConfig.from_hf({**QWEN2, "layer_types": ["chunked_attention"] * 3})


REAL = {  # config.json of published checkpoints (as written by transformers 4.x)
    "Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": {
            "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
            "rope_type": "llama3"}, "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
    "Qwen2.5-0.5B": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
        "vocab_size": 151936},
    "Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000},
    "OLMo-2-1124-7B": {
        "architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "olmo2", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 100277, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 500000, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.47.0.dev0", "use_cache": True, "vocab_size": 100352},
}


def test_published_configs():
    llama, qwen, mistral, olmo = (ModelConfig.from_hf(c) for c in REAL.values())
    assert llama.tie_word_embeddings and llama.head_dim == 64 and llama.rope == RopeConfig(
        "llama3", 500000.0, 32.0, 1.0, 4.0, 8192)
    assert qwen.qkv_bias and qwen.sliding_window is None and qwen.rope.theta == 1e6 and qwen.num_key_value_heads == 2
    assert mistral.sliding_window == 4096 and mistral.window(31) == 4096 and mistral.rms_norm_eps == 1e-5
    assert olmo.qk_norm == "flat" and olmo.rope == RopeConfig("default", 500000.0) and olmo.rms_norm_eps == 1e-6


def test_olmo2_flags():
    cfg = ModelConfig.from_hf({**MISTRAL, "model_type": "olmo2", "sliding_window": None, "attention_bias": True})
    assert (cfg.qk_norm, cfg.layout, cfg.norm) == ("flat", "post", "w_f32") and cfg.qkv_bias and cfg.o_bias
    assert cfg.rms_norm_eps == 1e-5 and not cfg.mlp_bias


ROUND_TRIP = {
    "llama3": (transformers.LlamaConfig, dict(rope_parameters={**LLAMA["rope_scaling"], "rope_theta": 5e5},
                                              attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "llama_linear": (transformers.LlamaConfig, dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                     "rope_theta": 1e4}, head_dim=8)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=3)),
    "qwen2": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "olmo2": (transformers.Olmo2Config, dict(attention_bias=True)),
}


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_to_hf_loads_into_an_equivalent_transformers_model(case, tmp_path):
    config_cls, overrides = ROUND_TRIP[case]
    hf_config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    model.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    exported = cfg.to_hf()
    assert ModelConfig.from_hf(exported) == cfg
    (tmp_path / "config.json").write_text(json.dumps(exported))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    tokens = torch.tensor(np.random.default_rng(0).integers(0, 64, (2, 12)))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)
    assert ModelConfig.from_hf(reloaded.config.to_dict()) == cfg
