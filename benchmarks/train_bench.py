"""Benchmark: tokens/s and MFU of ftjax's jitted train step (AdamW, float32 master weights), optionally against a
PyTorch transformers training step on the same model, batch and sequence length.

    python benchmarks/train_bench.py                       # CPU: tiny Llama, float32, ftjax vs torch (ratio)
    python benchmarks/train_bench.py --preset 1b --dtype bfloat16 --seq 2048 --batch 8 --remat --no-torch  # H200

Timing: median wall time of `--steps` steps after `--warmup` steps (the first compiles), synchronised each step.
MFU = model FLOPs per second / peak: 6 * (non-embedding params + lm_head) per token for the matmuls, plus
12 * layers * seq * hidden per token for causal-masked-free attention (PaLM's convention; the causal half is not
subtracted). Peak: --peak-tflops, else 989 (H100/H200 dense bf16) on GPU and unknown on CPU.
Prints a markdown table row set. Not run in CI.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np

PRESETS = {
    # tiny: fast on a laptop CPU; 1b: Llama-3.2-1B shaped (tied embeddings, 128k vocab), ~1.24B params
    "tiny": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}


def hf_config(preset: str, seq: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": max(seq, 2048), "initializer_range": 0.02,
            **PRESETS[preset]}


def flops_per_token(c: dict, seq: int) -> float:
    d, f, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = d // c["num_attention_heads"]
    per_layer = d * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"]) + 3 * d * f
    matmul_params = layers * per_layer + v * d  # + lm_head (tied or not, it is a matmul)
    return 6 * matmul_params + 12 * layers * seq * d


def bench_ftjax(c: dict, args) -> float:
    import jax
    import jax.numpy as jnp

    from ftjax.config import ModelConfig
    from ftjax.model import init_params
    from ftjax.train import TrainConfig, make_optimizer, train_step

    cfg = ModelConfig.from_hf(c)
    tcfg = TrainConfig(steps=1000, lr=1e-5, batch_size=args.batch, max_len=args.seq, dtype=args.dtype,
                       remat=args.remat, warmup=0)
    opt = make_optimizer(tcfg)
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(0))}
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, c["vocab_size"], (1, args.batch, args.seq), dtype=np.int32)
    batch = tuple(jnp.asarray(a) for a in (tokens, np.ones_like(tokens), np.broadcast_to(np.arange(args.seq),
                                           tokens.shape).astype(np.int32), np.ones(tokens.shape, np.float32)))
    step = jax.jit(functools.partial(train_step, cfg=cfg, step_cfg=tcfg.step_config, optimizer=opt),
                   donate_argnums=0)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, jnp.float32(tcfg.lr))
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_torch(c: dict, args) -> float:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")})
    model = transformers.LlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, c["vocab_size"], (args.batch, args.seq)))
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="ftjax compute dtype")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch transformers comparison")
    args = ap.parse_args()

    import jax

    c = hf_config(args.preset, args.seq)
    device = jax.devices()[0]
    peak = args.peak_tflops or (989.0 if device.platform == "gpu" else None)
    tokens = args.batch * args.seq
    fpt = flops_per_token(c, args.seq)
    rows = []
    t = bench_ftjax(c, args)
    rows.append(("ftjax (jax " + jax.__version__ + f", {args.dtype}{', remat' if args.remat else ''})", t))
    if not args.no_torch:
        import torch

        rows.append((f"transformers + torch {torch.__version__} (float32, eager)", bench_torch(c, args)))
    print(f"\npreset {args.preset}, batch {args.batch} x seq {args.seq}, device {device.device_kind}, "
          f"{fpt / 1e9:.3f} GFLOP/token\n")
    print("| implementation | step time (s) | tokens/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    for name, t in rows:
        tflops = fpt * tokens / t / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        print(f"| {name} | {t:.4f} | {tokens / t:,.0f} | {tflops:.3f} | {mfu} |")
    if len(rows) == 2:
        print(f"\nftjax / torch tokens/s ratio: {rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
