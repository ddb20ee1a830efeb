"""The one prepared device check (issue 8): every accelerator figure of benchmarks/RESULTS.md in a single short run.

    python benchmarks/device_check.py --out device_check.json          # an H200 (or any GPU / TPU): ~3-5 minutes
    python benchmarks/device_check.py --smoke --out /tmp/dc.json       # CPU, tiny sizes: proves the script runs

Checks (each timed as the median of a few runs after a warm-up that compiles; one failing check is recorded and the
rest still run):
  hbm            fused t + a*(f - b) over bf16 vectors; bytes = 3 reads + 1 write per element
  matmul         bf16 [n, n] @ [n, n], 2 n^3 FLOPs
  h2d / d2h      host->device from pageable numpy and from a `pinned_host` array; device->host through np.asarray
                 and into `pinned_host` memory
  attention      causal GQA attention, jax.nn.dot_product_attention, implementation cudnn (GPU) and xla, forward and
                 forward+backward; FLOPs count the causal half only: fwd 2 B N T^2 H, fwd+bwd 3.5x that
  disk           sequential write (+fsync) and read after dropping the file from the page cache (posix_fadvise)
  transfer       the exact transfer kernel (ftjax.treeops.tree_transfer, jitted once) on an 8B-shaped (Llama-3-8B)
                 bf16 pytree, 3 reads + 1 write per element, target >= 80% of `hbm`; and ftjax.transfer.transfer_params
                 per call (the public API; bitwise the same output)
  load           ftjax.params.load_params of a 1B-shaped bf16 checkpoint from a cold page cache onto the device;
                 target <= 1.3x max(bytes / disk read, bytes / best host->device)
  scan_forward   ftjax.lmc.point_row_stats (interpolate two bf16 models, forward, per-row NLL) for a 1B Llama shape at
                 batch x 2048; MFU with 2 x matmul params + 4 x layers x seq x hidden FLOPs per token; target >= 45%
  train_step     ftjax.train.train_step (AdamW, f32 master weights, bf16 compute, donated state) on the same shape;
                 MFU with 6 x matmul params + 12 x layers x seq x hidden FLOPs per token; target >= 40%; measured
                 without remat and with ftjax's remat policy (dots without batch dims saved)
MFU peak: --peak-tflops, else 989 (H100/H200 dense bf16) on GPU; unknown elsewhere. Writes one JSON file (--out) and
prints markdown rows for benchmarks/RESULTS.md. Needs ~100 GB of device memory and ~6 GB of free disk at full size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

GIB = 1 << 30
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)


def sizes(smoke: bool) -> dict[str, Any]:
    if smoke:
        return dict(vector=1 << 18, matmul=256, copy_bytes=8 << 20, attn=(1, 256, 4, 2, 32), disk_bytes=16 << 20,
                    transfer_model=TINY, load_model=TINY, model=TINY, batch=2, seq=64, repeats=1, remat=(True,))
    return dict(vector=1 << 30, matmul=8192, copy_bytes=2 * GIB, attn=(8, 2048, 32, 8, 128), disk_bytes=4 * GIB,
                transfer_model=LLAMA_8B, load_model=LLAMA_1B, model=LLAMA_1B, batch=8, seq=2048, repeats=5,
                remat=(False, True))


def hf_config(shape: dict, seq: int = 2048) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": max(seq, 2048), "initializer_range": 0.02,
            "torch_dtype": "bfloat16", **shape}


def timeit(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() (blocked until ready) over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_params(c: dict) -> int:
    d, f, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    per_layer = d * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"]) + 3 * d * f
    return layers * per_layer + v * d  # lm_head is a matmul, tied or not


# ---------------------------------------------------------------------------------------------------------- checks
def check_hbm(s, ctx):
    n = s["vector"]
    k = jax.random.split(jax.random.key(0), 3)
    t, f, b = (jax.random.normal(ki, (n,), jnp.bfloat16) for ki in k)
    fused = jax.jit(lambda t, f, b: t + jnp.bfloat16(0.5) * (f - b))
    sec = timeit(lambda: fused(t, f, b), s["repeats"])
    ctx["hbm_Bps"] = 4 * n * 2 / sec
    return {"elements": n, "seconds": sec, "TB_per_s": ctx["hbm_Bps"] / 1e12}


def check_matmul(s, ctx):
    n = s["matmul"]
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
    mm = jax.jit(lambda a, b: a @ b)
    sec = timeit(lambda: mm(a, b), s["repeats"])
    return {"n": n, "seconds": sec, "TFLOP_per_s": 2 * n**3 / sec / 1e12}


def _memory(device, kind: str):
    return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)


def check_copies(s, ctx):
    dev = jax.local_devices()[0]
    n = s["copy_bytes"] // 2
    host = np.random.default_rng(0).standard_normal(n, np.float32).astype(jnp.bfloat16)
    out: dict[str, Any] = {"bytes": host.nbytes}
    sec = timeit(lambda: jax.device_put(host, dev), s["repeats"])
    out["h2d_pageable_GB_per_s"] = host.nbytes / sec / 1e9
    kinds = {m.kind for m in dev.addressable_memories()}
    on_dev = jax.device_put(host, dev)
    if "pinned_host" in kinds:
        pinned = jax.device_put(host, _memory(dev, "pinned_host"))
        sec = timeit(lambda: jax.device_put(pinned, _memory(dev, "device")), s["repeats"])
        out["h2d_pinned_GB_per_s"] = host.nbytes / sec / 1e9
        sec = timeit(lambda: jax.device_put(on_dev, _memory(dev, "pinned_host")), s["repeats"])
        out["d2h_pinned_GB_per_s"] = host.nbytes / sec / 1e9
    else:
        out["pinned_host"] = f"not offered by this device (memory kinds: {sorted(kinds)})"

    def to_numpy():
        x = on_dev + 0  # a fresh device array: np.asarray caches its host copy
        x.block_until_ready()
        t0 = time.perf_counter()
        np.asarray(x)
        return time.perf_counter() - t0

    to_numpy()
    out["d2h_numpy_GB_per_s"] = host.nbytes / statistics.median(to_numpy() for _ in range(s["repeats"])) / 1e9
    ctx["h2d_Bps"] = 1e9 * max(out.get("h2d_pinned_GB_per_s", 0), out["h2d_pageable_GB_per_s"])
    return out


def check_attention(s, ctx):
    b, t, n, k, h = s["attn"]
    q = jax.random.normal(jax.random.key(3), (b, t, n, h), jnp.bfloat16)
    kv = [jax.random.normal(jax.random.key(i), (b, t, k, h), jnp.bfloat16) for i in (4, 5)]
    fwd_flops = 2 * b * n * t * t * h  # 4 B N T^2 H for QK^T and PV, halved by causality
    impls = ["cudnn", "xla"] if jax.default_backend() == "gpu" else ["xla"]
    out: dict[str, Any] = {"shape_BTNKH": [b, t, n, k, h]}
    for impl in impls:
        def attn(q, k_, v, impl=impl):
            return jax.nn.dot_product_attention(q, k_, v, is_causal=True, implementation=impl)

        fwd = jax.jit(attn)
        grad = jax.jit(jax.grad(lambda q, k_, v: jnp.sum(attn(q, k_, v).astype(jnp.float32)), argnums=(0, 1, 2)))
        try:
            out[f"{impl}_fwd_TFLOP_per_s"] = fwd_flops / timeit(lambda: fwd(q, *kv), s["repeats"]) / 1e12
            out[f"{impl}_fwd_bwd_TFLOP_per_s"] = 3.5 * fwd_flops / timeit(lambda: grad(q, *kv), s["repeats"]) / 1e12
        except Exception as e:  # noqa: BLE001 - cuDNN may refuse a shape; keep the other numbers
            out[f"{impl}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    from ftjax.model import attention_implementation

    out["ftjax_bf16_implementation"] = attention_implementation(jnp.bfloat16)
    return out


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def check_disk(s, ctx):
    total, block = s["disk_bytes"], min(s["disk_bytes"], 64 << 20)
    buf = np.random.default_rng(1).integers(0, 255, block, np.uint8).tobytes()
    path = Path(ctx["dir"]) / "ftjax_disk_check.bin"
    try:
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(total // block):
                f.write(buf)
            f.flush()
            os.fsync(f.fileno())
        write = time.perf_counter() - t0
        _drop_cache(path)
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(block):
                pass
        read = time.perf_counter() - t0
    finally:
        path.unlink(missing_ok=True)
    ctx["disk_read_Bps"] = total / read
    return {"bytes": total, "write_GB_per_s": total / write / 1e9, "read_GB_per_s": total / read / 1e9,
            "note": "read after posix_fadvise(DONTNEED); a cache that ignores it makes this a page-cache figure"}


def _random_tree(shape: dict, seed: int) -> dict:
    """A bf16 param tree in HF names of the given Llama shape, random on device (one jit, no host traffic)."""
    from ftjax.config import ModelConfig
    from ftjax.model import param_shapes
    from ftjax.params import nest

    shapes = param_shapes(ModelConfig.from_hf(hf_config(shape)))

    @jax.jit
    def make(key):
        keys = jax.random.split(key, len(shapes))
        return {n: (0.02 * jax.random.normal(k, s, jnp.float32)).astype(jnp.bfloat16)
                for k, (n, s) in zip(keys, shapes.items())}

    return nest(make(jax.random.key(seed)))


def check_transfer(s, ctx):
    from ftjax import treeops
    from ftjax.transfer import transfer_params

    t, f, b = (_random_tree(s["transfer_model"], i) for i in range(3))
    elements = sum(x.size for x in jax.tree.leaves(t))
    # The kernel: the exact single-rounding t + a(f - b) of ftjax.treeops over the whole tree, compiled once.
    kernel = jax.jit(lambda t, f, b: treeops.tree_transfer(t, f, b, 1.0))
    sec = timeit(lambda: kernel(t, f, b), s["repeats"])
    bw = 4 * 2 * elements / sec
    out = {"params": elements, "kernel_seconds": sec, "kernel_TB_per_s": bw / 1e12}
    if "hbm_Bps" in ctx:
        out["fraction_of_hbm"] = bw / ctx["hbm_Bps"]
        out["target_met"] = out["fraction_of_hbm"] >= 0.8
    # The public API per call (policies, name matching, dispatch; it builds its jitted function per call, so this
    # includes whatever tracing/compilation it does on a repeat call).
    sec = timeit(lambda: transfer_params(t, f, b, alpha=1.0), max(1, s["repeats"] // 2))
    out.update(api_seconds=sec, api_TB_per_s=4 * 2 * elements / sec / 1e12)
    same = jax.tree.map(lambda x, y: jnp.array_equal(x, y), kernel(t, f, b), transfer_params(t, f, b, alpha=1.0))
    out["api_equals_kernel"] = bool(all(jax.tree.leaves(same)))
    return out


def check_load(s, ctx):
    from ftjax.io.checkpoint import HFCheckpointWriter
    from ftjax.io.safetensors import TensorInfo
    from ftjax.params import flatten, load_params

    import ml_dtypes

    config = hf_config(s["load_model"])
    tree = flatten(_random_tree(s["load_model"], 7))
    path = Path(tempfile.mkdtemp(prefix="ftjax_load_check_", dir=ctx["dir"]))
    try:
        infos = [TensorInfo(n, np.dtype(ml_dtypes.bfloat16), tuple(x.shape)) for n, x in tree.items()]
        with HFCheckpointWriter(path, infos, max_shard_bytes=1 * GIB) as writer:
            for n, x in tree.items():
                writer.write(n, np.asarray(x))
        (path / "config.json").write_text(json.dumps(config))
        del tree
        files = sorted(path.glob("*.safetensors"))
        nbytes = sum(p.stat().st_size for p in files)
        times = []
        for _ in range(max(2, s["repeats"] // 2)):
            for p in files:
                _drop_cache(p)
            t0 = time.perf_counter()
            _, params = load_params(path)
            jax.block_until_ready(params)
            times.append(time.perf_counter() - t0)
            del params
        sec = statistics.median(times)
        out = {"bytes": nbytes, "seconds": sec, "GB_per_s": nbytes / sec / 1e9}
        if "disk_read_Bps" in ctx and "h2d_Bps" in ctx:
            bound = max(nbytes / ctx["disk_read_Bps"], nbytes / ctx["h2d_Bps"])
            out["ratio_to_bound"] = sec / bound
            out["target_met"] = out["ratio_to_bound"] <= 1.3
        return out
    finally:
        for p in path.iterdir():
            p.unlink()
        path.rmdir()


def _mfu(flops: float, sec: float, ctx) -> dict:
    out = {"TFLOP_per_s": flops / sec / 1e12}
    if ctx["peak"]:
        out["MFU"] = flops / sec / (ctx["peak"] * 1e12)
    return out


def _tokens(s, vocab: int):
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.integers(0, vocab, (s["batch"], s["seq"])), jnp.int32)


def check_scan_forward(s, ctx):
    from ftjax import lmc
    from ftjax.config import ModelConfig

    shape = s["model"]
    cfg = ModelConfig.from_hf(hf_config(shape, s["seq"]))
    a, b = _random_tree(shape, 11), _random_tree(shape, 12)
    tokens = _tokens(s, shape["vocab_size"])
    mask, weights = jnp.ones_like(tokens), jnp.ones(tokens.shape, jnp.float32)
    coefs = np.asarray([0.5], np.float32)
    sec = timeit(lambda: lmc.point_row_stats(coefs, (a, b), tokens, mask, weights, path="lerp", cfg=cfg,
                                              dtype="bfloat16"), s["repeats"])
    per_token = 2 * matmul_params(shape) + 4 * shape["num_hidden_layers"] * s["seq"] * shape["hidden_size"]
    n_tokens = s["batch"] * s["seq"]
    return {"batch": s["batch"], "seq": s["seq"], "seconds": sec, "tokens_per_s": n_tokens / sec,
            **_mfu(per_token * n_tokens, sec, ctx), "target": 0.45}


def check_train_step(s, ctx):
    import functools

    from ftjax.config import ModelConfig
    from ftjax.train import TrainConfig, make_optimizer, train_step

    shape = s["model"]
    cfg = ModelConfig.from_hf(hf_config(shape, s["seq"]))
    out: dict[str, Any] = {"batch": s["batch"], "seq": s["seq"], "target": 0.40}
    for remat in s["remat"]:
        tcfg = TrainConfig(steps=1000, lr=1e-5, batch_size=s["batch"], max_len=s["seq"], dtype="bfloat16",
                           remat=remat, warmup=0)
        opt = make_optimizer(tcfg)
        params = jax.tree.map(lambda x: x.astype(jnp.float32), _random_tree(shape, 13))
        state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32),
                 "rng": jax.random.key_data(jax.random.key(0))}
        tokens = _tokens(s, shape["vocab_size"])[None]
        ones = jnp.ones_like(tokens)
        batch = (tokens, ones, jnp.broadcast_to(jnp.arange(s["seq"], dtype=jnp.int32), tokens.shape),
                 ones.astype(jnp.float32))
        step = jax.jit(functools.partial(train_step, cfg=cfg, step_cfg=tcfg.step_config, optimizer=opt),
                       donate_argnums=0)
        box = {"state": state}

        def run():
            box["state"], metrics = step(box["state"], batch, jnp.float32(tcfg.lr))
            return metrics

        try:
            sec = timeit(run, s["repeats"])
        except Exception as e:  # noqa: BLE001 - out of memory without remat: try with remat
            out[f"remat_{remat}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        finally:
            del state, params
        per_token = 6 * matmul_params(shape) + 12 * shape["num_hidden_layers"] * s["seq"] * shape["hidden_size"]
        n_tokens = s["batch"] * s["seq"]
        out[f"remat_{remat}"] = {"seconds": sec, "tokens_per_s": n_tokens / sec, **_mfu(per_token * n_tokens, sec, ctx)}
        box.clear()
    return out


CHECKS = {"hbm": check_hbm, "matmul": check_matmul, "copies": check_copies, "attention": check_attention,
          "disk": check_disk, "transfer": check_transfer, "load": check_load, "scan_forward": check_scan_forward,
          "train_step": check_train_step}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU): check that every path runs")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), help="run these checks only")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default $OUT/device_check.json or ./)")
    p.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: tempdir)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU")
    args = p.parse_args(argv)
    s = sizes(args.smoke)
    backend = jax.default_backend()
    peak = args.peak_tflops or (989.0 if backend == "gpu" else None)
    ctx: dict[str, Any] = {"dir": args.dir or tempfile.gettempdir(), "peak": peak}
    dev = jax.local_devices()[0]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": getattr(dev, "device_kind", str(dev)), "backend": backend, "jax": jax.__version__,
            "python": platform.python_version(), "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "smoke": args.smoke, "peak_tflops": peak}
    results: dict[str, Any] = {"meta": meta}
    out_path = args.out or Path(os.environ.get("OUT", ".")) / "device_check.json"
    print(f"# device_check on {meta['device']} ({backend}), jax {jax.__version__}", flush=True)
    for name in args.only or CHECKS:
        t0 = time.perf_counter()
        try:
            results[name] = CHECKS[name](s, ctx)
        except Exception as e:  # noqa: BLE001 - record and go on: one run must give every figure it can
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                             "traceback": traceback.format_exc()[-2000:]}
        results[name]["check_seconds"] = time.perf_counter() - t0
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'traceback'}, default=str)}",
              flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1, default=str) + "\n")  # after each check: a kill keeps it
    print(f"wrote {out_path}")
    return 1 if any("error" in v for k, v in results.items() if k != "meta") else 0


if __name__ == "__main__":
    sys.exit(main())
