"""Training rows: examples laid out in fixed-length rows (optionally packed, with segment ids so attention stays
within each document) and the resumable data order (a seeded permutation per epoch, so the data position of a run
is just an integer)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ftjax.config import ModelConfig
from ftjax.data import CHOICE, Example, check_vocab, examples_from_rows, load_tokenizer, needs_tokenizer, read_jsonl
from ftjax.errors import FtjaxError

if TYPE_CHECKING:
    from ftjax.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class Rows:
    """Fixed-length training rows. Segment 0 is padding; a packed row holds documents 1, 2, ... ."""

    tokens_nt: np.ndarray  # int32 [N, T]
    segments_nt: np.ndarray  # int32 [N, T]
    positions_nt: np.ndarray  # int32 [N, T], position within the own document (RoPE)
    weights_nt: np.ndarray  # float32 [N, T], loss weight of predicting tokens[:, t] (0 at each document start)


def training_examples(examples: Sequence[Example], max_len: int, *, source: str = "data") -> list[Example]:
    """Examples to train on: multiple-choice rows keep only the correct choice, every example keeps its first max_len
    tokens (as SFT trainers do, so a long prompt can push its completion out), examples left without a weighted
    token are dropped with a warning; none left is an error."""
    kept, empty, cut = [], 0, 0
    for e in examples:
        if e.kind == CHOICE and e.choice != e.answer:
            continue
        if len(e.tokens_t) > max_len:
            cut += 1
            e = dataclasses.replace(e, tokens_t=e.tokens_t[:max_len], weights_t=e.weights_t[:max_len])
        if float(e.weights_t.sum()) > 0:
            kept.append(e)
        else:
            empty += 1
    if not kept:
        raise FtjaxError(f"{source}: no tokens to train on after truncation to --max-len {max_len} (every completion "
                         "was cut off); raise --max-len or shorten the prompts")
    if cut or empty:
        print(f"ftjax: warning: {source}: {cut} example(s) truncated to {max_len} tokens, {empty} dropped with no "
              "completion tokens left", file=sys.stderr)
    return kept


def make_rows(examples: Sequence[Example], max_len: int, *, pack: bool = False) -> Rows:
    """One example per row, or greedily packed in order (pack=True). Row length: max_len, or less when the data is
    shorter (the smallest power of two >= 16 that fits the longest example, or all packed tokens)."""
    lengths = [len(e.tokens_t) for e in examples]
    groups: list[list[int]] = []
    if pack:
        fill = max_len + 1
        for i, n in enumerate(lengths):
            if fill + n > max_len:
                groups.append([])
                fill = 0
            groups[-1].append(i)
            fill += n
    else:
        groups = [[i] for i in range(len(examples))]
    longest = max(sum(lengths[i] for i in g) for g in groups)
    t = 16
    while t < longest:
        t *= 2
    t = min(t, max_len)
    shape = (len(groups), t)
    rows = Rows(np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32),
                np.zeros(shape, np.float32))
    for r, group in enumerate(groups):
        at = 0
        for seg, i in enumerate(group, start=1):
            e, n = examples[i], lengths[i]
            rows.tokens_nt[r, at:at + n], rows.weights_nt[r, at:at + n] = e.tokens_t, e.weights_t
            rows.segments_nt[r, at:at + n], rows.positions_nt[r, at:at + n] = seg, np.arange(n)
            at += n
    return rows


def load_examples(data: str | Path, model_dir: str | Path, cfg: ModelConfig) -> list[Example]:
    """Read and tokenize a JSONL file (with model_dir's tokenizer.json where rows hold text); ids checked against
    the vocabulary."""
    rows = read_jsonl(data)
    tokenizer = load_tokenizer(model_dir) if needs_tokenizer(rows) else None
    examples = examples_from_rows(rows, tokenizer, source=str(data))
    check_vocab(examples, cfg.vocab_size, source=str(data))
    return examples


def load_rows(data: str | Path, model_dir: str | Path, cfg: ModelConfig, tcfg: TrainConfig) -> Rows:
    """Read, tokenize, truncate and lay out a JSONL file as training rows."""
    examples = load_examples(data, model_dir, cfg)
    return make_rows(training_examples(examples, tcfg.max_len, source=str(data)), tcfg.max_len, pack=tcfg.pack)


def row_indices(step: int, n_rows: int, rows_per_step: int, seed: int) -> np.ndarray:
    """Row indices of optimizer step `step` (0-based): consecutive slices of a seeded permutation per epoch."""
    g = step * rows_per_step + np.arange(rows_per_step)
    epochs, offsets = np.divmod(g, n_rows)
    out = np.empty(rows_per_step, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n_rows)
        out[epochs == epoch] = perm[offsets[epochs == epoch]]
    return out


def step_batch(rows: Rows, step: int, tcfg: TrainConfig) -> tuple[np.ndarray, ...]:
    """(tokens, segments, positions, weights), each [grad_accum, batch_size, T], for optimizer step `step`."""
    idx = row_indices(step, rows.tokens_nt.shape[0], tcfg.rows_per_step, tcfg.seed)
    shape = (tcfg.grad_accum, tcfg.batch_size, -1)
    return tuple(a[idx].reshape(shape) for a in (rows.tokens_nt, rows.segments_nt, rows.positions_nt,
                                                 rows.weights_nt))
