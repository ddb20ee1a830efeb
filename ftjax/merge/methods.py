"""The merge methods ftjax knows, with mergekit's names, parameters and defaults (so a config means the same in both
tools), and where ftjax departs from mergekit or offers the published method instead.

Each method lists its global parameters (one value per output tensor) and its per-model parameters (one value per
model and tensor), each with its default (`REQUIRED`: no default). Values may be scalars, gradients over layers or
filter lists (`ftjax.merge.config`). The math lives in `ftjax.merge.kernels` (elementwise, exact, one rounding) and
`ftjax.merge.plan` (the per-tensor statistics some methods need).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from ftjax.errors import FtjaxError

REQUIRED = object()  # a parameter without a default


@dataclasses.dataclass(frozen=True)
class Method:
    """One merge method: `family` picks the kernel; `sparsify` and `consensus` configure the task-arithmetic family."""

    name: str
    family: str  # "gta" (task arithmetic and its sparsified variants), "linear", "slerp", ... (see kernels)
    globals: Mapping[str, Any]
    per_model: Mapping[str, Any]
    base: str  # "required", "optional", "input" (the base is one of the inputs, weighted like them) or "none"
    sparsify: str | None = None  # None, "magnitude", "random", "outliers", "della", "variance" (sce)
    consensus: bool = False  # TIES sign election
    min_models: int = 1
    max_models: int | None = None
    formula: str = ""
    defaults_note: str = ""


# Globals every task-arithmetic method takes, plus ftjax's named variants (mergekit's behaviour is the default):
#   sign_election "weighted" (mergekit: the sign of the sum of the *weighted* trimmed deltas, mergekit issue #474)
#                 or "unweighted" (the TIES paper: the sign of the sum of the trimmed deltas, weights applied after);
#   rescale_mode "l1" (mergekit: multiply the kept deltas by ||delta||_1 / ||kept||_1, per tensor) or
#                "inverse_density" (the DARE/DELLA papers: divide each kept element by its keep probability).
_GTA = {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False, "sign_election": "weighted",
        "rescale_mode": "l1"}


def _gta(name: str, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool, extra: dict,
         formula: str) -> Method:
    return Method(name, "gta", {**_GTA, "normalize": normalize, "rescale": rescale},
                  {"weight": REQUIRED, "density": 1.0, **extra}, "required", sparsify, consensus, formula=formula)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("linear", "linear", {"normalize": True}, {"weight": REQUIRED}, "input",
           formula="Σ wᵢ·Mᵢ / Σ wᵢ (without normalize: Σ wᵢ·Mᵢ); a base_model is one more weighted input"),
    _gta("task_arithmetic", None, False, False, False, {},
         "B + λ·Σ wᵢ·(Mᵢ − Dᵢ) (÷ Σ wᵢ with normalize); Dᵢ = delta_base of model i, else B"),
    _gta("ties", "magnitude", True, True, False, {},
         "trim each δᵢ = Mᵢ − Dᵢ to its top density·N magnitudes; elect a sign per element; "
         "B + λ·Σ_agree wᵢδᵢ / Σ_agree wᵢ"),
    _gta("dare_ties", "random", True, False, True, {},
         "keep each element of δᵢ with probability density, rescale, elect signs as ties; B + λ·Σ_agree wᵢδᵢ"),
    _gta("dare_linear", "random", False, False, True, {}, "keep with probability density, rescale; B + λ·Σ wᵢδᵢ"),
    _gta("breadcrumbs", "outliers", False, False, False, {"gamma": 0.01},
         "drop the largest gamma·N and the smallest (1 − density − gamma)·N magnitudes of δᵢ; B + λ·Σ wᵢδᵢ"),
    _gta("breadcrumbs_ties", "outliers", True, False, False, {"gamma": 0.01}, "breadcrumbs, then ties' sign election"),
    _gta("della", "della", True, True, True, {"epsilon": 0.15},
         "keep each element with probability density − ε + 2ε·rank/(cols−1) (rank of |δ| in its row), rescale, "
         "elect signs; B + λ·Σ_agree wᵢδᵢ / Σ_agree wᵢ"),
    _gta("della_linear", "della", False, False, True, {"epsilon": 0.15}, "della's drop and rescale; B + λ·Σ wᵢδᵢ"),
    Method("sce", "gta", {"select_topk": 1.0, "int8_mask": False}, {}, "required", "variance", True,
           formula="keep the select_topk share of elements where the δᵢ vary most across models (population "
                   "variance, whole tensor); elect signs from Σ δᵢ; B + Σ_agree wᵢδᵢ / max(Σ_agree wᵢ, 1e-6), "
                   "wᵢ ∝ mean(kept δᵢ²) (uniform when Σ mean(kept δᵢ²) < 1e-6)"),
    Method("slerp", "slerp", {"t": REQUIRED}, {}, "required", min_models=1, max_models=1,
           formula="sin((1−t)θ)/sin θ·B + sin(tθ)/sin θ·M, θ the angle between B and M (whole tensor); "
                   "lerp when |cos θ| > 0.9995"),
    Method("nuslerp", "nuslerp", {"nuslerp_flatten": True, "nuslerp_row_wise": False}, {"weight": REQUIRED},
           "optional", min_models=2, max_models=2,
           formula="slerp of M₀, M₁ (or of their deltas from the base) at t = w₁/(w₀ + w₁): over the whole tensor "
                   "(flatten), per row, or per column (row_wise)"),
    Method("multislerp", "multislerp", {"normalize_weights": True, "eps": 1e-8}, {"weight": REQUIRED}, "optional",
           formula="the weighted mean direction of the unit Mᵢ (or deltas), scaled by Σ wᵢ‖Mᵢ‖ (weights normalised)"),
    Method("karcher", "karcher", {"max_iter": 10, "tol": 1e-5}, {}, "input",
           formula="the Karcher (Riemannian) mean of the unit Mᵢ on the sphere, equal weights, scaled by the mean "
                   "norm; the base, if any, is one of the inputs"),
    Method("model_stock", "model_stock", {"filter_wise": False}, {}, "required", min_models=2,
           formula="t·mean(Mᵢ) + (1 − t)·B with t = N·c/(1 + (N−1)·c), c the mean pairwise cosine of the Mᵢ − B "
                   "(whole tensor, or per row with filter_wise)"),
    Method("nearswap", "nearswap", {"t": REQUIRED}, {}, "required", min_models=1, max_models=1,
           formula="B + w·(M − B) with w = clamp(t / |M − B|, 0, 1) per element"),
    Method("arcee_fusion", "fusion", {}, {}, "required", min_models=1, max_models=1,
           formula="B + δ·[s ≥ median(s) + 1.5·(q₃(s) − q₁(s))], s = |δ|·KL(softmax(M) ‖ softmax(B)) per row "
                   "(softmaxes + 1e-8), quantiles over the whole tensor, exact (mergekit samples 1e6 elements of a "
                   "larger tensor)"),
    Method("ram", "ram", {"epsilon": 1e-5}, {}, "required",
           formula="B + Σ over the models that change an element (|δᵢ| > epsilon, c of them): δᵢ when c = 1, "
                   "their mean Σ δᵢ / c when c > 1"),
    Method("ramplus_tl", "ram", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {}, "required",
           formula="ram with each model's unique changes (c = 1) × λᵢ = 1 + r·clamp(ρᵢ, 0, alpha), ρᵢ = its shared "
                   "(c > 1) / unique changed elements over the whole tensor (÷ max(unique, epsilon))"),
    Method("passthrough", "passthrough", {}, {"scale": None}, "none", min_models=1, max_models=1,
           formula="the one input model (× scale)"),
]}


def method(name: str, where: str = "merge_method") -> Method:
    """The method called `name`; FtjaxError with the nearest known name otherwise."""
    if name not in METHODS:
        near = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise FtjaxError(f"{where}: unknown merge method {name!r}{hint} (known: {', '.join(METHODS)})")
    return METHODS[name]
