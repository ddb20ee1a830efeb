"""Benchmark: ftjax transfer vs the I/O floor vs mergekit (when installed) on 1.1B-param bf16 Llama checkpoints.

    python benchmarks/transfer_bench.py [--small] [--dir /tmp/ftjax_bench] [--repeats 3]

Generates three random Llama-shaped checkpoints (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads,
vocab 32000, 1 GB shards; ~2.2 GB each) with ftjax's own writer, then runs each method as a subprocess (wall time
median of `repeats`, peak RSS of the child) and prints a markdown table. `--small` shrinks the model ~50x.
Not run in CI. Needs ~9 GB free in --dir at full size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000)
SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=32000)


def shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (v, h)}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        out |= {p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)}
    return out | {"model.norm.weight": (h,), "lm_head.weight": (v, h)}


def make_models(root: Path, c: dict) -> list[Path]:
    from ftjax.io.checkpoint import HFCheckpoint, HFCheckpointWriter, write_json
    from ftjax.io.safetensors import TensorInfo

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
           "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": False, "dtype": "bfloat16",
           **c}
    infos = [TensorInfo(n, np.dtype(ml_dtypes.bfloat16), s) for n, s in shapes(c).items()]
    paths = [root / "base_s", root / "ft_s", root / "base_t"]
    if all((p / "config.json").exists() for p in paths):
        return paths
    for seed, p in ((0, paths[0]), (1, paths[2])):
        rng = np.random.default_rng(seed)
        with HFCheckpointWriter(p, infos, 10**9) as w:
            for info in infos:
                for r0 in range(0, info.shape[0], 4096):
                    rows = (min(4096, info.shape[0] - r0),) + info.shape[1:]
                    w.write(info.name, (rng.standard_normal(rows, np.float32) * 0.02).astype(ml_dtypes.bfloat16))
        write_json(p / "config.json", cfg)
    base, rng = HFCheckpoint(paths[0]), np.random.default_rng(2)
    with HFCheckpointWriter(paths[1], infos, 10**9) as w:  # ft = bf16(base + N(0, 1e-3))
        for info in infos:
            for r0 in range(0, info.shape[0], 4096):
                x = base.get_slice(info.name, (slice(r0, r0 + 4096),)).astype(np.float32)
                w.write(info.name, (x + rng.standard_normal(x.shape, np.float32) * 1e-3).astype(ml_dtypes.bfloat16))
    write_json(paths[1] / "config.json", cfg)
    return paths


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run cmd in a fresh wrapper process; return (wall s, peak RSS MB of the command)."""
    wrap = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "print(r.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrap, *cmd], capture_output=True, text=True, check=True).stdout
    rc, wall, rss = out.split()
    if rc != "0":
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return float(wall), int(rss) / 1024


IO_FLOOR = r"""
import os, sys
ins, out = sys.argv[1:-1], sys.argv[-1]
buf = bytearray(64 << 20); mv = memoryview(buf); total = 0
with open(out, "wb") as w:
    for p in ins:
        with open(p, "rb", buffering=0) as f:
            while (n := f.readinto(buf)):
                total += n
                if p in ins[: len(ins) // 3]:  # write as many bytes as one checkpoint (the output)
                    w.write(mv[:n])
    w.flush(); os.fsync(w.fileno())
"""

FTJAX = "import sys; from ftjax.transfer import transfer; transfer(*sys.argv[1:5], progress=False, overwrite=True)"


def exact_mismatches(out: Path, paths: list[Path]) -> int:
    from ftjax.io.checkpoint import HFCheckpoint
    from ftjax.treeops import transfer_kernel

    o, b, f, t = (HFCheckpoint(p) for p in (out, *paths))
    bad = 0
    for n in t.names():
        for r0 in range(0, t.info(n).shape[0], 4096):
            s = (slice(r0, r0 + 4096),)
            ref = np.asarray(transfer_kernel(t.get_slice(n, s), f.get_slice(n, s), b.get_slice(n, s), alpha=1.0,
                                             out_dtype=ml_dtypes.bfloat16))
            bad += int((ref.view(np.uint16) != o.get_slice(n, s).view(np.uint16)).sum())
    return bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--dir", default="/tmp/ftjax_bench")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(args.dir) / ("small" if args.small else "full")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    paths = make_models(root, SMALL if args.small else FULL)
    print(f"models ready in {time.time() - t0:.0f} s: {root}", file=sys.stderr)
    files = [str(p) for d in paths for p in sorted(d.glob("*.safetensors"))]
    in_bytes = sum(os.path.getsize(p) for p in files)
    out_bytes = sum(os.path.getsize(p) for p in sorted(paths[2].glob("*.safetensors")))
    for p in files:  # warm the page cache
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    out = root / "out"
    runs = {"I/O floor (read inputs, write + fsync output)":
            [sys.executable, "-c", IO_FLOOR, *[str(p) for d in (paths[2], paths[0], paths[1])
                                               for p in sorted(d.glob("*.safetensors"))], str(root / "floor.bin")],
            "ftjax transfer": [sys.executable, "-c", FTJAX, *map(str, paths), str(out)]}
    configs = {}
    if shutil.which("mergekit-yaml"):
        m = {k: str(v) for k, v in zip(("b", "f", "t"), paths)}
        configs["mergekit linear [1,1,-1] bf16"] = {"merge_method": "linear", "parameters": {"normalize": False},
            "dtype": "bfloat16", "models": [{"model": m["t"], "parameters": {"weight": 1.0}},
                                             {"model": m["f"], "parameters": {"weight": 1.0}},
                                             {"model": m["b"], "parameters": {"weight": -1.0}}]}
        configs["mergekit task_arithmetic bf16"] = {"merge_method": "task_arithmetic", "base_model": m["t"],
            "dtype": "bfloat16", "models": [{"model": m["f"], "parameters": {"weight": 1.0}},
                                             {"model": m["b"], "parameters": {"weight": -1.0}}]}
        for name, cfg in configs.items():
            y = root / (name.split()[1] + ".yml")
            y.write_text(json.dumps(cfg))  # JSON is YAML
            runs[name] = ["mergekit-yaml", str(y), str(root / ("mk_" + name.split()[1]))]
    rows = []
    for name, cmd in runs.items():
        res = []
        for _ in range(args.repeats):
            for p in (out, root / "floor.bin", *(root / ("mk_" + n.split()[1]) for n in configs)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            subprocess.run(["sync"])
            res.append(timed(cmd))
        wall = statistics.median(r[0] for r in res)
        mism = "-"
        if name.startswith("ftjax"):
            mism = exact_mismatches(out, paths)
        elif name.startswith("mergekit"):
            mism = exact_mismatches(root / ("mk_" + name.split()[1]), paths)
        rows.append((name, wall, max(r[1] for r in res), mism))
    floor = rows[0][1]
    ftj = rows[1][1]
    print(f"\ninputs {in_bytes / 1e9:.2f} GB, output {out_bytes / 1e9:.2f} GB, {os.cpu_count()} CPUs, warm cache\n")
    print("| method | wall s (median of %d) | x I/O floor | x ftjax | peak RSS MB | elements != exact |" % args.repeats)
    print("|---|---|---|---|---|---|")
    for name, wall, rss, mism in rows:
        print(f"| {name} | {wall:.2f} | {wall / floor:.2f} | {wall / ftj:.2f} | {rss:.0f} | {mism} |")


if __name__ == "__main__":
    main()
