"""Benchmark: one `ftjax fit-alpha` adam step on alpha against one full fine-tuning step (AdamW on every weight) of
the same model, batch and sequence length (issue 18's Speed section).

    python benchmarks/fit_alpha_bench.py                                  # CPU: tiny Llama, batch 4 x seq 256
    python benchmarks/fit_alpha_bench.py --preset 1b --batch 1 --seq 2048  # GPU (device script)
    python benchmarks/fit_alpha_bench.py --mesh fsdp=8 --remat --no-train  # the fit sharded as `fit-alpha --mesh`

The fit step is `ftjax.fit_alpha`'s own jitted step (`_step`): theta(alpha) = T + sum_g alpha_g * Delta_g in float32,
the objective's value and gradient in alpha, adam on alpha, clip. T and Delta are random (`init_params`, seeds 0 and
1, Delta scaled by 1e-2): speed does not depend on the values. Printed per step kind: the first call (compile +
one step, s), the median of `--steps` steps after it (s), tokens/s, the number of compilations of the jitted step
after every call (`_cache_size`; 1 means one compile for the whole fit), and peak memory: the device's
peak_bytes_in_use where the backend reports it, else the process's peak RSS (which includes both benchmarks, so on
CPU only the fit's row, run first, is its own). The train step is `benchmarks/train_bench.py`'s (float32 compute
unless --dtype). Not run in CI.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_bench import PRESETS, bench_ftjax, hf_config  # noqa: E402


def peak_memory_mb() -> float:
    """Peak memory in MB: the first device's peak_bytes_in_use when reported, else this process's peak RSS."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_fit(c: dict, args) -> dict:
    """Time `fit_alpha`'s jitted step on a random target and diff: first call, median step, compiles, peak memory."""
    import jax
    import jax.numpy as jnp

    from ftjax import fit_alpha as F
    from ftjax.config import ModelConfig
    from ftjax.model import init_params
    from ftjax.params import make_mesh

    mesh = make_mesh(args.mesh) if args.mesh else None
    cfg = ModelConfig.from_hf(c)
    target = init_params(cfg, jax.random.key(0), jnp.float32)
    delta = jax.tree.map(lambda x: 1e-2 * x, init_params(cfg, jax.random.key(1), jnp.float32))
    problem = F.place(F.prepare(target, [delta], cfg, groups=args.groups), mesh)
    del target, delta
    step, opt = F._step(F._static(problem), args.objective, 0.05, -0.5, 2.0, mesh, args.remat)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, c["vocab_size"], (args.batch, args.seq), dtype=np.int32)
    positions = np.broadcast_to(np.arange(args.seq), tokens.shape).astype(np.int32)
    batch = tuple(jax.device_put(a, F.batch_sharding(mesh, args.batch))
                  for a in (tokens, np.ones_like(tokens), positions, np.ones(tokens.shape, np.float32)))
    alpha = jnp.ones(problem.shape, jnp.float32)
    opt_state = opt.init(alpha)
    alpha, opt_state = jax.device_put((alpha, opt_state), F.replicated(mesh))  # as `fit_alpha` places them
    times, compiles = [], []
    for _ in range(1 + args.steps):
        t0 = time.perf_counter()
        alpha, opt_state, loss = step(alpha, opt_state, problem.target, problem.deltas, problem.extras, batch)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
        compiles.append(step._cache_size())
    return {"first": times[0], "step": statistics.median(times[1:]), "compiles": max(compiles),
            "alphas": int(np.prod(problem.shape)), "peak_mb": peak_memory_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--groups", choices=["layer", "layer-module", "tensor"], default="layer")
    ap.add_argument("--objective", choices=["loss", "entropy"], default="loss")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first (compiling) one")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="train step compute dtype")
    ap.add_argument("--remat", action="store_true", help="remat in the fit step and the train step")
    ap.add_argument("--mesh", default=None, metavar="SPEC",
                    help="shard the fit step as `fit-alpha --mesh`, e.g. fsdp=8 (the train step stays on one device)")
    ap.add_argument("--no-train", action="store_true", help="skip the full fine-tuning step")
    args = ap.parse_args()
    args.warmup = 1

    import jax

    c = hf_config(args.preset, args.seq)
    tokens = args.batch * args.seq
    fit = bench_fit(c, args)
    print(f"\npreset {args.preset}, batch {args.batch} x seq {args.seq}, device {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}, groups {args.groups} ({fit['alphas']} alphas), objective {args.objective}\n")
    print("| step | first call (s) | step (s) | tokens/s | compiles | peak memory MB |")
    print("|---|---|---|---|---|---|")
    fit_kind = ", ".join(["float32"] + (["remat"] if args.remat else []) + ([f"mesh {args.mesh}"] if args.mesh else []))
    print(f"| fit-alpha ({fit_kind}) | {fit['first']:.3f} | {fit['step']:.4f} | {tokens / fit['step']:,.0f} | "
          f"{fit['compiles']} | {fit['peak_mb']:,.0f} |")
    if not args.no_train:
        t = bench_ftjax(c, args)
        print(f"| full fine-tuning ({args.dtype}{', remat' if args.remat else ''}) | – | {t:.4f} | "
              f"{tokens / t:,.0f} | – | {peak_memory_mb():,.0f} |")
        print(f"\nfit-alpha step / fine-tuning step: {fit['step'] / t:.2f}")


if __name__ == "__main__":
    main()
