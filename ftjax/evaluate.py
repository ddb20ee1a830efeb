"""Evaluation: weighted next-token NLL (nats), perplexity, exact match and multiple-choice accuracy.

Every batch has a fixed shape (length buckets, see ftjax.data), so an evaluation compiles once per bucket. The
device returns per-row sums; the host adds them in float64, so results do not depend on batch size or padding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax import distributed
from ftjax.config import ModelConfig
from ftjax.data import CHAT, CHOICE, COMPLETION, Batch, Example, batches, truncate
from ftjax.dtypes import is_float
from ftjax.errors import FtjaxError
from ftjax.model import forward

# (tokens_bt, mask_bt, weights_bt) -> (nll_b, count_b, greedy_b): per-row sums for one fixed-shape batch.
BatchFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Negative log-likelihood (nats, float32 [B, T]) of each target token under its logits (float32 [B, T, V])."""
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_btv, axis=-1) - target_logit_bt


def row_stats(params: Any, cfg: ModelConfig, tokens_bt: jax.Array, mask_bt: jax.Array,
              weights_bt: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-row weighted NLL sum (nats, f32 [B]), weight sum (f32 [B]) and all-weighted-tokens-greedy (bool [B]).

    weights_bt[:, t] weighs predicting tokens_bt[:, t] from tokens_bt[:, :t]; column 0 is never scored.
    """
    logits_btv = forward(params, tokens_bt, cfg, attention_mask_bt=mask_bt)[:, :-1].astype(jnp.float32)
    targets_bt = tokens_bt[:, 1:]
    nll_bt = token_nll(logits_btv, targets_bt)
    w_bt = weights_bt[:, 1:]
    scored_bt = w_bt > 0
    # where(), not a product: a fully padded row may hold NaN logits, and NaN * 0 is NaN.
    nll_b = jnp.sum(jnp.where(scored_bt, nll_bt * w_bt, 0.0), axis=1)
    greedy_b = jnp.all(~scored_bt | (jnp.argmax(logits_btv, axis=-1) == targets_bt), axis=1)
    return nll_b, jnp.sum(w_bt, axis=1), greedy_b


@functools.partial(jax.jit, static_argnames=("cfg",))
def _row_stats_jit(params, cfg, tokens_bt, mask_bt, weights_bt):
    return row_stats(params, cfg, tokens_bt, mask_bt, weights_bt)


def cast_params(params: Any, dtype: Any) -> Any:
    """Cast floating leaves to the compute dtype (None: leave as they are)."""
    if dtype is None:
        return params
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if is_float(x.dtype) else x, params)


@dataclasses.dataclass(frozen=True)
class RowStats:
    """Per-example results, aligned with the examples list (float64 / bool numpy arrays)."""

    nll: np.ndarray  # summed weighted NLL of each example, nats
    count: np.ndarray  # summed weights (scored tokens)
    greedy: np.ndarray  # every scored token is the argmax


def device_batches(examples: Sequence[Example], batch_size: int, max_len: int,
                   mesh: Mesh | None = None) -> list[tuple[Batch, tuple[jax.Array, ...]]]:
    """The fixed-shape batches, already on device (batch axis over the mesh's `data` axis when it divides).

    Multi-process: every process builds the same batches and copies only its own devices' slices."""
    sharding = None
    if mesh is not None:
        n = mesh.shape.get("data", 1)
        sharding = NamedSharding(mesh, PartitionSpec("data" if n > 1 and batch_size % n == 0 else None))
    out = []
    for b in batches(examples, batch_size, max_len):
        arrays = (b.tokens_bt, b.mask_bt, b.weights_bt)
        out.append((b, tuple(distributed.put_global(a, sharding) if sharding else jnp.asarray(a) for a in arrays)))
    return out


def run_batches(fn: BatchFn, prepared: Sequence[tuple[Batch, tuple[jax.Array, ...]]], n: int) -> RowStats:
    """Apply a per-batch function to every prepared batch; scatter row results back to example order."""
    outputs = [fn(*arrays) for _, arrays in prepared]  # dispatched asynchronously, fetched once below
    nll, count, greedy = np.zeros(n), np.zeros(n), np.zeros(n, bool)
    for (batch, _), out in zip(prepared, distributed.to_host(outputs)):
        real = batch.index_b >= 0
        idx = batch.index_b[real]
        nll[idx] = np.asarray(out[0], np.float64)[real]
        count[idx] = np.asarray(out[1], np.float64)[real]
        greedy[idx] = np.asarray(out[2])[real]
    return RowStats(nll, count, greedy)


def drop_cut_rows(examples: Sequence[Example], max_len: int) -> tuple[list[Example], list[str]]:
    """(examples to score, rows skipped as `path:line`): a row is skipped when truncation to max_len tokens would cut
    what it scores (a completion or any choice of more than max_len - 1 tokens: its scored end would lose its start,
    and exact match or the choice comparison would judge a part; a chat row with every assistant token beyond
    max_len). A multiple-choice row goes whole. Warns on stderr with the count and the first rows."""
    def cut_off(e: Example) -> bool:
        if e.kind in (COMPLETION, CHOICE):
            return int(np.count_nonzero(e.weights_t)) > max_len - 1
        return e.kind == CHAT and not np.any(e.weights_t[:max_len])

    cut_rows = {e.row for e in examples if cut_off(e)}
    kept = [e for e in examples if e.row not in cut_rows]
    skipped = list(dict.fromkeys(e.where or f"row {e.row + 1}" for e in examples if e.row in cut_rows))
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        print(f"ftjax: warning: skipped {len(skipped)} row(s) whose completion, choices or assistant turns "
              f"--max-len {max_len} cuts off (not scored): {', '.join(skipped[:3])}{more}", file=sys.stderr)
    if not kept:
        raise FtjaxError(f"--max-len {max_len} cuts off what every row scores ({', '.join(skipped[:3])}"
                         f"{', ...' if len(skipped) > 3 else ''}); raise --max-len")
    return kept, skipped


def summarize(examples: Sequence[Example], stats: RowStats) -> dict[str, Any]:
    """Aggregate per-example stats into metrics.

    loss: token-weighted mean NLL (nats) over LM rows, completion tokens and the correct choice of each
    multiple-choice row; ppl = exp(loss); tokens: scored tokens. exact_match (completion rows): fraction whose
    every completion token is greedy. acc / acc_norm (multiple choice): argmax of the summed log-likelihood, and of
    log-likelihood / character length of the choice, equal to the answer (lm-evaluation-harness). Rows each metric
    covers: loss_rows (rows with a scored token), completion_rows (exact_match), choice_rows (acc, acc_norm).
    """
    in_loss = [i for i, e in enumerate(examples) if e.kind != CHOICE or e.choice == e.answer]
    total = math.fsum(stats.nll[i] for i in in_loss)
    count = math.fsum(stats.count[i] for i in in_loss)
    loss = total / count if count else math.nan
    out: dict[str, Any] = {"loss": loss, "ppl": math.exp(loss) if count else math.nan, "tokens": int(round(count)),
                           "loss_rows": len({examples[i].row for i in in_loss if stats.count[i] > 0})}
    completions = [i for i, e in enumerate(examples) if e.kind == COMPLETION]
    if completions:
        out["exact_match"] = float(np.mean(stats.greedy[completions]))
        out["completion_rows"] = len(completions)
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        if e.kind == CHOICE:
            groups.setdefault(e.row, []).append(i)
    if groups:
        acc, acc_norm = [], []
        for idx in groups.values():
            ll = -stats.nll[idx]
            chars = np.array([max(examples[i].chars, 1) for i in idx], np.float64)
            answer = examples[idx[0]].answer
            acc.append(examples[idx[int(np.argmax(ll))]].choice == answer)
            acc_norm.append(examples[idx[int(np.argmax(ll / chars))]].choice == answer)
        out["acc"], out["acc_norm"], out["choice_rows"] = float(np.mean(acc)), float(np.mean(acc_norm)), len(groups)
    return out


def evaluate_loss(
    params: Any,
    cfg: ModelConfig,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_len: int | None = None,
    dtype: Any = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Evaluate a model on examples: the metrics of `summarize` plus "tokens_per_s" (forward tokens, padding
    included, per second of wall time, compilation included), "compiles" (distinct batch shapes) and "cut_rows"
    (rows skipped because max_len cuts off what they score, `drop_cut_rows`).

    dtype: compute dtype (None: the params' own). The result does not depend on batch size or padding: padded
    positions carry zero weight and causal attention never lets a real token see them.
    """
    max_len = max_len or cfg.max_position_embeddings or max(len(e.tokens_t) for e in examples) or 4096
    examples, cut_rows = drop_cut_rows(examples, max_len)
    examples = truncate(examples, max_len)
    params = cast_params(params, dtype)
    start = time.perf_counter()
    prepared = device_batches(examples, batch_size, max_len, mesh)
    stats = run_batches(functools.partial(_row_stats_jit, params, cfg), prepared, len(examples))
    seconds = time.perf_counter() - start
    out = summarize(examples, stats)
    seen = sum(b.tokens_bt.size for b, _ in prepared)
    out["tokens_per_s"] = seen / seconds if seconds > 0 else math.nan
    out["compiles"] = len({b.tokens_bt.shape for b, _ in prepared})
    out["cut_rows"] = len(cut_rows)
    return out
