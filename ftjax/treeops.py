"""Jitted pytree arithmetic with float32 inside and exactly one rounding out.

The core is `axpy_exact(t, d_hi, d_lo, alpha)`: round(t + alpha * (d_hi + d_lo)) where d_hi + d_lo is the exact
difference ft - b (`diff_exact`). It is written with float32 error-free transformations only (no float64, which
TPUs lack and which JAX disables by default), so the same bits come out on every backend:

* alpha == 1 (the paper's only setting) and alpha a power of two: the result is the exact real value
  t + alpha * (ft - b) rounded once, round-to-nearest-even, to the output dtype. For bf16/f16/f32 inputs this is
  bit-identical to numpy's `round(float64(t) + alpha * (float64(ft) - float64(b)))` whenever that float64
  computation is itself exact (always, unless the three exponents span more than ~2^45).
* other alpha: the same with alpha * (ft - b) evaluated to ~2^-46 relative accuracy (alpha split in two float32
  words, Dekker products) before the single final rounding; it differs from the float64 reference only if
  t + alpha*d lies within that distance of a rounding boundary (probability ~2^-40 per element; never observed).
* Preconditions: finite inputs with |ft - b| within float32 range (inf/nan propagate like plain float32
  arithmetic), and no values in (0, 2^-102): XLA on CPU/TPU flushes float32 subnormals to zero, which would break
  the error terms of numbers that small. alpha == 0 returns t unchanged (bitwise), whatever ft and b hold.

Pytree helpers (`tree_transfer`, `tree_diff`, `tree_apply`, `tree_lerp`, `tree_scale`, `tree_norm`,
`tree_cosine`) map these over nested dicts; non-float leaves pass through from the target.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.dtypes import is_float

def split_alpha(alpha: float) -> tuple[float, float]:
    """alpha (a Python float64) as two float32 words a_hi + a_lo (exact to ~2^-48 relative)."""
    hi = float(np.float32(alpha))
    return hi, float(np.float32(alpha - hi))


# --- error-free transformations (all float32) -------------------------------------------------------------------


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's TwoSum: s = fl(a + b) and e with a + b == s + e exactly (no branch, any magnitudes)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def _split12(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Split by masking the low 12 mantissa bits instead of Veltkamp's (2^12+1)*a trick: a compiler that fuses
    # multiply-adds into FMAs (XLA:GPU may) would break Veltkamp, but cannot change a bit mask.
    hi = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0xFFFFF000), jnp.float32)
    return hi, a - hi  # both have <= 12 significant bits, so every partial product below is exact


def two_prod(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dekker's TwoProduct: p = fl(a * b) and e with a * b == p + e exactly (barring under/overflow)."""
    p = a * b
    ah, al = _split12(a)
    bh, bl = _split12(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.int32)


def _from_bits(i: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(i, jnp.float32)


def _step_toward(x: jax.Array, sign_src: jax.Array) -> jax.Array:
    """The float32 neighbour of x (x != 0, finite) in the direction of sign(sign_src)."""
    away = (x > 0) == (sign_src > 0)  # moving away from zero increases the magnitude bits
    return _from_bits(_bits(x) + jnp.where(away, 1, -1))


def round_sum3(t: jax.Array, d_hi: jax.Array, d_lo: jax.Array, out_dtype: Any, zero: jax.Array | None = None
               ) -> jax.Array:
    """round(t + d_hi + d_lo) to out_dtype, computed exactly, rounded once (RNE); d_lo must be <= ulp(d_hi)/2.

    Where the numerics bite: fl32(t + d) then bf16 would round twice, and a float32 sum that lands exactly on a
    bf16 tie goes to even although the exact value was off the tie. So (1) three TwoSums give V = hi + g + r
    exactly with hi a faithful float32 rounding of V and sign(g + r) = sign(V - hi) exact; (2) for 8/11-bit
    outputs hi is rounded to *odd* (if inexact and the last bit is even, step one ulp toward V); round-to-odd
    at >= 2 extra bits makes the following round-to-nearest-even equal to a single correct rounding
    (Boldo & Melquiond 2008) -- for bf16 the same decision is taken directly on the bits (`_round_bf16`);
    (3) for a float32 output, hi moves to the other neighbour when V is past the midpoint, decided exactly by
    comparing the error terms with half the gap.
    """
    s, e = two_sum(t, d_hi)
    w, r = two_sum(e, d_lo)
    hi, g = two_sum(s, w)
    rho = g + r  # sign is exact: a rounded sum of two floats is zero only if the exact sum is
    naive = t + (d_hi + d_lo)
    zero = t + d_hi if zero is None else zero
    if np.dtype(out_dtype) == np.dtype(jnp.bfloat16):
        return _round_bf16(t, d_hi, hi, rho, naive, zero)
    if np.dtype(out_dtype) == np.dtype(jnp.float32):
        other = _step_toward(hi, rho)
        half = (other - hi) * 0.5
        past = g - half  # exact sign; r decides only at an exact tie of g
        past = jnp.where(past == 0, r, past)
        y = jnp.where((rho != 0) & ((past > 0) == (rho > 0)) & (past != 0), other, hi)
    else:
        odd = (_bits(hi) & 1) == 1
        y = jnp.where(odd, hi, _step_toward(hi, rho))
    y = jnp.where(hi == 0, rho, y)  # V == r exactly
    y = jnp.where(rho == 0, hi, y)  # exact in float32
    # An exact zero: +0 (RNE) unless all terms are zeros, then the IEEE sign of the plain evaluation.
    y = jnp.where((hi == 0) & (rho == 0), jnp.where((t == 0) & (d_hi == 0), zero, 0.0), y)
    y = jnp.where(jnp.isfinite(hi) & jnp.isfinite(rho), y, naive)
    return y.astype(out_dtype)


def _rne_bf16_bits(u: jax.Array) -> jax.Array:
    """float32 bits -> bfloat16 bits, round to nearest even (NaN -> quiet NaN of the same sign, like XLA/Eigen)."""
    r = (u + (jnp.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return jnp.where(nan, (u >> 16) | 0x40, r)


def _round_bf16(t, d_hi, hi, rho, naive, zero):
    # round_sum3 for a bf16 output, on the bits (XLA:CPU's float32 -> bf16 convert is slow, and so is the
    # round-to-odd select chain). V = hi + rho with hi faithful, so RNE(V) == RNE(hi) unless hi sits exactly on a
    # bf16 tie (low 16 bits 0x8000); there V is off the tie on the side of sign(rho): away from zero if sign(rho) ==
    # sign(hi). hi == 0 means V == rho exactly. Same bits as the round-to-odd path, several times faster.
    u = jax.lax.bitcast_convert_type(hi, jnp.uint32)
    away = ((hi > 0) == (rho > 0)).astype(jnp.uint32)
    r16 = jnp.where(((u & 0xFFFF) == 0x8000) & (rho != 0), (u >> 16) + away, _rne_bf16_bits(u))
    r16 = jnp.where(hi == 0, _rne_bf16_bits(jax.lax.bitcast_convert_type(rho, jnp.uint32)), r16)
    exact_zero = (hi == 0) & (rho == 0)
    y = jnp.where(exact_zero, jnp.where((t == 0) & (d_hi == 0), zero, 0.0), naive)  # as in the float32 path
    special = exact_zero | ~(jnp.isfinite(hi) & jnp.isfinite(rho))
    r16 = jnp.where(special, _rne_bf16_bits(jax.lax.bitcast_convert_type(y, jnp.uint32)), r16)
    return jax.lax.bitcast_convert_type(r16.astype(jnp.uint16), jnp.bfloat16)


def to_f32(x: jax.Array) -> jax.Array:
    """x as float32, exactly; bf16 by shifting its bits (XLA:CPU's bf16 convert is several times slower)."""
    if x.dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16, jnp.float32)
    return x.astype(jnp.float32)


def diff_exact(ft: jax.Array, base: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ft - base as float32 (hi, lo) with hi + lo == ft - base exactly; hi = fl32(ft - base)."""
    return two_sum(to_f32(ft), -to_f32(base))


def axpy_exact(t: jax.Array, d_hi: jax.Array, d_lo: jax.Array, alpha: float, out_dtype: Any) -> jax.Array:
    """round(t + alpha * (d_hi + d_lo)) to out_dtype, one rounding (see the module docstring for guarantees).

    `alpha` is a static Python float (one compile per distinct value)."""
    t = to_f32(t)
    if alpha == 0:
        return t.astype(out_dtype)
    zero = t + d_hi
    if alpha != 1:
        a_hi, a_lo = split_alpha(alpha)
        zero = t + jnp.float32(a_hi) * d_hi
        p, q = two_prod(jnp.float32(a_hi), d_hi)
        q = q + (jnp.float32(a_hi) * d_lo + jnp.float32(a_lo) * d_hi)  # small terms: rounding here is ~2^-46 rel.
        d_hi, d_lo = two_sum(p, q)
    return round_sum3(t, d_hi, d_lo, out_dtype, zero)


def transfer_exact(t: jax.Array, ft: jax.Array, base: jax.Array, alpha: float, out_dtype: Any) -> jax.Array:
    """round(t + alpha * (ft - base)) to out_dtype, elementwise, with a single rounding."""
    if alpha == 0:
        return t.astype(out_dtype)
    d_hi, d_lo = diff_exact(ft, base)
    return axpy_exact(t, d_hi, d_lo, alpha, out_dtype)


# --- pytrees ----------------------------------------------------------------------------------------------------


def _leaf_transfer(t, ft, base, alpha, out_dtype):
    if not is_float(t.dtype):
        return t
    return transfer_exact(t, ft, base, alpha, t.dtype if out_dtype is None else out_dtype)


def tree_transfer(target: Any, source_ft: Any, source_base: Any, alphas: Any = 1.0, out_dtype: Any = None) -> Any:
    """target + alphas * (source_ft - source_base) leafwise (exact, one rounding; output dtype = target's unless
    `out_dtype`). `alphas` is a float or a pytree of floats matching `target` (static). Call under jit."""
    if not isinstance(alphas, (dict, list, tuple)):
        alphas = jax.tree.map(lambda _: float(alphas), target)
    return jax.tree.map(lambda t, f, b, a: _leaf_transfer(t, f, b, a, out_dtype), target, source_ft, source_base, alphas)


def tree_diff(ft: Any, base: Any, dtype: Any = jnp.float32) -> Any:
    """Leafwise ft - base rounded once to `dtype` (non-float leaves: ft's)."""
    return jax.tree.map(lambda f, b: (f.astype(jnp.float32) - b.astype(jnp.float32)).astype(dtype)
                        if is_float(f.dtype) else f, ft, base)


def tree_apply(target: Any, diff: Any, alpha: float = 1.0) -> Any:
    """Leafwise round(target + alpha * diff) in the target's dtype, one rounding (diff taken as exact)."""
    return jax.tree.map(lambda t, d: axpy_exact(t, d.astype(jnp.float32), jnp.zeros_like(d, jnp.float32), alpha,
                                                t.dtype) if is_float(t.dtype) else t, target, diff)


def tree_scale(tree: Any, alpha: float) -> Any:
    """Leafwise alpha * x in float32, rounded once to each leaf's dtype."""
    return jax.tree.map(lambda x: (x.astype(jnp.float32) * alpha).astype(x.dtype) if is_float(x.dtype) else x, tree)


def tree_lerp(a: Any, b: Any, lam: float) -> Any:
    """Leafwise (1 - lam) * a + lam * b == a + lam * (b - a), exact-then-rounded in a's dtype."""
    return tree_transfer(a, b, a, lam)


def tree_norm(tree: Any) -> jax.Array:
    """Global L2 norm over all float leaves (float32 accumulation)."""
    sq = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree) if is_float(x.dtype)]
    return jnp.sqrt(sum(sq, jnp.float32(0)))


def tree_cosine(a: Any, b: Any) -> jax.Array:
    """Cosine similarity of two pytrees flattened to one vector (float32)."""
    dots = [jnp.vdot(x.astype(jnp.float32).ravel(), y.astype(jnp.float32).ravel())
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if is_float(x.dtype)]
    return sum(dots, jnp.float32(0)) / (tree_norm(a) * tree_norm(b))


def tree_add(target: Any, diff: Any, alpha: float = 1.0) -> Any:
    """Alias of `tree_apply`: round(target + alpha * diff), one rounding, target dtypes."""
    return tree_apply(target, diff, alpha)


def tree_norms(tree: Any) -> Any:
    """Per-leaf L2 norms (float32 scalars; non-float leaves -> nan)."""
    return jax.tree.map(lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)))) if is_float(x.dtype)
                        else jnp.float32(jnp.nan), tree)
