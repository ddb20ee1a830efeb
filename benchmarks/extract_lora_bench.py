"""Benchmark: `ftjax extract-lora` vs `mergekit-extract-lora` at one rank on the 1.1B-param bf16 benchmark models.

    python benchmarks/extract_lora_bench.py [--rank 64] [--dir /tmp/ftjax_bench] [--mergekit-extract-lora PATH]

The models of benchmarks/transfer_bench.py (made there if missing): base = its base_s, fine-tune = its ft_s
(base + N(0, 1e-3): a full-rank delta, so rank 64 keeps a small share of it; this measures speed and memory, not
quality). Both tools factorize every 2-D linear weight of the layers and leave embeddings, lm_head and norms out
(ftjax `--skip 'embed_tokens|lm_head|norm'`; mergekit `--exclude-regex` on embed_tokens/lm_head and
`--skip-undecomposable` for the norms). Each run is a subprocess, timed with its peak anonymous RSS sampled as in
transfer_bench; rows interleave so background load hits both alike. Also printed: each adapter's relative Frobenius
error ‖Δ − B·A·scale‖ / ‖Δ‖ on three sampled modules (float64), so the speed is compared at equal quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfer_bench import FULL, SMALL, make_models, timed, versions  # noqa: E402



def modules(n_layers: int) -> tuple[str, ...]:
    """Three sampled modules: the first layer's q_proj, a middle layer's down_proj, the last layer's gate_proj."""
    return ("model.layers.0.self_attn.q_proj", f"model.layers.{n_layers // 2}.mlp.down_proj",
            f"model.layers.{n_layers - 1}.mlp.gate_proj")


def relative_errors(adapter: Path, base: Path, ft: Path, sampled: tuple[str, ...]) -> dict[str, float]:
    """‖Δ − scale·B·A‖_F / ‖Δ‖_F for the sampled modules, from the adapter's safetensors and config (PEFT's key names)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ftjax.io.checkpoint import HFCheckpoint
    from ftjax.io.safetensors import SafetensorsFile

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    f = SafetensorsFile(adapter / "adapter_model.safetensors")
    names = f.names()
    b, t = HFCheckpoint(base), HFCheckpoint(ft)
    out = {}
    for m in sampled:
        a_key = next(n for n in names if n.endswith(f"{m}.lora_A.weight"))
        b_key = next(n for n in names if n.endswith(f"{m}.lora_B.weight"))
        a, bb = f.get(a_key).astype(np.float64), f.get(b_key).astype(np.float64)
        short = m.split(".")[-1]
        r = (cfg.get("rank_pattern") or {}).get(m, cfg["r"])
        alpha = (cfg.get("alpha_pattern") or {}).get(m, cfg["lora_alpha"])
        scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
        delta = t.get(m + ".weight").astype(np.float64) - b.get(m + ".weight").astype(np.float64)
        out[short] = float(np.linalg.norm(delta - scale * bb @ a) / np.linalg.norm(delta))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--dir", default="/tmp/ftjax_bench")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--mergekit-extract-lora", default=shutil.which("mergekit-extract-lora"))
    args = ap.parse_args()
    root = Path(args.dir) / ("small" if args.small else "full")
    root.mkdir(parents=True, exist_ok=True)
    base, ft, _ = make_models(root, SMALL if args.small else FULL)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    outs = {"ftjax": root / "lora_ftjax", "mergekit": root / "lora_mergekit"}
    runs = {"ftjax": [sys.executable, "-m", "ftjax.cli", "extract-lora", "--base", str(base), "--ft", str(ft),
                      "--out", str(outs["ftjax"]), "--rank", str(args.rank), "--skip", "embed_tokens|lm_head|norm",
                      "--quiet", "--overwrite"]}
    if args.mergekit_extract_lora:
        runs["mergekit"] = [args.mergekit_extract_lora, "--model", str(ft), "--base-model", str(base),
                            "--out-path", str(outs["mergekit"]), "--max-rank", str(args.rank),
                            "--exclude-regex", ".*(embed_tokens|lm_head).*", "--skip-undecomposable"]
    res: dict[str, list] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for label, cmd in runs.items():
            shutil.rmtree(outs[label], ignore_errors=True)
            res[label].append(timed(cmd, env))
            print(f"  {label}: {res[label][-1][0]:.1f} s, {res[label][-1][2]:.0f} MB", file=sys.stderr)
    layers = (SMALL if args.small else FULL)["num_hidden_layers"]
    sampled = modules(layers)
    errs = {k: relative_errors(outs[k], base, ft, sampled) for k in runs}
    med = {k: statistics.median(r[0] for r in v) for k, v in res.items()}
    print(f"\nrank {args.rank}, bf16 Llama ({layers} layers x 7 linear weights), median of {args.repeats}\n")
    print("| tool | wall s | peak anon RSS MB | adapter MB | rel. error " + " / ".join(m.split(".")[-1] for m in sampled)
          + " | mergekit / ftjax |")
    print("|---|---|---|---|---|---|")
    for k in runs:
        size = sum(p.stat().st_size for p in outs[k].glob("*.safetensors")) / 1e6
        ratio = f"{med['mergekit'] / med['ftjax']:.2f}x" if "mergekit" in med and k == "mergekit" else ""
        print(f"| {k} | {med[k]:.1f} | {max(r[2] for r in res[k]):.0f} | {size:.0f} | "
              + " / ".join(f"{e:.4f}" for e in errs[k].values()) + f" | {ratio} |")
    print(f"\nversions: {versions(None)}")


if __name__ == "__main__":
    main()
