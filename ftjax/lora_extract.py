"""A diff as a LoRA adapter (`ftjax extract-lora`): each 2-D linear weight's change Δ = ft − base (float32) by a
truncated SVD, written as a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads.

- Factors: Δ ≈ U_k S_k V_kᵀ; B = U_k·S_k ([out, k], `lora_B.weight`), A = V_kᵀ ([k, in], `lora_A.weight`), float32;
  lora_alpha = r per module, so PEFT's scaling is 1 and B @ A is the delta as written.
- Rank: `rank` (capped at min(out, in)), or `energy` e: per module the smallest k with Σ_{i<k} s_i² ≥ e·‖Δ‖²_F;
  ranks that differ from `r` go into rank_pattern / alpha_pattern (keys: the escaped full module names).
- SVD: exact when the smaller side n of Δ is at most EXACT_MAX, through the Gram matrix of that side: G = ΔᵀΔ
  [n, n] (or ΔΔᵀ) accumulated in float64 from float32 row blocks (bounded memory), its top-k eigenvectors V_k
  (LAPACK's subset eigensolver; every eigenvalue only for `energy` or a plotted curve), then B = Δ V_k and A = V_kᵀ
  (float64 products). The projection makes ‖Δ − BA‖ optimal for the V_k found; G's float64 rounding costs
  singular values below ~1e-8·s_max only, far under float32's 1e-7 (tests: within 1e-3 relative of Eckart–Young).
  O(m n²/2 + n³) flops against the full SVD's ~6x more (RESULTS.md "LoRA extraction"). Larger Δ take a jitted
  randomized SVD (Halko et al.: a Gaussian sketch with OVERSAMPLE extra columns, POWER_ITERS power iterations with
  QR, fixed key) on the default JAX device: faster, but on a flat spectrum its error exceeds the optimum by ~0.3%
  (rank 64 of 2048). With `energy` the sketch doubles until it holds the energy (exact past half the matrix).
- Other changed float tensors (embeddings, lm_head, norms) are saved whole as `modules_to_save`
  (`base_model.model.<module>.weight`, as PEFT saves them), or left out with `skip` and reported. A tied model's
  changed embedding is saved as both embed_tokens and lm_head with `ensure_weight_tying` (PEFT then ties the two
  copies; without it PEFT's lm_head would keep the base's embedding). Changed biases are saved whole with
  bias="all" (the LoRA layer's `base_layer.bias` when its module is adapted). Unchanged modules are left out.
- Memory: one Δ at a time (plus the factors, the adapter's size); whole tensors are streamed by row blocks.
- Output: written atomically (a temp sibling renamed at the end), with `ftjax_extract_lora.json` recording it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from ftjax.errors import FtjaxError, finite
from ftjax.io.checkpoint import DIFF_MARKER, RECORD_KEY, HFCheckpoint, _read_json, atomic_output_dir, write_json
from ftjax.io.safetensors import SafetensorsWriter, TensorInfo
from ftjax.layout import EMBED, LM_HEAD, Layout, is_vocab
from ftjax.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX
from ftjax.engine.outputs import CHUNK_ELEMS, provenance

RECORD = "ftjax_extract_lora.json"
EXACT_MAX = 4096  # exact (Gram-side) SVD when the smaller side of Δ is at most this
OVERSAMPLE, POWER_ITERS, SEED = 16, 4, 0
PLOT, PLOTTED = "rank_error", 4  # --plot: file stem in the adapter dir, modules plotted


@dataclasses.dataclass
class ExtractReport:
    """What `extract_lora` wrote: per LoRA module its shape, rank, relative Frobenius error ‖Δ − BA‖/‖Δ‖ and the
    energy kept Σ kept s²/‖Δ‖²; the whole tensors; what was left out and why; the adapter's bytes against the full
    float32 diff's (`ftjax diff`'s main tensors). `to_dict()` is the CLI's --json."""

    out: str
    inputs: dict[str, str]
    modules: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    whole: list[str] = dataclasses.field(default_factory=list)
    biases: list[str] = dataclasses.field(default_factory=list)  # changed biases, saved whole (PEFT's bias="all")
    left_out: dict[str, str] = dataclasses.field(default_factory=dict)
    adapter_bytes: int = 0
    diff_bytes: int = 0
    seconds: float = 0.0
    curves: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # with plot: error at rank 1, 2, ...
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"ftjax extract-lora: {len(self.modules)} LoRA modules, {len(self.whole)} whole, "
                 f"{len(self.left_out)} left out; adapter {self.adapter_bytes / 1e6:.2f} MB vs full diff "
                 f"{self.diff_bytes / 1e6:.2f} MB ({self.adapter_bytes / max(self.diff_bytes, 1):.1%}) in "
                 f"{self.seconds:.1f} s -> {self.out}",
                 f"  {'module':<44} {'shape':>12} {'rank':>5} {'rel_error':>10} {'energy':>8}"]
        for m in self.modules:
            shape = "x".join(map(str, m["shape"]))
            lines.append(f"  {m['module']:<44} {shape:>12} {m['rank']:>5} {m['rel_error']:>10.2e} "
                         f"{m['energy_kept']:>8.4f}")
        lines += [f"  whole (modules_to_save): {name}" for name in self.whole]
        lines += [f"  bias (bias=all): {name}" for name in self.biases]
        lines += [f"  left out: {name} ({why})" for name, why in self.left_out.items()]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@functools.partial(jax.jit, static_argnames=("width", "iters"))
def _randomized_svd(d, key, width: int, iters: int):
    """Top-`width` SVD of d [m, n] (float32): U [m, width], s [width], Vt [width, n], by a Gaussian sketch and
    `iters` power iterations (QR between products for stability)."""
    hi = jax.lax.Precision.HIGHEST
    q, _ = jnp.linalg.qr(jnp.matmul(d, jax.random.normal(key, (d.shape[1], width), d.dtype), precision=hi))
    for _ in range(iters):
        z, _ = jnp.linalg.qr(jnp.matmul(d.T, q, precision=hi))
        q, _ = jnp.linalg.qr(jnp.matmul(d, z, precision=hi))
    u, s, vt = jnp.linalg.svd(jnp.matmul(q.T, d, precision=hi), full_matrices=False)
    return jnp.matmul(q, u, precision=hi), s, vt


def _gram(d: np.ndarray) -> np.ndarray:
    """ΔᵀΔ [n, n] (float64) of d [m, n] (float32), accumulated over row blocks of ~CHUNK_ELEMS elements: products
    of float32 values are exact in float64, so only the sums round."""
    g = np.zeros((d.shape[1], d.shape[1]))
    rows = max(1, CHUNK_ELEMS // max(1, d.shape[1]))
    for r0 in range(0, d.shape[0], rows):
        c = d[r0:r0 + rows].astype(np.float64)
        g += c.T @ c  # numpy's syrk: half the flops of a general product
    return g


def _exact_svd(d: np.ndarray, k: int | None, energy: float | None, total: float,
               spectrum: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Truncated SVD of d [m, n] (float32) through the Gram matrix of its smaller side: (B [m, k] = U_k S_k,
    A [k, n] = V_kᵀ, float64; the top-k singular values s [k]; the singular values for the error curve: all of them
    when `spectrum` or `energy` is given, else s). k: the rank, or None to pick the smallest keeping `energy`."""
    wide = d.shape[0] < d.shape[1]
    dt = d.T if wide else d  # [long, short]
    g = _gram(dt)
    short = g.shape[0]
    every = np.clip(scipy.linalg.eigvalsh(g)[::-1], 0, None) if spectrum or k is None else None
    if k is None:
        k = _energy_rank(np.sqrt(every), total, energy) or short
    _, v = scipy.linalg.eigh(g, subset_by_index=[short - k, short - 1], driver="evr")
    v = v[:, ::-1]  # [short, k], by descending eigenvalue
    p = np.concatenate([dt[r0:r0 + 4096].astype(np.float64) @ v for r0 in range(0, dt.shape[0], 4096)])  # U_k S_k
    s = np.linalg.norm(p, axis=0)
    if wide:  # d = (dt)ᵀ ≈ v pᵀ: B = v·s, A = pᵀ/s (a zero column of p stays zero)
        b, a = v * s, (p / np.where(s > 0, s, 1)).T
    else:
        b, a = p, v.T
    return b, a, s, np.sqrt(every) if every is not None else s


def _energy_rank(s: np.ndarray, total: float, energy: float) -> int | None:
    """The smallest k with Σ_{i<k} s_i² ≥ energy·total, or None if the given values do not reach it."""
    kept = np.cumsum(s.astype(np.float64) ** 2)
    hit = np.nonzero(kept >= energy * total * (1 - 1e-12))[0]
    return int(hit[0]) + 1 if hit.size else None


def factorize(d: np.ndarray, *, rank: int | None = None, energy: float | None = None,
              spectrum: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, Any], np.ndarray]:
    """B [out, k] = U_k·S_k and A [k, in] = V_kᵀ (float32) of Δ = `d` [out, in] (float32, nonzero), at `rank`
    (capped at min(out, in)) or at the smallest rank keeping `energy` of ‖Δ‖²_F; the stats (rank, rel_error,
    energy_kept, method); and the error curve: sqrt(1 − Σ_{i<j} s_i²/‖Δ‖²) at ranks j = 1 .. (singular values
    computed: every one on the exact path with `spectrum` or `energy`, else the top k or the sketch's), float64."""
    m, n = d.shape
    full = min(m, n)
    total = float(_gram(d.reshape(-1, 1))[0, 0])
    method = "exact" if full <= EXACT_MAX else "randomized"
    if method == "exact":
        u, vt, s, spec = _exact_svd(d, min(rank, full) if rank is not None else None, energy, total, spectrum)
        k = len(s)
    else:
        width = min(rank + OVERSAMPLE, full) if rank is not None else min(64, full)
        while True:
            u, s, vt = map(np.asarray, _randomized_svd(d, jax.random.key(SEED), width, POWER_ITERS))
            k = min(rank, full) if rank is not None else _energy_rank(s, total, energy)
            if k is not None:
                u, spec = u * s, s  # B = U_k S_k
                break
            if 2 * width > full:  # the sketch would be most of the matrix: the exact SVD is as cheap
                method = "exact"
                u, vt, s, spec = _exact_svd(d, None, energy, total, spectrum)
                k = len(s)
                break
            width *= 2
    curve = np.sqrt(np.clip(1 - np.cumsum(spec.astype(np.float64) ** 2) / total, 0, None))
    s = s[:k]
    b = np.ascontiguousarray(u[:, :k]).astype(np.float32)
    a = np.ascontiguousarray(vt[:k]).astype(np.float32)
    res = d - np.matmul(b, a)
    stats = {"rank": int(k), "rel_error": float(math.sqrt(float(np.sum(res.astype(np.float64) ** 2)) / total)),
             "energy_kept": float(min(np.sum(s.astype(np.float64) ** 2) / total, 1.0)), "method": method}
    return b, a, stats, curve


def _check_args(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise FtjaxError("give one of --rank (an int) and --energy (a share of ‖Δ‖²_F in (0, 1])")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1):
        raise FtjaxError(f"--rank must be an integer >= 1, got {rank!r}")
    if energy is not None and not 0 < finite("--energy", energy) <= 1:
        raise FtjaxError(f"--energy must be in (0, 1], got {energy!r}")


def _module_name(tensor: str) -> str:
    return tensor.removesuffix(".weight")


def _selected(module: str, targets: Sequence[str] | None) -> bool:
    """PEFT's target_modules rule for a list: the module's name is a target or ends with '.' + target."""
    return targets is None or any(module == t or module.endswith("." + t) for t in targets)


def _inputs(base, ft, diff) -> tuple[HFCheckpoint | None, HFCheckpoint | None, HFCheckpoint | None, str | None]:
    """The checkpoints read: (base, ft) or a diff dir; and the base_model_name_or_path to record."""
    if diff is not None:
        if ft is not None:
            raise FtjaxError("give --ft (with --base) or --diff, not both")
        d = HFCheckpoint(diff, allow_diff=True)
        if not d.is_diff:
            raise FtjaxError(f"{d.path}: no {DIFF_MARKER}; --diff takes a directory written by `ftjax diff`")
        recorded = _read_json(d.path / DIFF_MARKER, DIFF_MARKER).get("base")
        return (HFCheckpoint(base) if base is not None else None), None, d, str(base) if base is not None else recorded
    if base is None or ft is None:
        raise FtjaxError("give --base and --ft (or --diff, a directory written by `ftjax diff`)")
    b, f = HFCheckpoint(base), HFCheckpoint(ft)
    return b, f, None, str(base)


def _plan(lb: Layout, lf: Layout, skip: Sequence[re.Pattern], targets: Sequence[str] | None,
          report: ExtractReport) -> tuple[list[str], list[str]]:
    """(linear tensors to factorize, candidate whole tensors: weights and biases); the rest in report.left_out."""
    problems = [f"{n} is {lf.shapes[n]} in ft, {lb.shapes[n]} in base" for n in lb.names
                if n in lf.shapes and lf.shapes[n] != lb.shapes[n] and not any(r.search(n) for r in skip)]
    problems += [f"{n} is missing in ft" for n in lb.names if n not in lf.shapes and not any(r.search(n) for r in skip)]
    if lb.tied != lf.tied:
        problems.append(f"the base {'ties' if lb.tied else 'does not tie'} lm_head to the embedding, ft "
                        f"{'does' if lf.tied else 'does not'}")
    if problems:
        raise FtjaxError(f"base and ft do not match: {'; '.join(problems[:4])}; a LoRA adapter keeps the base's "
                         "shapes (leave such tensors out with --skip)")
    unmatched = [f"--skip {r.pattern!r}" for r in skip if not any(r.search(n) for n in lb.names)]
    unmatched += [f"--target-modules {t!r}" for t in targets or () if not any(
        _selected(_module_name(n), [t]) for n in lb.names if len(lb.shapes[n]) == 2 and not is_vocab(n))]
    if unmatched:
        raise FtjaxError(f"{', '.join(unmatched)} matches no tensor of the base; check the names "
                         "(`ftjax inspect BASE` lists them)")
    linear, whole = [], []
    for n in lb.names:
        if any(r.search(n) for r in skip):
            report.left_out[n] = "--skip"
        elif not lb.is_float(n):
            report.left_out[n] = "not a float tensor"
        elif len(lb.shapes[n]) == 2 and n.endswith(".weight") and not is_vocab(n):
            if _selected(_module_name(n), targets):
                linear.append(n)
            else:
                report.left_out[n] = "not in --target-modules"
        elif not n.endswith((".weight", ".bias")):
            report.left_out[n] = "not a module weight"
        else:
            whole.append(n)
    return linear, whole


def _target_modules(modules: list[str], all_linear: list[str]) -> list[str]:
    """target_modules for the config: the short names (q_proj) when they select exactly `modules` among the
    checkpoint's linear modules, else the full module names."""
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if {m for m in all_linear if _selected(m, short)} == set(modules):
        return short
    return sorted(modules)


def extract_lora(base: str | os.PathLike | None, ft: str | os.PathLike | None, out: str | os.PathLike, *,
                 rank: int | None = None, energy: float | None = None, target_modules: Sequence[str] | None = None,
                 skip: Sequence[str] = (), diff: str | os.PathLike | None = None, overwrite: bool = False,
                 plot: bool = False, progress: bool = True) -> ExtractReport:
    """Write ft − base (or the `ftjax diff` directory `diff`) as a PEFT LoRA adapter directory at `out`.

    rank: the LoRA rank r (an int >= 1, capped per module at min(out, in)); or energy in (0, 1]: per module the
    smallest rank keeping that share of ‖Δ‖²_F. target_modules: module names or suffixes (PEFT's list rule) to
    factorize; default every 2-D linear weight. skip: regexes of tensor names to leave out (reported). Changed
    embeddings, lm_head and norms are saved whole (modules_to_save); with `diff` and no `base` they cannot be (no
    fine-tuned values) and are left out. plot: also write PLOT.png/.pdf in `out`, the relative error against the
    rank of up to PLOTTED modules spread over the layers. See the module docstring for the factors and the SVD."""
    t0 = time.perf_counter()
    _check_args(rank, energy)
    skips = [re.compile(p) for p in skip]
    b, f, d, base_name = _inputs(base, ft, diff)
    delta_src = d if d is not None else f
    report = ExtractReport(str(out), {k: str(c.path) for k, c in (("base", b), ("ft", f), ("diff", d)) if c})
    lb = Layout.of_checkpoint(b if b is not None else d)
    linear, whole = _plan(lb, Layout.of_checkpoint(delta_src), skips, target_modules, report)
    all_linear = [_module_name(n) for n in lb.names if len(lb.shapes[n]) == 2 and n.endswith(".weight")
                  and not is_vocab(n) and lb.is_float(n)]
    report.diff_bytes = sum(4 * math.prod(lb.shapes[n]) for n in lb.float_names)
    inputs = [c.path for c in (b, f, d) if c is not None]
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        plotted = {linear[round(j * (len(linear) - 1) / (PLOTTED - 1))] for j in range(PLOTTED)} if linear else set()
        for i, n in enumerate(linear):
            if progress:
                print(f"\rftjax extract-lora: {i + 1}/{len(linear)} {_module_name(n)}", end="", flush=True,
                      file=sys.stderr)
            delta = _delta(b, f, d, n)
            if not np.any(delta):
                report.left_out[n] = "unchanged"
                continue
            bm, am, stats, curve = factorize(delta, rank=rank, energy=energy,
                                             spectrum=plot and n in plotted)
            del delta
            if plot and n in plotted:
                report.curves[_module_name(n)] = curve.tolist()
            factors[_module_name(n)] = (bm, am)
            report.modules.append({"module": _module_name(n), "shape": list(lb.shapes[n]), **stats})
        if progress and linear:
            print(file=sys.stderr)
        saved, biases = [], []  # (key after PREFIX, ft tensor)
        for n in whole:
            if not _changed(b, f, d, n):
                continue
            if f is None:
                report.left_out[n] = "changed, but a diff holds no fine-tuned values to save whole (give --ft)"
            elif n.endswith(".bias"):  # PEFT's bias="all": saved under the LoRA layer's base_layer when wrapped
                module = n.removesuffix(".bias")
                biases.append((f"{module}.base_layer.bias" if module in factors else n, n))
            else:
                saved.append((n, n))
        if lb.tied and (EMBED, EMBED) in saved:  # PEFT ties lm_head's copy to it when told to
            saved.append((LM_HEAD, EMBED))
        report.whole = [_module_name(k) for k, _ in saved]
        report.biases = [n for _, n in biases]
        saved += biases
        if not factors and not saved:
            raise FtjaxError(f"nothing to extract: no selected tensor differs between {inputs[0]} and "
                             f"{inputs[-1]}; nothing was written")
        ranks = {m: int(bm.shape[1]) for m, (bm, _) in factors.items()}
        r = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 1  # the most common rank
        pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
        infos = [TensorInfo(f"{PREFIX}{m}.lora_{ab}.weight", np.dtype(np.float32), x.shape)
                 for m, (bm, am) in factors.items() for ab, x in (("A", am), ("B", bm))]
        infos += [TensorInfo(f"{PREFIX}{k}", f.info(n).dtype, tuple(f.info(n).shape)) for k, n in saved]
        with SafetensorsWriter(tmp / ADAPTER_WEIGHTS, infos) as w:
            for m, (bm, am) in factors.items():
                w.write(f"{PREFIX}{m}.lora_A.weight", am)
                w.write(f"{PREFIX}{m}.lora_B.weight", bm)
            for k, n in saved:
                rows = max(1, CHUNK_ELEMS // max(1, math.prod(f.info(n).shape[1:])))
                for r0 in range(0, f.info(n).shape[0], rows):
                    w.write(f"{PREFIX}{k}", np.asarray(f.get_slice(n, (slice(r0, r0 + rows),))))
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "rank_pattern": pattern,
                  "alpha_pattern": dict(pattern), "target_modules": _target_modules(list(factors), all_linear),
                  "modules_to_save": report.whole or None, "base_model_name_or_path": base_name,
                  "bias": "all" if biases else "none",
                  "use_rslora": False, "fan_in_fan_out": False, "lora_dropout": 0.0, "init_lora_weights": True,
                  "inference_mode": True, "ensure_weight_tying": _module_name(LM_HEAD) in report.whole}
        write_json(tmp / ADAPTER_CONFIG, config)
        own = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, RECORD]
        if plot and report.curves:
            from ftjax.plots import plot_rank_error

            ranks_of = {m["module"]: m["rank"] for m in report.modules}
            own += [p.name for p in plot_rank_error({m: (c, ranks_of[m]) for m, c in report.curves.items()},
                                                    tmp / PLOT)]
        report.adapter_bytes = (tmp / ADAPTER_WEIGHTS).stat().st_size
        report.seconds = time.perf_counter() - t0
        record = provenance("extract-lora", report.inputs, {}, rank=rank, energy=energy,
                            target_modules=list(target_modules) if target_modules is not None else None,
                            skip=list(skip), factors="B = U_k S_k, A = V_k^T (float32), lora_alpha = r: scaling 1")
        write_json(tmp / RECORD, {**record, "report": report.to_dict(),
                                  RECORD_KEY: sorted(own)})
    return report


def _delta(b: HFCheckpoint | None, f: HFCheckpoint | None, d: HFCheckpoint | None, name: str) -> np.ndarray:
    """Δ of tensor `name`, float32: the diff's, or ft − base."""
    if d is not None:
        return np.asarray(d.get(name), dtype=np.float32)
    return np.asarray(f.get(name), dtype=np.float32) - np.asarray(b.get(name), dtype=np.float32)


def _changed(b: HFCheckpoint | None, f: HFCheckpoint | None, d: HFCheckpoint | None, name: str) -> bool:
    if f is None:
        return bool(np.any(np.asarray(d.get(name))))
    return not np.array_equal(np.asarray(f.get(name)), np.asarray(b.get(name)))
