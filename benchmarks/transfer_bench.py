"""Benchmark: ftjax transfer vs the I/O floor vs mergekit on 1.1B-param bf16 Llama checkpoints (warm page cache).

    python benchmarks/transfer_bench.py [--small] [--dir /tmp/ftjax_bench] [--repeats 3] [--mergekit-yaml PATH]

Generates three random Llama-shaped checkpoints (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads,
vocab 32000, 1 GB shards; ~2.2 GB each) with ftjax's own writer, then runs, round-robin so that load from other
processes hits all methods alike, `repeats` times each, every one as a subprocess:
- I/O floor: read the same input bytes, write one output's bytes, one fsync (plain file I/O, 64 MB buffers);
  and the same with write-behind (posix_fadvise DONTNEED after every 64 MB write: the disk starts writing back at
  once instead of at the fsync), a stricter floor shown for reference (ratios are to the plain one);
- ftjax: `python -m ftjax.cli transfer ... --quiet` (includes JAX start-up, compiles, and its fsyncs);
- mergekit `linear` [1, 1, -1], normalize false, dtype bfloat16, default flags;
- mergekit `task_arithmetic`, base_model = source base, models target (1) and source-ft (1), dtype bfloat16.
mergekit never fsyncs, so a timed `sync` follows every run and is shown separately (`+sync`).
Memory: peak anonymous RSS of the child (RssAnon in /proc/PID/status, sampled every 20 ms; excludes page-cache
pages of mmapped inputs) and max RSS from wait4 (includes them). Exactness: output elements whose bits differ from
round_once_bf16(t + (ft - b)) (float64 sum, exact for this data, rounded once: round to odd at float32, then to
nearest even; a plain float64 -> bf16 cast would round twice). `--small` shrinks the model ~50x. Needs ~9 GB free.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000)
SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=32000)
BF16 = ml_dtypes.bfloat16


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
    """[base_s, ft_s, base_t] under root (kept between runs); ft_s = bf16(base_s + N(0, 1e-3))."""
    from ftjax.io.checkpoint import HFCheckpoint, HFCheckpointWriter, write_json
    from ftjax.io.safetensors import TensorInfo

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
           "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": False, "dtype": "bfloat16",
           **c}
    infos = [TensorInfo(n, np.dtype(BF16), s) for n, s in shapes(c).items()]
    paths = [root / "base_s", root / "ft_s", root / "base_t"]
    if all((p / "config.json").exists() for p in paths):
        return paths
    for seed, p in ((0, paths[0]), (1, paths[2])):
        rng = np.random.default_rng(seed)
        with HFCheckpointWriter(p, infos, 10**9) as w:
            for info in infos:
                for r0 in range(0, info.shape[0], 4096):
                    rows = (min(4096, info.shape[0] - r0),) + info.shape[1:]
                    w.write(info.name, (rng.standard_normal(rows, np.float32) * 0.02).astype(BF16))
        write_json(p / "config.json", cfg)
    base, rng = HFCheckpoint(paths[0]), np.random.default_rng(2)
    with HFCheckpointWriter(paths[1], infos, 10**9) as w:
        for info in infos:
            for r0 in range(0, info.shape[0], 4096):
                x = base.get_slice(info.name, (slice(r0, r0 + 4096),)).astype(np.float32)
                w.write(info.name, (x + rng.standard_normal(x.shape, np.float32) * 1e-3).astype(BF16))
    write_json(paths[1] / "config.json", cfg)
    return paths


def _anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, float, float]:
    """Run cmd; return (wall s, sync s, peak anonymous RSS MB (sampled), max RSS MB (wait4, this child only))."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_kb(p.pid))
            time.sleep(0.02)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr.read().decode()[-3000:]}")
    t1 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return wall, time.perf_counter() - t1, peak[0] / 1024, ru.ru_maxrss / 1024


IO_FLOOR = r"""
import os, sys
ins, out = sys.argv[1:-1], sys.argv[-1]
buf = bytearray(64 << 20); mv = memoryview(buf)
with open(out, "wb") as w:
    for p in ins:
        with open(p, "rb", buffering=0) as f:
            while (n := f.readinto(buf)):
                if p in ins[: len(ins) // 3]:  # write as many bytes as one checkpoint (the output)
                    w.write(mv[:n])
                    if WRITE_BEHIND:  # start writeback now, drop clean pages (what ftjax's writer does)
                        w.flush(); os.posix_fadvise(w.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    w.flush(); os.fsync(w.fileno())
"""


def round_once_bf16(x: np.ndarray) -> np.ndarray:
    """Correct RNE of float64 x to bf16 (the transfer's reference rounding, tests/reference.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference import round_f64

    return round_f64(x, BF16)


def mismatches(out: Path, paths: list[Path]) -> int:
    """Output elements whose bits differ from round_once_bf16(t + (ft - b)); a missing tensor counts in full."""
    from ftjax.io.checkpoint import HFCheckpoint

    o, b, f, t = (HFCheckpoint(p) for p in (out, *paths))
    bad = 0
    for n in t.names():
        shape = t.info(n).shape
        if n not in o:
            bad += int(np.prod(shape))
            continue
        for r0 in range(0, shape[0], 2048):
            s = (slice(r0, r0 + 2048),)
            ref = round_once_bf16(t.get_slice(n, s).astype(np.float64) + (f.get_slice(n, s).astype(np.float64)
                                                                           - b.get_slice(n, s).astype(np.float64)))
            got = o.get_slice(n, s)
            got = got if got.dtype == BF16 else got.astype(BF16)
            bad += int((ref.view(np.uint16) != got.view(np.uint16)).sum())
    return bad


def versions(mk_yaml: str | None) -> str:
    import jax

    v = f"python {sys.version.split()[0]}, jax {jax.__version__}, numpy {np.__version__}"
    if mk_yaml:
        py = Path(mk_yaml).resolve().parent / "python"
        q = ("import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
             "('mergekit', 'torch', 'transformers', 'safetensors')))")
        r = subprocess.run([str(py), "-c", q], capture_output=True, text=True)
        v += "; " + (r.stdout.strip() or "mergekit version unknown")
    return v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--dir", default="/tmp/ftjax_bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit-yaml", default=shutil.which("mergekit-yaml"), help="mergekit-yaml executable")
    ap.add_argument("--no-check", action="store_true", help="skip the exactness check")
    args = ap.parse_args()
    root = Path(args.dir) / ("small" if args.small else "full")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    paths = make_models(root, SMALL if args.small else FULL)
    print(f"models ready in {time.time() - t0:.0f} s: {root}", file=sys.stderr)
    b, f, t = (str(p) for p in paths)
    shards = {p: sorted(Path(p).glob("*.safetensors")) for p in (b, f, t)}
    in_bytes = sum(os.path.getsize(x) for v in shards.values() for x in v)
    out_bytes = sum(os.path.getsize(x) for x in shards[t])
    for x in (x for v in shards.values() for x in v):  # warm the page cache
        with open(x, "rb") as fh:
            while fh.read(64 << 20):
                pass
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    outs = {"floor": root / "floor.bin", "ftjax": root / "out_ftjax", "linear": root / "out_mk_linear",
            "task_arith": root / "out_mk_ta"}
    floor_args = [*map(str, shards[t] + shards[b] + shards[f]), str(outs["floor"])]
    runs = {"I/O floor (read inputs; write + fsync output)":
            ("floor", [sys.executable, "-c", "WRITE_BEHIND = False\n" + IO_FLOOR, *floor_args]),
            "I/O floor with write-behind (same, fadvise per 64 MB)":
            ("floor", [sys.executable, "-c", "WRITE_BEHIND = True\n" + IO_FLOOR, *floor_args]),
            "ftjax transfer (CLI, exact, fsync)":
            ("ftjax", [sys.executable, "-m", "ftjax.cli", "transfer", "--source-base", b, "--source-ft", f,
                       "--target-base", t, "--out", str(outs["ftjax"]), "--quiet"])}
    if args.mergekit_yaml:
        cfgs = {"linear": {"merge_method": "linear", "parameters": {"normalize": False}, "dtype": "bfloat16",
                           "models": [{"model": t, "parameters": {"weight": 1.0}},
                                      {"model": f, "parameters": {"weight": 1.0}},
                                      {"model": b, "parameters": {"weight": -1.0}}]},
                "task_arith": {"merge_method": "task_arithmetic", "base_model": b, "dtype": "bfloat16",
                               "models": [{"model": t, "parameters": {"weight": 1.0}},
                                          {"model": f, "parameters": {"weight": 1.0}}]}}
        for key, label in (("linear", "mergekit linear [1,1,-1] bf16, default flags"),
                           ("task_arith", "mergekit task_arithmetic (base = source base) bf16")):
            y = root / f"{key}.yml"
            y.write_text(json.dumps(cfgs[key]))  # JSON is YAML
            runs[label] = (key, [args.mergekit_yaml, str(y), str(outs[key])])
    res: dict[str, list] = {label: [] for label in runs}
    for rep in range(args.repeats):  # round-robin: background load hits every method alike
        for label, (key, cmd) in runs.items():
            for p in outs.values():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            subprocess.run(["sync"])
            res[label].append(timed(cmd, env))
            print(f"  {label}: {res[label][-1][0]:.2f} s", file=sys.stderr)
            if rep == args.repeats - 1 and key != "floor" and not args.no_check:
                res[label].append(mismatches(outs[key], paths))
    # Peak memory must not grow with model size: the same transfer on the ~50x smaller model.
    rss_note = ""
    if not args.small:
        sp = make_models(Path(args.dir) / "small", SMALL)
        so = Path(args.dir) / "small" / "out_ftjax"
        shutil.rmtree(so, ignore_errors=True)
        small = timed([sys.executable, "-m", "ftjax.cli", "transfer", "--source-base", str(sp[0]), "--source-ft",
                       str(sp[1]), "--target-base", str(sp[2]), "--out", str(so), "--quiet"], env)
        shutil.rmtree(so, ignore_errors=True)
        big = max(r[2] for r in res["ftjax transfer (CLI, exact, fsync)"][: args.repeats])
        rss_note = (f"ftjax peak anon RSS: {big:.0f} MB for 1.1B params vs {small[2]:.0f} MB for the ~50x smaller "
                    f"model (bounded by the buffer pool, not the model)")
        assert big < small[2] + 200, rss_note
    for p in outs.values():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def med(label):
        return statistics.median(r[0] for r in res[label][: args.repeats])
    labels = list(runs)
    floor, ftj = med(labels[0]), med(labels[2])
    print(f"\ninputs {in_bytes / 1e9:.2f} GB, output {out_bytes / 1e9:.2f} GB, warm page cache, "
          f"median of {args.repeats} (range), round-robin\n")
    print("| method | wall s | + sync s | x I/O floor | x ftjax | x ftjax (wall + sync) | peak anon RSS MB | max RSS MB "
          "| elements != exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in labels:
        r = res[label][: args.repeats]
        w = [x[0] for x in r]
        mism = res[label][args.repeats] if len(res[label]) > args.repeats else "-"
        mism = f"{mism:,} ({mism / (out_bytes / 2):.2g})" if isinstance(mism, int) and mism else mism
        print(f"| {label} | {med(label):.2f} ({min(w):.2f}-{max(w):.2f}) | {statistics.median(x[1] for x in r):.2f} "
              f"| {med(label) / floor:.2f} | {med(label) / ftj:.2f} "
              f"| {statistics.median(x[0] + x[1] for x in r) / ftj:.2f} | {max(x[2] for x in r):.0f} "
              f"| {max(x[3] for x in r):.0f} | {mism} |")
    print(f"\n{rss_note}\nversions: {versions(args.mergekit_yaml)}")


if __name__ == "__main__":
    main()
