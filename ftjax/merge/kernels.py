"""The per-tensor merge arithmetic, as pure jax functions over flat chunks of the inputs (the streaming engine calls
them chunk by chunk; `merge_params` calls them on whole tensors): the same function gives the same bits either way.

Numerics: every input is widened exactly to float32; a delta δ = M − D is kept exactly as a pair (hi, lo); weights,
rescale factors, λ and coefficients are float64 numbers on the host, passed as two float32 words; products and sums
are carried as float32 pairs (error-free transformations, `ftjax.treeops`), and the result is rounded once to the
output dtype. So a sum of products (linear, task arithmetic, TIES' disjoint mean, any linear combination) is the
exact value to ~2^-44 relative before that one rounding: bit for bit the float64 formula rounded once whenever
float64 itself is exact, and otherwise except within that distance of a rounding boundary.

Masks: magnitude masks compare |fl32(δ)| with exact thresholds found by the statistics passes (`ftjax.merge.plan`);
random masks (DARE, DELLA) hash (key, element index) with a counter-based mixer, so an element's fate depends on the
seed, the model, the tensor's name and its index only, never on chunking, devices or tensor order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.treeops import round_sum3, to_f32, two_prod, two_sum

# --- double-float32 helpers (values as (hi, lo) pairs with |lo| <= ulp(hi) / 2) ------------------------------------


def dd_mul(a_hi, a_lo, x_hi, x_lo=None):
    """(a_hi + a_lo) * (x_hi + x_lo), to ~2^-46 relative, as a normalised pair."""
    p, e = two_prod(a_hi, x_hi)
    e = e + (a_lo * x_hi if x_lo is None else a_hi * x_lo + a_lo * x_hi)  # treeops.axpy_exact's order
    return two_sum(p, e)


def dd_add(a, b):
    s, e = two_sum(a[0], b[0])
    return two_sum(s, e + (a[1] + b[1]))


def dd_div(a, w_hi, w_lo):
    """(a_hi + a_lo) / (w_hi + w_lo) to ~2^-45 relative (one Newton-style correction)."""
    q1 = a[0] / w_hi
    p, e = two_prod(q1, w_hi)
    r = ((a[0] - p) - e) + a[1] - q1 * w_lo
    return two_sum(q1, r / w_hi)


def split(x: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float64 number (or array) as two float32 words hi + lo (exact to ~2^-48 relative)."""
    x = np.asarray(x, np.float64)
    hi = x.astype(np.float32)
    return hi, (x - hi.astype(np.float64)).astype(np.float32)


# --- counter-based randomness -----------------------------------------------------------------------------------


def _mix(x):
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def uniform(key: jax.Array, idx_hi: jax.Array, idx_lo: jax.Array, n: int) -> jax.Array:
    """float32 [n] in [0, 1) with 24 random bits: element j is a hash of key (3 uint32 words) and the 64-bit element
    index (idx_hi, idx_lo) + j."""
    lo = idx_lo + jnp.arange(n, dtype=jnp.uint32)
    hi = idx_hi + (lo < idx_lo).astype(jnp.uint32)  # carry
    h = _mix(lo ^ key[0])
    h = _mix(h ^ hi ^ key[1])
    h = _mix(h + key[2])
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


# --- the task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*) and linear ---------------------


@dataclasses.dataclass(frozen=True)
class GtaSpec:
    """The static shape of a task-arithmetic merge of one tensor (part of the compiled code).

    deltas[i]: which input model i's delta is taken from (-1: the base B, j >= 0: the j-th extra delta base); for
    linear there is no base and the "deltas" are the models themselves. sparsify: None | "magnitude" | "outliers" |
    "random" | "della" | "variance" (sce: one mask for all models, the elements whose deltas vary most); width: the
    row length della ranks over; den_floor: the disjoint mean divides by max(Σ_agree w, den_floor) (sce: 1e-6)."""

    n: int
    deltas: tuple[int, ...]
    n_bases: int
    has_base: bool
    sparsify: str | None
    consensus: bool
    sign_election: str
    rescale_mode: str | None  # None, "factor" (a factor per model from the host) or "inverse_density" (1/p each)
    normalize: bool
    out_dtype: Any
    width: int = 0
    epsilon_given: bool = False
    den_floor: float = 0.0


def _deltas(spec: GtaSpec, base, models, bases):
    b = to_f32(base) if spec.has_base else None
    extra = [to_f32(x) for x in bases]
    out = []
    for x, d in zip(models, spec.deltas):
        x = to_f32(x)
        if not spec.has_base:
            out.append((x, jnp.zeros_like(x)))
        else:
            out.append(two_sum(x, -(b if d < 0 else extra[d])))
    return b, out


def keep_masks(spec: GtaSpec, deltas, dens, thr_lo, thr_hi, keys, idx_hi, idx_lo):
    """Per model: (mask, keep probability or None) of the sparsification."""
    out = []
    var = variance(deltas) if spec.sparsify == "variance" else None
    for i, (hi, _) in enumerate(deltas):
        mag = jnp.abs(hi)
        if spec.sparsify == "magnitude":
            out.append((mag >= thr_lo[i], None))
        elif spec.sparsify == "outliers":
            out.append(((mag >= thr_lo[i]) & (mag <= thr_hi[i]), None))
        elif spec.sparsify == "random":
            u = uniform(keys[i], idx_hi, idx_lo, hi.shape[0])
            p = jnp.broadcast_to(dens[i], hi.shape)
            out.append((u < p, p))
        elif spec.sparsify == "variance":
            out.append((var >= thr_lo[i], None))
        elif spec.sparsify == "della":
            p = della_probability(mag, dens[i], thr_lo[i], spec.width)  # thr_lo carries epsilon here
            u = uniform(keys[i], idx_hi, idx_lo, hi.shape[0])
            out.append((u < p, p))
        else:
            out.append((jnp.ones(hi.shape, bool), None))
    return out


def variance(deltas) -> jax.Array:
    """sce's selection score, float32 [n]: the population variance over the N models of fl32(δᵢ), per element, as
    Σ_{i<j} (δᵢ − δⱼ)² / N² carried in float32 pairs and rounded once, so the same value for the same deltas in any
    model order (a float32 mean would not be: the top-k would then split ties by model order)."""
    n = len(deltas)
    zero = jnp.zeros_like(deltas[0][0])
    total = (zero, zero)
    for i in range(n):
        for j in range(i + 1, n):
            d = two_sum(deltas[i][0], -deltas[j][0])
            total = dd_add(total, dd_mul(d[0], d[1], d[0], d[1]))
    return dd_div(total, jnp.float32(n * n), jnp.float32(0.0))[0]


def della_probability(mag: jax.Array, density: jax.Array, epsilon: jax.Array, width: int) -> jax.Array:
    """DELLA's keep probability: density - eps + 2 eps * rank / (width - 1), rank of |δ| in its row (0 = smallest,
    ties ranked by position), over rows of `width` elements (a 1-D tensor is one row)."""
    n = mag.shape[0]
    rows = n // width
    m = mag[: rows * width].reshape(rows, width)
    ranks = jnp.argsort(jnp.argsort(m, axis=1, stable=True), axis=1, stable=True).astype(jnp.float32)
    frac = ranks / jnp.float32(max(width - 1, 1)) if width > 1 else jnp.zeros_like(ranks)
    p = ((density - epsilon) + frac * (2 * epsilon)).reshape(-1)
    return jnp.concatenate([p, jnp.full((n - rows * width,), density, jnp.float32)]) if rows * width < n else p


# A sign vote Σ wᵢ·δᵢ within TIE·Σ|wᵢ·δᵢ| of zero is a tie, elected +1 (mergekit's `>= 0`): the config's decimal
# weights (0.6, 0.4) cancel exactly on deltas like 3·δ₀ = −2·δ₁, which bf16 checkpoints hold often, but their float64
# approximations leave a residue of ~2^-54 whose sign is an artifact (mergekit's float32 products round to equal
# numbers and elect +1). 2^-40 lies above the pair arithmetic's error (~2^-44) and far below any real vote.
TIE = 2.0**-40


def gta_kernel(*xs, spec: GtaSpec):
    """The write kernel. xs = (B?, M_1..M_n, D_1..D_k, w_hi, w_lo, dens, thr_lo, thr_hi, r_hi, r_lo, keys, lam, div,
    idx_hi, idx_lo): per-model float32 [n] arrays, keys uint32 [n, 3], lam float32 [2] (hi, lo); div: the
    normaliser, float32 [2] (hi, lo) without consensus, with it float32 [2^n] (`agreement_reciprocals`)."""
    nb = int(spec.has_base)
    base = xs[0] if spec.has_base else None
    models = xs[nb: nb + spec.n]
    bases = xs[nb + spec.n: nb + spec.n + spec.n_bases]
    w_hi, w_lo, dens, thr_lo, thr_hi, r_hi, r_lo, keys, lam, div, idx_hi, idx_lo = xs[nb + spec.n + spec.n_bases:]
    b, deltas = _deltas(spec, base, models, bases)
    masks = keep_masks(spec, deltas, dens, thr_lo, thr_hi, keys, idx_hi, idx_lo)
    tau = []
    for i, ((hi, lo), (mask, p)) in enumerate(zip(deltas, masks)):
        hi, lo = jnp.where(mask, hi, 0.0), jnp.where(mask, lo, 0.0)
        if spec.rescale_mode == "factor":
            hi, lo = dd_mul(r_hi[i], r_lo[i], hi, lo)
        elif spec.rescale_mode == "inverse_density" and p is not None:
            hi, lo = dd_div((hi, lo), p, jnp.zeros_like(p))
        tau.append((hi, lo))
    weighted = [dd_mul(w_hi[i], w_lo[i], hi, lo) for i, (hi, lo) in enumerate(tau)]
    zero = jnp.zeros_like(weighted[0][0])
    if spec.consensus:
        votes = weighted if spec.sign_election == "weighted" else tau
        total, size = (zero, zero), zero
        for v in votes:
            total, size = dd_add(total, v), size + jnp.abs(v[0])
        elected = jnp.where(total[0] >= -TIE * size, 1.0, -1.0)
        mixed, den, agrees = (zero, zero), (zero, zero), []
        for i, (wv, t) in enumerate(zip(weighted, tau)):
            agree = (jnp.sign(wv[0] if spec.sign_election == "weighted" else t[0]) == elected) & (t[0] != 0)
            agrees.append(agree)
            mixed = dd_add(mixed, (jnp.where(agree, wv[0], 0.0), jnp.where(agree, wv[1], 0.0)))
            den = dd_add(den, (jnp.where(agree, w_hi[i], 0.0), jnp.where(agree, w_lo[i], 0.0)))
        if spec.den_floor:  # sce's clamp(min=1e-6) of the agreeing weights (nothing agrees: mixed is 0 anyway)
            low = (den[0] < spec.den_floor) & (den[0] != 0)
            den = (jnp.where(low, jnp.float32(spec.den_floor), den[0]), jnp.where(low, 0.0, den[1]))
        if spec.normalize:  # ÷ Σ_agree w: the Newton step of dd_div with 1 / den from a host table over the 2^n
            # agreement patterns (`div`, float32 [2^n]; 1 where no model agrees, and mixed is 0): a divide in this
            # graph makes XLA:CPU re-derive the whole chain in several fusions, several times slower
            pattern = sum(jnp.where(a, 1 << i, 0) for i, a in enumerate(agrees))
            inv = div[pattern]
            q1 = mixed[0] * inv
            p, e = two_prod(q1, den[0])
            r = ((mixed[0] - p) - e) + mixed[1] - q1 * den[1]
            mixed = two_sum(q1, r * inv)
    else:
        mixed = (zero, zero)
        for wv in weighted:
            mixed = dd_add(mixed, wv)
        if spec.normalize:
            mixed = dd_div(mixed, div[0], div[1])
    mixed = dd_mul(lam[0], lam[1], mixed[0], mixed[1])
    return round_sum3(b if b is not None else zero, mixed[0], mixed[1], spec.out_dtype)


def agreement_reciprocals(w: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """float32 [2^n]: 1 / Σ_{i in S} w_i for every subset S of the models (bit i of the index: model i agrees), 1
    where that sum is 0 (mergekit's guard: nothing is divided); sums in (0, floor) count as floor."""
    n = len(w)
    sums = np.array([sum(float(w[i]) for i in range(n) if s >> i & 1) for s in range(1 << n)])
    if floor:
        sums = np.where((sums != 0) & (sums < floor), floor, sums)
    return np.where(sums != 0, 1.0 / np.where(sums != 0, sums, 1.0), 1.0).astype(np.float32)


def gta_stats(*xs, spec: GtaSpec, what: str):
    """Per-element values a statistics pass reduces on the host. what: "keys" (uint32 bits of |fl32(δ_i)|, one array
    per model, for the exact magnitude thresholds; sce: one array, of the variance), "l1" (|δ_i| and |kept δ_i| as
    float32, per model) or "sq" (kept δ_i², per model: sce's weights)."""
    nb = int(spec.has_base)
    base = xs[0] if spec.has_base else None
    models = xs[nb: nb + spec.n]
    bases = xs[nb + spec.n: nb + spec.n + spec.n_bases]
    _, deltas = _deltas(spec, base, models, bases)
    if what == "keys" and spec.sparsify == "variance":
        return (jax.lax.bitcast_convert_type(variance(deltas), jnp.uint32),)
    if what == "keys":
        return tuple(jax.lax.bitcast_convert_type(jnp.abs(hi), jnp.uint32) for hi, _ in deltas)
    dens, thr_lo, thr_hi, keys, idx_hi, idx_lo = xs[nb + spec.n + spec.n_bases:]
    masks = keep_masks(spec, deltas, dens, thr_lo, thr_hi, keys, idx_hi, idx_lo)
    if what == "sq":
        return tuple(jnp.where(mask, hi * hi, 0.0) for (hi, _), (mask, _) in zip(deltas, masks))
    out = []
    for (hi, _), (mask, _) in zip(deltas, masks):
        out += [jnp.abs(hi), jnp.where(mask, jnp.abs(hi), 0.0)]
    return tuple(out)


# --- linear combinations (slerp, nuslerp, multislerp, karcher, model_stock) and nearswap -------------------------


@dataclasses.dataclass(frozen=True)
class CombSpec:
    """out = [B +] Σ c_i·V_i with V_i = M_i (raw) or M_i − B (delta): coefficients from the host, per tensor
    (scalars), per row (`per_row`, rows of `width`) or per column (`per_col`)."""

    n: int
    delta: bool
    out_dtype: Any
    per_row: bool = False
    per_col: bool = False
    width: int = 1


def comb_kernel(*xs, spec: CombSpec):
    """xs = (B?, M_1..M_n, c_hi, c_lo, idx_hi, idx_lo); c_* float32 [n] (scalars), [n, rows] (per row; indexed
    by the chunk's position) or [n, width] (per column)."""
    nb = int(spec.delta)
    base = to_f32(xs[0]) if spec.delta else None
    models = xs[nb: nb + spec.n]
    c_hi, c_lo, idx_hi, idx_lo = xs[nb + spec.n:]
    n = models[0].shape[0]
    zero = jnp.zeros((n,), jnp.float32)
    if spec.per_row:
        first = first_row(idx_hi, idx_lo, spec.width).astype(jnp.int32)  # per-row chunks start on a row
        row = first + jnp.arange(n, dtype=jnp.int32) // spec.width
        row = jnp.minimum(row, c_hi.shape[1] - 1)
        coef = [(c_hi[i][row], c_lo[i][row]) for i in range(spec.n)]
    elif spec.per_col:
        col = jnp.arange(n, dtype=jnp.int32) % spec.width
        coef = [(c_hi[i][col], c_lo[i][col]) for i in range(spec.n)]
    else:
        coef = [(c_hi[i], c_lo[i]) for i in range(spec.n)]
    total = (zero, zero)
    for (ch, cl), x in zip(coef, models):
        v = two_sum(to_f32(x), -base) if spec.delta else (to_f32(x), zero)
        total = dd_add(total, dd_mul(ch, cl, v[0], v[1]))
    return round_sum3(base if base is not None else zero, total[0], total[1], spec.out_dtype)


def first_row(idx_hi: jax.Array, idx_lo: jax.Array, width: int) -> jax.Array:
    """(idx_hi * 2^32 + idx_lo) // width in uint32 arithmetic (a tensor may hold more than 2^32 elements)."""
    q, r = divmod(1 << 32, width)
    w = jnp.uint32(width)
    return idx_hi * jnp.uint32(q) + idx_lo // w + (idx_lo % w + idx_hi * jnp.uint32(r)) // w


def vectors(*xs, delta: bool, n: int):
    """The float32 vectors a Gram pass reduces on the host: M_i, or fl32(M_i − B) with a base."""
    if not delta:
        return tuple(to_f32(x) for x in xs[:n])
    b = to_f32(xs[0])
    return tuple(to_f32(x) - b for x in xs[1: 1 + n])


@dataclasses.dataclass(frozen=True)
class RamSpec:
    """ram / ramplus_tl of one tensor over n models."""

    n: int
    out_dtype: Any


def ram_masks(base, models, eps):
    """(exact deltas as pairs, per model |fl32(δᵢ)| > eps, the count c of models changing each element); eps float32
    rounded down from the config's epsilon, so the comparison is the exact one."""
    b = to_f32(base)
    deltas = [two_sum(to_f32(x), -b) for x in models]
    changed = [jnp.abs(hi) > eps for hi, _ in deltas]
    count = sum((c.astype(jnp.int32) for c in changed[1:]), changed[0].astype(jnp.int32))
    return b, deltas, changed, count


def ram_kernel(base, *xs, spec: RamSpec):
    """xs = (M_1..M_n, lam_hi, lam_lo, eps): B + λᵢ·δᵢ where model i alone changes the element, the mean of the
    changing deltas where several do, B where none does; λ float32 [n] pairs (1 for ram)."""
    *models, lam_hi, lam_lo, eps = xs
    b, deltas, changed, count = ram_masks(base, models, eps)
    zero = jnp.zeros_like(b)
    alone, shared = (zero, zero), (zero, zero)
    for i, ((hi, lo), ch) in enumerate(zip(deltas, changed)):
        hi, lo = jnp.where(ch, hi, 0.0), jnp.where(ch, lo, 0.0)
        alone = dd_add(alone, dd_mul(lam_hi[i], lam_lo[i], hi, lo))
        shared = dd_add(shared, (hi, lo))
    mean = dd_div(shared, jnp.maximum(count, 1).astype(jnp.float32), zero)
    hi = jnp.where(count == 1, alone[0], jnp.where(count > 1, mean[0], 0.0))
    lo = jnp.where(count == 1, alone[1], jnp.where(count > 1, mean[1], 0.0))
    return round_sum3(b, hi, lo, spec.out_dtype)


def ram_counts(base, *xs, spec: RamSpec):
    """Per model, uint8 indicators of its shared (c > 1) and unique (c = 1) changes: ramplus_tl's ρᵢ counts them."""
    *models, eps = xs
    _, _, changed, count = ram_masks(base, models, eps)
    out = []
    for ch in changed:
        out += [(ch & (count > 1)).astype(jnp.uint8), (ch & (count == 1)).astype(jnp.uint8)]
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class FusionSpec:
    """arcee_fusion of one tensor: rows of `width` elements (the last axis; a vector is one row)."""

    width: int
    out_dtype: Any


def fusion_importance(base, model, *, width: int) -> jax.Array:
    """float32 [n]: arcee_fusion's score |M − B| · KL(p ‖ q) of each element, p = softmax(M) + 1e-8 and q =
    softmax(B) + 1e-8 over the element's row (n a multiple of `width`)."""
    b, m = to_f32(base).reshape(-1, width), to_f32(model).reshape(-1, width)
    p = jax.nn.softmax(m, axis=-1) + jnp.float32(1e-8)
    q = jax.nn.softmax(b, axis=-1) + jnp.float32(1e-8)
    kl = jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True)
    return (jnp.abs(m - b) * kl).reshape(-1)


def ordered_key(x: jax.Array) -> jax.Array:
    """uint32 keys ordered like the float32 values x (negative values below positive ones)."""
    k = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(k >> 31 == 1, ~k, k | jnp.uint32(0x80000000))


def fusion_kernel(base, model, thr, *, spec: FusionSpec):
    """M where the score reaches the threshold thr (float32, from the quantile pass), else B (exact either way)."""
    keep = fusion_importance(base, model, width=spec.width) >= thr
    return jnp.where(keep, to_f32(model), to_f32(base)).astype(spec.out_dtype)


def nearswap_kernel(base, other, t, *, out_dtype):
    """B + w·(M − B), w = clamp(t / max(|M − B|, 1e-6), 0, 1) per element (mergekit's w·M + (1 − w)·B)."""
    b = to_f32(base)
    hi, lo = two_sum(to_f32(other), -b)
    w = jnp.clip(t / jnp.maximum(jnp.abs(hi), 1e-6), 0.0, 1.0)
    d = dd_mul(w, jnp.zeros_like(w), hi, lo)
    return round_sum3(b, d[0], d[1], out_dtype)


def scale_kernel(x, s_hi, s_lo, *, out_dtype):
    """x · s, rounded once (passthrough's `scale`)."""
    v = to_f32(x)
    d = dd_mul(s_hi, s_lo, v)
    return round_sum3(jnp.zeros_like(v), d[0], d[1], out_dtype)
