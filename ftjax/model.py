"""The Llama-family forward pass (llama, mistral, qwen2, olmo2) as Flax linen modules.

Module and parameter names ARE the Hugging Face names and layouts, so `CausalLM(cfg).apply({"params": params}, ...)`
takes the nested HF-named tree from `ftjax.params` as is: Linear `weight` is [out, in] (used as x @ w.T), biases are
`bias`, `model.embed_tokens.weight` is [V, D], norms carry `weight`, and `lm_head` is absent when embeddings are tied.
Compute runs in the params' dtype; logits come out float32. Shape suffixes: b batch, t query / s key position,
d model width, f output features, v vocab, n query heads, k kv heads, g query heads per kv head, h head_dim.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def fused_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, allowed_bts: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(h), masked) v through `jax.nn.dot_product_attention` -> [B, T, N, H].

    GQA groups query heads as (k, g) like HF repeat_kv. Scores and softmax are float32 on every backend. The mask
    includes causality; cuDNN is also told `is_causal` so it skips the upper-triangle blocks. Fully masked rows
    (padding queries) come out uniform (XLA) or arbitrary (cuDNN); callers never score them.
    """
    impl = attention_implementation(q_btnh.dtype)
    h = q_btnh.shape[-1]
    # Under HIGHEST for float32: the XLA implementation's einsums take the default precision.
    with jax.default_matmul_precision("highest" if q_btnh.dtype == jnp.float32 else None):
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=allowed_bts[:, None], scale=h**-0.5,
                                            is_causal=impl == "cudnn", implementation=impl)


# ---------------------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] float32 (radians per position) for cfg.rope: default, linear, llama3."""
    rope, dim = cfg.rope, cfg.head_dim
    # HF rounds the base frequencies to float32 before any scaling; the scaling itself is done here in float64.
    inv_freq = (1.0 / rope.theta ** (np.arange(0, dim, 2) / dim)).astype(np.float32).astype(np.float64)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        # Three bands by wavelength: long waves divided by factor, short ones kept, the middle interpolated.
        old_len, lo, hi = rope.original_max_position_embeddings, rope.low_freq_factor, rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        inv_freq = np.where(wavelen > old_len / lo, inv_freq / rope.factor,
                            np.where(wavelen < old_len / hi, inv_freq, smoothed))
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions_bt: jax.Array, cfg: ModelConfig, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim] in `dtype`, split-half layout (HF checkpoints are stored for rotate_half)."""
    # Angles in float32 (an elementwise product, so exact: no bf16 rounding of 257 to 256), then cast like HF.
    angles_bth = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))
    angles_bth = jnp.concatenate([angles_bth, angles_bth], axis=-1)
    return jnp.cos(angles_bth).astype(dtype), jnp.sin(angles_bth).astype(dtype)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = concat(-x2, x1)."""
    x1, x2 = jnp.split(x_btnh, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_btnh * cos_bth[:, :, None, :] + rotated * sin_bth[:, :, None, :]


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


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalized in float32.

    Llama order casts back to the input dtype before the weight multiply; OLMo 2 (`weight_in_f32`) multiplies in
    float32 and casts after. Identical in float32, different in bfloat16.
    """

    eps: float
    weight_in_f32: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        w_d = self.param("weight", nn.initializers.ones, (x_btd.shape[-1],), self.param_dtype)
        x_f32 = x_btd.astype(jnp.float32)
        x_f32 = x_f32 * jax.lax.rsqrt(jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True) + self.eps)
        if self.weight_in_f32:
            return (w_d.astype(jnp.float32) * x_f32).astype(x_btd.dtype)
        return w_d * x_f32.astype(x_btd.dtype)


class Attention(nn.Module):
    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd, cos_bth, sin_bth, allowed_bts, cache=None, index=None):
        """Returns (output, cache). With a cache {"k", "v": [B, K, S, H]}, the T new keys and values are written
        at slots [index, index + T) and the queries attend over all S slots (allowed_bts is [B, T, S])."""
        cfg, kw = self.cfg, dict(param_dtype=self.param_dtype)
        b, t, _ = x_btd.shape
        n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_btf = Linear(n * h, cfg.qkv_bias, name="q_proj", **kw)(x_btd)
        k_btf = Linear(k * h, cfg.qkv_bias, name="k_proj", **kw)(x_btd)
        v_btf = Linear(k * h, cfg.qkv_bias, name="v_proj", **kw)(x_btd)
        if cfg.qk_norm:  # OLMo 2: RMSNorm over the whole flat projection, before the head split and RoPE
            norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.norm_weight_in_f32, self.param_dtype)
            q_btf, k_btf = norm(name="q_norm")(q_btf), norm(name="k_norm")(k_btf)
        q_btnh = apply_rope(q_btf.reshape(b, t, n, h), cos_bth, sin_bth)
        k_btkh = apply_rope(k_btf.reshape(b, t, k, h), cos_bth, sin_bth)
        v_btkh = v_btf.reshape(b, t, k, h)
        if cache is None:  # full-sequence pass (training, scoring, scans): the fused kernel
            out_btnh = fused_attention(q_btnh, k_btkh, v_btkh, allowed_bts)
            return Linear(cfg.hidden_size, cfg.o_bias, name="o_proj", **kw)(out_btnh.reshape(b, t, n * h)), cache
        # Keys and values as [B, K, S, H], the cache's layout: a decode step then reads the cache without a transpose.
        k_bksh = k_btkh.transpose(0, 2, 1, 3)
        v_bksh = v_btkh.transpose(0, 2, 1, 3)
        k_bksh = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_bksh.astype(cache["k"].dtype), index, axis=2)
        v_bksh = jax.lax.dynamic_update_slice_in_dim(cache["v"], v_bksh.astype(cache["v"].dtype), index, axis=2)
        cache = {"k": k_bksh, "v": v_bksh}

        # With a cache (prefill, decode): plain einsums over the [B, K, S, H] cache (decode is bandwidth-bound anyway).
        # GQA as HF repeat_kv: query head i uses kv head i // g, so split heads as (k, g), never (g, k).
        q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
        prec = precision(q_btnh.dtype)
        scores_bkgts = jnp.einsum("btkgh,bksh->bkgts", q_btkgh, k_bksh, precision=prec) * h**-0.5
        scores_bkgts = jnp.where(allowed_bts[:, None, None], scores_bkgts.astype(jnp.float32), _MASKED)
        probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bksh.dtype)
        out_btkgh = jnp.einsum("bkgts,bksh->btkgh", probs_bkgts, v_bksh, precision=prec)
        return Linear(cfg.hidden_size, cfg.o_bias, name="o_proj", **kw)(out_btkgh.reshape(b, t, n * h)), cache


class MLP(nn.Module):
    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd):
        cfg, kw = self.cfg, dict(param_dtype=self.param_dtype)
        gate_btf = Linear(cfg.intermediate_size, cfg.mlp_bias, name="gate_proj", **kw)(x_btd)
        up_btf = Linear(cfg.intermediate_size, cfg.mlp_bias, name="up_proj", **kw)(x_btd)
        return Linear(cfg.hidden_size, cfg.mlp_bias, name="down_proj", **kw)(jax.nn.silu(gate_btf) * up_btf)


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd, cos_bth, sin_bth, allowed_bts, cache=None, index=None):
        """Returns (x_btd, cache); see Attention for the cache."""
        cfg = self.cfg
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.norm_weight_in_f32, self.param_dtype)
        attn = Attention(cfg, self.param_dtype, name="self_attn")
        mlp = MLP(cfg, self.param_dtype, name="mlp")
        if cfg.post_sublayer_norms:  # OLMo 2: no input norm; norm each sublayer's output before the residual add
            a_btd, cache = attn(x_btd, cos_bth, sin_bth, allowed_bts, cache, index)
            x_btd = x_btd + norm(name="post_attention_layernorm")(a_btd)
            return x_btd + norm(name="post_feedforward_layernorm")(mlp(x_btd)), cache
        a_btd, cache = attn(norm(name="input_layernorm")(x_btd), cos_bth, sin_bth, allowed_bts, cache, index)
        x_btd = x_btd + a_btd
        return x_btd + mlp(norm(name="post_attention_layernorm")(x_btd)), cache


class Layers(nn.Module):
    """The `model.layers` scope; children are named "0", "1", ... as in the checkpoint."""

    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_btd, cos_bth, sin_bth, allowed_by_type, caches=None, index=None):
        new_caches = []
        for i, layer_type in enumerate(self.cfg.layer_types):
            x_btd, cache = DecoderLayer(self.cfg, self.param_dtype, name=str(i))(
                x_btd, cos_bth, sin_bth, allowed_by_type[layer_type], None if caches is None else caches[i], index)
            new_caches.append(cache)
        return x_btd, (None if caches is None else new_caches)


class Decoder(nn.Module):
    """The `model` scope: embed_tokens, layers, final norm. Returns (hidden_btd, embed_tokens weight [V, D], caches)."""

    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens_bt, cos_bth, sin_bth, allowed_by_type, caches=None, index=None):
        cfg = self.cfg
        embed_vd = Table(cfg.vocab_size, cfg.hidden_size, self.param_dtype, name="embed_tokens")()
        x_btd = jnp.take(embed_vd, tokens_bt, axis=0)
        x_btd, caches = Layers(cfg, self.param_dtype, name="layers")(x_btd, cos_bth, sin_bth, allowed_by_type,
                                                                     caches, index)
        x_btd = RMSNorm(cfg.rms_norm_eps, cfg.norm_weight_in_f32, self.param_dtype, name="norm")(x_btd)
        return x_btd, embed_vd, caches


class CausalLM(nn.Module):
    """XForCausalLM: `model` + `lm_head` (or the tied embedding). Returns float32 logits [B, T, V], or
    (logits, caches) when called with caches; `last_only` computes the logits of the last position alone."""

    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens_bt, cos_bth, sin_bth, allowed_by_type, caches=None, index=None, last_only=False):
        cfg = self.cfg
        x_btd, embed_vd, new_caches = Decoder(cfg, self.param_dtype, name="model")(
            tokens_bt, cos_bth, sin_bth, allowed_by_type, caches, index)
        head_vd = embed_vd if cfg.tie_word_embeddings else Table(
            cfg.vocab_size, cfg.hidden_size, self.param_dtype, name="lm_head")()
        if last_only:
            x_btd = x_btd[:, -1:]
        # float32 accumulation out of the last matmul: bf16-rounded logits would cost log-prob precision.
        logits_btv = jnp.einsum("btd,vd->btv", x_btd, head_vd, precision=precision(x_btd.dtype),
                                preferred_element_type=jnp.float32)
        return logits_btv if caches is None else (logits_btv, new_caches)


def _inputs(cfg, tokens_bt, dtype, attention_mask_bt, segment_ids_bt, positions_bt):
    b, t = tokens_bt.shape
    if positions_bt is None:
        # RoPE is relative, so with masking/segments arange gives the same logits as per-sequence positions.
        positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
    cos_bth, sin_bth = rope_cos_sin(positions_bt, cfg, dtype)
    allowed_by_type = {
        layer_type: attention_mask_bts(b, t, cfg.sliding_window if layer_type == "sliding_attention" else None,
                                       attention_mask_bt, segment_ids_bt)
        for layer_type in set(cfg.layer_types)}
    return tokens_bt, cos_bth, sin_bth, allowed_by_type


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params: dict, tokens_bt: jax.Array, cfg: ModelConfig, *, attention_mask_bt: jax.Array | None = None,
            segment_ids_bt: jax.Array | None = None, positions_bt: jax.Array | None = None) -> jax.Array:
    """Logits float32 [B, T, V] for int32 tokens [B, T]; compute in the dtype of the params.

    params: the nested HF-named tree (see ftjax.params). attention_mask_bt: 1 real token, 0 padding (left or right).
    segment_ids_bt: packed sequences; attention never crosses a segment boundary. positions_bt: RoPE positions,
    default arange(T) (with left padding, pass positions explicitly if you want HF's position_ids).
    """
    try:
        dtype = params["model"]["embed_tokens"]["weight"].dtype
        inputs = _inputs(cfg, tokens_bt, dtype, attention_mask_bt, segment_ids_bt, positions_bt)
        return CausalLM(cfg).apply({"params": params}, *inputs)
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
    cos_bth, sin_bth = rope_cos_sin(positions_bt, cfg, dtype)
    s = cache[0]["k"].shape[2]
    allowed_by_type = {
        layer_type: cache_mask_bts(index, t, s, cfg.sliding_window if layer_type == "sliding_attention" else None,
                                   attention_mask_bs)
        for layer_type in set(cfg.layer_types)}
    return CausalLM(cfg).apply({"params": params}, tokens_bt, cos_bth, sin_bth, allowed_by_type, cache, index,
                               last_only)


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
            leaves.append(jnp.full(leaf.shape, path[-1].key == "weight", dtype))
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
    initializer_range is `CheckpointMeta.initializer_range`), biases zero, norm weights one."""
    return _init(rng, jnp.float32(std), cfg, jnp.dtype(dtype))
