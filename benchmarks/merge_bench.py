"""Benchmark: `ftjax merge` vs mergekit vs the I/O floor on 1.1B-param bf16 Llama checkpoints (warm page cache).

    python benchmarks/merge_bench.py [--small] [--dir /tmp/ftjax_bench] [--mergekit-yaml PATH] [--repeats 1]
                                     [--methods ties,dare_ties,task_arithmetic,slerp,model_stock] [--cold]

The models of benchmarks/transfer_bench.py (made there if missing): base = its base_s, the two merged models its
ft_s (base + N(0, 1e-3)) and base_t (an independent random model). Methods, each from one config given to both
tools (bf16, mergekit's default flags): ties (density 0.5), dare_ties (density 0.5), task_arithmetic, slerp
(t 0.5), model_stock (`--methods` picks a subset). Every run is a subprocess; rows interleave so background load
hits all alike. `--cold`: before every run the inputs' pages are dropped from the page cache (posix_fadvise
DONTNEED after a sync; the share still cached is printed), so every tool and the floor read from disk. Peak
anonymous RSS sampled as in transfer_bench. I/O floor: read the three inputs once, write one output, fsync.
Passes: the bytes ftjax read (its record's `bytes_read`) over the size of the inputs the method reads (slerp: the
base and one model): 1 for one read of each; a statistics pass (ties' radix select, slerp's and model_stock's Gram,
dare's L1 norms) reads a tensor again unless its float32 inputs fit in ftjax.merge.run.ONE_PASS_BYTES, when it is
read once and held.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfer_bench import FULL, IO_FLOOR, SMALL, make_models, timed, versions

METHODS = {
    "ties": ({"weight": 0.5, "density": 0.5}, {}),
    "dare_ties": ({"weight": 0.5, "density": 0.5}, {}),
    "task_arithmetic": ({"weight": 0.5}, {}),
    "slerp": (None, {"t": 0.5}),
    "model_stock": (None, {}),
}


def config(method: str, base: str, models: list[str]) -> dict:
    per, top = METHODS[method]
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base, "models": [{"model": models[0]}], "parameters": top,
                "dtype": "bfloat16"}
    if per is None:  # no per-model parameters (model_stock)
        return {"merge_method": method, "base_model": base, "dtype": "bfloat16",
                "models": [{"model": m} for m in models]}
    return {"merge_method": method, "base_model": base, "dtype": "bfloat16",
            "models": [{"model": m, "parameters": per} for m in models]}


def drop_cache(files: list[Path]) -> float:
    """Ask the kernel to drop the page-cache pages of `files` (posix_fadvise DONTNEED: clean pages go); returns the
    share of their pages still cached afterwards (mincore over a private mapping; 0.0: all read from disk next)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    cached = total = 0
    for f in files:
        with open(f, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            size = os.path.getsize(f)
            m = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)  # writable view, so ctypes can take its address
            n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * n)()
            base = ctypes.c_char.from_buffer(m)
            if libc.mincore(ctypes.addressof(base), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore failed on {f}")
            del base
            m.close()
            cached += sum(v & 1 for v in vec)
            total += n
    return cached / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--dir", default="/tmp/ftjax_bench")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--mergekit-yaml", default=shutil.which("mergekit-yaml"))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--cold", action="store_true", help="drop the inputs from the page cache before every run")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    root = Path(args.dir) / ("small" if args.small else "full")
    root.mkdir(parents=True, exist_ok=True)
    b, f, t = (str(p) for p in make_models(root, SMALL if args.small else FULL))
    shards = {p: sorted(Path(p).glob("*.safetensors")) for p in (b, f, t)}
    inputs = [x for v in shards.values() for x in v]
    in_bytes = sum(os.path.getsize(x) for x in inputs)
    left: list[float] = []  # --cold: the share of input pages still cached when a run starts
    for x in inputs:  # warm the page cache
        with open(x, "rb") as fh:
            while fh.read(64 << 20):
                pass
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = root / "out_merge"
    floor_cmd = [sys.executable, "-c", "WRITE_BEHIND = False\n" + IO_FLOOR,
                 *map(str, shards[b] + shards[f] + shards[t]), str(root / "floor.bin")]
    runs: dict[str, list[str]] = {"I/O floor": floor_cmd}
    for method in methods:
        y = root / f"{method}.yml"
        y.write_text(json.dumps(config(method, b, [f, t])))  # JSON is YAML
        runs[f"ftjax {method}"] = [sys.executable, "-m", "ftjax.cli", "merge", str(y), "--out", str(out), "--quiet"]
        if args.mergekit_yaml:
            runs[f"mergekit {method}"] = [args.mergekit_yaml, str(y), str(out)]
    res: dict[str, list] = {k: [] for k in runs}
    passes: dict[str, float] = {}
    for _ in range(args.repeats):
        for label, cmd in runs.items():
            shutil.rmtree(out, ignore_errors=True)
            (root / "floor.bin").unlink(missing_ok=True)
            subprocess.run(["sync"])
            if args.cold:
                left.append(drop_cache(inputs))
            res[label].append(timed(cmd, env))
            if label.startswith("ftjax "):  # what it read, from its record
                record = json.loads((out / "ftjax_merge.json").read_text())
                used = [b, f] if label == "ftjax slerp" else [b, f, t]  # slerp reads the base and one model
                passes[label] = record["report"]["bytes_read"] / sum(os.path.getsize(x) for p in used for x in shards[p])
            print(f"  {label}: {res[label][-1][0]:.1f} s, {res[label][-1][2]:.0f} MB", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    (root / "floor.bin").unlink(missing_ok=True)
    med = {k: statistics.median(r[0] for r in v) for k, v in res.items()}
    medw = {k: statistics.median(r[0] + r[1] for r in v) for k, v in res.items()}
    floor = med["I/O floor"]
    cache = (f"cold page cache (at most {max(left):.1%} of the input pages still cached at a start)" if args.cold
             else "warm page cache")
    print(f"\ninputs {in_bytes / 1e9:.2f} GB (base + 2 models), {cache}, median of {args.repeats}\n")
    print("| method | ftjax s | mergekit s (+ sync) | mergekit / ftjax (with its sync) | ftjax / I/O floor "
          "| passes | ftjax peak anon RSS MB | mergekit peak anon RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for method in methods:
        fj, mk = f"ftjax {method}", f"mergekit {method}"
        mk_s = f"{med[mk]:.1f} (+{medw[mk] - med[mk]:.1f})" if mk in med else "-"
        ratio = f"{medw[mk] / med[fj]:.1f}x" if mk in med else "-"
        mk_rss = f"{max(r[2] for r in res[mk]):.0f}" if mk in res else "-"
        print(f"| {method} | {med[fj]:.1f} | {mk_s} | {ratio} | {med[fj] / floor:.2f} | {passes[fj]:.2f} "
              f"| {max(r[2] for r in res[fj]):.0f} | {mk_rss} |")
    print(f"\nI/O floor {floor:.1f} s; {time.strftime('%Y-%m-%d')}; versions: {versions(args.mergekit_yaml)}")


if __name__ == "__main__":
    main()
