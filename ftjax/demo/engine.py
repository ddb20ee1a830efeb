"""The demo's in-memory training and scoring, built from ftjax.train's public pieces.

`ftjax.train.finetune` goes through a JSONL file, Orbax checkpoints and an HF export per run; the study runs dozens
of short runs on models of about 10^4–10^5 parameters, where that I/O would dominate. So here the same `train_step`
(optimizer from `make_optimizer`, learning rates from `lr_at`, loss from `loss_sums`) runs K steps per
call inside one `lax.scan`, on parameters that stay in memory. One compilation serves every run with the same
TrainConfig.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.config import ModelConfig
from ftjax.data import Example, batches
from ftjax.evaluate import row_stats
from ftjax.rows import Rows, step_batch
from ftjax.train import StepConfig, TrainConfig, lr_at, make_optimizer, train_step

from ftjax.demo.world import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE


def hf_config(width: int = 96, layers: int = 3, heads: int = 4, ffn: int = 256, max_len: int = 128) -> dict:
    """config.json of a tiny Llama (untied head, full multi-head attention, float32 weights)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB_SIZE,
            "hidden_size": width, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": width // heads,
            "max_position_embeddings": max_len, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
            "initializer_range": 0.02, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
            "torch_dtype": "float32"}


def init_state(params: Any, tcfg: TrainConfig) -> dict:
    """A fresh train state (float32 params, new AdamW moments, step 0) as `ftjax.train.train_step` expects."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return {"params": params, "opt_state": make_optimizer(tcfg).init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(tcfg.seed))}


@functools.lru_cache(maxsize=8)
def _steps_fn(cfg: ModelConfig, step_cfg: StepConfig) -> Callable:
    optimizer = make_optimizer(step_cfg)

    def run(state, batch_k, lr_k):
        return jax.lax.scan(lambda s, b: train_step(s, b[0], b[1], cfg=cfg, step_cfg=step_cfg, optimizer=optimizer),
                            state, (batch_k, lr_k))

    return jax.jit(run, donate_argnums=0)


def run_steps(state: dict, rows: Rows, cfg: ModelConfig, tcfg: TrainConfig, n: int,
              data_seed: int | None = None) -> tuple[dict, np.ndarray]:
    """Advance `state` by n optimizer steps (data order: ftjax.train's seeded per-epoch permutation, continuing at
    state["step"], seeded by `data_seed` if given, else tcfg.seed; the seed is not part of the compiled step, so
    runs that differ only in data order share one compilation). Returns the new state and the n training losses."""
    start = int(state["step"])
    order = tcfg if data_seed is None else dataclasses.replace(tcfg, seed=data_seed)
    per_step = [step_batch(rows, s, order.batch_size, order.grad_accum, order.seed) for s in range(start, start + n)]
    batch_k = tuple(np.stack([b[i] for b in per_step]) for i in range(4))
    lr_k = np.asarray(lr_at(tcfg, np.arange(start + 1, start + n + 1)), np.float32)
    state, metrics = _steps_fn(cfg, tcfg.step_config)(state, batch_k, lr_k)
    return state, np.asarray(metrics["loss"])


# ---------------------------------------------------------------------------------------------------------- scoring
@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Examples laid out as a few fixed-shape device batches (length buckets: short documents are not padded to
    the longest), so teacher-forced scoring is a handful of forward passes with one compilation per bucket."""

    name: str
    examples: tuple[Example, ...]
    batches: tuple[tuple[tuple[jax.Array, jax.Array, jax.Array], np.ndarray], ...]  # ((tokens, mask, weights), index)


def eval_set(name: str, examples: Sequence[Example], max_len: int, batch_size: int = 64) -> EvalSet:
    out = []
    for b in batches(list(examples), min(batch_size, len(examples)), max_len):
        out.append(((jnp.asarray(b.tokens_bt), jnp.asarray(b.mask_bt), jnp.asarray(b.weights_bt)), b.index_b))
    return EvalSet(name, tuple(examples), tuple(out))


_row_stats = jax.jit(row_stats, static_argnames=("cfg",))


def score(params: Any, cfg: ModelConfig, data: EvalSet) -> dict[str, float]:
    """{"loss": mean NLL per scored token (nats), "em": fraction of rows whose every scored token is the argmax}."""
    outs = jax.device_get([_row_stats(params, cfg, *arrays) for arrays, _ in data.batches])
    nll = count = hits = rows = 0.0
    for (n_b, c_b, g_b), (_, index) in zip(outs, data.batches):
        real = index >= 0
        nll, count = nll + float(np.sum(n_b[real], dtype=np.float64)), count + float(np.sum(c_b[real]))
        hits, rows = hits + float(np.sum(g_b[real])), rows + int(real.sum())
    return {"loss": nll / max(count, 1.0), "em": hits / max(rows, 1)}
