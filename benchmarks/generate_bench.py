"""Decode throughput of `ftjax.generate.generate_ids` (KV cache, jitted while-loop), against transformers' generate.

    python benchmarks/generate_bench.py                                   # CPU: tiny model, vs transformers
    python benchmarks/generate_bench.py --shape 1b --dtype bfloat16 --batch 1 32 --prompt-len 128 --new 256  # GPU

Decode tokens/s excludes the prefill: each configuration is timed generating `--new` tokens and generating 1
token from the same prompts (after a warm-up of each, which compiles), and
    decode tokens/s = batch * (new - 1) / (t(new) - t(1)).
Greedy, no EOS (every row runs the full length), prompts of different lengths (left padding), random weights.
On CPU the same weights and prompts go through transformers' `generate(do_sample=False)` (PyTorch, KV cache) for
the ratio. The 1b shape is Llama-3.2-1B's (random weights: throughput does not depend on their values).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}


def hf_config(shape: str) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 4096, "hidden_act": "silu", "eos_token_id": None,
            "bos_token_id": None, "pad_token_id": None, **SHAPES[shape]}


def prompt_ids(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts with lengths spread over [prompt_len / 2, prompt_len]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.linspace(max(1, prompt_len // 2), prompt_len, batch).astype(int)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def timed(fn, repeats: int = 1) -> float:
    fn()  # warm-up (compiles)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ftjax_decode_tps(params, cfg, prompts, new: int, repeats: int) -> float:
    import jax

    from ftjax.generate import generate_ids

    def run(n):
        out = generate_ids(params, cfg, prompts, max_new_tokens=n, batch_size=len(prompts))
        jax.block_until_ready(out)
        assert all(len(c.tokens) == n for c in out)

    t_new, t_one = timed(lambda: run(new), repeats), timed(lambda: run(1), repeats)
    return len(prompts) * (new - 1) / (t_new - t_one)


def torch_decode_tps(path: Path, prompts, new: int, repeats: int) -> float:
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t = max(map(len, prompts))
    ids, mask = np.zeros((len(prompts), t), np.int64), np.zeros((len(prompts), t), np.int64)
    for r, p in enumerate(prompts):
        ids[r, t - len(p):], mask[r, t - len(p):] = p, 1
    ids, mask = torch.tensor(ids), torch.tensor(mask)

    def run(n):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[1] == t + n

    t_new, t_one = timed(lambda: run(new), repeats), timed(lambda: run(1), repeats)
    return len(prompts) * (new - 1) / (t_new - t_one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default=None, help="default: tiny on CPU, 1b otherwise")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: float32 on CPU, bfloat16 otherwise")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: 4 on CPU, 1 32)")
    parser.add_argument("--prompt-len", type=int, default=32, help="longest prompt; others down to half of it")
    parser.add_argument("--new", type=int, default=128, help="new tokens per row")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs (best of) after the warm-up")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers comparison on CPU")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from ftjax.config import ModelConfig
    from ftjax.model import init_params

    jax.config.update("jax_default_matmul_precision", "highest")
    on_cpu = jax.default_backend() == "cpu"
    shape = args.shape or ("tiny" if on_cpu else "1b")
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    batches = args.batch or ([4] if on_cpu else [1, 32])
    compare = on_cpu and not args.no_torch
    config = hf_config(shape)
    cfg = ModelConfig.from_hf(config)
    device = jax.devices()[0].device_kind
    print(f"# generate_bench: {shape} llama ({cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
          f"vocab {cfg.vocab_size}), {dtype}, prompts {args.prompt_len // 2}..{args.prompt_len} tokens, "
          f"{args.new} new tokens, greedy, on {jax.default_backend()} ({device})")

    params = init_params(cfg, jax.random.key(0), jnp.dtype(dtype))
    path, tmp = None, tempfile.TemporaryDirectory(prefix="ftjax_gen_bench_")
    if compare:  # the same weights in a transformers model directory
        from ftjax.params import save_params

        path = Path(tmp.name) / "model"
        save_params(params, path, config=config)

    rows = []
    for batch in batches:
        prompts = prompt_ids(batch, args.prompt_len, cfg.vocab_size)
        ours = ftjax_decode_tps(params, cfg, prompts, args.new, args.repeats)
        theirs = torch_decode_tps(path, prompts, args.new, args.repeats) if compare else None
        rows.append((batch, ours, theirs))
    tmp.cleanup()

    print("\n| batch | ftjax decode tokens/s | transformers decode tokens/s | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for batch, ours, theirs in rows:
        t = f"{theirs:,.0f}" if theirs else "–"
        r = f"{ours / theirs:.1f}x" if theirs else "–"
        print(f"| {batch} | {ours:,.0f} | {t} | {r} |")
    if on_cpu:
        print(f"\n(CPU: {os.cpu_count()} cores visible; one run each after a warm-up)")


if __name__ == "__main__":
    main()
