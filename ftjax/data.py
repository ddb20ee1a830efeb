"""JSONL rows -> token sequences with loss weights -> fixed-shape batches.

Row forms (one JSON object per line):
    {"input_ids": [...]}                      already tokenized; loss over every next-token prediction
    {"text": "..."}                           tokenized; loss over every next-token prediction
    {"prompt": "...", "completion": "..."}    loss and exact match over the completion tokens only
    {"question" | "prompt": "...", "choices": [...], "answer": k}   multiple choice: one sequence per choice
    {"messages": [{"role", "content"}, ...]}  a conversation rendered with the model's chat template; loss on the
                                              assistant turns only (`ftjax.chat.chat_token_weights`, open-instruct's
                                              masking, as in Tulu 3 SFT data)

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

from ftjax.buckets import pow2_bucket
from ftjax.errors import FtjaxError

LM, COMPLETION, CHOICE, CHAT = "lm", "completion", "choice", "chat"


@dataclasses.dataclass(frozen=True)
class Example:
    """One sequence. weights_t[i] weighs the loss of predicting tokens_t[i] from tokens_t[:i] (weights_t[0] = 0).

    kind: LM (whole sequence), COMPLETION (weights on the completion only), CHOICE (one choice of a
    multiple-choice row) or CHAT (weights on the assistant turns). row: 0-based data row it came from. For CHOICE: `choice` index, `answer` (the correct
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


class JsonlRows(list):
    """The rows (dicts) of a JSONL file, remembering each row's line in the file, so every message about a row
    names it as `path:line` (blank lines are skipped, so row i is not line i + 1 in general)."""

    def __init__(self, rows: Sequence[dict], lines: Sequence[int], source: str):
        super().__init__(rows)
        self.lines, self.source = list(lines), source


def where(rows: Sequence[dict], i: int, source: str = "data") -> str:
    """How messages name row i: `path:line` for rows read from a file, else `source row i+1`."""
    if isinstance(rows, JsonlRows) and len(rows.lines) == len(rows):
        return f"{rows.source}:{rows.lines[i]}"
    return f"{source} row {i + 1}"


def read_jsonl(path: str | Path) -> JsonlRows:
    """Parse a JSONL file; a malformed line (bad JSON or invalid UTF-8) is an error naming its line number; an empty
    file is an error. Lines end at \n, \r\n or \r (JSON strings may hold U+2028 and other Unicode separators)."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise FtjaxError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise FtjaxError(f"data file {path} is a directory") from None
    rows, numbers = [], []
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FtjaxError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                             "save the file as UTF-8") from None
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
    return JsonlRows(rows, numbers, str(path))


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


@dataclasses.dataclass(frozen=True)
class Chat:
    """What {"messages"} rows need from a model directory: its chat template and the special tokens it renders."""

    template: str
    special: dict[str, str]

    @classmethod
    def load(cls, model_dir: str | Path, source: str = "data") -> Chat:
        from ftjax.chat import load_chat_template, special_tokens

        template = load_chat_template(model_dir)
        if template is None:
            raise FtjaxError(f"{source}: 'messages' rows need a chat template and {model_dir} has none (no "
                             "chat_template.jinja, no 'chat_template' in tokenizer_config.json); copy the instruct "
                             f"model's chat_template.jinja into {model_dir}, or write the rows as prompt/completion")
        return cls(template, special_tokens(model_dir))


def _messages(row: dict, where: str) -> list[dict]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise FtjaxError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    if not all(isinstance(m.get("role"), str) for m in messages):
        raise FtjaxError(f"{where}: every message needs a 'role' string")
    if not any(m["role"] == "assistant" for m in messages):
        raise FtjaxError(f"{where}: no 'assistant' message to score (roles: "
                         f"{', '.join(m['role'] for m in messages)})")
    return messages


def _chat_example(tokenizer, chat: Chat | None, row: dict, i: int, where: str) -> Example | None:
    from ftjax.chat import chat_token_weights

    if chat is None:
        raise FtjaxError(f"{where}: 'messages' rows need the model's chat template")
    messages = _messages(row, where)  # its errors name the row already
    try:
        ids, weights = chat_token_weights(tokenizer, chat.template, messages, special=chat.special)
    except FtjaxError as e:
        raise FtjaxError(f"{where}: {e}") from None
    return Example(ids, weights, kind=CHAT, row=i, where=where) if len(ids) >= 2 else None


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


def encode_rows(rows: Sequence[dict], tokenizer=None, *, source: str = "data", chat: Chat | None = None) -> Encoded:
    """Token sequences with loss weights for every row (one per choice for multiple-choice rows; `chat` renders
    {"messages"} rows)."""
    out: list[Example] = []
    skipped: list[str] = []
    for i, row in enumerate(rows):
        at = where(rows, i, source)
        if "input_ids" in row:
            ids = row["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise FtjaxError(f"{at}: input_ids must be a list of non-negative integers")
            examples = [_lm_example(ids, i, at)]
        elif tokenizer is None and any(k in row for k in ("text", "prompt", "question", "messages")):
            raise FtjaxError(f"{at}: text rows need a model directory with tokenizer.json")
        elif "messages" in row:
            examples = [_chat_example(tokenizer, chat, row, i, at)]
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
            raise FtjaxError(f"{at}: expected 'input_ids', 'text', 'messages', 'prompt'+'completion' or "
                             f"'question'+'choices'+'answer', got keys {sorted(row)}")
        if any(e is None for e in examples):
            skipped.append(at)
        else:
            out.extend(examples)
    return Encoded(out, skipped)


def encode_file(path: str | Path, model_dirs: str | Path | Sequence[str | Path], *,
                vocab_size: int | None = None) -> Encoded:
    """Read and encode a JSONL file: text with the tokenizer.json of the first of `model_dirs` that has one, chat
    rows with that directory's chat template; rows with nothing to score skipped with a warning; no example left
    is an error; token ids checked against `vocab_size` when given."""
    dirs = [model_dirs] if isinstance(model_dirs, (str, Path)) else list(model_dirs)
    rows = read_jsonl(path)
    tokenizer, chat = None, None
    if needs_tokenizer(rows):
        model_dir = next((d for d in dirs if (Path(d) / "tokenizer.json").is_file()), dirs[0])
        tokenizer = load_tokenizer(model_dir)
        if any("messages" in r for r in rows):
            chat = Chat.load(model_dir, str(path))
    encoded = encode_rows(rows, tokenizer, source=str(path), chat=chat)
    warn_skipped(encoded.skipped)
    if not encoded.examples:
        raise FtjaxError(f"{path}: no row has anything to score")
    if vocab_size is not None:
        check_vocab(encoded.examples, vocab_size, source=str(path))
    return encoded


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
    """Sequence length of a batch: `buckets.pow2_bucket` (at least `minimum`), capped at max_len."""
    return pow2_bucket(n, minimum, max_len)


def truncate(examples: Sequence[Example], max_len: int, *, warn: bool = True) -> list[Example]:
    """Cut examples to max_len tokens; warn once with the number truncated.

    LM and chat rows keep their first max_len tokens (as training does); completion and choice rows keep their last
    max_len (the scored end, as the harness does).
    """
    if max_len < 2:
        raise FtjaxError(f"--max-len must be at least 2, got {max_len}")
    n_cut = sum(len(e.tokens_t) > max_len for e in examples)
    if n_cut and warn:
        print(f"ftjax: warning: {n_cut} sequence(s) longer than --max-len {max_len} were truncated", file=sys.stderr)
    out = []
    for e in examples:
        out.append(cut(e, max_len, keep="start" if e.kind in (LM, CHAT) else "end"))
    return out


def cut(e: Example, max_len: int, *, keep: str) -> Example:
    """`e` cut to max_len tokens, keeping its "start" or its "end" (then the first kept token is unscored: nothing
    precedes it)."""
    if len(e.tokens_t) <= max_len:
        return e
    if keep == "start":
        return dataclasses.replace(e, tokens_t=e.tokens_t[:max_len], weights_t=e.weights_t[:max_len])
    weights = e.weights_t[-max_len:].copy()
    weights[0] = 0.0
    return dataclasses.replace(e, tokens_t=e.tokens_t[-max_len:], weights_t=weights)


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
