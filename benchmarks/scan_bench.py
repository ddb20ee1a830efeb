"""Forward throughput and model FLOPs utilisation of an interpolation scan on a Llama-shaped model.

    python benchmarks/scan_bench.py                       # CPU: tiny model, compared with transformers' forward
    python benchmarks/scan_bench.py --shape 1b --dtype bfloat16 --seq-len 2048 --batch 8   # GPU (H200: MFU)

The scan evaluates (1-λ)·A + λ·B at `--points` values of λ through `ftjax.lmc.scan` (one jitted function, λ
traced), after a warm-up scan that compiles it. FLOPs per token follow the PaLM convention for a forward pass:
2 · (matmul parameters, lm_head included, embedding lookup excluded) + 4 · layers · seq_len · (heads · head_dim)
(attention scores and values, no causal halving); the λ-interpolation's elementwise work is not counted.
MFU = achieved FLOPs/s / peak (`--peak-tflops`, default from the device kind: H200/H100 bf16 dense 989.4).
The CPU comparison runs transformers' PyTorch forward on the same weights and tokens (one timed run after a
warm-up) and reports the tokens/s ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4),
    # Llama-3.2-1B's shape.
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def hf_config(shape: str, seq_len: int) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": max(seq_len, 2048), "hidden_act": "silu", "tie_word_embeddings": False,
            **SHAPES[shape]}


def flops_per_token(cfg, seq_len: int) -> float:
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    matmul = L * (d * q + 2 * d * kv + q * d + 3 * d * f) + cfg.vocab_size * d
    return 2.0 * matmul + 4.0 * L * seq_len * q


def torch_tokens_per_s(config: dict, state: dict, tokens, batch: int, repeats: int) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})).eval()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=False)
    x = torch.from_numpy(tokens).long()
    best = float("inf")
    with torch.no_grad():
        model(x[:batch])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            for row in range(0, len(x), batch):
                model(x[row:row + batch]).logits.float()
            best = min(best, time.perf_counter() - start)
    return x.numel() / best


def flatten_torch_names(config: dict) -> list[str]:
    """Parameter names of transformers' LlamaForCausalLM for this config (tied lm_head left out)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if config.get("tie_word_embeddings") else
                                                                   ["lm_head.weight"])
    for i in range(config["num_hidden_layers"]):
        names += [f"model.layers.{i}.{m}.weight" for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sequences", type=int, default=16, help="sequences per λ point")
    ap.add_argument("--points", type=int, default=4, help="λ points in the timed scan")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by device kind)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions; the fastest counts (shared CPUs)")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers comparison")
    args = ap.parse_args()

    import jax
    import numpy as np

    from ftjax import lmc
    from ftjax.config import ModelConfig
    from ftjax.data import examples_from_rows
    from ftjax.model import init_params
    from ftjax.params import flatten

    config = hf_config(args.shape, args.seq_len)
    cfg = ModelConfig.from_hf(config)
    a = init_params(cfg, jax.random.key(0), args.dtype)
    b = init_params(cfg, jax.random.key(1), args.dtype)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.sequences, args.seq_len)).astype(np.int32)
    examples = examples_from_rows([{"input_ids": row.tolist()} for row in tokens])
    kw = dict(batch_size=args.batch, max_len=args.seq_len, dtype=args.dtype)

    lmc.scan(a, b, cfg, examples[:args.batch], [0.0, 1.0], **kw)  # compile
    lambdas = list(np.linspace(0, 1, args.points))
    seconds = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = lmc.scan(a, b, cfg, examples, lambdas, **kw)
        seconds = min(seconds, time.perf_counter() - start)
    tps = result["forward_tokens"] / seconds

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    achieved = tps * flops_per_token(cfg, args.seq_len)
    n_params = sum(x.size for x in jax.tree.leaves(a))
    rows = [("device", f"{kind} ({device.platform}, {jax.device_count()} device(s))"),
            ("model", f"llama {args.shape}: {n_params / 1e6:.1f}M params, {args.dtype}"),
            ("scan", f"best of {args.repeats}: {args.points} λ points × {args.sequences} seqs × {args.seq_len} "
                     f"tokens, batch {args.batch}"),
            ("ftjax scan tokens/s", f"{tps:,.0f}"),
            ("model TFLOP/s", f"{achieved / 1e12:.3f}"),
            ("MFU", f"{100 * achieved / (peak * 1e12):.1f}% of {peak} TFLOP/s" if peak else "n/a (unknown peak)")]
    if not args.no_torch and device.platform == "cpu":
        state = {k: np.asarray(jax.device_get(v), np.float32) for k, v in flatten(a).items()}
        missing = set(state) ^ set(flatten_torch_names(config))
        assert not missing, f"weights do not line up with transformers: {sorted(missing)[:4]}"
        ref = torch_tokens_per_s(config, state, tokens, args.batch, args.repeats)
        rows += [("transformers forward tokens/s", f"{ref:,.0f}"), ("ratio ftjax / transformers", f"{tps / ref:.2f}")]
    print("| quantity | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
