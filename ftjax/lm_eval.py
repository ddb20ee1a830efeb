"""ftjax as an lm-evaluation-harness backend: `FtjaxLM`, registered as the harness model "ftjax" on import.

The three request types follow the harness's own `hf` backend (lm_eval/models/huggingface.py) token for token:
- `loglikelihood`: the harness's `TemplateLM` splits (context, continuation) (the word-boundary space goes to the
  continuation; an empty context becomes the BOS/EOT prefix token); each pair is scored as `(ctx + cont)[-(L+1):]`
  with L = max_length, returning (sum of the continuation's log-probabilities in nats, is_greedy).
- `loglikelihood_rolling`: disjoint max-length windows from `lm_eval.utils.get_rolling_token_windows`, summed.
- `generate_until`: greedy (or temperature/top-p sampling) through `ftjax.generate.generate_ids`, the prompt
  left-truncated to max_length - max_gen_toks, the decoded text cut at the first stop string.

Requests are sorted by length and right-padded to power-of-two bucket lengths (`ftjax.data.bucket_length`) in batches
of a fixed size, so the forward compiles once per bucket, not once per request. This is the only module that imports
lm_eval (the `eval` extra).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ftjax.buckets import pow2_bucket
from ftjax.config import ModelConfig
from ftjax.data import bucket_length
from ftjax.errors import FtjaxError
from ftjax.model import forward

DTYPES = ("auto", "float32", "bfloat16", "float16")
_CONTINUE_TAG = "<ftjax-continue-final-message>"  # marks where the final message ends in the rendered text
DEFAULT_MAX_LENGTH = 2048  # the hf backend's fallback when the config names no context length
# hf backend options that change prompts, outputs or weights, which this backend does not implement: refused by name
UNSUPPORTED_OPTIONS = ("enable_thinking", "chat_template_args", "think_end_token", "peft", "delta")


@functools.partial(jax.jit, static_argnames=("cfg",))
def _token_scores(params: dict, tokens_bt: jax.Array, at_bk: jax.Array, targets_bk: jax.Array, cfg: ModelConfig):
    """(log p(target) float32 [B, K], argmax == target bool [B, K]) of the next-token targets [B, K] read at the
    positions at_bk [B, K] of tokens [B, T] (logits only there: the LM head runs on K, not T, positions)."""
    logits_bkv = forward(params, tokens_bt, cfg, logits_at_bk=at_bk)
    logp_bkv = jax.nn.log_softmax(logits_bkv, axis=-1)
    picked_bk = jnp.take_along_axis(logp_bkv, targets_bk[..., None], axis=-1)[..., 0]
    return picked_bk, jnp.argmax(logits_bkv, axis=-1) == targets_bk


def score_continuations(params: dict, cfg: ModelConfig, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        max_length: int, batch_size: int = 8,
                        progress: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context) in nats, is_greedy) per (context ids, continuation ids), as the hf backend.

    Each pair is scored as input `(ctx + cont)[-(max_length + 1):][:-1]`; the continuation's tokens are the last
    len(cont) targets. Pairs are sorted longest first, batched `batch_size` rows at a time (a short last batch padded
    with copies to a power of two) and right-padded to `bucket_length(longest, max_length)`; the LM head runs only on the K continuation
    positions per row (K a power of two >= the batch's longest continuation, at least 4): few shapes, few
    compilations. Right padding never changes a real token's logits (causal attention). progress(requests, tokens) is called after each batch.
    Results keep input order.
    """
    for i, (ctx, cont) in enumerate(pairs):
        if len(ctx) < 1 or len(cont) < 1:
            raise FtjaxError(f"request {i + 1}: context and continuation must each have at least one token")
        if len(cont) > max_length:
            raise FtjaxError(f"request {i + 1}: continuation of {len(cont)} tokens is longer than max_length "
                             f"{max_length}; raise max_length")
    whole = [(list(ctx) + list(cont))[-(max_length + 1):] for ctx, cont in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(whole[i]))
    batch = max(1, min(batch_size, len(pairs)))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        rows = chunk + [chunk[0]] * (pow2_bucket(len(chunk), 1, batch) - len(chunk))  # a short last batch: pow2 rows
        t = bucket_length(max(len(whole[i]) - 1 for i in rows), max_length)
        k = pow2_bucket(max(len(pairs[i][1]) for i in rows), 4, t)  # scored positions per row
        tokens_bt = np.zeros((len(rows), t), np.int32)
        at_bk = np.zeros((len(rows), k), np.int32)
        targets_bk = np.zeros((len(rows), k), np.int32)
        for r, i in enumerate(rows):
            n, m = len(whole[i]) - 1, len(pairs[i][1])
            tokens_bt[r, :n] = whole[i][:-1]
            at_bk[r] = np.minimum(np.arange(n - m, n - m + k), n - 1)  # the continuation's m positions, then repeats
            targets_bk[r] = np.asarray(whole[i][1:])[at_bk[r]]
        logp_bk, greedy_bk = jax.device_get(_token_scores(params, tokens_bt, at_bk, targets_bk, cfg=cfg))
        for r, i in enumerate(chunk):
            m = len(pairs[i][1])
            out[i] = (float(logp_bk[r, :m].sum()), bool(greedy_bk[r, :m].all()))
        if progress is not None:
            progress(len(chunk), sum(len(whole[i]) - 1 for i in chunk))
    return out


def _progress_bar(total: int, desc: str, disable: bool):
    """A tqdm bar over requests showing tokens/s, and the callback that advances it."""
    bar = tqdm(total=total, desc=desc, disable=disable)
    state = {"tokens": 0, "t0": time.perf_counter()}

    def update(requests: int, tokens: int) -> None:
        state["tokens"] += tokens
        bar.update(requests)
        bar.set_postfix_str(f"{state['tokens'] / max(time.perf_counter() - state['t0'], 1e-9):.0f} tokens/s")

    return bar, update


def _int_arg(value: Any, name: str) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise FtjaxError(f"{name} must be a positive integer, got {value!r}") from None
    if out < 1:
        raise FtjaxError(f"{name} must be a positive integer, got {value!r}")
    return out


@register_model("ftjax")
class FtjaxLM(TemplateLM):
    """An lm-evaluation-harness model over ftjax's forward pass and KV-cache generator.

    FtjaxLM(pretrained=DIR_OR_HUB_ID, dtype="float32", batch_size=8, max_length=None, max_gen_toks=256, mesh=None):
    a checkpoint's weights (ftjax.params.load_params; dtype "auto" keeps the stored one), tokenizer.json, special
    tokens and generation EOS ids. max_length (tokens): the context scored or generated from; default the config's
    max_position_embeddings, as the hf backend. add_bos_token, prefix_token_id: as the hf backend's (lm_eval
    --model_args): whether texts get the tokenizer's special tokens (default its post-processor's), and the token
    an empty context or a rolling window starts from (default BOS, else EOS). Other keyword arguments the harness
    passes (device, max_batch_size) are ignored, except the hf backend's UNSUPPORTED_OPTIONS, which are refused.
    For parameters already in memory see `from_params`.
    """

    def __init__(self, pretrained: str | Path | None = None, dtype: str = "float32", batch_size: int | str = 8,
                 max_length: int | str | None = None, max_gen_toks: int | str = 256, mesh: Any = None,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None, **ignored: Any) -> None:
        super().__init__()
        refused = [k for k in UNSUPPORTED_OPTIONS if ignored.get(k) is not None]
        if refused:
            raise FtjaxError(f"the ftjax backend does not support {', '.join(refused)} (hf backend options); drop "
                             "them from --model_args (or score with --model hf)")
        if pretrained is None:
            raise FtjaxError("FtjaxLM needs pretrained=DIR (a model directory or cached Hub id); "
                             "or use FtjaxLM.from_params(params, cfg, tokenizer)")
        if dtype not in DTYPES:
            raise FtjaxError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        from ftjax.io.checkpoint import resolve_model_path
        from ftjax.params import load_params

        model_dir = resolve_model_path(pretrained)
        tokenizer = _DirTokenizer.load(model_dir)  # tokenizer problems fail before the weights load
        cfg, params = load_params(model_dir, dtype=None if dtype == "auto" else dtype, mesh=mesh)
        self._setup(params, cfg, tokenizer, batch_size, max_length, max_gen_toks, name=str(pretrained),
                    add_bos_token=add_bos_token, prefix_token_id=prefix_token_id)

    @classmethod
    def from_params(cls, params: dict, cfg: ModelConfig, tokenizer: Any, *, eos_token_id: int | None = None,
                    bos_token_id: int | None = None, eos_ids: Sequence[int] | None = None,
                    chat_template: str | None = None, batch_size: int = 8, max_length: int | None = None,
                    max_gen_toks: int = 256, name: str = "ftjax", add_bos_token: bool | None = None,
                    prefix_token_id: int | None = None) -> FtjaxLM:
        """A harness model over parameters already in memory (e.g. from transfer_params or merge_params).

        tokenizer: a model directory (its tokenizer.json, special tokens, generation EOS ids and chat template are
        used) or a `tokenizers.Tokenizer`, which then needs eos_token_id (the harness's end-of-text id); bos_token_id
        (the empty-context prefix; default the EOS id), eos_ids (generation stops; default [eos_token_id]).
        add_bos_token, prefix_token_id: as in FtjaxLM(...).
        """
        if isinstance(tokenizer, (str, Path)):
            tok = _DirTokenizer.load(Path(tokenizer))
        else:
            if eos_token_id is None:
                raise FtjaxError("FtjaxLM.from_params with a tokenizers.Tokenizer needs eos_token_id=...; "
                                 "or pass the model directory as the tokenizer")
            tok = _DirTokenizer(tokenizer, eos_token_id, bos_token_id,
                                tuple(eos_ids) if eos_ids is not None else (eos_token_id,), chat_template, {})
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        self._setup(params, cfg, tok, batch_size, max_length, max_gen_toks, name=name, add_bos_token=add_bos_token,
                    prefix_token_id=prefix_token_id)
        return self

    def _setup(self, params, cfg, tok: _DirTokenizer, batch_size, max_length, max_gen_toks, *, name: str,
               add_bos_token: bool | None, prefix_token_id: int | None) -> None:
        self.params, self.cfg, self.tok, self._name = params, cfg, tok, name
        if add_bos_token is not None and not isinstance(add_bos_token, bool):
            raise FtjaxError(f"add_bos_token must be True or False, got {add_bos_token!r}")
        if prefix_token_id is not None and (isinstance(prefix_token_id, bool) or not isinstance(prefix_token_id, int)
                                            or not 0 <= prefix_token_id < cfg.vocab_size):
            raise FtjaxError(f"prefix_token_id must be a token id in 0..{cfg.vocab_size - 1}, got {prefix_token_id!r}")
        self._add_bos_token, self._prefix_token_id = add_bos_token, prefix_token_id
        if batch_size == "auto":
            raise FtjaxError("batch_size 'auto' is not supported by the ftjax backend; give a number, e.g. 8")
        self._batch_size = _int_arg(batch_size, "batch_size")
        self._max_length = _int_arg(max_length or cfg.max_position_embeddings or DEFAULT_MAX_LENGTH, "max_length")
        self._max_gen_toks = _int_arg(max_gen_toks, "max_gen_toks")

    # ----------------------------------------------------------------------------------------- harness properties
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        if self._prefix_token_id is not None:
            return self._prefix_token_id
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered with the model's chat template, as the hf backend renders it: with the
        generation prompt, or else ending inside the final message (transformers' continue_final_message); a
        template that refuses the conversation is retried without system messages."""
        if self.tok.chat_template is None:
            raise FtjaxError(f"{self._name} has no chat template; drop apply_chat_template / --apply-chat-template")
        try:
            return self._render_chat(chat_history, add_generation_prompt)
        except FtjaxError:
            if not any(m.get("role") == "system" for m in chat_history):
                raise
            return self._render_chat([m for m in chat_history if m.get("role") != "system"], add_generation_prompt)

    def _render_chat(self, chat_history: list[dict[str, str]], add_generation_prompt: bool) -> str:
        from ftjax.chat import render_chat

        messages = [dict(m) for m in chat_history]
        if not add_generation_prompt and messages:
            messages[-1]["content"] = messages[-1]["content"] + _CONTINUE_TAG
        text = render_chat(self.tok.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           special=self.tok.special)
        if add_generation_prompt:
            return text
        loc = text.rfind(_CONTINUE_TAG.strip())
        if loc < 0:
            raise FtjaxError(f"{self._name}: the chat template drops the final message, so it cannot be continued")
        return text[:loc] if text[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:loc].rstrip()

    # --------------------------------------------------------------------------------------------- tokenization
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids; special tokens (BOS) added as asked, else as add_bos_token says (default yes), never when the
        text starts with the prefix token."""
        if add_special_tokens is None:
            starts_with_prefix = string.startswith(self.tok.token_text(self.prefix_token_id))
            add_special_tokens = not starts_with_prefix and self._add_bos_token is not False
        ids = self.tok.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in self.tok.special_ids]
        return self.tok.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------------- requests
    def _score(self, pairs, desc: str, disable: bool) -> list[tuple[float, bool]]:
        bar, update = _progress_bar(len(pairs), desc, disable or self.rank != 0)
        try:
            return score_continuations(self.params, self.cfg, pairs, max_length=self.max_length,
                                       batch_size=self.batch_size, progress=update)
        finally:
            bar.close()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) from TemplateLM."""
        out = self._score([(ctx, cont) for _, ctx, cont in requests], "Running loglikelihood requests", disable_tqdm)
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Full-text log-likelihood (nats) of each request's string over disjoint max_length windows."""
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(k)
        scores = self._score(windows, "Running loglikelihood_rolling windows", disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, scores):
            totals[k] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generated continuations, cut at the first stop string (`until`, plus the EOS text), as the hf backend."""
        from ftjax.generate import generate_ids

        groups: dict[int, list[int]] = {}
        kwargs_of: list[dict] = []
        for i, req in enumerate(requests):
            kw = req.args[1]
            j = next((j for j, seen in enumerate(kwargs_of) if seen == kw), None)
            if j is None:
                j = len(kwargs_of)
                kwargs_of.append(kw)
            groups.setdefault(j, []).append(i)
        out: list[str] = [""] * len(requests)
        bar, update = _progress_bar(len(requests), "Running generate_until requests", disable_tqdm or self.rank != 0)
        eos_text = self.tok.token_text(self.eot_token_id)
        try:
            for j, members in groups.items():
                until, max_gen_toks, temperature, top_p = self._generation_settings(kwargs_of[j], eos_text)
                max_ctx = self.max_length - max_gen_toks
                if max_ctx < 1:
                    raise FtjaxError(f"max_gen_toks {max_gen_toks} leaves no room for the prompt in max_length "
                                     f"{self.max_length}; raise max_length or lower max_gen_toks")
                prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=max_ctx) for i in members]
                completions = generate_ids(self.params, self.cfg, prompts, max_new_tokens=max_gen_toks,
                                           eos_ids=self.tok.eos_ids, temperature=temperature, top_p=top_p,
                                           batch_size=self.batch_size)
                for i, completion in zip(members, completions):
                    text = postprocess_generated_text(self.tok_decode(completion.tokens), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                update(len(members), sum(len(c.tokens) for c in completions))
        finally:
            bar.close()
        return out

    def _generation_settings(self, gen_kwargs: dict, eos_text: str) -> tuple[list[str], int, float, float]:
        """(stop strings, max_gen_toks, temperature (0 = greedy), top_p) of a request's gen_kwargs; anything else
        is refused by name."""
        if not isinstance(gen_kwargs, dict):
            raise FtjaxError(f"generate_until: gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
        max_gen_toks = _int_arg(kw.pop("max_gen_toks"), "max_gen_toks")
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        temperature = temperature if do_sample else 0.0
        top_p = float(kw.pop("top_p", 1.0))
        if kw:
            raise FtjaxError(f"generate_until: the ftjax backend does not support {', '.join(sorted(kw))} "
                             "(it supports until, max_gen_toks, do_sample, temperature, top_p)")
        return until, max_gen_toks, temperature, top_p


class _DirTokenizer:
    """A `tokenizers.Tokenizer` with what the harness needs: EOS/BOS ids, generation stop ids, special-token ids
    (skipped when decoding, as transformers does) and the chat template."""

    def __init__(self, tokenizer: Any, eos_id: int, bos_id: int | None, eos_ids: tuple[int, ...],
                 chat_template: str | None, special: dict[str, str]) -> None:
        self.tokenizer, self.eos_id, self.bos_id, self.eos_ids = tokenizer, eos_id, bos_id, eos_ids
        self.chat_template, self.special = chat_template, special
        ids = {tokenizer.token_to_id(text) for text in special.values()}
        self.special_ids = frozenset(i for i in ids | set(eos_ids) | {eos_id} if i is not None)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @classmethod
    def load(cls, model_dir: Path) -> _DirTokenizer:
        """tokenizer.json, the named special tokens of tokenizer_config.json and generation_config.json's EOS ids."""
        from ftjax.chat import load_chat_template, special_tokens
        from ftjax.config import read_config
        from ftjax.data import load_tokenizer
        from ftjax.generate import eos_token_ids
        from ftjax.io.checkpoint import HFCheckpoint

        tokenizer = load_tokenizer(model_dir)
        special = special_tokens(model_dir)
        meta = read_config(HFCheckpoint(model_dir).config, source=str(model_dir / "config.json")).meta
        eos_ids = eos_token_ids(model_dir, meta)

        def named(key: str) -> int | None:
            text = special.get(key)
            return None if text is None else tokenizer.token_to_id(text)

        eos = named("eos_token")
        eos = eos if eos is not None else (eos_ids[0] if eos_ids else None)
        if eos is None:
            raise FtjaxError(f"{model_dir}: no eos_token in tokenizer_config.json and no eos_token_id in "
                             "generation_config.json / config.json; add one")
        return cls(tokenizer, eos, named("bos_token"), eos_ids or (eos,), load_chat_template(model_dir), special)


# ------------------------------------------------------------------------------------------------ running tasks
def check_chat_options(apply_chat_template: bool, fewshot_as_multiturn: bool | None) -> None:
    """Few-shot examples as chat turns need the chat template (as lm_eval's CLI): a one-line FtjaxError if not."""
    if fewshot_as_multiturn and not apply_chat_template:
        raise FtjaxError("--fewshot-as-multiturn needs --apply-chat-template (few-shot turns are chat messages)")


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None) -> Any:
    """The harness's TaskManager (built-in tasks plus the YAMLs under include_path) once `tasks` are all found in it.

    Building it indexes every built-in task YAML (seconds): build it once per run and pass it to every
    `evaluate_tasks` call. Unknown task names and a missing include_path are one-line FtjaxErrors.
    """
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise FtjaxError(f"--include-path {include_path} is not a directory of task YAML files")
    if not tasks:
        raise FtjaxError("--tasks names no task; give e.g. --tasks hellaswag,arc_easy")
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        where = f" or under {include_path}" if include_path is not None else "; pass --include-path DIR for your own"
        raise FtjaxError(f"unknown task {', '.join(unknown)}: not a harness task{where} (the names are the YAMLs' "
                         "`task:` fields)")
    return manager


def evaluate_tasks(lm: FtjaxLM, tasks: Sequence[str], *, include_path: str | Path | None = None,
                   manager: Any = None, limit: float | None = None, num_fewshot: int | None = None, seed: int = 0,
                   apply_chat_template: bool = False, system_instruction: str | None = None,
                   fewshot_as_multiturn: bool | None = None, bootstrap_iters: int = 100000) -> dict:
    """`lm_eval.simple_evaluate` of `lm` on harness tasks by name (built-in, or YAMLs under include_path).

    manager: a `task_manager(tasks, include_path)` built before (include_path is then not read again).
    limit: at most this many documents per task (a fraction of each task's documents when < 1). Returns the
    harness's result dict ("results" per task as {"metric,filter": value}, "configs", "versions", "n-shot", ...).
    apply_chat_template, system_instruction, fewshot_as_multiturn: as lm_eval's own CLI passes them (few-shot
    examples as turns defaults to apply_chat_template; asking for it without a chat template is an error); they
    are recorded in the result's "config", with the chat template used (None without apply_chat_template).
    bootstrap_iters: resamples for the metrics' stderr (the harness's default; 0 skips them).
    Unknown task names and a missing include_path are one-line FtjaxErrors, raised before any scoring.
    """
    import lm_eval

    check_chat_options(apply_chat_template, fewshot_as_multiturn)
    manager = manager if manager is not None else task_manager(tasks, include_path)
    multiturn = bool(apply_chat_template if fewshot_as_multiturn is None else fewshot_as_multiturn)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      apply_chat_template=apply_chat_template, system_instruction=system_instruction,
                                      fewshot_as_multiturn=multiturn, bootstrap_iters=bootstrap_iters)
    if results is not None:  # None on ranks other than 0; the prompt settings, as lm_eval's CLI logs them
        results["config"].update(apply_chat_template=bool(apply_chat_template),
                                 chat_template=lm.chat_template(apply_chat_template),
                                 system_instruction=system_instruction, fewshot_as_multiturn=multiturn)
    return results


def evaluate_path(path: str, thetas: Sequence[Any], coefs: Sequence[Sequence[float]], cfg: ModelConfig,
                  tokenizer: str | Path, tasks: Sequence[str], *, dtype: str = "float32", batch_size: int = 8,
                  max_length: int | None = None, **task_options: Any) -> list[dict]:
    """Harness results (`evaluate_tasks`' dicts) of the model at every point of a scan path, none written to disk.

    path, thetas: as `ftjax.lmc.point_params` ("lerp" over (A, B), "diff" over (T, F, S), "plane" over (A, B, C));
    coefs: one coefficient vector per point. Each point's parameters are built by the scan's one compiled
    interpolation and scored through `FtjaxLM.from_params`; every point has the same shapes, so the forward
    compiles once per bucket for the whole scan, not per point, and the tasks are indexed once. tokenizer: the
    model directory whose tokenizer and special tokens score every point. task_options: evaluate_tasks' keywords
    (include_path or manager, limit, ...); stderr is not bootstrapped unless bootstrap_iters is given.
    """
    from ftjax.lmc import point_params

    if task_options.get("manager") is None:
        task_options["manager"] = task_manager(tasks, task_options.get("include_path"))
    task_options.setdefault("bootstrap_iters", 0)
    thetas = tuple(thetas)
    out = []
    for c in coefs:
        params = point_params(np.asarray(c, np.float32), thetas, path=path, dtype=jnp.dtype(dtype).name)
        lm = FtjaxLM.from_params(params, cfg, tokenizer, batch_size=batch_size, max_length=max_length,
                                 name=f"{path}@{','.join(f'{x:g}' for x in c)}")
        out.append(evaluate_tasks(lm, tasks, **task_options))
        del lm, params
    return out


def metric_curves(points: Sequence[dict]) -> dict[str, dict[str, list[float | None]]]:
    """{task: {"metric,filter": [value at each point]}} of `evaluate_path`'s results: the numeric metrics the
    harness reports (no stderr); a metric missing or not finite at a point is None there."""
    import math

    curves: dict[str, dict[str, list[float | None]]] = {}
    for k, point in enumerate(points):
        for task, metrics in point["results"].items():
            for key, value in metrics.items():
                if "stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                series = curves.setdefault(task, {}).setdefault(key, [None] * len(points))
                series[k] = float(value) if math.isfinite(value) else None
    return curves


def results_table(results: dict) -> str:
    """The harness's markdown results table (lm_eval.utils.make_table), plus the groups table if there are groups."""
    from lm_eval.utils import make_table

    table = make_table(results)
    return table + ("\n" + make_table(results, "groups") if results.get("groups") else "")


def results_json(results: dict) -> str:
    """The result dict as indented JSON, non-JSON values as the harness writes them (handle_non_serializable)."""
    import json

    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=1, default=handle_non_serializable, ensure_ascii=False) + "\n"
