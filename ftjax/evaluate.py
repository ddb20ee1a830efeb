"""Token-level evaluation: weighted next-token NLL (nats), perplexity, token counts, throughput."""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from ftjax.config import ModelConfig
from ftjax.data import Example, batches, truncate
from ftjax.model import forward


def token_nll(params: Any, cfg: ModelConfig, tokens_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """NLL (nats, float32) of predicting tokens_bt[:, t] from tokens_bt[:, :t]; shape [B, T] with column 0 = 0."""
    logits_btv = forward(params, tokens_bt, cfg, attention_mask_bt=mask_bt)
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    nll_bt = -jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(nll_bt, ((0, 0), (1, 0)))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _batch_sums(params, cfg, tokens_bt, mask_bt, weights_bt):
    nll_bt = token_nll(params, cfg, tokens_bt, mask_bt)
    return jnp.sum(nll_bt * weights_bt), jnp.sum(weights_bt)


def cast_params(params: Any, dtype: Any) -> Any:
    """Cast floating leaves to the compute dtype (None: leave as they are)."""
    if dtype is None:
        return params
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def evaluate_loss(
    params: Any,
    cfg: ModelConfig,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_len: int | None = None,
    dtype: Any = None,
) -> dict[str, float]:
    """Token-weighted mean NLL over all examples.

    Returns {"loss": mean NLL in nats, "ppl": exp(loss), "tokens": number of scored tokens,
    "tokens_per_s": forward tokens (padding included) per second}. The result does not depend on batch
    size or padding: padded positions carry zero weight and causal attention never sees them.
    """
    max_len = max_len or cfg.max_position_embeddings
    examples = truncate(examples, max_len)
    params = cast_params(params, dtype)
    sums, seen = [], 0
    start = time.perf_counter()
    for batch in batches(examples, batch_size, max_len):
        sums.append(_batch_sums(params, cfg, batch.tokens_bt, batch.mask_bt, batch.weights_bt))
        seen += batch.tokens_bt.size
    # Per-batch sums are added on the host in float64 so the result does not depend on the batching.
    total = math.fsum(float(s) for s, _ in sums)
    count = math.fsum(float(c) for _, c in sums)
    seconds = time.perf_counter() - start
    loss = total / count if count else math.nan
    return {"loss": loss, "ppl": math.exp(loss) if count else math.nan, "tokens": int(count),
            "tokens_per_s": seen / seconds if seconds > 0 else math.nan}
