"""ModelConfig: the numbers that define a Llama-family model, read from a Hugging Face config.json as transformers
reads it.

Families: llama (1 / 2 / 3 / 3.1 / 3.2), mistral, qwen2 (Qwen2 / Qwen2.5), olmo2. The reference is transformers'
modeling code for the family: `FAMILIES` lists, per family, every key that code reads and what transformers assumes
when the key is absent (from transformers 5.24: `models/<family>/configuration_<family>.py` and
`modeling_<family>.py`, `modeling_rope_utils.py`, `activations.py`, `modeling_utils.py`). A config is refused only
where a key that code reads holds a value ftjax does not implement (a rope type, an activation, quantized weights,
...), since ftjax would then compute something else. Every other key -- leftovers of training frameworks,
converters, web runtimes, or a field another family reads -- is inert: accepted, and reported by `read_config` so
`ftjax inspect` and output provenance can list it. `model_type` picks the family, as transformers' Auto classes do;
an unusual `architectures` entry is a note.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ftjax.errors import FtjaxError

ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# Read by every family's modeling code (and by PreTrainedModel: tie_word_embeddings, quantization_config).
# dtype / torch_dtype and the token ids are read too, but only as checkpoint metadata (stored dtype, padding_idx
# of the embedding at init, generation): they never change what the forward pass computes.
_COMMON = (*_SIZES, "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
           "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
           "original_max_position_embeddings", "quantization_config")
_METADATA = ("model_type", "architectures", "dtype", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id",
             "initializer_range")


@dataclass(frozen=True)
class Family:
    """One model_type: the class AutoModelForCausalLM builds, the keys its modeling code reads beyond `_COMMON`, and
    the config class's defaults for keys config.json may leave out (`None`: derived, see `_from_hf`)."""

    architecture: str
    reads: tuple[str, ...]
    defaults: Mapping[str, Any]


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", ("attention_bias", "mlp_bias"), dict(
        num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6, attention_bias=False,
        mlp_bias=False)),
    "mistral": Family("MistralForCausalLM", ("sliding_window",), dict(
        num_key_value_heads=8, max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, sliding_window=4096)),
    "qwen2": Family("Qwen2ForCausalLM", ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
                    dict(num_key_value_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None)),
    "olmo2": Family("Olmo2ForCausalLM", ("attention_bias",), dict(
        num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-5, attention_bias=False)),
}
ARCHITECTURES = {family: f.architecture for family, f in FAMILIES.items()}
_ACTIVATIONS = ("silu", "swish")  # transformers' ACT2FN maps both to SiLU

# Fields of transformers' PreTrainedConfig (and generation settings older versions kept there) that none of these
# models read. Inert like every unread key; left out of the ignored-keys report only to keep that report readable.
_GENERIC = frozenset("""
    transformers_version use_cache attention_dropout _name_or_path _commit_hash _attn_implementation
    _attn_implementation_autoset _experts_implementation output_hidden_states output_attentions return_dict
    torchscript use_bfloat16 tf_legacy_loss pruned_heads chunk_size_feed_forward is_encoder_decoder is_decoder
    add_cross_attention cross_attention_hidden_size tie_encoder_decoder finetuning_task tokenizer_class prefix
    task_specific_params problem_type id2label label2id sep_token_id decoder_start_token_id max_length min_length
    do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature top_k top_p typical_p
    repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids
    num_return_sequences output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id
    remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
""".split())
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
    """Architecture of one checkpoint: what the compiled forward pass depends on, and nothing else (token ids, the
    stored dtype and initialisation are `CheckpointMeta`), so a base and its instruct model share one compilation.
    Hashable, so it can be a static argument of jax.jit.

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
    def from_hf(cls, config: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Parse a Hugging Face config dict; `source` names the file in error messages."""
        return read_config(config, source=source).config

    def to_hf(self, meta: CheckpointMeta | None = None) -> dict[str, Any]:
        """A config.json dict that transformers (v5, and v4 via rope_theta/rope_scaling) loads into this model, with
        the token ids, dtype and initializer range of `meta` (default: none)."""
        meta = meta or CheckpointMeta()
        rope_scaling = None if self.rope.rope_type == "default" else {
            k: v for k, v in self.rope.to_hf().items() if k != "rope_theta"}
        out: dict[str, Any] = {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings or 4096,
            "initializer_range": meta.initializer_range, "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope.theta, "rope_scaling": rope_scaling, "rope_parameters": self.rope.to_hf(),
            "bos_token_id": meta.bos_token_id,
            "eos_token_id": list(meta.eos_token_id) if isinstance(meta.eos_token_id, tuple) else meta.eos_token_id,
            "pad_token_id": meta.pad_token_id, "use_cache": True,
        }
        if meta.dtype is not None:
            out["dtype"] = meta.dtype
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


@dataclass(frozen=True)
class CheckpointMeta:
    """What a config.json says beyond the architecture: the stored dtype, token ids, the initializer range (for new
    parameters), the keys transformers' modeling code for the family never reads (inert, in file order,
    PreTrainedConfig boilerplate left out) and notes on what was resolved unusually."""

    dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    ignored: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConfigReport:
    """A parsed config.json: the architecture and the checkpoint's metadata."""

    config: ModelConfig
    meta: CheckpointMeta

    @property
    def ignored(self) -> tuple[str, ...]:
        return self.meta.ignored

    @property
    def notes(self) -> tuple[str, ...]:
        return self.meta.notes


def read_config(config: Mapping[str, Any], *, source: str = "config.json") -> ConfigReport:
    """Parse a Hugging Face config dict the way transformers reads it for its family (see the module docstring);
    FtjaxError, naming `source`, where transformers would compute something ftjax does not implement."""
    c = dict(config)
    notes: list[str] = []
    family = c.get("model_type")
    archs = c.get("architectures") or []
    if family is None and archs:
        family = {v: k for k, v in ARCHITECTURES.items()}.get(archs[0], archs[0])
        notes.append(f"no model_type: family {family!r} taken from architectures")
    if family not in FAMILIES:
        raise FtjaxError(f"{source}: unsupported model_type {family!r} (architectures {archs}); "
                         f"supported: {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    unusual = [a for a in archs if a != fam.architecture]
    if unusual:
        notes.append(f"architectures {unusual} ignored: model_type {family!r} builds {fam.architecture}, "
                     "as transformers' AutoModelForCausalLM does")
    reads = set(_COMMON) | set(fam.reads)
    ignored = [k for k in c if k not in reads and k not in _METADATA and k not in _GENERIC]
    cfg = _from_hf(c, family, source, ignored, notes)
    eos = c.get("eos_token_id")
    meta = CheckpointMeta(dtype=c.get("dtype") or c.get("torch_dtype"), bos_token_id=c.get("bos_token_id"),
                          eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                          pad_token_id=c.get("pad_token_id"),
                          initializer_range=float(c.get("initializer_range") or 0.02),
                          ignored=tuple(ignored), notes=tuple(notes))
    return ConfigReport(cfg, meta)


def _from_hf(c: dict[str, Any], family: str, src: str, ignored: list[str], notes: list[str]) -> ModelConfig:
    defaults = FAMILIES[family].defaults

    def get(key: str) -> Any:
        return c[key] if key in c else defaults.get(key)

    for key in _SIZES:
        if c.get(key) is None:
            raise FtjaxError(f"{src}: required key {key!r} is missing")
    if c.get("quantization_config") is not None:
        method = c["quantization_config"].get("quant_method") if isinstance(c["quantization_config"], dict) else None
        raise FtjaxError(f"{src}: quantized checkpoint (quantization_config, quant_method {method!r}); ftjax computes "
                         "on unquantized weights only: use the original bf16/f16/f32 checkpoint")
    act = c.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise FtjaxError(f"{src}: hidden_act {act!r} is not supported (only {' or '.join(_ACTIVATIONS)})")
    hidden, n_heads, n_layers = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
    n_kv = get("num_key_value_heads")
    n_kv = n_heads if n_kv is None else n_kv  # an explicit null means num_attention_heads in every family
    if n_heads % n_kv:
        raise FtjaxError(f"{src}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    attention_bias = bool(get("attention_bias")) if "attention_bias" in FAMILIES[family].reads else False
    window, layer_types = _attention_layout(c, family, n_layers, src, notes)
    eps = get("rms_norm_eps")
    return ModelConfig(
        model_type=family, vocab_size=c["vocab_size"], hidden_size=hidden,
        intermediate_size=c["intermediate_size"], num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_kv, head_dim=c.get("head_dim") or hidden // n_heads,
        rms_norm_eps=float(defaults["rms_norm_eps"] if eps is None else eps),
        rope=_rope(c, src, get("max_position_embeddings"), ignored, notes),
        max_position_embeddings=get("max_position_embeddings"),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or attention_bias, o_bias=attention_bias,
        mlp_bias=family == "llama" and bool(get("mlp_bias")),
        qk_norm=family == "olmo2", post_sublayer_norms=family == "olmo2", norm_weight_in_f32=family == "olmo2",
        sliding_window=window, layer_types=layer_types,
    )


def _attention_layout(c: dict, family: str, n_layers: int, src: str,
                      notes: list[str]) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) exactly as transformers' modeling code for `family` uses them."""
    defaults = FAMILIES[family].defaults
    get = lambda key: c[key] if key in c else defaults.get(key)  # noqa: E731
    if family == "mistral":  # MistralModel windows every layer (None: full attention) and ignores layer_types
        window = get("sliding_window")
        if c.get("layer_types") is not None:
            notes.append("layer_types ignored: transformers' Mistral applies sliding_window to every layer")
        return window, (("full_attention", "sliding_attention")[window is not None],) * n_layers
    if family != "qwen2":
        return None, ("full_attention",) * n_layers
    # Qwen2 carries sliding_window but uses it only with use_sliding_window, and then per layer.
    window = get("sliding_window") if get("use_sliding_window") else None
    layer_types = c.get("layer_types")
    if layer_types is None:
        return window, tuple("sliding_attention" if window is not None and i >= get("max_window_layers")
                             else "full_attention" for i in range(n_layers))
    layer_types = tuple(layer_types)
    if len(layer_types) != n_layers or not set(layer_types) <= set(LAYER_TYPES):
        raise FtjaxError(f"{src}: layer_types must be {n_layers} entries from {LAYER_TYPES}, got {list(layer_types)}")
    if "sliding_attention" in layer_types and window is None:
        raise FtjaxError(f"{src}: layer_types has sliding_attention layers but no sliding_window is in effect "
                         f"(use_sliding_window={c.get('use_sliding_window')})")
    return window, layer_types


def _rope(c: dict, src: str, max_positions: int | None, ignored: list[str], notes: list[str]) -> RopeConfig:
    """Rope settings from either schema as transformers 5 resolves them: a non-empty `rope_scaling` wins over
    `rope_parameters` (which is then not read at all), `rope_theta` inside the dict over the top-level one."""
    scaling, params = c.get("rope_scaling"), c.get("rope_parameters")
    for key, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is not None and not isinstance(value, dict):
            raise FtjaxError(f"{src}: {key} must be a dict or null, got {value!r}")
    if scaling and params and _std({"rope_theta": c.get("rope_theta"), **scaling}) != _std(
            {"rope_theta": c.get("rope_theta"), **params}):
        notes.append(f"rope_parameters {params} ignored: transformers uses rope_scaling {scaling}")
    which = "rope_scaling" if scaling else "rope_parameters"
    d = _std(scaling or params or {})
    if set(d) & set(LAYER_TYPES):
        raise FtjaxError(f"{src}: per-layer-type rope parameters are not supported")
    ignored += [f"{which}.{k}" for k in d if k not in _ROPE_KEYS]  # no rope type ftjax implements reads them
    rope_type = d["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise FtjaxError(f"{src}: unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    partial = d.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise FtjaxError(f"{src}: partial_rotary_factor {partial} is not supported (rope over the whole head only)")
    theta = float(d.get("rope_theta") or c.get("rope_theta") or 10000.0)
    if rope_type == "default":
        return RopeConfig("default", theta)

    def need(key: str) -> float:
        if d.get(key) is None:
            raise FtjaxError(f"{src}: rope type {rope_type!r} needs {key!r}")
        return float(d[key])

    if rope_type == "linear":
        return RopeConfig("linear", theta, factor=need("factor"))
    # a top-level original_max_position_embeddings wins (transformers' Phi-3 rule), then the dict's, then the context
    original = c.get("original_max_position_embeddings") or d.get("original_max_position_embeddings") or max_positions
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
