"""JSONL rows -> token sequences with loss weights -> fixed-shape batches.

Row forms (one JSON object per line):
    {"input_ids": [...]}   already tokenized; loss over every next-token prediction
    {"text": "..."}        tokenized with the model directory's tokenizer.json (its own special-token policy)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ftjax.errors import FtjaxError


@dataclasses.dataclass(frozen=True)
class Example:
    """One sequence. weights_t[i] weighs the loss of predicting tokens_t[i] from tokens_t[:i] (weights_t[0] = 0)."""

    tokens_t: np.ndarray  # int32 [T]
    weights_t: np.ndarray  # float32 [T]


@dataclasses.dataclass(frozen=True)
class Batch:
    tokens_bt: np.ndarray  # int32 [B, T], right-padded with 0
    mask_bt: np.ndarray  # int32 [B, T], 1 = real token
    weights_bt: np.ndarray  # float32 [B, T], loss weight of predicting tokens_bt[:, t]


def read_jsonl(path: str | Path) -> list[dict]:
    """Parse a JSONL file; a malformed line is an error naming its line number; an empty file is an error."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FtjaxError(f"data file {path} does not exist") from None
    except UnicodeDecodeError:
        raise FtjaxError(f"data file {path} is not UTF-8 text") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FtjaxError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise FtjaxError(f"{path}:{number}: each line must be a JSON object")
        rows.append(row)
    if not rows:
        raise FtjaxError(f"data file {path} has no rows")
    return rows


def load_tokenizer(model_dir: str | Path):
    """The `tokenizers.Tokenizer` of a model directory (its tokenizer.json)."""
    from tokenizers import Tokenizer

    file = Path(model_dir) / "tokenizer.json"
    if not file.is_file():
        raise FtjaxError(f"{model_dir} has no tokenizer.json; pass pre-tokenized rows ({{\"input_ids\": [...]}}) instead")
    return Tokenizer.from_file(str(file))


def examples_from_rows(rows: Sequence[dict], tokenizer=None, *, source: str = "data") -> list[Example]:
    """Token sequences with loss weights for every row; rows need `input_ids` or `text`."""
    out = []
    for i, row in enumerate(rows, start=1):
        if "input_ids" in row:
            ids = row["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise FtjaxError(f"{source} row {i}: input_ids must be a list of non-negative integers")
        elif "text" in row:
            if tokenizer is None:
                raise FtjaxError(f"{source} row {i}: text rows need a model directory with tokenizer.json")
            ids = tokenizer.encode(str(row["text"])).ids
        else:
            raise FtjaxError(f"{source} row {i}: expected a key 'input_ids' or 'text', got {sorted(row)}")
        tokens = np.asarray(ids, np.int32)
        weights = np.ones(len(tokens), np.float32)
        weights[:1] = 0.0
        out.append(Example(tokens, weights))
    return out


def bucket_length(n: int, max_len: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (at least `minimum`), capped at max_len: a handful of shapes, a handful of compiles."""
    size = minimum
    while size < n:
        size *= 2
    return min(size, max_len)


def truncate(examples: Sequence[Example], max_len: int, *, warn: bool = True) -> list[Example]:
    """Keep the first max_len tokens of each example; warn once with the number truncated."""
    cut = sum(len(e.tokens_t) > max_len for e in examples)
    if cut and warn:
        print(f"ftjax: warning: {cut} sequence(s) longer than --max-len {max_len} were truncated", file=sys.stderr)
    return [Example(e.tokens_t[:max_len], e.weights_t[:max_len]) for e in examples]


def batches(examples: Sequence[Example], batch_size: int, max_len: int) -> Iterator[Batch]:
    """Fixed-shape batches: examples sorted by length, padded to length buckets, short batches padded with empty rows."""
    if batch_size < 1:
        raise FtjaxError(f"batch size must be positive, got {batch_size}")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens_t))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        t = bucket_length(max(len(e.tokens_t) for e in chunk), max_len)
        tokens = np.zeros((batch_size, t), np.int32)
        mask = np.zeros((batch_size, t), np.int32)
        weights = np.zeros((batch_size, t), np.float32)
        for row, e in enumerate(chunk):
            n = len(e.tokens_t)
            tokens[row, :n], mask[row, :n], weights[row, :n] = e.tokens_t, 1, e.weights_t
        yield Batch(tokens, mask, weights)
