"""Compatibility with mergekit itself: the same configs, the same tiny models, both tools, per-method differences.

    python benchmarks/mergekit_compat.py --mergekit-venv /path/to/venv [--dir /tmp/ftjax_compat] [--only LABEL]

Installs nothing: give a virtual environment where mergekit is installed (or its `--mergekit-yaml`).
tests/test_mergekit_compat.py runs the same configs against the same float64 references without mergekit. Builds tiny random
bf16 Llama checkpoints with transformers (a base and three fine-tunes = base + noise; 2 layers, so gradients have
two points), runs every method both tools have with mergekit's own example configs (examples/linear.yml, ties.yml,
bio-merge.yml, gradient-slerp.yml; model names replaced by these paths) and, for the methods without an example, the
parameters of mergekit's docs/merge_methods.md, each once with the example's dtype (computed by mergekit in that
dtype) and once with `dtype: float32`. Prints per run the largest difference in units in the last place of the
output dtype and the share of elements that differ; for the configs with scalar parameters and no random masks also
how many elements of each tool's output differ from a float64 re-implementation of mergekit's semantics
(tests/merge_reference.py) rounded once, and each tool's largest distance from it (relative to the tensor's largest
value): the tool closer to the float64 value has the better precision.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import merge_reference as mr  # noqa: E402

BF16 = ml_dtypes.bfloat16

# mergekit's examples (model names -> B base, M0..M2 fine-tunes), then configs for the other methods
EXAMPLES = {
    "linear (examples/linear.yml)": {
        "models": [{"model": "M0", "parameters": {"weight": 1.0}}, {"model": "M1", "parameters": {"weight": 0.3}},
                   {"model": "M2", "parameters": {"weight": 0.5}}], "merge_method": "linear", "dtype": "float16"},
    "ties (examples/ties.yml)": {
        "models": [{"model": "M0", "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                   {"model": "M1", "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                   {"model": "M2", "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5},
                                                                               {"value": 0}]}}],
        "merge_method": "ties", "base_model": "B", "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float16"},
    "ties (examples/bio-merge.yml)": {
        "models": [{"model": "M0", "parameters": {"density": 0.5, "weight": 0.5}},
                   {"model": "M1", "parameters": {"density": 0.5, "weight": 0.5}}],
        "merge_method": "ties", "base_model": "B", "parameters": {"normalize": False, "int8_mask": True},
        "dtype": "float16"},
    "slerp (examples/gradient-slerp.yml)": {
        "slices": [{"sources": [{"model": "M0", "layer_range": [0, 2]}, {"model": "M1", "layer_range": [0, 2]}]}],
        "merge_method": "slerp", "base_model": "M0",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "float16"},
}
WD = lambda w, d: {"weight": w, "density": d}
OTHERS = {
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "B", "models": [
        {"model": "M0", "parameters": {"weight": 0.7}}, {"model": "M1", "parameters": {"weight": 0.3}}]},
    "dare_ties (density 1: no drop)": {"merge_method": "dare_ties", "base_model": "B", "models": [
        {"model": "M0", "parameters": WD(0.6, 1.0)}, {"model": "M1", "parameters": WD(0.4, 1.0)}]},
    "dare_ties": {"merge_method": "dare_ties", "base_model": "B", "models": [
        {"model": "M0", "parameters": WD(0.6, 0.5)}, {"model": "M1", "parameters": WD(0.4, 0.5)}]},
    "dare_linear": {"merge_method": "dare_linear", "base_model": "B", "models": [
        {"model": "M0", "parameters": WD(0.6, 0.5)}, {"model": "M1", "parameters": WD(0.4, 0.5)}]},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "B", "models": [
        {"model": "M0", "parameters": {**WD(0.6, 0.9), "gamma": 0.01}},
        {"model": "M1", "parameters": {**WD(0.4, 0.9), "gamma": 0.01}}]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "B", "models": [
        {"model": "M0", "parameters": {**WD(0.6, 0.9), "gamma": 0.01}},
        {"model": "M1", "parameters": {**WD(0.4, 0.9), "gamma": 0.01}}]},
    "della": {"merge_method": "della", "base_model": "B", "models": [
        {"model": "M0", "parameters": {**WD(0.6, 0.5), "epsilon": 0.1}},
        {"model": "M1", "parameters": {**WD(0.4, 0.5), "epsilon": 0.1}}], "parameters": {"lambda": 1.0}},
    "della_linear": {"merge_method": "della_linear", "base_model": "B", "models": [
        {"model": "M0", "parameters": {**WD(0.6, 0.5), "epsilon": 0.1}},
        {"model": "M1", "parameters": {**WD(0.4, 0.5), "epsilon": 0.1}}]},
    "nuslerp": {"merge_method": "nuslerp", "models": [
        {"model": "M0", "parameters": {"weight": 0.6}}, {"model": "M1", "parameters": {"weight": 0.4}}]},
    "nuslerp (base, row-wise)": {"merge_method": "nuslerp", "base_model": "B", "models": [
        {"model": "M0", "parameters": {"weight": 0.6}}, {"model": "M1", "parameters": {"weight": 0.4}}],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
    "multislerp": {"merge_method": "multislerp", "models": [
        {"model": "M0", "parameters": {"weight": 0.5}}, {"model": "M1", "parameters": {"weight": 0.3}},
        {"model": "M2", "parameters": {"weight": 0.2}}]},
    "karcher": {"merge_method": "karcher", "models": [{"model": "M0"}, {"model": "M1"}, {"model": "M2"}]},
    "model_stock": {"merge_method": "model_stock", "base_model": "B", "models": [
        {"model": "M0"}, {"model": "M1"}, {"model": "M2"}]},
    "nearswap": {"merge_method": "nearswap", "base_model": "B", "models": [{"model": "M0"}],
                 "parameters": {"t": 0.01}},
    "sce": {"merge_method": "sce", "base_model": "B", "models": [{"model": "M0"}, {"model": "M1"}, {"model": "M2"}],
            "parameters": {"select_topk": 0.5}},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "B", "models": [{"model": "M0"}]},
    "ram": {"merge_method": "ram", "base_model": "B", "models": [{"model": "M0"}, {"model": "M1"}, {"model": "M2"}],
            "parameters": {"epsilon": 0.01}},
    "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": "B", "models": [
        {"model": "M0"}, {"model": "M1"}, {"model": "M2"}], "parameters": {"epsilon": 0.01, "r": 0.5, "alpha": 1.0}},
    "passthrough (scale 0.5)": {"merge_method": "passthrough", "models": [
        {"model": "M0", "parameters": {"scale": 0.5}}]},
    "task_arithmetic (slices: a base_model per slice, residual_weight)": {
        "merge_method": "task_arithmetic", "base_model": "B", "slices": [
            {"sources": [{"model": "B", "layer_range": [0, 1]},
                         {"model": "M0", "layer_range": [0, 1], "parameters": {"weight": 0.7}}]},
            {"base_model": "M1", "residual_weight": 0.3,
             "sources": [{"model": "M1", "layer_range": [1, 2]},
                         {"model": "M2", "layer_range": [1, 2], "parameters": {"weight": 0.5}}]}]},
}


def make_models(root: Path) -> dict[str, Path]:
    from hf_models import make_hf_model

    from ftjax.io.checkpoint import HFCheckpoint, save_hf

    paths = {"B": root / "base", **{f"M{i}": root / f"m{i}" for i in range(3)}}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    make_hf_model(paths["B"], dtype="bfloat16", seed=0, hidden_size=64, intermediate_size=160, vocab_size=256)
    ck = HFCheckpoint(paths["B"])
    for i in range(3):
        rng = np.random.default_rng(10 + i)
        tens = {n: (ck.get(n).astype(np.float32) + rng.normal(0, 0.02, ck.info(n).shape)).astype(BF16)
                for n in ck.names()}
        save_hf(paths[f"M{i}"], tens, config=ck.config, aux_from=paths["B"])
    return paths


def _replace(cfg, paths):
    if isinstance(cfg, dict):
        return {k: _replace(v, paths) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [_replace(v, paths) for v in cfg]
    return str(paths[cfg]) if isinstance(cfg, str) and cfg in paths else cfg


def ordered(x: np.ndarray) -> np.ndarray:
    """Float bits as integers ordered like the values (differences are ulps)."""
    width = {2: np.int16, 4: np.int32}[x.dtype.itemsize]
    b = x.view(width).astype(np.int64)
    return np.where(b < 0, -(b & (2 ** (8 * x.dtype.itemsize - 1) - 1)), b)


def compare(a: Path, b: Path) -> tuple[int, float, float, float]:
    """Between two checkpoints: (largest ulp difference, share of elements that differ, share that differ by more
    than one ulp, largest |difference| relative to its tensor's largest |value|)."""
    from ftjax.io.checkpoint import HFCheckpoint

    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    worst, diff, big, total, rel = 0, 0, 0, 0, 0.0
    for n in sorted(set(ca.names()) & set(cb.names())):
        x, y = np.ascontiguousarray(ca.get(n)), np.ascontiguousarray(cb.get(n))
        if x.dtype != y.dtype:  # mergekit's arcee_fusion and ramplus_tl return float32 (a float mask or λ times a
            # bf16 tensor) and save it uncast: compared as rounded once to the config's dtype, ftjax's output dtype
            print(f"  {n}: {a.name} holds {x.dtype}, compared rounded to {y.dtype}", file=sys.stderr)
            x = x.astype(np.float64).astype(y.dtype) if y.dtype != BF16 else x.astype(BF16)
        u = np.abs(ordered(x) - ordered(y))
        worst, diff, big, total = max(worst, int(u.max())), diff + int((u > 0).sum()), big + int((u > 1).sum()), \
            total + u.size
        xf, yf = x.astype(np.float64), y.astype(np.float64)
        rel = max(rel, float(np.max(np.abs(xf - yf)) / max(np.max(np.abs(yf)), 1e-30)))
    return worst, diff / total, big / total, rel


def gradient(values: list[float], name: str, num_layers: int) -> float:
    """mergekit's value of a gradient list for tensor `name` (mergekit/plan.py + config.py, read for this): layer i of
    L has position i / (L − 1) (1 when L = 1) and the list is interpolated linearly at position · (len − 1);
    tensors outside the layers (embeddings, final norm, lm_head) have position 0."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    pos = 0.0 if m is None else (int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0)
    scaled = pos * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    return (1 - (scaled - i0)) * values[i0] + (scaled - i0) * values[i1]


def gradient_slerp_t(name: str) -> float:
    """t of examples/gradient-slerp.yml for `name` in the 2-layer test models (first matching filter wins)."""
    if "self_attn" in name:
        return gradient([0, 0.5, 0.3, 0.7, 1], name, 2)
    if "mlp" in name:
        return gradient([1, 0.5, 0.7, 0.3, 0], name, 2)
    return 0.5


# float64 references (tests/merge_reference.py) of mergekit's semantics: elements of each tool's output that differ
# from the reference rounded once to the output dtype. Each takes (the inputs' tensors by model, the tensor's name).
REFERENCES = {
    "linear (examples/linear.yml)": lambda t, _n: mr.linear([t["M0"], t["M1"], t["M2"]], [1.0, 0.3, 0.5]),
    "slerp (examples/gradient-slerp.yml)": lambda t, n: mr.slerp(t["M0"], t["M1"], gradient_slerp_t(n)),
    "ties (examples/bio-merge.yml)": lambda t, _n: mr.ties(t["B"], [t["M0"], t["M1"]], [0.5, 0.5], [0.5, 0.5],
                                                       normalize=False),
    "task_arithmetic": lambda t, _n: mr.task_arithmetic(t["B"], [t["M0"], t["M1"]], [0.7, 0.3]),
    "dare_ties (density 1: no drop)": lambda t, _n: mr.ties(t["B"], [t["M0"], t["M1"]], [0.6, 0.4], [1.0, 1.0],
                                                        normalize=False),
    "nuslerp": lambda t, _n: mr.nuslerp([t["M0"], t["M1"]], [0.6, 0.4]),
    "nuslerp (base, row-wise)": lambda t, _n: mr.nuslerp([t["M0"], t["M1"]], [0.6, 0.4], t["B"], flatten=False,
                                                     row_wise=True),
    "multislerp": lambda t, _n: mr.multislerp([t["M0"], t["M1"], t["M2"]], [0.5, 0.3, 0.2]),
    "karcher": lambda t, _n: mr.karcher([t["M0"], t["M1"], t["M2"]]).reshape(np.shape(t["M0"])),
    "model_stock": lambda t, _n: mr.model_stock(t["B"], [t["M0"], t["M1"], t["M2"]]).reshape(np.shape(t["B"])),
    "nearswap": lambda t, _n: mr.nearswap(t["B"], t["M0"], 0.01),
    "task_arithmetic (slices: a base_model per slice, residual_weight)": lambda t, n: per_slice_bases(t, n),
}


def per_slice_bases(t: dict, name: str) -> np.ndarray:
    """The per-slice-base config above as mergekit plans it: layer 0 and the embeddings (slices[0]) against B, layer 1,
    the final norm and the head (slices[-1]) against slice 1's own base M1; residual_weight has no effect."""
    if name.startswith("model.layers.0.") or "embed_tokens" in name:
        return mr.task_arithmetic(t["B"], [t["M0"]], [0.7])
    return mr.task_arithmetic(t["M1"], [t["M2"]], [0.5])


def off_reference(label: str, paths: dict[str, Path], out: Path) -> tuple[int, float]:
    """(output elements whose bits differ from the float64 reference of `label` rounded once to the output dtype,
    largest |output − reference| relative to its tensor's largest |reference|)."""
    from ftjax.io.checkpoint import HFCheckpoint

    cks = {k: HFCheckpoint(p) for k, p in paths.items()}
    co, bad, rel = HFCheckpoint(out), 0, 0.0
    for n in co.names():
        y = np.ascontiguousarray(co.get(n))
        ref = REFERENCES[label]({k: c.get(n) for k, c in cks.items()}, n)
        want = mr.round_f64(ref, y.dtype)
        bad += int(np.sum(want.view(f"u{y.itemsize}") != y.view(f"u{y.itemsize}")))
        rel = max(rel, float(np.max(np.abs(y.astype(np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30)))
    return bad, rel


def main() -> None:
    ap = argparse.ArgumentParser()
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--mergekit-venv", help="a virtual environment with mergekit installed (its bin/mergekit-yaml)")
    where.add_argument("--mergekit-yaml", help="the mergekit-yaml command of such an environment")
    ap.add_argument("--dir", default="/tmp/ftjax_compat")
    ap.add_argument("--only", default=None, help="run only the configs whose label contains this text")
    args = ap.parse_args()
    if args.mergekit_venv:
        args.mergekit_yaml = str(Path(args.mergekit_venv) / "bin" / "mergekit-yaml")
    if not Path(args.mergekit_yaml).is_file():
        raise SystemExit(f"{args.mergekit_yaml} does not exist; give a venv where `pip install mergekit` ran")
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = make_models(root)
    rows = []
    for label, cfg0 in {**EXAMPLES, **OTHERS}.items():
        if args.only and args.only not in label:
            continue
        for dtype in (cfg0.get("dtype", "bfloat16"), "float32"):
            cfg = _replace(copy.deepcopy({**cfg0, "dtype": dtype}), paths)
            y = root / "config.yml"
            y.write_text(json.dumps(cfg))  # JSON is YAML
            outs = {"mergekit": root / "out_mk", "ftjax": root / "out_ftjax"}
            for p in outs.values():
                shutil.rmtree(p, ignore_errors=True)
            mk = subprocess.run([args.mergekit_yaml, str(y), str(outs["mergekit"])], capture_output=True, text=True)
            fj = subprocess.run([sys.executable, "-m", "ftjax.cli", "merge", str(y), "--out", str(outs["ftjax"]),
                                 "--quiet"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if mk.returncode or fj.returncode:
                err = (mk.stderr if mk.returncode else fj.stderr).strip().splitlines()[-1:]
                rows.append((label, dtype, "failed: " + ("mergekit " if mk.returncode else "ftjax ") + " ".join(err),
                             "", "", "", "", ""))
            else:
                worst, share, big, rel = compare(outs["mergekit"], outs["ftjax"])
                ref, ref_rel = "-", "-"
                if label in REFERENCES:
                    (fb, fr), (mb, mr_) = (off_reference(label, paths, outs[k]) for k in ("ftjax", "mergekit"))
                    ref, ref_rel = f"{fb:,} / {mb:,}", f"{fr:.1e} / {mr_:.1e}"
                rows.append((label, dtype, str(worst), f"{share:.2%}", f"{big:.2%}", f"{rel:.1e}", ref, ref_rel))
            print(f"  {label} {dtype}: {rows[-1][2:]}", file=sys.stderr)
    print("| method (config) | dtype | max diff (ulp) | elements differing | by > 1 ulp | max diff / max abs "
          "| elements != float64 ref (ftjax / mergekit) | max diff from float64 ref / max abs (ftjax / mergekit) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    r = subprocess.run([str(Path(args.mergekit_yaml).resolve().parent / "python"), "-c",
                        "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                       capture_output=True, text=True)
    print(f"\nmergekit {r.stdout.strip()} (mergekit, torch)")


if __name__ == "__main__":
    main()
