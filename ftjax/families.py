"""The model families, as transformers 5.25 reads their config.json: per family, the class AutoModelForCausalLM
builds, every key its modeling code reads beyond the common ones, the config class's defaults, and how those keys
become the architecture switches of `ModelConfig` (layer types, norms, rope per layer type, scalar hooks).

Sources: `models/<family>/configuration_<family>.py` and `modeling_<family>.py`; the notes in
`shared/reference/families.md` (each switch checked against transformers' float32 logits). A family is one small
function here plus the switches `ftjax.model` reads, never a new forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ftjax import rope as R
from ftjax.errors import FtjaxError

MOE = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
       "qwen2_moe": "Qwen2MoeForCausalLM"}


class Keys:
    """A config dict read with a family's defaults; collects notes."""

    def __init__(self, c: Mapping[str, Any], defaults: Mapping[str, Any], src: str, notes: list[str],
                 ignored: list[str]):
        self.c, self.defaults, self.src, self.notes, self.ignored = c, defaults, src, notes, ignored

    def __call__(self, key: str) -> Any:
        return self.c[key] if key in self.c else self.defaults.get(key)

    def layer_types(self, n_layers: int, derived: Callable[[int], bool], window: int | None) -> tuple[str, ...]:
        """An explicit `layer_types` list (checked), else layer i slides where `derived(i)`."""
        explicit = self.c.get("layer_types")
        if explicit is None:
            return tuple("sliding_attention" if derived(i) else "full_attention" for i in range(n_layers))
        types = tuple(explicit)
        if len(types) != n_layers or not set(types) <= set(R.LAYER_TYPES):
            raise FtjaxError(f"{self.src}: layer_types must be {n_layers} entries from {R.LAYER_TYPES}, "
                             f"got {list(types)}")
        if "sliding_attention" in types and window is None:
            raise FtjaxError(f"{self.src}: layer_types has sliding_attention layers but no sliding_window is in "
                             "effect")
        return types


@dataclass(frozen=True)
class Family:
    """One model_type: the class AutoModelForCausalLM builds, the keys its code reads beyond `COMMON`, the config
    class's defaults for keys config.json may leave out, and `switches(keys, sizes) -> ModelConfig fields`."""

    architecture: str
    reads: tuple[str, ...]
    defaults: Mapping[str, Any]
    switches: Callable[[Keys, dict], dict]
    act_key: str = "hidden_act"


# Read by every family's modeling code (and by PreTrainedModel: tie_word_embeddings, quantization_config).
COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
          "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
          "original_max_position_embeddings", "quantization_config")


# ------------------------------------------------------------------------------------------ rope
def flat_rope(k: Keys, s: dict, *, theta_default: float = 10000.0, longrope_aliases: bool = False,
              original_field: bool = False) -> R.RopeConfig:
    """One rope for every layer, from either schema as transformers 5 resolves it: a non-empty `rope_scaling` wins
    over `rope_parameters` (then not read at all), `rope_theta` inside the dict over the top-level one, then the
    class default. `original_field`: the config class declares original_max_position_embeddings (Phi-3), so its
    value (default included) overrides the dict's."""
    c, src = k.c, k.src
    scaling, params = c.get("rope_scaling"), c.get("rope_parameters")
    for key, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is not None and not isinstance(value, dict):
            raise FtjaxError(f"{src}: {key} must be a dict or null, got {value!r}")
    if scaling and params and R.standardize({"rope_theta": c.get("rope_theta"), **scaling}) != R.standardize(
            {"rope_theta": c.get("rope_theta"), **params}):
        k.notes.append(f"rope_parameters {params} ignored: transformers uses rope_scaling {scaling}")
    which = "rope_scaling" if scaling else "rope_parameters"
    d = R.standardize(scaling or params or {}, longrope_aliases=longrope_aliases)
    if set(d) & set(R.LAYER_TYPES):
        raise FtjaxError(f"{src}: per-layer-type rope parameters are not read by {c.get('model_type')} models")
    k.ignored += [f"{which}.{x}" for x in d if x not in R.keys_read(d["rope_type"])]
    theta = float(d.get("rope_theta") or c.get("rope_theta") or theta_default)
    original = k("original_max_position_embeddings") if original_field else c.get("original_max_position_embeddings")
    return R.from_dict(d, src=src, theta=theta, rotary_dim=s["rotary_dim"], max_positions=k("max_position_embeddings"),
                       original=original)


def nested_rope(k: Keys, s: dict, *, full_theta: float, local_theta: float,
                local_key: str | None) -> tuple[R.RopeConfig, R.RopeConfig]:
    """(full, sliding) ropes of OLMo 3 and Gemma 3: `rope_parameters` keyed by layer type; a legacy `rope_scaling`
    goes to full-attention layers only; the top-level `rope_theta` fills the full layers' theta, `local_key`
    (Gemma 3's rope_local_base_freq) the sliding layers', else the class defaults."""
    c, src = k.c, k.src
    params = c.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise FtjaxError(f"{src}: rope_parameters must be a dict or null, got {params!r}")
    nested = {t: dict((params or {}).get(t) or {"rope_type": "default"}) for t in R.LAYER_TYPES}
    if params and not set(params) & set(R.LAYER_TYPES):
        k.notes.append(f"rope_parameters {params} not keyed by layer type: transformers then uses default ropes")
    if c.get("rope_scaling"):
        nested["full_attention"].update(c["rope_scaling"])
    nested["full_attention"].setdefault("rope_theta", c.get("rope_theta") or full_theta)
    nested["sliding_attention"].setdefault("rope_theta", (c.get(local_key) if local_key else None) or local_theta)
    out = []
    for t in ("full_attention", "sliding_attention"):
        d = R.standardize(nested[t])
        k.ignored += [f"rope_parameters.{t}.{x}" for x in d if x not in R.keys_read(d["rope_type"])]
        out.append(R.from_dict(d, src=f"{src} ({t})", theta=float(d["rope_theta"]), rotary_dim=s["rotary_dim"],
                               max_positions=k("max_position_embeddings"),
                               original=c.get("original_max_position_embeddings")))
    return out[0], out[1]


def _no_partial_rotary(k: Keys) -> None:
    """Families whose rotation covers the whole head (a partial_rotary_factor would break transformers' own
    forward there)."""
    d = k.c.get("rope_scaling") or k.c.get("rope_parameters") or {}
    partial = (d.get("partial_rotary_factor") if isinstance(d, dict) else None) or k.c.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        raise FtjaxError(f"{k.src}: partial_rotary_factor {partial} is not supported for "
                         f"{k.c.get('model_type')} (rope over the whole head only)")


# ------------------------------------------------------------------------------------------ families
def _qwen_layers(k: Keys, n: int) -> tuple[int | None, tuple[str, ...]]:
    """Qwen2 / Qwen3: sliding_window only with use_sliding_window, on layers i >= max_window_layers."""
    window = k("sliding_window") if k("use_sliding_window") else None
    return window, k.layer_types(n, lambda i: window is not None and i >= k("max_window_layers"), window)


def _llama(k: Keys, s: dict) -> dict:
    _no_partial_rotary(k)
    bias = bool(k("attention_bias"))
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(k("mlp_bias")), rope=flat_rope(k, s))


def _mistral(k: Keys, s: dict) -> dict:
    _no_partial_rotary(k)
    window = k("sliding_window")  # MistralModel windows every layer (None: full attention), ignores layer_types
    if k.c.get("layer_types") is not None:
        k.notes.append("layer_types ignored: transformers' Mistral applies sliding_window to every layer")
    return dict(sliding_window=window, layer_types=(("full_attention", "sliding_attention")[window is not None],)
                * s["n_layers"], rope=flat_rope(k, s))


def _qwen2(k: Keys, s: dict) -> dict:
    _no_partial_rotary(k)
    window, types = _qwen_layers(k, s["n_layers"])
    return dict(qkv_bias=True, sliding_window=window, layer_types=types, rope=flat_rope(k, s))


def _qwen3(k: Keys, s: dict) -> dict:
    _no_partial_rotary(k)
    window, types = _qwen_layers(k, s["n_layers"])
    bias = bool(k("attention_bias"))
    return dict(qkv_bias=bias, o_bias=bias, qk_norm="head", sliding_window=window, layer_types=types,
                rope=flat_rope(k, s))


def _olmo2(k: Keys, s: dict) -> dict:
    _no_partial_rotary(k)
    bias = bool(k("attention_bias"))
    return dict(qkv_bias=bias, o_bias=bias, qk_norm="flat", layout="post", norm="w_f32", rope=flat_rope(k, s))


def _olmo3(k: Keys, s: dict) -> dict:
    _no_partial_rotary(k)
    window = k("sliding_window")
    full, local = nested_rope(k, s, full_theta=500000.0, local_theta=500000.0, local_key=None)
    return dict(_olmo2_flags(k), sliding_window=window, rope=full, local_rope=local,
                layer_types=k.layer_types(s["n_layers"], lambda i: (i + 1) % 4 != 0, window))


def _olmo2_flags(k: Keys) -> dict:
    bias = bool(k("attention_bias"))
    return dict(qkv_bias=bias, o_bias=bias, qk_norm="flat", layout="post", norm="w_f32")


def _smollm3(k: Keys, s: dict) -> dict:
    _no_partial_rotary(k)
    n = s["n_layers"]
    rope_on = k("no_rope_layers")  # 1: rope on, 0: NoPE (the name says the opposite)
    if rope_on is None:
        rope_on = [int((i + 1) % k("no_rope_layer_interval") != 0) for i in range(n)]
    if len(rope_on) != n:
        raise FtjaxError(f"{k.src}: no_rope_layers has {len(rope_on)} entries for {n} layers")
    window = k("sliding_window")
    sliding_on = bool(k("use_sliding_window")) and window is not None
    bias = bool(k("attention_bias"))
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(k("mlp_bias")), rope=flat_rope(k, s, theta_default=2e6),
                rope_layers=tuple(bool(x) for x in rope_on), sliding_window=window,
                layer_types=k.layer_types(n, lambda i: sliding_on and not rope_on[i], window))


def _gemma(k: Keys, s: dict) -> dict:
    """What Gemma 2 and Gemma 3 share: (1 + w) norms in float32, four norms per layer, GeGLU, query_pre_attn_scalar,
    embeddings × √hidden rounded to the weight dtype."""
    _no_partial_rotary(k)
    act = k("hidden_activation")
    if act != "gelu_pytorch_tanh":
        raise FtjaxError(f"{k.src}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh only)")
    bias = bool(k("attention_bias"))
    return dict(qkv_bias=bias, o_bias=bias, norm="1+w", layout="sandwich", act="gelu_tanh",
                attn_scale=float(k("query_pre_attn_scalar")) ** -0.5, embed_scale=s["hidden"] ** 0.5,
                embed_scale_rounded=True, final_softcap=k("final_logit_softcapping"))


def _gemma2(k: Keys, s: dict) -> dict:
    window = k("sliding_window")
    return dict(_gemma(k, s), attn_softcap=k("attn_logit_softcapping"), rope=flat_rope(k, s), sliding_window=window,
                layer_types=k.layer_types(s["n_layers"], lambda i: i % 2 == 0, window))


def _gemma3(k: Keys, s: dict) -> dict:
    if k.c.get("use_bidirectional_attention"):
        raise FtjaxError(f"{k.src}: use_bidirectional_attention (an embedding model, not a causal LM) is not "
                         "supported")
    if k.c.get("attn_logit_softcapping") is not None:
        k.notes.append("attn_logit_softcapping ignored: transformers' Gemma 3 attention never applies it")
    window, pattern = k("sliding_window"), k("sliding_window_pattern")
    full, local = nested_rope(k, s, full_theta=1e6, local_theta=1e4, local_key="rope_local_base_freq")
    return dict(_gemma(k, s), qk_norm="head", rope=full, local_rope=local, sliding_window=window,
                layer_types=k.layer_types(s["n_layers"], lambda i: bool((i + 1) % pattern), window))


def _phi3(k: Keys, s: dict) -> dict:
    window = k("sliding_window")  # every layer, as Mistral
    return dict(fused=True, sliding_window=window, rotary_dim=s["rotary_dim"],
                layer_types=(("full_attention", "sliding_attention")[window is not None],) * s["n_layers"],
                rope=flat_rope(k, s, longrope_aliases=True, original_field=True))


def _granite(k: Keys, s: dict) -> dict:
    _no_partial_rotary(k)
    bias = bool(k("attention_bias"))
    return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(k("mlp_bias")), rope=flat_rope(k, s),
                embed_scale=float(k("embedding_multiplier")), attn_scale=float(k("attention_multiplier")),
                residual_multiplier=float(k("residual_multiplier")), logits_divisor=float(k("logits_scaling")))


_QWEN_WINDOW = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
_GEMMA = ("hidden_activation", "query_pre_attn_scalar", "sliding_window", "layer_types", "final_logit_softcapping",
          "attention_bias")

FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", ("attention_bias", "mlp_bias"), dict(
        num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6), _llama),
    "mistral": Family("MistralForCausalLM", ("sliding_window",), dict(
        num_key_value_heads=8, max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, sliding_window=4096), _mistral),
    "qwen2": Family("Qwen2ForCausalLM", _QWEN_WINDOW, dict(
        num_key_value_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=4096,
        max_window_layers=28), _qwen2),
    "qwen3": Family("Qwen3ForCausalLM", ("attention_bias", *_QWEN_WINDOW), dict(
        num_key_value_heads=32, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=4096,
        max_window_layers=28), _qwen3),
    "olmo2": Family("Olmo2ForCausalLM", ("attention_bias",), dict(
        num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-5), _olmo2),
    "olmo3": Family("Olmo3ForCausalLM", ("attention_bias", "sliding_window", "layer_types"), dict(
        num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-5, sliding_window=4096), _olmo3),
    "smollm3": Family("SmolLM3ForCausalLM", ("attention_bias", "mlp_bias", "use_sliding_window", "sliding_window",
                                             "layer_types", "no_rope_layers", "no_rope_layer_interval"), dict(
        num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        no_rope_layer_interval=4), _smollm3),
    "gemma2": Family("Gemma2ForCausalLM", (*_GEMMA, "attn_logit_softcapping"), dict(
        num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0), _gemma2, act_key="hidden_activation"),
    "gemma3_text": Family("Gemma3ForCausalLM", (*_GEMMA, "sliding_window_pattern", "rope_local_base_freq",
                                                "use_bidirectional_attention", "attn_logit_softcapping"), dict(
        num_key_value_heads=4, head_dim=256, max_position_embeddings=131072, rms_norm_eps=1e-6,
        tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
        sliding_window=4096, sliding_window_pattern=6), _gemma3, act_key="hidden_activation"),
    "phi3": Family("Phi3ForCausalLM", ("sliding_window",), dict(
        num_key_value_heads=None, max_position_embeddings=4096, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5), _phi3),
    "granite": Family("GraniteForCausalLM", ("attention_bias", "mlp_bias", "embedding_multiplier",
                                             "attention_multiplier", "residual_multiplier", "logits_scaling"), dict(
        num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6, embedding_multiplier=1.0,
        attention_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0), _granite),
}
ARCHITECTURES = {family: f.architecture for family, f in FAMILIES.items()}


def is_tied(config: Mapping[str, Any]) -> bool:
    """The tying rule, as transformers applies it: the config's `tie_word_embeddings`, else its family's default
    (PreTrainedConfig's True for a family ftjax does not model). Used by the config reader and the layout alike."""
    family = FAMILIES.get(config.get("model_type"))
    default = family.defaults.get("tie_word_embeddings", False) if family else True
    tie = config.get("tie_word_embeddings")
    return bool(default if tie is None else tie)
