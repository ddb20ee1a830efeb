"""treeops: the exact one-rounding kernels against a float64 reference (rounded once, correctly), identities."""

import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ftjax import treeops
from reference import bits, exact_round, reference, round_f64

BF16 = ml_dtypes.bfloat16
transfer_kernel = jax.jit(treeops.transfer_exact, static_argnames=("alpha", "out_dtype"))
diff_kernel = jax.jit(treeops.diff_exact)


@functools.partial(jax.jit, static_argnames=("alpha", "out_dtype"))
def apply_kernel(t, d_hi, d_lo, *, alpha, out_dtype):
    return treeops.axpy_exact(t, treeops.to_f32(d_hi), treeops.to_f32(d_lo), alpha, out_dtype)


def mixed(rng, n, dtype, spread=36):
    """Values with widely different exponents (float32 sums inexact, landing on bf16 ties) and some exact ties."""
    e = rng.integers(-spread // 2, spread // 2, size=(3, n))
    x = rng.choice([-1, 1], size=(3, n)) * (1 + rng.random((3, n))) * 2.0 ** e
    if np.dtype(dtype) == np.float16:
        x = np.clip(x * 2.0 ** -12, -6e4, 6e4)
    return [v.astype(dtype) for v in x]


@pytest.mark.parametrize("dtype", [BF16, np.float16, np.float32])
def test_round_f64_rounds_once_correctly(dtype):
    # The float64 reference of the transfer semantics, checked against exact rational rounding, on values that sit
    # just off ties of the output format (where rounding via float32 first would go wrong) and on random values.
    rng = np.random.default_rng(7)
    fmt = np.dtype(dtype)
    mant = {2: 7 if fmt == np.dtype(BF16) else 10, 4: 23}[fmt.itemsize]
    base = (1 + rng.integers(0, 2**mant, 300) / 2**mant) * 2.0 ** rng.integers(-8, 8, 300)
    half_ulp = 2.0 ** (np.floor(np.log2(base)) - mant - 1)
    ties = base + half_ulp  # exact ties of the output format
    nudges = np.concatenate([ties + half_ulp * 2.0**-30, ties - half_ulp * 2.0**-30, ties,
                             rng.standard_normal(300) * 10.0 ** rng.integers(-4, 4, 300)])
    x = np.concatenate([nudges, -nudges])
    out = round_f64(x, dtype)
    assert out.dtype == fmt
    want = np.array([exact_round(Fraction(float(v)), dtype) for v in x])
    np.testing.assert_array_equal(out.astype(np.float64), want)


@pytest.mark.parametrize("dtype", [BF16, np.float16, np.float32])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0, -1.0])
def test_kernel_bitwise_reference(dtype, alpha):
    rng = np.random.default_rng(0)
    t, f, b = mixed(rng, 200_000, dtype)
    out = transfer_kernel(t, f, b, alpha=alpha, out_dtype=dtype)
    np.testing.assert_array_equal(bits(out), bits(reference(t, f, b, alpha, dtype)))
    if dtype == BF16:  # the plain float32 computation double-rounds on such data
        naive = (t.astype(np.float32) + np.float32(alpha) * (f.astype(np.float32) - b.astype(np.float32))).astype(dtype)
        assert (bits(naive) != bits(out)).sum() > 100


@pytest.mark.parametrize("alpha", [0.3, -1.7, 0.01])
def test_kernel_general_alpha_bf16(alpha):
    rng = np.random.default_rng(1)
    t, f, b = [x.astype(BF16) for x in rng.standard_normal((3, 500_000)) * 0.02]
    f = (f.astype(np.float32) + b.astype(np.float32)).astype(BF16)
    out = transfer_kernel(t, f, b, alpha=alpha, out_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(bits(out), bits(reference(t, f, b, alpha, BF16)))


def test_constructed_double_rounding_cases():
    # t + (ft - b): float32 sum lands exactly on a bf16 tie, the exact value is off it.
    t = np.array([115.25, 1.0, -3.0, 256.0], np.float32).astype(BF16)
    f = np.array([2.0**-30, 2.0**-9 + 2.0**-40, -(2.0**-8), 1.0], np.float32).astype(BF16)
    b = np.array([-(2.0**-40), 2.0**-40, 2.0**-42, 2.0**-35], np.float32).astype(BF16)
    t[0], f[0], b[0] = BF16(115.0), BF16(0.25), BF16(-(2.0**-30))  # 115.25 + 2^-30 -> 115.5
    out = np.asarray(transfer_kernel(t, f, b, alpha=1.0, out_dtype=jnp.bfloat16))
    exact = [Fraction(float(x)) + Fraction(float(y)) - Fraction(float(z)) for x, y, z in zip(t, f, b)]
    ref = reference(t, f, b, 1.0, BF16)
    np.testing.assert_array_equal(bits(out), bits(ref))
    assert float(out[0]) == 115.5
    assert all(abs(Fraction(float(o)) - e) <= abs(Fraction(float(o2)) - e) for o, e, o2 in zip(out, exact, ref))


def test_exact_even_beyond_float64():
    # Exponent spreads where float64 itself is inexact: compare with exact rational arithmetic (alpha = 1).
    rng = np.random.default_rng(2)
    t, f, b = mixed(rng, 3000, BF16, spread=120)
    out = np.asarray(transfer_kernel(t, f, b, alpha=1.0, out_dtype=jnp.bfloat16))
    for i in range(len(t)):
        e = Fraction(float(t[i])) + Fraction(float(f[i])) - Fraction(float(b[i]))
        best = exact_round(e, BF16)
        assert float(out[i]) == best, (t[i], f[i], b[i], out[i], best)


def test_identities_and_signed_zero():
    rng = np.random.default_rng(3)
    t, f, b = [x.astype(BF16) for x in rng.standard_normal((3, 10_000))]
    t[:3] = f[:3] = BF16(-0.0)
    b[:3] = BF16(0.0)
    t[3] = BF16(np.nan)
    np.testing.assert_array_equal(bits(transfer_kernel(t, f, b, alpha=0.0, out_dtype=jnp.bfloat16)), bits(t))
    np.testing.assert_array_equal(bits(transfer_kernel(b, f, b, alpha=1.0, out_dtype=jnp.bfloat16))[3:],
                                  bits(f)[3:])
    out = transfer_kernel(t, f, b, alpha=1.0, out_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(bits(out)[:3], bits(reference(t, f, b, 1.0, BF16))[:3])  # -0 + (-0 - 0) = -0
    assert np.isnan(np.float32(out[3]))


def test_diff_then_apply_is_transfer():
    rng = np.random.default_rng(4)
    t, f, b = mixed(rng, 100_000, BF16)
    hi, lo = diff_kernel(f, b)
    assert np.any(np.asarray(lo) != 0), "data must include differences inexact in float32"
    for alpha in (1.0, 0.5, 0.3):
        np.testing.assert_array_equal(
            bits(apply_kernel(t, hi, lo, alpha=alpha, out_dtype=jnp.bfloat16)),
            bits(transfer_kernel(t, f, b, alpha=alpha, out_dtype=jnp.bfloat16)))


def test_two_prod_exact():
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal((2, 100_000)) * 2.0 ** rng.integers(-20, 20, (2, 100_000))).astype(np.float32)
    p, e = jax.jit(treeops.two_prod)(a, b)
    np.testing.assert_array_equal(np.float64(p) + np.float64(e), np.float64(a) * np.float64(b))


def test_tree_ops():
    rng = np.random.default_rng(6)
    mk = lambda: {"a": {"w": jnp.asarray(rng.standard_normal((4, 8)).astype(BF16))}, "step": jnp.int32(3)}
    t, f, b = mk(), mk(), mk()
    out = jax.jit(treeops.tree_transfer)(t, f, b)
    ref = reference(*(np.asarray(x["a"]["w"]) for x in (t, f, b)), 1.0, BF16)
    np.testing.assert_array_equal(bits(out["a"]["w"]), bits(ref))
    assert int(out["step"]) == 3
    d = treeops.tree_diff(f, b)
    assert d["a"]["w"].dtype == jnp.float32
    lerp = treeops.tree_lerp(t, f, 0.0)
    np.testing.assert_array_equal(bits(lerp["a"]["w"]), bits(t["a"]["w"]))
    assert float(treeops.tree_cosine(t, t)) == pytest.approx(1.0, rel=1e-6)
    assert float(treeops.tree_norm(treeops.tree_scale(t, 0.0))) == 0.0


def test_tree_norms_and_cosine_match_numpy_float64():
    """tree_norm / tree_norms / tree_cosine of mixed-dtype trees (non-float leaves ignored, nan per-leaf norm)
    against numpy float64 over the same values; float32 accumulation stays within 1e-5 relative."""
    rng = np.random.default_rng(7)

    def mk(scale):
        return {"emb": jnp.asarray((scale * rng.standard_normal((64, 32))).astype(BF16)),
                "layers": [jnp.asarray(rng.standard_normal((16, 16)).astype(np.float32) * 1e-3),
                           jnp.asarray(rng.standard_normal(40).astype(np.float16))],
                "step": jnp.int32(7)}

    a, noise = mk(3.0), mk(2.0)
    b = jax.tree.map(lambda x, n: (x + n).astype(x.dtype), a, noise)  # correlated: cosine about 0.8
    floats = lambda t: [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)  # noqa: E731
                        if np.dtype(x.dtype).kind != "i"]
    va, vb = np.concatenate(floats(a)), np.concatenate(floats(b))
    np.testing.assert_allclose(float(treeops.tree_norm(a)), np.linalg.norm(va), rtol=1e-5)
    want_cos = va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb))
    np.testing.assert_allclose(float(treeops.tree_cosine(a, b)), want_cos, rtol=1e-5, atol=1e-6)
    norms = treeops.tree_norms(a)
    for got, x in zip(jax.tree.leaves(norms), jax.tree.leaves(a)):
        if np.dtype(x.dtype).kind == "i":
            assert np.isnan(float(got))
        else:
            np.testing.assert_allclose(float(got), np.linalg.norm(np.asarray(x, np.float64)), rtol=1e-5)
