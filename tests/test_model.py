"""Parity of ftjax.model.forward with transformers on tiny random float32 models of every supported family."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ftjax.errors import FtjaxError
from ftjax.model import forward, init_params
from ftjax.rope import inv_freq as rope_inv_freq
from ftjax.params import load_params

ATOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, attn_implementation="eager")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
CASES = {  # name: (transformers config class, overrides of BASE)
    "llama_gqa": (transformers.LlamaConfig, {}),
    "llama_mqa": (transformers.LlamaConfig, dict(num_key_value_heads=1)),
    "llama_mha": (transformers.LlamaConfig, dict(num_key_value_heads=4)),
    "llama_tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "llama_biases": (transformers.LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
    "llama_head_dim": (transformers.LlamaConfig, dict(head_dim=24)),
    "llama_linear_rope": (transformers.LlamaConfig, dict(rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                          "rope_theta": 10000.0})),
    "llama3_rope": (transformers.LlamaConfig, dict(hidden_size=32, head_dim=8, rope_parameters=LLAMA3_ROPE)),
    "mistral_window": (transformers.MistralConfig, dict(sliding_window=5)),
    "mistral_no_window": (transformers.MistralConfig, dict(sliding_window=None, num_key_value_heads=1)),
    "qwen2": (transformers.Qwen2Config, dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2_window": (transformers.Qwen2Config, dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                                                    max_window_layers=1, tie_word_embeddings=True)),
    "olmo2": (transformers.Olmo2Config, {}),
    "olmo2_bias_mha": (transformers.Olmo2Config, dict(num_key_value_heads=4, attention_bias=True)),
}


def make_hf(case, tmp_path, seed=0):
    """A tiny transformers model with non-trivial random weights, saved to tmp_path; returns (model, cfg, params)."""
    config_cls, overrides = CASES[case]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(tmp_path)
    return (model, *load_params(tmp_path))


def hf_logits(model, tokens_bt, attention_mask_bt=None):
    with torch.no_grad():
        mask = None if attention_mask_bt is None else torch.tensor(attention_mask_bt)
        return model(torch.tensor(tokens_bt), attention_mask=mask).logits.float().numpy()


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def tokens(batch, length, seed=1):
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], (batch, length)).astype(np.int32)


@pytest.mark.parametrize("case", list(CASES))
def test_parity(case, tmp_path):
    model, cfg, params = make_hf(case, tmp_path)
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    tokens_bt = tokens(2, 24)
    expected = hf_logits(model, tokens_bt)
    got = forward(params, tokens_bt, cfg)
    assert got.dtype == jnp.float32 and got.shape == expected.shape
    err = max_err(got, expected)
    print(f"{case}: max abs logit error {err:.2e} (logit scale {np.abs(expected).max():.2f})")
    assert err <= ATOL


def test_llama3_rope_frequencies_and_long_input(tmp_path):
    model, cfg, params = make_hf("llama3_rope", tmp_path)
    inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)
    # Meta's published Llama 3.1 `apply_scaling`, written out independently in float64
    r = LLAMA3_ROPE
    base = 1.0 / r["rope_theta"] ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    wavelen, old_len = 2 * math.pi / base, r["original_max_position_embeddings"]
    smooth = (old_len / wavelen - r["low_freq_factor"]) / (r["high_freq_factor"] - r["low_freq_factor"])
    want = np.where(wavelen < old_len / r["high_freq_factor"], base,
                    np.where(wavelen > old_len / r["low_freq_factor"], base / r["factor"],
                             (1 - smooth) * base / r["factor"] + smooth * base))
    np.testing.assert_allclose(inv_freq, want, rtol=1e-6)
    # all three llama3 bands are exercised: kept (short waves), interpolated, divided by factor (long waves)
    assert (wavelen < old_len / 4).any() and (wavelen > old_len).any()
    assert ((wavelen >= old_len / 4) & (wavelen <= old_len)).any()
    tokens_bt = tokens(1, 520)
    err = max_err(forward(params, tokens_bt, cfg), hf_logits(model, tokens_bt))
    print(f"llama3_rope T=520: max abs logit error {err:.2e}")
    assert err <= ATOL


@pytest.mark.parametrize("case", ["llama_gqa", "mistral_window", "qwen2_window", "olmo2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding(case, side, tmp_path):
    model, cfg, params = make_hf(case, tmp_path)
    tokens_bt = tokens(3, 20)
    lengths = np.array([20, 13, 7])
    real_bt = np.arange(20)[None, :] < lengths[:, None]
    if side == "left":
        real_bt = real_bt[:, ::-1]
    mask_bt = real_bt.astype(np.int32)
    expected = hf_logits(model, tokens_bt, mask_bt)
    # left padding passes per-row positions as users do; RoPE is relative, so either way matches HF
    positions_bt = np.maximum(np.cumsum(mask_bt, axis=1) - 1, 0) if side == "left" else None
    got = np.asarray(forward(params, tokens_bt, cfg, attention_mask_bt=mask_bt, positions_bt=positions_bt))
    assert np.isfinite(got).all()
    err = max_err(got[real_bt], expected[real_bt])
    print(f"{case} {side} padding: max abs logit error {err:.2e}")
    assert err <= ATOL


@pytest.mark.parametrize("case", ["llama_gqa", "mistral_window", "qwen2_window", "olmo2"])
def test_segments(case, tmp_path):
    model, cfg, params = make_hf(case, tmp_path)
    seg_lengths = [[7, 9, 6, 2], [15, 9]]  # row 0 ends in two padding tokens
    tokens_bt = tokens(2, 24)
    segment_ids_bt = np.array([np.repeat(np.arange(len(row)), row) for row in seg_lengths], dtype=np.int32)
    mask_bt = np.ones_like(tokens_bt)
    mask_bt[0, -2:] = 0
    got = np.asarray(forward(params, tokens_bt, cfg, attention_mask_bt=mask_bt, segment_ids_bt=segment_ids_bt))
    err = 0.0
    for b, row in enumerate(seg_lengths):
        starts = np.cumsum([0] + row)
        for start, n in zip(starts, row[:3] if b == 0 else row):  # the padding "segment" has no reference
            expected = hf_logits(model, tokens_bt[b:b + 1, start:start + n])[0]
            err = max(err, max_err(got[b, start:start + n], expected))
    print(f"{case} segments: max abs logit error {err:.2e}")
    assert err <= ATOL


@pytest.mark.parametrize("case", ["llama_gqa", "llama_tied", "qwen2_window", "olmo2_bias_mha"])
def test_init_params_matches_hf_layout(case, tmp_path):
    model, cfg, params = make_hf(case, tmp_path)
    for dtype in (jnp.float32, jnp.bfloat16):
        fresh = init_params(cfg, jax.random.key(0), dtype)
        shapes = jax.tree.map(lambda x: (x.shape, x.dtype), fresh)
        assert shapes == jax.tree.map(lambda x: (x.shape, jnp.dtype(dtype)), params)
        logits = forward(fresh, tokens(1, 8), cfg)
        assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    w = np.asarray(fresh["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"], np.float32)
    assert abs(w.std() - 0.02) < 0.2 * 0.02  # init_params' default std
    assert (np.asarray(fresh["model"]["norm"]["weight"], np.float32) == 1).all()


def test_bfloat16_close_to_transformers(tmp_path):
    model, cfg, params = make_hf("llama_gqa", tmp_path)
    tokens_bt = tokens(2, 24)
    expected = hf_logits(model.to(torch.bfloat16), tokens_bt)
    got = forward(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), tokens_bt, cfg)
    err = max_err(got, expected)
    print(f"llama_gqa bfloat16: max abs logit error {err:.2e} (logit scale {np.abs(expected).max():.2f})")
    assert err < 0.05 * np.abs(expected).max()


def test_params_that_do_not_fit_raise_ftjax_error(tmp_path):
    _, cfg, params = make_hf("llama_gqa", tmp_path)
    with pytest.raises(FtjaxError, match="lm_head"):
        forward({"model": params["model"]}, tokens(1, 4), cfg)
    with pytest.raises(FtjaxError, match="shape"):
        forward(params, tokens(1, 4), cfg.replace(intermediate_size=32))


def test_logits_at_chosen_positions_equal_the_full_logits():
    """forward(..., logits_at_bk) is the full logits gathered at those positions (tied and untied heads)."""
    from ftjax.config import ModelConfig

    for tied in (True, False):
        cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "tie_word_embeddings": tied})
        params = init_params(cfg, jax.random.key(0))
        tokens_bt = jax.random.randint(jax.random.key(1), (3, 12), 0, 64)
        at_bk = jnp.array([[0, 5, 11, 11], [3, 4, 5, 6], [7, 7, 2, 9]], jnp.int32)
        full_btv = forward(params, tokens_bt, cfg)
        some_bkv = forward(params, tokens_bt, cfg, logits_at_bk=at_bk)
        assert some_bkv.shape == (3, 4, 64)
        np.testing.assert_allclose(some_bkv, jnp.take_along_axis(full_btv, at_bk[..., None], axis=1), rtol=1e-5,
                                   atol=1e-6)
