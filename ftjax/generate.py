"""Text generation with a KV cache, and generation-based evaluation (exact match on generated answers).

A batch of prompts is left-padded to a length bucket; RoPE positions are HF's `cumsum(mask) - 1`, so each row
sees exactly the positions it would see alone. One jitted function runs the prefill and then a
`jax.lax.while_loop` of single-token decode steps over a fixed-size cache (prompt bucket + new-token bucket), so
XLA compiles once per (batch size, prompt bucket, cache length) — never per token — and the loop never returns to
Python until every row has hit an EOS id or its token budget. Greedy by default; temperature + top-p sampling
with a seeded `jax.random` key otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.chat import chat_messages, render_chat
from ftjax.config import CheckpointMeta, ModelConfig, read_config
from ftjax.data import bucket_length, where
from ftjax.errors import FtjaxError
from ftjax.model import forward_cached, init_cache

# --extract presets: the final answer of a GSM8K solution, or the last number in the text.
NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+"
EXTRACT_PRESETS = {"gsm8k": rf"####\s*({NUMBER})", "last-number": rf"({NUMBER})"}


@dataclasses.dataclass(frozen=True)
class Completion:
    """Generated token ids (the EOS id included when it stopped there) and why generation ended:
    "stop" (an EOS id), "length" (max_new_tokens) or "context" (the model's context window)."""

    tokens: list[int]
    finish_reason: str


def eos_token_ids(model_dir: str | Path | None, meta: CheckpointMeta | None = None) -> tuple[int, ...]:
    """Stop ids: `eos_token_id` of generation_config.json (int or list) if present, else the config's (`meta`)."""
    eos: Any = None
    path = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if path is not None and path.is_file():
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise FtjaxError(f"{path}: cannot be read as a JSON object ({e})") from None
    if eos is None and meta is not None:
        eos = meta.eos_token_id
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def sampling_logits(logits_bv: jax.Array, temperature: jax.Array | float, top_p: jax.Array | float) -> jax.Array:
    """Logits [B, V] of the sampling distribution: divided by temperature (> 0), then top-p (nucleus) filtered.

    Top-p keeps the smallest set of most likely tokens whose probability mass reaches top_p (the most likely always
    stays; a token tied with the last kept one stays too); every other token gets -inf. softmax of the result is
    the distribution sampled from, the kept probabilities renormalized.
    """
    logits_bv = logits_bv / temperature
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    keep_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv < top_p
    threshold_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_bv >= threshold_b1, logits_bv, -jnp.inf)


def _sample(logits_bv: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, greedy: bool):
    if greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)  # first maximum on ties, as torch.argmax
    return jax.random.categorical(key, sampling_logits(logits_bv, temperature, top_p), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "greedy"))
def _generate_batch(params, tokens_bt, mask_bt, budget_b, eos_e, key, temperature, top_p, pad_id, *,
                    cfg: ModelConfig, cache_len: int, greedy: bool):
    """Prefill + while-loop decode. Returns (tokens [B, cache_len - T] with pad_id after a row ends, steps run)."""
    b, t = tokens_bt.shape
    n_new = cache_len - t
    cache = init_cache(cfg, b, cache_len, params["model"]["embed_tokens"]["weight"].dtype)
    mask_bs = jnp.concatenate([mask_bt, jnp.ones((b, n_new), mask_bt.dtype)], axis=1)
    positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=1) - 1, 0)
    n_real_b = mask_bt.sum(axis=1)
    logits_b1v, cache = forward_cached(params, tokens_bt, cache, 0, cfg, attention_mask_bs=mask_bs,
                                       positions_bt=positions_bt, last_only=True)

    def cond(state):
        i, _, _, _, done_b = state
        return (i < n_new) & ~done_b.all()

    def step(i, cache, tok_b, out_bn):
        logits_b1v, cache = forward_cached(params, tok_b[:, None], cache, t + i, cfg, attention_mask_bs=mask_bs,
                                           positions_bt=(n_real_b + i)[:, None])
        return logits_b1v[:, 0], cache

    def recompute(i, cache, tok_b, out_bn):
        """Long-rope (Phi-3): a row whose token first lies past the original context re-runs its whole sequence with
        the long factors, as transformers drops its cache there (later steps are long by their positions); the other
        rows take the plain step."""
        logits_bv, cache = step(i, cache, tok_b, out_bn)
        tokens_bs = jnp.concatenate([tokens_bt, out_bn], axis=1)
        now_b = n_real_b + i  # the position of this step's token; later slots are masked by causality
        positions_bs = jnp.clip(jnp.cumsum(mask_bs, axis=1) - 1, 0, now_b[:, None])
        logits_bsv, fresh = forward_cached(params, tokens_bs, init_cache(cfg, b, cache_len, cache[0]["k"].dtype), 0,
                                           cfg, attention_mask_bs=mask_bs, positions_bt=positions_bs)
        cross_b = now_b == cfg.rope.original_max_position_embeddings
        pick = lambda new, old: jnp.where(cross_b.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)  # noqa: E731
        logits_bv = pick(jax.lax.dynamic_index_in_dim(logits_bsv, t + i, axis=1, keepdims=False), logits_bv)
        return logits_bv, jax.tree_util.tree_map(pick, fresh, cache)

    def body(state):
        i, cache, logits_bv, out_bn, done_b = state
        tok_b = jnp.where(done_b, pad_id, _sample(logits_bv, jax.random.fold_in(key, i), temperature, top_p, greedy))
        out_bn = jax.lax.dynamic_update_slice_in_dim(out_bn, tok_b[:, None], i, axis=1)
        done_b = done_b | (tok_b[:, None] == eos_e[None, :]).any(axis=-1) | (i + 1 >= budget_b)
        if cfg.rope.rope_type == "longrope":
            crossing = (n_real_b + i == cfg.rope.original_max_position_embeddings).any()
            logits_bv, cache = jax.lax.cond(crossing, recompute, step, i, cache, tok_b, out_bn)
        else:
            logits_bv, cache = step(i, cache, tok_b, out_bn)
        return i + 1, cache, logits_bv, out_bn, done_b

    state = (jnp.int32(0), cache, logits_b1v[:, 0], jnp.full((b, n_new), pad_id, jnp.int32), budget_b <= 0)
    steps, _, _, out_bn, _ = jax.lax.while_loop(cond, body, state)
    return out_bn, steps


def check_generation_args(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                          temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 1) -> None:
    """One-line FtjaxErrors for bad arguments, before any compute: a non-positive max_new_tokens, an empty
    prompt, a token outside the vocabulary, a prompt that leaves no room in the context window."""
    if max_new_tokens < 1:
        raise FtjaxError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise FtjaxError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise FtjaxError(f"--top-p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise FtjaxError(f"--batch-size must be positive, got {batch_size}")
    if not prompts:
        raise FtjaxError("no prompts to generate from")
    context = cfg.max_position_embeddings
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise FtjaxError(f"prompt {i + 1} encodes to no tokens")
        if max(ids) >= cfg.vocab_size or min(ids) < 0:
            raise FtjaxError(f"prompt {i + 1}: token id {max(ids)} is outside the vocabulary of {cfg.vocab_size}")
        if context is not None and len(ids) >= context:
            raise FtjaxError(f"prompt {i + 1} has {len(ids)} tokens, but the context window is {context} "
                             "(max_position_embeddings); shorten the prompt")


def generate_ids(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 256,
                 eos_ids: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int = 8, pad_id: int = 0) -> list[Completion]:
    """Continue each prompt (token ids, BOS included if the model wants one) by up to max_new_tokens tokens.

    Greedy when temperature == 0, else temperature + top-p sampling from `jax.random.key(seed)`. A row stops at the
    first of eos_ids or when prompt + generation fill the context window (cfg.max_position_embeddings).
    Prompts are sorted by length into batches of batch_size rows (the last one padded with copies); results keep
    input order.
    """
    check_generation_args(cfg, prompts, max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size)
    context = cfg.max_position_embeddings or 1 << 62
    batch_size = min(batch_size, len(prompts))
    eos_e = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    key = jax.random.key(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Completion | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # pad the batch with copies: one shape per size
        t = bucket_length(max(len(prompts[i]) for i in rows))
        budgets = np.array([min(max_new_tokens, context - len(prompts[i])) for i in rows], np.int32)
        tokens_bt = np.full((batch_size, t), pad_id, np.int32)
        mask_bt = np.zeros((batch_size, t), np.int32)
        for r, i in enumerate(rows):
            n = len(prompts[i])
            tokens_bt[r, t - n:], mask_bt[r, t - n:] = prompts[i], 1
        out_bn, _ = _generate_batch(params, tokens_bt, mask_bt, budgets, eos_e, jax.random.fold_in(key, start),
                                    jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.int32(pad_id),
                                    cfg=cfg, cache_len=t + bucket_length(int(budgets.max())), greedy=temperature == 0)
        out_bn = np.asarray(out_bn)
        for r, i in enumerate(chunk):
            ids = out_bn[r, :budgets[r]].tolist()
            stop = next((k for k, tok in enumerate(ids) if tok in eos_ids), None)
            if stop is not None:
                out[i] = Completion(ids[:stop + 1], "stop")
            else:
                out[i] = Completion(ids, "length" if budgets[r] == max_new_tokens else "context")
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------- text
def encode_prompts(tokenizer, prompts: Sequence[str | Sequence[dict]], *, template: str | None = None,
                   special: dict[str, str] | None = None, system: str | None = None) -> list[list[int]]:
    """Token ids of each prompt. Without a template: `tokenizer.encode(prompt)` (its own special tokens, e.g. BOS).
    With a chat template: the rendered conversation (generation prompt added) encoded without extra special
    tokens, as transformers' apply_chat_template(tokenize=True) does; a prompt may then also be a message list."""
    out = []
    for p in prompts:
        if template is None:
            if not isinstance(p, str):
                raise FtjaxError("a message list needs --chat (a chat template) to become a prompt")
            if system is not None:
                raise FtjaxError("a system message needs --chat (a chat template to put it in)")
            out.append(tokenizer.encode(p).ids)
        else:
            text = render_chat(template, chat_messages(p, system), add_generation_prompt=True, special=special)
            out.append(tokenizer.encode(text, add_special_tokens=False).ids)
    return out


def decode(tokenizer, completion: Completion, eos_ids: Sequence[int] = ()) -> str:
    """The generated text, without the EOS id and other special tokens."""
    ids = [t for t in completion.tokens if t not in eos_ids]
    return tokenizer.decode(ids, skip_special_tokens=True)


def normalize_answer(text: str) -> str:
    """Light normalization for exact match: case, surrounding whitespace and punctuation, inner whitespace runs;
    numbers compare by value ("1,000" == "1000" == "$1000.00")."""
    s = " ".join(str(text).lower().split()).strip(" .,;:!?\"'`()[]")
    number = s.replace(",", "").replace("$", "")
    if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", number):
        try:
            value = Decimal(number).normalize()
            return format(value, "f") if value != 0 else "0"
        except InvalidOperation:
            pass
    return s


def extract_answer(text: str, pattern: str | None) -> str | None:
    """The last match of pattern in text (its first group if it has one), or None; with no pattern, the text."""
    if pattern is None:
        return text
    pattern = EXTRACT_PRESETS.get(pattern, pattern)
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    m = matches[-1]
    return m.group(1) if m.re.groups else m.group(0)


def is_generation_row(row: dict) -> bool:
    """A row scored by generation: {"prompt", "answer"} (a multiple-choice row has "choices" too)."""
    return "answer" in row and "choices" not in row and "completion" not in row


def evaluate_generation(params: Any, cfg: ModelConfig, rows: Sequence[dict], tokenizer, *, eos_ids: Sequence[int],
                        template: str | None = None, special: dict[str, str] | None = None,
                        system: str | None = None, max_new_tokens: int = 256, extract: str | None = None,
                        batch_size: int = 8, source: str = "data") -> tuple[dict, list[dict]]:
    """Greedy-generate an answer for every {"prompt" (or "question"), "answer"} row and score exact match.

    extract: a regex (or preset "gsm8k" / "last-number") pulling the final answer out of the generation (the last
    match, its first group if any); it is applied to the reference too when it matches there (a GSM8K solution).
    Returns (metrics {"exact_match", "rows", "generated_tokens", "tokens_per_s"}, one record per row).
    """
    prompts: list = []
    for i, row in enumerate(rows):
        prompt = row.get("prompt", row.get("question"))
        if not (isinstance(prompt, str) or (template is not None and isinstance(prompt, list))):
            raise FtjaxError(f"{where(rows, i, source)}: generation rows need a 'prompt' string and an 'answer'")
        if not isinstance(row.get("answer"), (str, int, float)) or isinstance(row.get("answer"), bool):
            raise FtjaxError(f"{where(rows, i, source)}: 'answer' must be a string or a number")
        prompts.append(prompt)
    ids = encode_prompts(tokenizer, prompts, template=template, special=special, system=system)
    check_generation_args(cfg, ids, max_new_tokens, batch_size=batch_size)
    start = time.perf_counter()
    completions = generate_ids(params, cfg, ids, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                               batch_size=batch_size)
    seconds = time.perf_counter() - start
    records, correct = [], 0
    for i, (row, completion) in enumerate(zip(rows, completions)):
        text = decode(tokenizer, completion, eos_ids)
        predicted = extract_answer(text, extract)
        reference = str(row["answer"])
        reference = extract_answer(reference, extract) or reference
        ok = predicted is not None and normalize_answer(predicted) == normalize_answer(reference)
        correct += ok
        records.append({"row": i, "prompt": prompts[i], "answer": row["answer"], "generation": text,
                        "extracted": predicted, "correct": bool(ok), "finish_reason": completion.finish_reason,
                        "tokens": len(completion.tokens)})
    generated = sum(r["tokens"] for r in records)
    metrics = {"exact_match": correct / len(rows), "rows": len(rows), "correct": correct,
               "generated_tokens": generated, "tokens_per_s": generated / max(seconds, 1e-9)}
    return metrics, records


# ---------------------------------------------------------------------------------------------------------- setup
@dataclasses.dataclass(frozen=True)
class TextSetup:
    """Everything text generation needs from a model directory except the weights (so bad input fails first)."""

    cfg: ModelConfig
    tokenizer: Any
    eos_ids: tuple[int, ...]
    template: str | None = None
    special: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, model_dir: str | Path, *, chat: bool = False) -> TextSetup:
        """Config, tokenizer.json, EOS ids and, with chat, the chat template (an error if there is none)."""
        from ftjax.chat import require_chat_template, special_tokens
        from ftjax.data import load_tokenizer
        from ftjax.io.checkpoint import HFCheckpoint

        model_dir = Path(model_dir)
        parsed = read_config(HFCheckpoint(model_dir).config, source=str(model_dir / "config.json"))
        template = require_chat_template(model_dir) if chat else None
        return cls(parsed.config, load_tokenizer(model_dir), eos_token_ids(model_dir, parsed.meta), template,
                   special_tokens(model_dir) if chat else {})

    def encode(self, prompts: Sequence[str | Sequence[dict]], system: str | None = None) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts, template=self.template, special=self.special, system=system)


def generation_rows(rows: Sequence[dict]) -> bool:
    """True when every row is a {"prompt", "answer"} row scored by generating, False when none is; a file mixing the
    two is an error (naming the first other row)."""
    kinds = [is_generation_row(r) for r in rows]
    if any(kinds) and not all(kinds):
        raise FtjaxError(f"{where(rows, kinds.index(False))}: not a {{\"prompt\", \"answer\"}} row but others are; put "
                         "generation-scored rows in a file of their own")
    return bool(kinds) and all(kinds)


def evaluate_generation_dir(model_dir: str | Path, rows: Sequence[dict], *, chat: bool = False,
                            system: str | None = None, max_new_tokens: int = 256, extract: str | None = None,
                            batch_size: int = 8, dtype: Any = None, mesh: Any = None) -> tuple[dict, list[dict]]:
    """`evaluate_generation` of a model directory: its tokenizer, EOS ids and (with chat) chat template, checked
    before the weights are loaded (with `dtype`, on `mesh`)."""
    from ftjax.params import load_params

    setup = TextSetup.load(model_dir, chat=chat)
    if max_new_tokens < 1:
        raise FtjaxError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    cfg, params = load_params(model_dir, dtype=dtype, mesh=mesh)
    return evaluate_generation(params, cfg, rows, setup.tokenizer, eos_ids=setup.eos_ids, template=setup.template,
                               special=setup.special, system=system, max_new_tokens=max_new_tokens, extract=extract,
                               batch_size=batch_size, source=getattr(rows, "source", "data"))


def prompts_from_rows(rows: Sequence[dict], *, source: str = "prompts") -> list[str | list[dict]]:
    """Prompts from JSONL rows: {"prompt": "..."} or, for chat models, {"messages": [{"role", "content"}, ...]}."""
    out: list[str | list[dict]] = []
    for i, row in enumerate(rows):
        if isinstance(row.get("prompt"), str):
            out.append(row["prompt"])
        elif isinstance(row.get("messages"), list) and row["messages"]:
            out.append(row["messages"])
        else:
            raise FtjaxError(f"{where(rows, i, source)}: expected a 'prompt' string or a 'messages' list, "
                             f"got keys {sorted(row)}")
    return out
