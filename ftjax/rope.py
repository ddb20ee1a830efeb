"""Rotary position embedding: a config.json's rope settings as transformers 5 resolves them, the inverse frequencies
of each rope type, and the rotation itself.

Rope types (transformers' `modeling_rope_utils.py`): default, linear (frequencies / factor), llama3 (three bands by
wavelength), yarn (NTK-by-parts ramp between interpolated and extrapolated frequencies; cos and sin scaled by an
attention factor) and longrope (Phi-3: per-frequency factors, a short set while the sequence fits the original
context and a long set beyond it; cos and sin scaled by an attention factor). A rope may cover only the first
`rotary_dim` dimensions of each head (Phi-3's `partial_rotary_factor`); the rest pass through unrotated.
Frequencies and angles are float32 as transformers computes them: float64 angles drift by up to 2.6e-4 at 4096
positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import FtjaxError

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")
_BASE_KEYS = frozenset({"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings", "partial_rotary_factor"})
_TYPE_KEYS = {"yarn": {"beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"},
              "longrope": {"attention_factor", "short_factor", "long_factor"}}


def keys_read(rope_type: str) -> frozenset:
    """The rope-dict keys a rope of `rope_type` reads (the rest are inert, listed by `ftjax inspect`)."""
    return _BASE_KEYS | _TYPE_KEYS.get(rope_type, set())


@dataclass(frozen=True)
class RopeConfig:
    """One rope: `rope_type` in ROPE_TYPES. `factor` for linear/llama3/yarn/longrope; low/high_freq_factor for llama3;
    beta_fast/beta_slow/truncate for yarn; short/long_factor for longrope; attention_factor scales cos and sin
    (yarn, longrope; resolved from the config as transformers does)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    def to_hf(self) -> dict[str, Any]:
        """The `rope_parameters` dict transformers 5 writes (includes rope_theta)."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type in ("linear", "llama3", "yarn", "longrope"):
            out["factor"] = self.factor
        if self.rope_type in ("llama3", "yarn", "longrope"):
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)
        if self.rope_type == "yarn":
            out.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate,
                       attention_factor=self.attention_factor)
        if self.rope_type == "longrope":
            out.update(short_factor=list(self.short_factor), long_factor=list(self.long_factor),
                       attention_factor=self.attention_factor)
        return out


# ------------------------------------------------------------------------------------------ reading config.json
def standardize(d: Mapping[str, Any], *, longrope_aliases: bool = False) -> dict:
    """A rope dict with `rope_type` set from the legacy `type` key (default 'default'); Phi-3 reads legacy "su" and
    "yarn" as longrope (`longrope_aliases`)."""
    d = dict(d)
    d.setdefault("rope_type", d.get("type") or "default")
    d.pop("type", None)
    if longrope_aliases and d["rope_type"] in ("su", "yarn"):
        d["rope_type"] = "longrope"
    return d


def from_dict(d: Mapping[str, Any], *, src: str, theta: float, rotary_dim: int, max_positions: int | None,
              original: int | None = None) -> RopeConfig:
    """RopeConfig of one standardized rope dict; `theta` is the resolved rope_theta, `original` an
    original_max_position_embeddings that overrides the dict's (a config attribute, as transformers reads it)."""
    rope_type = d["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise FtjaxError(f"{src}: unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return RopeConfig("default", theta)

    def need(key: str) -> float:
        if d.get(key) is None:
            raise FtjaxError(f"{src}: rope type {rope_type!r} needs {key!r}")
        return float(d[key])

    if rope_type == "linear":
        return RopeConfig("linear", theta, factor=need("factor"))
    omax = original or d.get("original_max_position_embeddings") or max_positions
    if omax is None:
        raise FtjaxError(f"{src}: rope type {rope_type!r} needs original_max_position_embeddings")
    omax = int(omax)
    if rope_type == "llama3":
        return RopeConfig("llama3", theta, factor=need("factor"), low_freq_factor=need("low_freq_factor"),
                          high_freq_factor=need("high_freq_factor"), original_max_position_embeddings=omax)
    factor = d.get("factor")
    if factor is None:  # transformers: the context growth max_position_embeddings / original
        if max_positions is None:
            raise FtjaxError(f"{src}: rope type {rope_type!r} needs 'factor' or max_position_embeddings")
        factor = max_positions / omax
    factor = float(factor)
    att = d.get("attention_factor")
    if rope_type == "yarn":
        if att is None:
            mscale, mscale_all = d.get("mscale"), d.get("mscale_all_dim")
            att = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                   else _yarn_mscale(factor))
        return RopeConfig("yarn", theta, factor=factor, original_max_position_embeddings=omax,
                          beta_fast=float(d.get("beta_fast") or 32), beta_slow=float(d.get("beta_slow") or 1),
                          truncate=bool(d.get("truncate", True)), attention_factor=float(att))
    short, long = d.get("short_factor"), d.get("long_factor")
    for key, v in (("short_factor", short), ("long_factor", long)):
        if not isinstance(v, list) or len(v) != rotary_dim // 2:
            raise FtjaxError(f"{src}: longrope {key} must be a list of {rotary_dim // 2} numbers (rotary dim / 2)")
    if att is None:
        att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(omax))
    return RopeConfig("longrope", theta, factor=factor, original_max_position_embeddings=omax,
                      attention_factor=float(att), short_factor=tuple(map(float, short)),
                      long_factor=tuple(map(float, long)))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ------------------------------------------------------------------------------------------ frequencies
def inv_freq(rope: RopeConfig, dim: int, long: bool = False) -> np.ndarray:
    """Inverse frequencies [dim // 2] float32 (radians per position) of `rope` over `dim` rotary dimensions; `long`
    picks longrope's long factors."""
    if rope.rope_type == "longrope":
        factors = np.asarray(rope.long_factor if long else rope.short_factor, np.float32)
        return (np.float32(1.0) / (factors * np.float32(rope.theta) ** (
            np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    if rope.rope_type == "yarn":
        pos = np.float32(rope.theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        extrapolated, interpolated = np.float32(1.0) / pos, np.float32(1.0) / (np.float32(rope.factor) * pos)

        def correction(rotations: float) -> float:
            omax = rope.original_max_position_embeddings
            return dim * math.log(omax / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

        low, high = correction(rope.beta_fast), correction(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        keep = np.float32(1) - ramp.astype(np.float32)  # the share of the extrapolated frequency
        return (interpolated * (np.float32(1) - keep) + extrapolated * keep).astype(np.float32)
    # default / linear / llama3: HF rounds the base frequencies to float32, the scaling is done here in float64
    base = (1.0 / rope.theta ** (np.arange(0, dim, 2) / dim)).astype(np.float32).astype(np.float64)
    if rope.rope_type == "linear":
        base = base / rope.factor
    elif rope.rope_type == "llama3":
        # Three bands by wavelength: long waves divided by factor, short ones kept, the middle interpolated.
        old_len, lo, hi = rope.original_max_position_embeddings, rope.low_freq_factor, rope.high_freq_factor
        wavelen = 2 * math.pi / base
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * base / rope.factor + smooth * base
        base = np.where(wavelen > old_len / lo, base / rope.factor, np.where(wavelen < old_len / hi, base, smoothed))
    return base.astype(np.float32)


def cos_sin(positions_bt: jax.Array, rope: RopeConfig, dim: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, dim] in `dtype`, split-half layout (HF checkpoints are stored for rotate_half), times the
    rope's attention factor. Longrope uses its long factors for a row whose max(position) + 1 exceeds the original
    context: transformers makes that choice once per call for the whole batch, which equals this for one sequence;
    per row, a sequence's result does not depend on the others batched with it."""
    freqs = jnp.asarray(inv_freq(rope, dim))
    if rope.rope_type == "longrope":
        long_b11 = (jnp.max(positions_bt, axis=-1) + 1 > rope.original_max_position_embeddings)[:, None, None]
        freqs = jnp.where(long_b11, jnp.asarray(inv_freq(rope, dim, long=True)), freqs)
    # Angles in float32 (an elementwise product, so exact: no bf16 rounding of 257 to 256), then cast like HF.
    angles_bth = positions_bt[..., None].astype(jnp.float32) * freqs
    angles_bth = jnp.concatenate([angles_bth, angles_bth], axis=-1)
    cos, sin = jnp.cos(angles_bth), jnp.sin(angles_bth)
    if rope.attention_factor != 1.0:
        cos, sin = cos * np.float32(rope.attention_factor), sin * np.float32(rope.attention_factor)
    return cos.astype(dtype), sin.astype(dtype)


def apply(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin on the first cos.shape[-1] dims of each head (rotate_half(x) = concat(-x2, x1));
    the remaining dims (partial rotary) pass through."""
    r = cos_bth.shape[-1]
    rot, rest = (x_btnh, None) if r == x_btnh.shape[-1] else (x_btnh[..., :r], x_btnh[..., r:])
    x1, x2 = jnp.split(rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = rot * cos_bth[:, :, None, :] + rotated * sin_bth[:, :, None, :]
    return out if rest is None else jnp.concatenate([out, rest], axis=-1)
