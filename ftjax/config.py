"""ModelConfig: the numbers that define a Llama-family model, parsed strictly from a Hugging Face config.json.

Families: llama (3.0 / 3.1 / 3.2), mistral, qwen2 (Qwen2 / Qwen2.5), olmo2. Both rope schemas parse: the older
`rope_theta` + `rope_scaling` (keyed `type` or `rope_type`, may be null) and transformers 5's `rope_parameters`.
A key that could change numerics and is not handled here raises FtjaxError rather than being silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ftjax.errors import FtjaxError

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")

# Keys that never change the forward pass: PretrainedConfig.to_dict() boilerplate, token ids, training-only knobs.
_HARMLESS = frozenset("""
    architectures model_type dtype torch_dtype transformers_version use_cache initializer_range attention_dropout
    max_window_layers bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id id2label label2id
    _name_or_path _commit_hash _attn_implementation _attn_implementation_autoset _experts_implementation
    output_hidden_states output_attentions return_dict torchscript use_bfloat16 tf_legacy_loss pruned_heads
    chunk_size_feed_forward is_encoder_decoder is_decoder add_cross_attention cross_attention_hidden_size
    tie_encoder_decoder finetuning_task tokenizer_class prefix task_specific_params problem_type max_length
    min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature top_k top_p
    typical_p repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids
    num_return_sequences output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id
    remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
    embd_pdrop resid_pdrop residual_dropout mlp_dropout unsloth_version
""".split())

# Keys read by every family.
_COMMON = frozenset("""
    vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads head_dim
    hidden_act rms_norm_eps rope_theta rope_scaling rope_parameters max_position_embeddings tie_word_embeddings
    layer_types partial_rotary_factor original_max_position_embeddings
""".split())

_FAMILY_KEYS = {
    "llama": frozenset({"attention_bias", "mlp_bias", "pretraining_tp"}),
    "mistral": frozenset({"sliding_window"}),
    "qwen2": frozenset({"use_sliding_window", "sliding_window"}),
    "olmo2": frozenset({"attention_bias"}),
}

# Keys a family does not read, accepted only at the value that leaves the forward pass unchanged.
_NEUTRAL = {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "use_sliding_window": False,
            "partial_rotary_factor": 1.0, "use_mrope": False}

# transformers' per-family defaults for keys that may be absent from config.json.
_DEFAULT_EPS = {"llama": 1e-6, "mistral": 1e-6, "qwen2": 1e-6, "olmo2": 1e-5}
_DEFAULT_KV_HEADS = {"mistral": 8, "qwen2": 32}  # llama/olmo2: num_attention_heads
_DEFAULT_WINDOW = 4096  # MistralConfig / Qwen2Config default sliding_window
_ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings", "partial_rotary_factor"})


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `rope_type` in ROPE_TYPES; `factor` for linear/llama3, the rest for llama3 only."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def to_hf(self) -> dict[str, Any]:
        """The `rope_parameters` dict transformers 5 writes (includes rope_theta)."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type in ("linear", "llama3"):
            out["factor"] = self.factor
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                       original_max_position_embeddings=self.original_max_position_embeddings)
        return out


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one checkpoint. Hashable, so it can be a static argument of jax.jit.

    `layer_types[i]` is "full_attention" or "sliding_attention" (window `sliding_window` tokens, self included).
    Bias/norm flags are resolved per family: qwen2 has q/k/v biases only; olmo2 has no input norm, post-sublayer
    norms and q/k RMSNorm over the flat projection; `norm_weight_in_f32` is OLMo 2's `(w * x_f32).to(dtype)` order.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    post_sublayer_norms: bool = False
    norm_weight_in_f32: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    initializer_range: float = 0.02
    dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise FtjaxError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    def window(self, layer: int) -> int | None:
        """Sliding-window length of `layer` in tokens, or None for full causal attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, config: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Parse a Hugging Face config dict; `source` names the file in error messages."""
        return _from_hf(dict(config), source)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers (v5, and v4 via rope_theta/rope_scaling) loads into this model."""
        rope_scaling = None if self.rope.rope_type == "default" else {
            k: v for k, v in self.rope.to_hf().items() if k != "rope_theta"}
        out: dict[str, Any] = {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings or 4096,
            "initializer_range": self.initializer_range, "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope.theta, "rope_scaling": rope_scaling, "rope_parameters": self.rope.to_hf(),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id, "use_cache": True,
        }
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.model_type in ("llama", "olmo2"):
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            sliding = [i for i, t in enumerate(self.layer_types) if t == "sliding_attention"]
            out.update(use_sliding_window=bool(sliding), sliding_window=self.sliding_window,
                       max_window_layers=sliding[0] if sliding else self.num_hidden_layers,
                       layer_types=list(self.layer_types))
        return out


def _from_hf(c: dict[str, Any], src: str) -> ModelConfig:
    family = c.get("model_type")
    archs = c.get("architectures") or []
    if family is None and archs:
        family = {v: k for k, v in ARCHITECTURES.items()}.get(archs[0], archs[0])
    if family not in ARCHITECTURES:
        raise FtjaxError(f"{src}: unsupported model_type {family!r} (architectures {archs}); "
                         f"supported: {', '.join(ARCHITECTURES)}")
    bad_archs = [a for a in archs if a != ARCHITECTURES[family]]
    if bad_archs:
        raise FtjaxError(f"{src}: unsupported architecture {bad_archs} for model_type {family!r}; "
                         f"supported: {', '.join(ARCHITECTURES.values())}")

    handled = _HARMLESS | _COMMON | _FAMILY_KEYS[family]
    unknown = sorted(k for k, v in c.items() if k not in handled and v is not None
                     and not (k in _NEUTRAL and v == _NEUTRAL[k]))
    if unknown:
        raise FtjaxError(f"{src}: {family} config has keys ftjax does not handle and that may change numerics: "
                         f"{', '.join(f'{k}={c[k]!r}' for k in unknown)}; remove them only if you know they are inert")

    def req(key: str) -> Any:
        if c.get(key) is None:
            raise FtjaxError(f"{src}: required key {key!r} is missing")
        return c[key]

    if c.get("hidden_act", "silu") != "silu":
        raise FtjaxError(f"{src}: hidden_act {c['hidden_act']!r} is not supported (only 'silu')")
    if c.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise FtjaxError(f"{src}: partial_rotary_factor {c['partial_rotary_factor']} is not supported")
    if family == "llama" and c.get("pretraining_tp", 1) not in (None, 1):
        raise FtjaxError(f"{src}: pretraining_tp={c['pretraining_tp']} is not supported (only 1)")

    hidden, n_heads, n_layers = req("hidden_size"), req("num_attention_heads"), req("num_hidden_layers")
    n_kv = c.get("num_key_value_heads") or _DEFAULT_KV_HEADS.get(family, n_heads)
    if n_heads % n_kv:
        raise FtjaxError(f"{src}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    attention_bias = bool(c.get("attention_bias", False))
    window, layer_types = _attention_layout(c, family, n_layers, src)
    eos = c.get("eos_token_id")
    eps = c.get("rms_norm_eps")
    return ModelConfig(
        model_type=family, vocab_size=req("vocab_size"), hidden_size=hidden,
        intermediate_size=req("intermediate_size"), num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_kv, head_dim=c.get("head_dim") or hidden // n_heads,
        rms_norm_eps=float(_DEFAULT_EPS[family] if eps is None else eps), rope=_rope(c, src),
        max_position_embeddings=c.get("max_position_embeddings"),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or (family in ("llama", "olmo2") and attention_bias),
        o_bias=family in ("llama", "olmo2") and attention_bias,
        mlp_bias=family == "llama" and bool(c.get("mlp_bias", False)),
        qk_norm=family == "olmo2", post_sublayer_norms=family == "olmo2", norm_weight_in_f32=family == "olmo2",
        sliding_window=window, layer_types=layer_types,
        initializer_range=float(c.get("initializer_range") or 0.02),
        dtype=c.get("dtype") or c.get("torch_dtype"),
        bos_token_id=c.get("bos_token_id"), pad_token_id=c.get("pad_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )


def _attention_layout(c: dict, family: str, n_layers: int, src: str) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) exactly as transformers' modeling code for `family` uses them."""
    if family == "qwen2":
        # Qwen2 carries sliding_window but uses it only with use_sliding_window, and then per layer.
        window = c.get("sliding_window", _DEFAULT_WINDOW) if c.get("use_sliding_window") else None
        derived = tuple("sliding_attention" if window is not None and i >= c.get("max_window_layers", 28)
                        else "full_attention" for i in range(n_layers))
    elif family == "mistral":  # MistralModel windows every layer and ignores layer_types
        window = c.get("sliding_window", _DEFAULT_WINDOW)
        derived = (("full_attention", "sliding_attention")[window is not None],) * n_layers
    else:
        window, derived = None, ("full_attention",) * n_layers

    layer_types = c.get("layer_types")
    if layer_types is None:
        return window, derived
    layer_types = tuple(layer_types)
    if len(layer_types) != n_layers or not set(layer_types) <= set(LAYER_TYPES):
        raise FtjaxError(f"{src}: layer_types must be {n_layers} entries from {LAYER_TYPES}, got {list(layer_types)}")
    if family != "qwen2" and layer_types != derived:
        raise FtjaxError(f"{src}: transformers' {family} model ignores layer_types; this config's layer_types "
                         f"disagree with its sliding_window={window}, so the intended attention is ambiguous")
    if "sliding_attention" in layer_types and window is None:
        raise FtjaxError(f"{src}: layer_types has sliding_attention layers but no sliding_window is in effect "
                         f"(use_sliding_window={c.get('use_sliding_window')})")
    return window, layer_types


def _rope(c: dict, src: str) -> RopeConfig:
    """Rope settings from either schema, with transformers 5's precedence (rope_scaling over rope_parameters)."""
    scaling, params = c.get("rope_scaling"), c.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise FtjaxError(f"{src}: rope_parameters must be a dict, got {params!r}")
    if params and set(params) & set(LAYER_TYPES):
        raise FtjaxError(f"{src}: per-layer-type rope_parameters are not supported")
    if scaling and params:
        top_theta = c.get("rope_theta", 10000.0)
        a, b = _std({"rope_theta": top_theta, **scaling}), _std({"rope_theta": top_theta, **params})
        if a != b:
            raise FtjaxError(f"{src}: rope_scaling {scaling} and rope_parameters {params} disagree")
    d = _std(scaling or params or {})
    unknown = sorted(k for k, v in d.items() if k not in _ROPE_KEYS and v is not None)
    if unknown:
        raise FtjaxError(f"{src}: unsupported rope parameters {unknown} in {d}")
    rope_type = d["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise FtjaxError(f"{src}: unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if d.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise FtjaxError(f"{src}: partial_rotary_factor {d['partial_rotary_factor']} is not supported")
    theta = float(d.get("rope_theta") or c.get("rope_theta") or 10000.0)
    if rope_type == "default":
        return RopeConfig("default", theta)

    def need(key: str) -> float:
        if d.get(key) is None:
            raise FtjaxError(f"{src}: rope type {rope_type!r} needs {key!r}")
        return float(d[key])

    if rope_type == "linear":
        return RopeConfig("linear", theta, factor=need("factor"))
    original = c.get("original_max_position_embeddings") or d.get("original_max_position_embeddings") \
        or c.get("max_position_embeddings")
    if original is None:
        raise FtjaxError(f"{src}: rope type 'llama3' needs original_max_position_embeddings")
    return RopeConfig("llama3", theta, factor=need("factor"), low_freq_factor=need("low_freq_factor"),
                      high_freq_factor=need("high_freq_factor"), original_max_position_embeddings=int(original))


def _std(d: dict) -> dict:
    """Rope dict with `rope_type` set from the legacy `type` key (default 'default')."""
    d = dict(d)
    d.setdefault("rope_type", d.get("type") or "default")
    d.pop("type", None)
    return d
