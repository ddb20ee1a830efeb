"""ModelConfig: the numbers that define a decoder model, read from a Hugging Face config.json as transformers reads it.

Families (`ftjax.families`): llama, mistral, qwen2, qwen3, olmo2, olmo3, smollm3, gemma2, gemma3_text, phi3,
granite. The reference is transformers' modeling code for the family: `FAMILIES` lists, per family, every key that
code reads and what transformers assumes when the key is absent (from transformers 5.25:
`models/<family>/configuration_<family>.py` and `modeling_<family>.py`, `modeling_rope_utils.py`, `activations.py`,
`modeling_utils.py`). Mixture-of-experts families are refused by name (their routed forward is not implemented;
transfer and merge are tensor-wise and work on them). A config is refused only
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
from ftjax.families import ARCHITECTURES, COMMON, FAMILIES, MOE, Keys, is_tied
from ftjax.rope import LAYER_TYPES, ROPE_TYPES, RopeConfig  # noqa: F401 - public names of this module

_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# dtype / torch_dtype and the token ids are read too, but only as checkpoint metadata (stored dtype, padding_idx
# of the embedding at init, generation): they never change what the forward pass computes.
_METADATA = ("model_type", "architectures", "dtype", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id",
             "initializer_range")
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
@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one checkpoint: what the compiled forward pass depends on, and nothing else (token ids, the
    stored dtype and initialisation are `CheckpointMeta`), so a base and its instruct model share one compilation.
    Hashable, so it can be a static argument of jax.jit.

    `layer_types[i]` is "full_attention" or "sliding_attention" (window `sliding_window` tokens, self included).
    The family switches (`ftjax.families` sets them from config.json; `ftjax.model` reads them):
    - biases: q/k/v (`qkv_bias`), o (`o_bias`), MLP (`mlp_bias`); `fused`: Phi-3's qkv_proj and gate_up_proj.
    - `norm`: "w" (Llama: normalise in float32, cast, × w), "w_f32" (OLMo: × w in float32, then cast), "1+w" (Gemma:
      × (1 + w) in float32, then cast; weights stored zero-centred). `layout`: "pre" (norm → sublayer → add), "post"
      (OLMo: sublayer → norm → add, no input norm), "sandwich" (Gemma: norm → sublayer → norm → add).
    - `qk_norm`: "" none, "flat" (OLMo: over the whole projection), "head" (Qwen3, Gemma 3: per head over head_dim),
      before rope.
    - rope: `rope` (every layer, or the full-attention layers when `local_rope` is set: OLMo 3, Gemma 3),
      `rope_layers[i]` False for a layer without rotary embedding (SmolLM3), `rotary_dim` rotated dims per head
      (Phi-3's partial rotary; 0 = head_dim).
    - scalars: `attn_scale` (None: head_dim^-0.5), `attn_softcap` / `final_softcap` (tanh(x/c)·c on attention scores
      / logits), `embed_scale` (embeddings ×; `embed_scale_rounded`: the scale rounded to the weight dtype first, as
      Gemma), `residual_multiplier` (sublayer outputs ×), `logits_divisor`; `act` "silu" or "gelu_tanh".
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
    fused: bool = False
    norm: str = "w"
    layout: str = "pre"
    qk_norm: str = ""
    act: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    local_rope: RopeConfig | None = None
    rope_layers: tuple[bool, ...] = ()
    rotary_dim: int = 0
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float = 1.0
    embed_scale_rounded: bool = False
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise FtjaxError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if not self.rope_layers:
            object.__setattr__(self, "rope_layers", (True,) * self.num_hidden_layers)
        if not self.rotary_dim:
            object.__setattr__(self, "rotary_dim", self.head_dim)

    def rope_of(self, layer_type: str) -> RopeConfig:
        """The rope of a layer type (OLMo 3 and Gemma 3 rotate sliding layers with `local_rope`)."""
        return self.local_rope if layer_type == "sliding_attention" and self.local_rope is not None else self.rope

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
        fam, sliding = FAMILIES[self.model_type], [i for i, t in enumerate(self.layer_types) if t != "full_attention"]
        if "attention_bias" in fam.reads:
            out["attention_bias"] = self.qkv_bias
        if "mlp_bias" in fam.reads:
            out["mlp_bias"] = self.mlp_bias
        if "sliding_window" in fam.reads:
            out["sliding_window"] = self.sliding_window
        if "layer_types" in fam.reads:
            out["layer_types"] = list(self.layer_types)
        if "use_sliding_window" in fam.reads:
            out["use_sliding_window"] = bool(sliding)
        if "max_window_layers" in fam.reads:
            out["max_window_layers"] = sliding[0] if sliding else self.num_hidden_layers
        if self.local_rope is not None:  # OLMo 3, Gemma 3: ropes keyed by layer type, nothing at the top level
            out.update(rope_theta=None, rope_scaling=None, rope_parameters={
                "full_attention": self.rope.to_hf(), "sliding_attention": self.local_rope.to_hf()})
        if self.rotary_dim != self.head_dim:
            out["partial_rotary_factor"] = out["rope_parameters"]["partial_rotary_factor"] = (
                self.rotary_dim / self.head_dim)
        if self.model_type == "phi3" and self.rope.original_max_position_embeddings:
            out["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
        if self.model_type == "smollm3":
            out["no_rope_layers"] = [int(x) for x in self.rope_layers]
        if self.act == "gelu_tanh":
            out["hidden_act"] = out["hidden_activation"] = "gelu_pytorch_tanh"
        if self.norm == "1+w":  # Gemma
            out.update(query_pre_attn_scalar=round(self.attn_scale ** -2, 9), final_logit_softcapping=self.final_softcap,
                       attn_logit_softcapping=self.attn_softcap)
        if self.model_type == "granite":
            out.update(embedding_multiplier=self.embed_scale, attention_multiplier=self.attn_scale,
                       residual_multiplier=self.residual_multiplier, logits_scaling=self.logits_divisor)
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
        family = {v: k for k, v in {**ARCHITECTURES, **MOE}.items()}.get(archs[0], archs[0])
        notes.append(f"no model_type: family {family!r} taken from architectures")
    if family in MOE:
        raise FtjaxError(f"{source}: model_type {family!r} is a mixture of experts; ftjax's forward pass does not "
                         "route experts (eval, scan, generate, finetune); transfer, diff, apply and merge are "
                         "tensor-wise and work on it")
    if isinstance(c.get("text_config"), dict):
        raise FtjaxError(f"{source}: a multimodal checkpoint (model_type {family!r}); ftjax models its language model "
                         f"alone (text_config: model_type {c['text_config'].get('model_type')!r}), whose tensors such "
                         "checkpoints keep under language_model.*: not supported yet")
    if family not in FAMILIES:
        raise FtjaxError(f"{source}: unsupported model_type {family!r} (architectures {archs}); "
                         f"supported: {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    unusual = [a for a in archs if a != fam.architecture]
    if unusual:
        notes.append(f"architectures {unusual} ignored: model_type {family!r} builds {fam.architecture}, "
                     "as transformers' AutoModelForCausalLM does")
    reads = set(COMMON) | set(fam.reads)
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
    fam = FAMILIES[family]
    k = Keys(c, fam.defaults, src, notes, ignored)
    for key in _SIZES:
        if c.get(key) is None:
            raise FtjaxError(f"{src}: required key {key!r} is missing")
    if c.get("quantization_config") is not None:
        method = c["quantization_config"].get("quant_method") if isinstance(c["quantization_config"], dict) else None
        raise FtjaxError(f"{src}: quantized checkpoint (quantization_config, quant_method {method!r}); ftjax computes "
                         "on unquantized weights only: use the original bf16/f16/f32 checkpoint")
    if fam.act_key == "hidden_act":  # Gemma reads hidden_activation (checked by its family function)
        act = c.get("hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise FtjaxError(f"{src}: hidden_act {act!r} is not supported (only {' or '.join(_ACTIVATIONS)})")
    hidden, n_heads, n_layers = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
    n_kv = k("num_key_value_heads")
    n_kv = n_heads if n_kv is None else n_kv  # an explicit null means num_attention_heads in every family
    if n_heads % n_kv:
        raise FtjaxError(f"{src}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    head_dim = k("head_dim") or hidden // n_heads
    eps = k("rms_norm_eps")
    rope_dict = c.get("rope_scaling") or c.get("rope_parameters") or {}
    partial = (rope_dict.get("partial_rotary_factor") if isinstance(rope_dict, dict) else None) or c.get(
        "partial_rotary_factor") or 1.0
    sizes = dict(n_layers=n_layers, hidden=hidden, rotary_dim=int(head_dim * partial))
    switches = fam.switches(k, sizes)
    return ModelConfig(
        model_type=family, vocab_size=c["vocab_size"], hidden_size=hidden,
        intermediate_size=c["intermediate_size"], num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_kv, head_dim=head_dim, rms_norm_eps=float(fam.defaults["rms_norm_eps"] if eps is None
                                                                         else eps),
        max_position_embeddings=k("max_position_embeddings"),
        tie_word_embeddings=is_tied({**c, "model_type": family}), **switches)
