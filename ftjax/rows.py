"""Training rows: examples laid out in fixed-length rows (optionally packed, with segment ids so attention stays
within each document) and the resumable data order (a seeded permutation per epoch, so the data position of a run
is just an integer).

A training file holds any row form of ftjax.data, chat rows {"messages": [{"role", "content"}, ...]} (Tulu 3 /
open-instruct SFT data) included: loss on the assistant turns only (`ftjax.chat.chat_token_weights`).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ftjax.config import ModelConfig
from ftjax.data import CHOICE, Example, cut, encode_file
from ftjax.errors import FtjaxError



@dataclasses.dataclass(frozen=True)
class Rows:
    """Fixed-length training rows. Segment 0 is padding; a packed row holds documents 1, 2, ... ."""

    tokens_nt: np.ndarray  # int32 [N, T]
    segments_nt: np.ndarray  # int32 [N, T]
    positions_nt: np.ndarray  # int32 [N, T], position within the own document (RoPE)
    weights_nt: np.ndarray  # float32 [N, T], loss weight of predicting tokens[:, t] (0 at each document start)


def select_examples(examples: Sequence[Example], max_len: int, *,
                    source: str = "data") -> tuple[list[Example], int, int]:
    """(examples to train on, number truncated, number skipped): multiple-choice rows keep only the correct choice,
    every example keeps its first max_len tokens (as SFT trainers do, so a long prompt can push its completion or
    every assistant turn out), examples left without a weighted token are skipped. Warns with both counts; none
    left is an error."""
    kept, skipped, n_cut = [], 0, 0
    for e in examples:
        if e.kind == CHOICE and e.choice != e.answer:
            continue
        if len(e.tokens_t) > max_len:
            n_cut += 1
            e = cut(e, max_len, keep="start")
        if float(e.weights_t.sum()) > 0:
            kept.append(e)
        else:
            skipped += 1
    if not kept:
        raise FtjaxError(f"{source}: no tokens to train on after truncation to --max-len {max_len} (every completion "
                         "or assistant turn was cut off); raise --max-len or shorten the prompts")
    if n_cut or skipped:
        print(f"ftjax: warning: {source}: {n_cut} example(s) truncated to {max_len} tokens, {skipped} skipped with no "
              "trained tokens left (completion or assistant turns cut off)", file=sys.stderr)
    return kept, n_cut, skipped


def training_examples(examples: Sequence[Example], max_len: int, *, source: str = "data") -> list[Example]:
    """The examples of `select_examples` (without the counts)."""
    return select_examples(examples, max_len, source=source)[0]


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
    """Read and tokenize a JSONL file of any row form `ftjax.data` reads (chat rows with model_dir's chat template);
    ids checked against the vocabulary."""
    return encode_file(data, model_dir, vocab_size=cfg.vocab_size).examples


@dataclasses.dataclass(frozen=True)
class DataCounts:
    """What became of a training file: rows read, examples trained on, examples truncated to max_len (skipped ones
    included), and examples skipped (no trained token left after truncation, e.g. every assistant turn cut off)."""

    rows: int
    examples: int
    truncated: int
    skipped: int


def load_rows(data: str | Path, model_dir: str | Path, cfg: ModelConfig, *, max_len: int,
              pack: bool = False) -> tuple[Rows, DataCounts]:
    """Read, tokenize, truncate to max_len tokens and lay out a JSONL file as training rows (packed if `pack`)."""
    examples = load_examples(data, model_dir, cfg)
    kept, cut, skipped = select_examples(examples, max_len, source=str(data))
    counts = DataCounts(len({e.row for e in examples}), len(kept), cut, skipped)
    return make_rows(kept, max_len, pack=pack), counts


def row_indices(step: int, n_rows: int, rows_per_step: int, seed: int) -> np.ndarray:
    """Row indices of optimizer step `step` (0-based): consecutive slices of a seeded permutation per epoch."""
    g = step * rows_per_step + np.arange(rows_per_step)
    epochs, offsets = np.divmod(g, n_rows)
    out = np.empty(rows_per_step, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n_rows)
        out[epochs == epoch] = perm[offsets[epochs == epoch]]
    return out


def step_batch(rows: Rows, step: int, batch_size: int, grad_accum: int, seed: int) -> tuple[np.ndarray, ...]:
    """(tokens, segments, positions, weights), each [grad_accum, batch_size, T], for optimizer step `step`
    (0-based), drawn from the permutation that `seed` picks."""
    idx = row_indices(step, rows.tokens_nt.shape[0], batch_size * grad_accum, seed)
    shape = (grad_accum, batch_size, -1)
    return tuple(a[idx].reshape(shape) for a in (rows.tokens_nt, rows.segments_nt, rows.positions_nt,
                                                 rows.weights_nt))
