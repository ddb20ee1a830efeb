"""The embedded default: a fine-tuning transfer between tiny model versions that ftjax makes itself.

This first version builds three tiny random Llama-family checkpoints (a source base, its "fine-tuned" version
and a target base), runs the real streaming transfer on them and checks the result against the exact
reference. The miniature reproduction of the paper (trained versions, task scores, LMC) replaces it.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.config import ModelConfig
from ftjax.model import init_params
from ftjax.params import flatten, save_params

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def make_versions(out: Path, seed: int = 0) -> dict[str, Path]:
    """Write source_base, source_ft (= source_base + a small update) and target_base (= source_base + drift)."""
    cfg = ModelConfig.from_hf(TINY_LLAMA)
    k_base, k_ft, k_drift = jax.random.split(jax.random.key(seed), 3)
    base = init_params(cfg, k_base, jnp.float32)

    def perturb(params, key, scale):
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

    versions = {
        "source_base": base,
        "source_ft": perturb(base, k_ft, 2e-3),
        "target_base": perturb(base, k_drift, 1e-2),
    }
    paths = {}
    for name, params in versions.items():
        paths[name] = save_params(params, out / name, config=TINY_LLAMA, dtype=jnp.bfloat16, overwrite=True)
    return paths


def _round_f64(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round float64 to a 16-bit float once (ml_dtypes' direct cast rounds twice, via float32): round to odd at
    float32 first, which makes the second rounding exact."""
    y = x.astype(np.float32)
    inexact = (y.astype(np.float64) != x) & (y != 0)
    toward_x = np.where((y.astype(np.float64) < x) == (y > 0), 1, -1)
    bits = y.view(np.uint32).astype(np.int64)
    bits = np.where(inexact & (bits % 2 == 0), bits + toward_x, bits).astype(np.uint32)
    return bits.view(np.float32).astype(dtype)


def run_demo(out: str | Path, *, seed: int = 0, overwrite: bool = False) -> dict:
    """Make the tiny versions under `out/`, transfer the source's fine-tuning onto the target, verify, report."""
    from ftjax.io.checkpoint import HFCheckpoint
    from ftjax.transfer import transfer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = make_versions(out, seed)
    start = time.perf_counter()
    report = transfer(paths["source_base"], paths["source_ft"], paths["target_base"], out / "transferred",
                      overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    sb, sf, tb, res = (HFCheckpoint(p) for p in (*paths.values(), out / "transferred"))
    mismatched = 0
    for name in res.names():
        want = _round_f64(np.float64(tb.get(name)) + (np.float64(sf.get(name)) - np.float64(sb.get(name))),
                          res.info(name).dtype)
        uint = f"u{want.dtype.itemsize}"
        mismatched += int(np.sum(want.view(uint) != res.get(name).view(uint)))
    print(report.summary())
    print(f"demo: transferred {len(res.names())} tensors in {seconds:.2f} s; "
          f"elements differing from round_bf16(t + (ft - b)): {mismatched}")
    print(f"demo: checkpoints in {out}/ (try `ftjax inspect {out / 'transferred'}`)")
    return {"mismatched": mismatched, "out": str(out)}
