"""The decoder forward pass of every supported family as Flax linen modules: one block, steered by the family
switches of `ModelConfig` (norm form, layer layout, q/k norm, rope per layer type, NoPE layers, softcaps, scalar
multipliers, fused projections; see its docstring and `ftjax.families`).

Module and parameter names ARE the Hugging Face names and layouts, so `CausalLM(cfg).apply({"params": params}, ...)`
takes the nested HF-named tree from `ftjax.params` as is: Linear `weight` is [out, in] (used as x @ w.T), biases are
`bias`, `model.embed_tokens.weight` is [V, D], norms carry `weight`, and `lm_head` is absent when embeddings are tied.
Compute runs in the params' dtype; logits come out float32. Shape suffixes: b batch, t query / s key position,
d model width, f output features, v vocab, n query heads, k kv heads, g query heads per kv head, h head_dim.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax import rope as R
from ftjax.config import ModelConfig
from ftjax.errors import FtjaxError

# Finite, so a fully masked row (a padding query) softmaxes to uniform instead of NaN.
_MASKED = float(np.finfo(np.float32).min)


def precision(dtype: Any) -> jax.lax.Precision:
    """Matmul precision for compute in `dtype`: HIGHEST for float32 (parity with transformers; the GPU/TPU default
    would round operands to TF32 / bf16 passes), DEFAULT for bf16/f16 (full-rate tensor cores, f32 accumulation)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def attention_implementation(dtype: Any) -> str:
    """`jax.nn.dot_product_attention` backend: cuDNN flash attention on GPU for bf16/f16, XLA otherwise (float32,
    CPU and TPU). Override with FTJAX_ATTENTION=xla|cudnn (read at trace time)."""
    forced = os.environ.get("FTJAX_ATTENTION")
    if forced in ("xla", "cudnn"):
        return forced
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def fused_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, allowed_bts: jax.Array,
                    scale: float) -> jax.Array:
    """softmax(q k^T * scale, masked) v through `jax.nn.dot_product_attention` -> [B, T, N, H].

    GQA groups query heads as (k, g) like HF repeat_kv. Scores and softmax are float32 on every backend. The mask
    includes causality; cuDNN is also told `is_causal` so it skips the upper-triangle blocks. Fully masked rows
    (padding queries) come out uniform (XLA) or arbitrary (cuDNN); callers never score them.
    """
    impl = attention_implementation(q_btnh.dtype)
    # Under HIGHEST for float32: the XLA implementation's einsums take the default precision.
    with jax.default_matmul_precision("highest" if q_btnh.dtype == jnp.float32 else None):
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=allowed_bts[:, None], scale=scale,
                                            is_causal=impl == "cudnn", implementation=impl)


# ---------------------------------------------------------------------------------------------------------- masks
def attention_mask_bts(batch: int, length: int, window: int | None, attention_mask_bt: jax.Array | None = None,
                       segment_ids_bt: jax.Array | None = None) -> jax.Array:
    """bool [B, T, S]: query t may attend key s. Causal by index; `window` keeps s > t - window (self included);
    keys with attention_mask 0 are dropped; attention never crosses segment ids."""
    t = jnp.arange(length)[:, None]
    s = jnp.arange(length)[None, :]
    allowed_ts = s <= t
    if window is not None:
        allowed_ts &= s > t - window
    allowed_bts = jnp.broadcast_to(allowed_ts, (batch, length, length))
    if attention_mask_bt is not None:
        allowed_bts &= attention_mask_bt[:, None, :].astype(bool)
    if segment_ids_bt is not None:
        allowed_bts &= segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return allowed_bts


def cache_mask_bts(index: jax.Array, length: int, cache_len: int, window: int | None,
                   attention_mask_bs: jax.Array) -> jax.Array:
    """bool [B, T, S] for T queries written at cache slots [index, index + T): causal and windowed by slot (slot
    differences are position differences, since padding is only on the left), keys with attention_mask 0 dropped."""
    t = index + jnp.arange(length)[:, None]
    s = jnp.arange(cache_len)[None, :]
    allowed_ts = s <= t
    if window is not None:
        allowed_ts &= s > t - window
    return allowed_ts[None] & attention_mask_bs[:, None, :].astype(bool)


# ---------------------------------------------------------------------------------------------------------- modules
class Linear(nn.Module):
    """y = x @ weight.T (+ bias), weight [out, in] as torch stores it. (Initial values come from `init_params`, so
    the modules' own initializers only shape the parameter tree.)"""

    features: int
    use_bias: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        w_fd = self.param("weight", nn.initializers.zeros, (self.features, x_btd.shape[-1]), self.param_dtype)
        y_btf = jnp.einsum("btd,fd->btf", x_btd, w_fd, precision=precision(x_btd.dtype))
        if self.use_bias:
            y_btf = y_btf + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return y_btf


class Table(nn.Module):
    """A [rows, cols] `weight` returned whole: the token embedding, or an untied lm_head."""

    rows: int
    cols: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("weight", nn.initializers.zeros, (self.rows, self.cols), self.param_dtype)


def einsum_attention(q_btnh: jax.Array, k_bksh: jax.Array, v_bksh: jax.Array, allowed_bts: jax.Array, scale: float,
                     softcap: float | None = None) -> jax.Array:
    """softmax(softcap(q k^T * scale), masked) v as plain einsums over [B, K, S, H] keys and values (a KV cache's
    layout; decode is bandwidth-bound anyway), scores in the compute dtype, softmax in float32 -> [B, T, N, H].
    GQA as HF repeat_kv: query head i uses kv head i // g, so heads split as (k, g), never (g, k)."""
    b, t, n, h = q_btnh.shape
    k = k_bksh.shape[1]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    prec = precision(q_btnh.dtype)
    scores_bkgts = jnp.einsum("btkgh,bksh->bkgts", q_btkgh, k_bksh, precision=prec) * scale
    if softcap is not None:  # Gemma 2: before the mask
        scores_bkgts = jnp.tanh(scores_bkgts / softcap) * softcap
    scores_bkgts = jnp.where(allowed_bts[:, None, None], scores_bkgts.astype(jnp.float32), _MASKED)
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bksh.dtype)
    out_btkgh = jnp.einsum("bkgts,bksh->btkgh", probs_bkgts, v_bksh, precision=prec)
    return out_btkgh.reshape(b, t, n, h)


class RMSNorm(nn.Module):
    """x / rms(x), normalized in float32, then by `form`: "w" (Llama: cast back to the input dtype, then × weight),
    "w_f32" (OLMo: × weight in float32, then cast), "1+w" (Gemma: × (1 + weight) in float32, then cast; the stored
    weight is zero-centred). The three agree in float32 for w and 1 + w; they differ in bfloat16."""

    eps: float
    form: str = "w"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.form == "1+w" else nn.initializers.ones
        w_d = self.param("weight", init, (x_btd.shape[-1],), self.param_dtype)
        x_f32 = x_btd.astype(jnp.float32)
        x_f32 = x_f32 * jax.lax.rsqrt(jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True) + self.eps)
        if self.form == "1+w":
            return (x_f32 * (1.0 + w_d.astype(jnp.float32))).astype(x_btd.dtype)
        if self.form == "w_f32":
            return (w_d.astype(jnp.float32) * x_f32).astype(x_btd.dtype)
        return w_d * x_f32.astype(x_btd.dtype)


def _norm(cfg: ModelConfig, param_dtype: Any, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, cfg.norm, param_dtype, name=name)


class Attention(nn.Module):
    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd, rope_bth, allowed_bts, cache=None, index=None):
        """Returns (output, cache). rope_bth: (cos, sin) of this layer, or None (a NoPE layer). With a cache
        {"k", "v": [B, K, S, H]}, the T new keys and values are written at slots [index, index + T) and the queries
        attend over all S slots (allowed_bts is [B, T, S])."""
        cfg, kw = self.cfg, dict(param_dtype=self.param_dtype)
        b, t, _ = x_btd.shape
        n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if cfg.fused:  # Phi-3: one qkv_proj, output columns q | k | v
            qkv_btf = Linear((n + 2 * k) * h, cfg.qkv_bias, name="qkv_proj", **kw)(x_btd)
            q_btf, k_btf, v_btf = jnp.split(qkv_btf, [n * h, (n + k) * h], axis=-1)
        else:
            q_btf = Linear(n * h, cfg.qkv_bias, name="q_proj", **kw)(x_btd)
            k_btf = Linear(k * h, cfg.qkv_bias, name="k_proj", **kw)(x_btd)
            v_btf = Linear(k * h, cfg.qkv_bias, name="v_proj", **kw)(x_btd)
        if cfg.qk_norm == "flat":  # OLMo: over the whole flat projection, before the head split and rope
            q_btf, k_btf = _norm(cfg, self.param_dtype, "q_norm")(q_btf), _norm(cfg, self.param_dtype, "k_norm")(k_btf)
        q_btnh, k_btkh, v_btkh = q_btf.reshape(b, t, n, h), k_btf.reshape(b, t, k, h), v_btf.reshape(b, t, k, h)
        if cfg.qk_norm == "head":  # Qwen3, Gemma 3: one weight [head_dim] shared by the heads, before rope
            q_btnh = _norm(cfg, self.param_dtype, "q_norm")(q_btnh)
            k_btkh = _norm(cfg, self.param_dtype, "k_norm")(k_btkh)
        if rope_bth is not None:
            q_btnh, k_btkh = R.apply(q_btnh, *rope_bth), R.apply(k_btkh, *rope_bth)
        scale = cfg.head_dim ** -0.5 if cfg.attn_scale is None else cfg.attn_scale
        o_proj = Linear(cfg.hidden_size, cfg.o_bias, name="o_proj", **kw)
        if cache is None and cfg.attn_softcap is None:  # full-sequence pass (training, scoring, scans)
            return o_proj(fused_attention(q_btnh, k_btkh, v_btkh, allowed_bts, scale).reshape(b, t, n * h)), cache
        k_bksh, v_bksh = k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3)
        if cache is not None:  # write the new keys and values at slots [index, index + T)
            k_bksh = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_bksh.astype(cache["k"].dtype), index, axis=2)
            v_bksh = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_bksh.astype(cache["v"].dtype), index, axis=2)
            cache = {"k": k_bksh, "v": v_bksh}
        out_btnh = einsum_attention(q_btnh, k_bksh, v_bksh, allowed_bts, scale, cfg.attn_softcap)
        return o_proj(out_btnh.reshape(b, t, n * h)), cache


class MLP(nn.Module):
    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd):
        """down(act(gate(x)) * up(x)); act SiLU, or GELU with the tanh approximation (Gemma)."""
        cfg, kw = self.cfg, dict(param_dtype=self.param_dtype)
        i = cfg.intermediate_size
        if cfg.fused:  # Phi-3: gate_up_proj, gate rows first
            gate_btf, up_btf = jnp.split(Linear(2 * i, cfg.mlp_bias, name="gate_up_proj", **kw)(x_btd), 2, axis=-1)
        else:
            gate_btf = Linear(i, cfg.mlp_bias, name="gate_proj", **kw)(x_btd)
            up_btf = Linear(i, cfg.mlp_bias, name="up_proj", **kw)(x_btd)
        act = jax.nn.silu if cfg.act == "silu" else functools.partial(jax.nn.gelu, approximate=True)
        return Linear(cfg.hidden_size, cfg.mlp_bias, name="down_proj", **kw)(act(gate_btf) * up_btf)


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd, rope_bth, allowed_bts, cache=None, index=None):
        """Returns (x_btd, cache); see Attention for rope_bth and the cache. Layouts: pre (Llama), post (OLMo: no
        input norm, each sublayer's output normed before the add), sandwich (Gemma: both)."""
        cfg, pd = self.cfg, self.param_dtype
        attn, mlp = Attention(cfg, pd, name="self_attn"), MLP(cfg, pd, name="mlp")
        m = cfg.residual_multiplier  # Granite scales each sublayer's output

        def scaled(y_btd):
            return y_btd if m == 1.0 else y_btd * m

        if cfg.layout == "post":
            a_btd, cache = attn(x_btd, rope_bth, allowed_bts, cache, index)
            x_btd = x_btd + scaled(_norm(cfg, pd, "post_attention_layernorm")(a_btd))
            return x_btd + scaled(_norm(cfg, pd, "post_feedforward_layernorm")(mlp(x_btd))), cache
        a_btd, cache = attn(_norm(cfg, pd, "input_layernorm")(x_btd), rope_bth, allowed_bts, cache, index)
        if cfg.layout == "sandwich":
            x_btd = x_btd + scaled(_norm(cfg, pd, "post_attention_layernorm")(a_btd))
            f_btd = mlp(_norm(cfg, pd, "pre_feedforward_layernorm")(x_btd))
            return x_btd + scaled(_norm(cfg, pd, "post_feedforward_layernorm")(f_btd)), cache
        x_btd = x_btd + scaled(a_btd)
        return x_btd + scaled(mlp(_norm(cfg, pd, "post_attention_layernorm")(x_btd))), cache


class Layers(nn.Module):
    """The `model.layers` scope; children are named "0", "1", ... as in the checkpoint."""

    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd, rope_by_type, allowed_by_type, caches=None, index=None):
        new_caches = []
        for i, layer_type in enumerate(self.cfg.layer_types):
            rope_bth = rope_by_type[layer_type] if self.cfg.rope_layers[i] else None
            x_btd, cache = DecoderLayer(self.cfg, self.param_dtype, name=str(i))(
                x_btd, rope_bth, allowed_by_type[layer_type], None if caches is None else caches[i], index)
            new_caches.append(cache)
        return x_btd, (None if caches is None else new_caches)


class Decoder(nn.Module):
    """The `model` scope: embed_tokens, layers, final norm. Returns (hidden_btd, embed_tokens weight [V, D], caches)."""

    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens_bt, rope_by_type, allowed_by_type, caches=None, index=None):
        cfg = self.cfg
        embed_vd = Table(cfg.vocab_size, cfg.hidden_size, self.param_dtype, name="embed_tokens")()
        x_btd = jnp.take(embed_vd, tokens_bt, axis=0)
        if cfg.embed_scale != 1.0:  # Gemma: √hidden rounded to the weight dtype; Granite: embedding_multiplier
            scale = jnp.asarray(cfg.embed_scale, x_btd.dtype) if cfg.embed_scale_rounded else cfg.embed_scale
            x_btd = (x_btd * scale).astype(embed_vd.dtype)
        x_btd, caches = Layers(cfg, self.param_dtype, name="layers")(x_btd, rope_by_type, allowed_by_type, caches,
                                                                     index)
        return _norm(cfg, self.param_dtype, "norm")(x_btd), embed_vd, caches


class CausalLM(nn.Module):
    """XForCausalLM: `model` + `lm_head` (or the tied embedding). Returns float32 logits [B, T, V], or
    (logits, caches) when called with caches; `last_only` computes the logits of the last position alone, and
    `at_bk` (int32 [B, K] positions) those of K chosen positions per row, [B, K, V]."""

    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens_bt, rope_by_type, allowed_by_type, caches=None, index=None, last_only=False,
                 at_bk=None):
        cfg = self.cfg
        x_btd, embed_vd, new_caches = Decoder(cfg, self.param_dtype, name="model")(
            tokens_bt, rope_by_type, allowed_by_type, caches, index)
        head_vd = embed_vd if cfg.tie_word_embeddings else Table(
            cfg.vocab_size, cfg.hidden_size, self.param_dtype, name="lm_head")()
        if last_only:
            x_btd = x_btd[:, -1:]
        if at_bk is not None:  # the LM head (the largest matmul for big vocabularies) only where it is read
            x_btd = jnp.take_along_axis(x_btd, at_bk[..., None], axis=1)
        # float32 accumulation out of the last matmul: bf16-rounded logits would cost log-prob precision.
        logits_btv = jnp.einsum("btd,vd->btv", x_btd, head_vd, precision=precision(x_btd.dtype),
                                preferred_element_type=jnp.float32)
        if cfg.logits_divisor != 1.0:  # Granite
            logits_btv = logits_btv / cfg.logits_divisor
        if cfg.final_softcap is not None:  # Gemma
            logits_btv = jnp.tanh(logits_btv / cfg.final_softcap) * cfg.final_softcap
        return logits_btv if caches is None else (logits_btv, new_caches)


def rope_tables(positions_bt: jax.Array, cfg: ModelConfig, dtype: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
    """(cos, sin) [B, T, rotary_dim] per layer type of `cfg` (one table unless sliding layers have their own rope)."""
    return {t: R.cos_sin(positions_bt, cfg.rope_of(t), cfg.rotary_dim, dtype) for t in sorted(set(cfg.layer_types))}


def _inputs(cfg, tokens_bt, dtype, attention_mask_bt, segment_ids_bt, positions_bt):
    b, t = tokens_bt.shape
    if positions_bt is None:
        # RoPE is relative, so with masking/segments arange gives the same logits as per-sequence positions.
        positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
    allowed_by_type = {
        layer_type: attention_mask_bts(b, t, cfg.sliding_window if layer_type == "sliding_attention" else None,
                                       attention_mask_bt, segment_ids_bt)
        for layer_type in set(cfg.layer_types)}
    return tokens_bt, rope_tables(positions_bt, cfg, dtype), allowed_by_type


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params: dict, tokens_bt: jax.Array, cfg: ModelConfig, *, attention_mask_bt: jax.Array | None = None,
            segment_ids_bt: jax.Array | None = None, positions_bt: jax.Array | None = None,
            logits_at_bk: jax.Array | None = None) -> jax.Array:
    """Logits float32 [B, T, V] for int32 tokens [B, T]; compute in the dtype of the params.

    params: the nested HF-named tree (see ftjax.params). attention_mask_bt: 1 real token, 0 padding (left or right).
    segment_ids_bt: packed sequences; attention never crosses a segment boundary. positions_bt: RoPE positions,
    default arange(T) (with left padding, pass positions explicitly if you want HF's position_ids).
    logits_at_bk: int32 [B, K] positions in [0, T): then only their logits, float32 [B, K, V] (row b's k-th equals
    the full logits at [b, logits_at_bk[b, k]]; the LM head and softmax cost K/T of the full ones).
    """
    try:
        dtype = params["model"]["embed_tokens"]["weight"].dtype
        inputs = _inputs(cfg, tokens_bt, dtype, attention_mask_bt, segment_ids_bt, positions_bt)
        return CausalLM(cfg).apply({"params": params}, *inputs, at_bk=logits_at_bk)
    except (KeyError, flax.errors.ScopeParamNotFoundError, flax.errors.ScopeParamShapeError) as e:
        raise FtjaxError(f"params do not fit the {cfg.architecture} config: {e}") from None


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any) -> list[dict[str, jax.Array]]:
    """An empty KV cache: per layer {"k", "v": zeros [batch, kv heads, length, head_dim]} in `dtype`."""
    shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_hidden_layers)]


def forward_cached(params: dict, tokens_bt: jax.Array, cache: list, index: jax.Array, cfg: ModelConfig, *,
                   attention_mask_bs: jax.Array, positions_bt: jax.Array,
                   last_only: bool = False) -> tuple[jax.Array, list]:
    """Logits float32 [B, T, V] (or [B, 1, V] with last_only) and the updated cache, for T tokens written at cache
    slots [index, index + T): prefill with index 0 and the (left-padded) prompt, then decode one token at a time.

    attention_mask_bs: int/bool [B, S], 0 on padding slots of the cache (slots not yet written are excluded by
    causality). positions_bt: RoPE positions of the new tokens (HF's cumsum(mask) - 1 under left padding).
    Not jitted itself: call it inside a jitted prefill step or decode loop.
    """
    b, t = tokens_bt.shape
    dtype = params["model"]["embed_tokens"]["weight"].dtype
    s = cache[0]["k"].shape[2]
    allowed_by_type = {
        layer_type: cache_mask_bts(index, t, s, cfg.sliding_window if layer_type == "sliding_attention" else None,
                                   attention_mask_bs)
        for layer_type in set(cfg.layer_types)}
    return CausalLM(cfg).apply({"params": params}, tokens_bt, rope_tables(positions_bt, cfg, dtype), allowed_by_type,
                               cache, index, last_only)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _init(rng, std, cfg, dtype):
    inputs = _inputs(cfg, jnp.zeros((1, 1), jnp.int32), dtype, None, None, None)
    abstract = jax.eval_shape(lambda: CausalLM(cfg, dtype).init(jax.random.key(0), *inputs)["params"])
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    is_random = [path[-1].key == "weight" and not path[-2].key.endswith("norm") for path, _ in paths_leaves]
    # One normal draw for all weights, then slices: XLA compiles one RNG instead of one per tensor.
    sizes = [leaf.size if rand else 0 for (_, leaf), rand in zip(paths_leaves, is_random)]
    flat = std * jax.random.normal(rng, (sum(sizes),), jnp.float32)
    offsets = np.cumsum([0] + sizes)
    leaves = []
    for (path, leaf), rand, start, stop in zip(paths_leaves, is_random, offsets[:-1], offsets[1:]):
        if rand:
            leaves.append(flat[start:stop].reshape(leaf.shape).astype(dtype))
        else:  # norm weights one, biases zero
            leaves.append(jnp.full(leaf.shape, path[-1].key == "weight" and cfg.norm != "1+w", dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


@functools.lru_cache(maxsize=64)
def _param_shapes(cfg: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    inputs = _inputs(cfg, jnp.zeros((1, 1), jnp.int32), jnp.float32, None, None, None)
    abstract = jax.eval_shape(lambda: CausalLM(cfg, jnp.float32).init(jax.random.key(0), *inputs)["params"])
    return tuple((".".join(str(k.key) for k in path), tuple(leaf.shape))
                 for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0])


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model of `cfg` has, with its shape, by its Hugging Face name (the model's own tree, traced
    abstractly: nothing is allocated)."""
    return dict(_param_shapes(cfg))


def init_params(cfg: ModelConfig, rng: jax.Array, dtype: Any = jnp.float32, std: float = 0.02) -> dict:
    """A random param tree in HF names and layouts: linears and embeddings normal(0, std) (a config's
    initializer_range is `CheckpointMeta.initializer_range`), biases zero, norm weights one (zero for Gemma's
    zero-centred 1 + w norms)."""
    return _init(rng, jnp.float32(std), cfg, jnp.dtype(dtype))
