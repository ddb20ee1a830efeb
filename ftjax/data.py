"""JSONL rows -> token sequences with loss weights -> fixed-shape batches.

Row forms (one JSON object per line):
    {"input_ids": [...]}                      already tokenized; loss over every next-token prediction
    {"text": "..."}                           tokenized; loss over every next-token prediction
    {"prompt": "...", "completion": "..."}    loss and exact match over the completion tokens only
    {"question" | "prompt": "...", "choices": [...], "answer": k}   multiple choice: one sequence per choice

Text goes through the model directory's tokenizer.json with its own special-token policy (e.g. a BOS from its
post-processor). Prompt/completion and multiple-choice pairs are tokenized as lm-evaluation-harness does: trailing
spaces of the context move to the continuation, context + continuation is encoded once and split at
len(encode(context)); a choice's continuation is " " + choice.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ftjax.errors import FtjaxError

LM, COMPLETION, CHOICE = "lm", "completion", "choice"


@dataclasses.dataclass(frozen=True)
class Example:
    """One sequence. weights_t[i] weighs the loss of predicting tokens_t[i] from tokens_t[:i] (weights_t[0] = 0).

    kind: LM (whole sequence), COMPLETION (weights on the completion only) or CHOICE (one choice of a
    multiple-choice row). row: 0-based data row it came from. For CHOICE: `choice` index, `answer` (the correct
    index) and `chars` (character length of the choice, the harness's acc_norm denominator).
    """

    tokens_t: np.ndarray  # int32 [T]
    weights_t: np.ndarray  # float32 [T]
    kind: str = LM
    row: int = 0
    choice: int = -1
    answer: int = -1
    chars: int = 0
    where: str = ""  # how messages name the row: "path:line"


@dataclasses.dataclass(frozen=True)
class Batch:
    tokens_bt: np.ndarray  # int32 [B, T], right-padded with 0
    mask_bt: np.ndarray  # int32 [B, T], 1 = real token
    weights_bt: np.ndarray  # float32 [B, T], loss weight of predicting tokens_bt[:, t]
    index_b: np.ndarray  # int32 [B], position of each row's Example in the input list; -1 for padding rows


class Rows(list):
    """The rows (dicts) of a JSONL file, remembering each row's line in the file, so every message about a row
    names it as `path:line` (blank lines are skipped, so row i is not line i + 1 in general)."""

    def __init__(self, rows: Sequence[dict], lines: Sequence[int], source: str):
        super().__init__(rows)
        self.lines, self.source = list(lines), source


def where(rows: Sequence[dict], i: int, source: str = "data") -> str:
    """How messages name row i: `path:line` for rows read from a file, else `source row i+1`."""
    if isinstance(rows, Rows) and len(rows.lines) == len(rows):
        return f"{rows.source}:{rows.lines[i]}"
    return f"{source} row {i + 1}"


def read_jsonl(path: str | Path) -> Rows:
    """Parse a JSONL file; a malformed line is an error naming its line number; an empty file is an error."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FtjaxError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise FtjaxError(f"data file {path} is a directory") from None
    except UnicodeDecodeError:
        raise FtjaxError(f"data file {path} is not UTF-8 text") from None
    rows, numbers = [], []
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
        numbers.append(number)
    if not rows:
        raise FtjaxError(f"data file {path} has no rows")
    return Rows(rows, numbers, str(path))


def load_tokenizer(model_dir: str | Path):
    """The `tokenizers.Tokenizer` of a model directory (its tokenizer.json)."""
    from tokenizers import Tokenizer

    file = Path(model_dir) / "tokenizer.json"
    if not file.is_file():
        raise FtjaxError(f"{model_dir} has no tokenizer.json; "
                         "pass pre-tokenized rows ({\"input_ids\": [...]}) instead")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
        raise FtjaxError(f"{file}: cannot be read by the tokenizers library ({str(e).splitlines()[0]})") from None


def needs_tokenizer(rows: Sequence[dict]) -> bool:
    """True if any row holds text rather than input_ids."""
    return any("input_ids" not in r for r in rows)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """lm-evaluation-harness's `_encode_pair`: (ids of context + continuation, number of context tokens)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation).ids
    n_context = len(tokenizer.encode(context).ids)
    return whole, n_context


def _pair_example(tokenizer, context: str, continuation: str, where: str, **meta) -> Example | None:
    """None (nothing to score) when the context or the continuation encodes to no tokens."""
    ids, n_context = encode_pair(tokenizer, context, continuation)
    if n_context < 1 or len(ids) <= n_context:
        return None
    weights = np.zeros(len(ids), np.float32)
    weights[n_context:] = 1.0
    return Example(np.asarray(ids, np.int32), weights, where=where, **meta)


def _require_str(row: dict, key: str, where: str) -> str:
    if not isinstance(row.get(key), str):
        raise FtjaxError(f"{where}: {key!r} must be a string")
    return row[key]


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Examples of a set of rows, and the rows skipped because they hold nothing to score (as `path:line`): an LM row
    of fewer than two tokens, a prompt or completion that encodes to no tokens."""

    examples: list[Example]
    skipped: list[str]


def encode_rows(rows: Sequence[dict], tokenizer=None, *, source: str = "data") -> Encoded:
    """Token sequences with loss weights for every row (one per choice for multiple-choice rows)."""
    out: list[Example] = []
    skipped: list[str] = []
    for i, row in enumerate(rows):
        at = where(rows, i, source)
        if "input_ids" in row:
            ids = row["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise FtjaxError(f"{at}: input_ids must be a list of non-negative integers")
            examples = [_lm_example(ids, i, at)]
        elif tokenizer is None and any(k in row for k in ("text", "prompt", "question")):
            raise FtjaxError(f"{at}: text rows need a model directory with tokenizer.json")
        elif "choices" in row:
            key = "question" if "question" in row else "prompt"
            context = _require_str(row, key, at)
            choices, answer = row["choices"], row.get("answer")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise FtjaxError(f"{at}: 'choices' must be a list of at least two strings")
            if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
                raise FtjaxError(f"{at}: 'answer' must be an index into 'choices' (0..{len(choices) - 1})")
            examples = [_pair_example(tokenizer, context, " " + choice, at, kind=CHOICE, row=i, choice=k,
                                      answer=answer, chars=len(choice)) for k, choice in enumerate(choices)]
        elif "completion" in row:
            context, completion = _require_str(row, "prompt", at), _require_str(row, "completion", at)
            examples = [_pair_example(tokenizer, context, completion, at, kind=COMPLETION, row=i)]
        elif "text" in row:
            examples = [_lm_example(tokenizer.encode(_require_str(row, "text", at)).ids, i, at)]
        else:
            raise FtjaxError(f"{at}: expected 'input_ids', 'text', 'prompt'+'completion' or "
                             f"'question'+'choices'+'answer', got keys {sorted(row)}")
        if any(e is None for e in examples):
            skipped.append(at)
        else:
            out.extend(examples)
    return Encoded(out, skipped)


def examples_from_rows(rows: Sequence[dict], tokenizer=None, *, source: str = "data") -> list[Example]:
    """`encode_rows(...).examples`, with a warning on stderr naming the rows skipped for holding nothing to score."""
    encoded = encode_rows(rows, tokenizer, source=source)
    warn_skipped(encoded.skipped)
    return encoded.examples


def warn_skipped(skipped: Sequence[str]) -> None:
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        print(f"ftjax: warning: skipped {len(skipped)} row(s) with nothing to score (fewer than two tokens, or an "
              f"empty prompt or completion): {', '.join(skipped[:3])}{more}", file=sys.stderr)


def _lm_example(ids: list[int], row: int, where: str) -> Example | None:
    if len(ids) < 2:
        return None
    weights = np.ones(len(ids), np.float32)
    weights[0] = 0.0
    return Example(np.asarray(ids, np.int32), weights, kind=LM, row=row, where=where)


def check_vocab(examples: Sequence[Example], vocab_size: int, *, source: str = "data") -> None:
    """Every token id must index the model's embedding table."""
    for e in examples:
        if len(e.tokens_t) and int(e.tokens_t.max()) >= vocab_size:
            raise FtjaxError(f"{e.where or f'{source} row {e.row + 1}'}: token id {int(e.tokens_t.max())} is outside "
                             f"the model's vocabulary of {vocab_size}")


def bucket_length(n: int, max_len: int | None = None, minimum: int = 16) -> int:
    """Smallest power of two >= n (at least `minimum`), capped at max_len: few shapes, so few compilations."""
    size = minimum
    while size < n:
        size *= 2
    return size if max_len is None else min(size, max_len)


def truncate(examples: Sequence[Example], max_len: int, *, warn: bool = True) -> list[Example]:
    """Cut examples to max_len tokens; warn once with the number truncated.

    LM rows keep their first max_len tokens; completion and choice rows keep their last max_len (the scored end,
    as the harness does), and the first kept token is then unscored: nothing precedes it.
    """
    if max_len < 2:
        raise FtjaxError(f"--max-len must be at least 2, got {max_len}")
    cut = sum(len(e.tokens_t) > max_len for e in examples)
    if cut and warn:
        print(f"ftjax: warning: {cut} sequence(s) longer than --max-len {max_len} were truncated", file=sys.stderr)
    out = []
    for e in examples:
        if len(e.tokens_t) <= max_len:
            out.append(e)
        elif e.kind == LM:
            out.append(dataclasses.replace(e, tokens_t=e.tokens_t[:max_len], weights_t=e.weights_t[:max_len]))
        else:
            weights = e.weights_t[-max_len:].copy()
            weights[0] = 0.0
            out.append(dataclasses.replace(e, tokens_t=e.tokens_t[-max_len:], weights_t=weights))
    return out


def batches(examples: Sequence[Example], batch_size: int, max_len: int) -> Iterator[Batch]:
    """Fixed-shape batches: examples sorted by length, padded to length buckets, short batches padded with empty
    rows (index -1)."""
    if batch_size < 1:
        raise FtjaxError(f"batch size must be positive, got {batch_size}")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens_t))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        t = bucket_length(max(len(examples[i].tokens_t) for i in chunk), max_len)
        tokens = np.zeros((batch_size, t), np.int32)
        mask = np.zeros((batch_size, t), np.int32)
        weights = np.zeros((batch_size, t), np.float32)
        index = np.full(batch_size, -1, np.int32)
        for row, i in enumerate(chunk):
            e = examples[i]
            n = len(e.tokens_t)
            tokens[row, :n], mask[row, :n], weights[row, :n], index[row] = e.tokens_t, 1, e.weights_t, i
        yield Batch(tokens, mask, weights, index)
