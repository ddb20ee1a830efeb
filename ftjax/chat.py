"""Chat templates: find a model directory's template and render it the way transformers' `apply_chat_template` does.

The template is `chat_template.jinja` in the model directory, else the `chat_template` field of
`tokenizer_config.json` (a string, or a list of named templates of which "default" is used). Rendering uses a
jinja2 sandboxed environment with trim_blocks and lstrip_blocks, the loop-controls extension, a no-op
`{% generation %}` block, the helpers templates call (`raise_exception`, `strftime_now`, a `tojson` filter that
does not escape HTML and takes indent / separators / sort_keys, `namespace`, `dict`), and the tokenizer's named
special tokens (`bos_token`, `eos_token`, ...) as variables. Chat templates come from the Hub and are untrusted
code: the sandbox is what keeps them from reaching Python internals.

`chat_token_weights` turns a conversation into training tokens with loss weights on the assistant turns only
(open-instruct's masking of non-assistant messages by tokenized prefix lengths).
"""

from __future__ import annotations

import datetime
import functools
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ftjax.errors import FtjaxError

Message = dict[str, Any]
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FtjaxError(f"{path}: cannot be read as JSON ({e})") from None
    if not isinstance(value, dict):
        raise FtjaxError(f"{path}: expected a JSON object")
    return value


def load_chat_template(model_dir: str | Path) -> str | None:
    """The model directory's chat template source, or None if it has none."""
    model_dir = Path(model_dir)
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    template = _read_json(config_file).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def require_chat_template(model_dir: str | Path) -> str:
    """The chat template, or a one-line FtjaxError saying the model has none."""
    template = load_chat_template(model_dir)
    if template is None:
        raise FtjaxError(f"{model_dir} has no chat template (no chat_template.jinja and no 'chat_template' in "
                         "tokenizer_config.json); drop --chat to use the prompt as plain text")
    return template


def special_tokens(model_dir: str | Path) -> dict[str, str]:
    """Named special tokens (`bos_token`, `eos_token`, ...) as strings, from tokenizer_config.json, else from
    special_tokens_map.json. Values may be stored as strings or as AddedToken dicts ({"content": ...})."""
    out: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        config = _read_json(path)
        for key in SPECIAL_TOKEN_NAMES:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and key not in out:
                out[key] = value
    return out


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it renders as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace, refusing underscore names (no reaching into internals through it)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace,
                       dict=lambda *args, **kwargs: dict(*args, **kwargs))
    return env.from_string(template)


def render_chat(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                special: dict[str, str] | None = None, **kwargs: Any) -> str:
    """The text `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` renders.

    special: the tokenizer's named special tokens (see `special_tokens`); kwargs are further template variables
    (e.g. tools, documents, enable_thinking) and override special tokens of the same name.
    """
    import jinja2

    if not messages:
        raise FtjaxError("cannot apply a chat template to an empty conversation")
    # transformers drops None-valued keys (many templates would print "None") and passes plain JSON data.
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    variables = {"tools": None, "documents": None, **(special or {}), **kwargs}
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise FtjaxError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None
    try:
        return compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise FtjaxError(f"chat template refused the conversation: {e}") from None


def chat_messages(prompt: str | Sequence[Message], system: str | None = None) -> list[Message]:
    """A conversation from a plain user prompt (or a given message list), with an optional system message first."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        if not all(isinstance(m.get("role"), str) for m in messages):
            raise FtjaxError("each chat message needs a 'role' string (and usually 'content')")
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def chat_token_weights(tokenizer, template: str, messages: Sequence[Message], *,
                       special: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32 [T]) of a conversation rendered by its chat template, and each token's loss weight
    (float32 [T]): 1 on what the assistant says, 0 on everything else. This is open-instruct's SFT masking
    (`mask_labels` of `sft_tulu_tokenize_and_truncate_v1`), applied to the whole conversation before truncation.

    ids = tokenize(render(messages, add_generation_prompt=False)), without added special tokens, as
    `apply_chat_template(messages, tokenize=True)` gives them (`tokenizer` is a `tokenizers.Tokenizer`). Then for
    every message i whose role is not "assistant" (system, user, tool, ...), tokens [start_i, end_i) weigh 0:
        start_i = 0 if i == 0 else len(tokenize(render(messages[:i], add_generation_prompt=False)))
        end_i = len(tokenize(render(messages[:i + 1], add_generation_prompt=<messages[i + 1] is "assistant">)))
    So masked: the template's preamble (BOS, default system prompt), every non-assistant message with its header
    and end-of-turn tokens, and the assistant header that follows it (the generation prompt). Trained: each
    assistant message's content and whatever the template emits after it up to the next message's start (its
    end-of-turn / EOS tokens, so the model learns to stop). Token 0 always weighs 0 (nothing precedes it). A
    conversation that opens with an assistant message has nothing before it to mask, so there the preamble and
    that first assistant header are trained too (as in open-instruct).

    The spans come from token counts of re-rendered prefixes, so they assume the template renders a prefix of the
    conversation as a prefix of the whole (true of Tulu, Llama 3 and Qwen 2.5 templates; a template that rewrites
    earlier turns once later ones exist can shift the boundaries by a few tokens, as in open-instruct).
    """
    def render(msgs: Sequence[Message], generation_prompt: bool) -> str:
        return render_chat(template, msgs, add_generation_prompt=generation_prompt, special=special)

    masked = [i for i, m in enumerate(messages) if m.get("role") != "assistant"]
    texts = [render(messages, False)]
    for i in masked:  # the prefix before message i (none for i = 0), and through message i
        next_is_assistant = i + 1 < len(messages) and messages[i + 1].get("role") == "assistant"
        texts += ([render(messages[:i], False)] if i else []) + [render(messages[:i + 1], next_is_assistant)]
    ids, *prefixes = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    lengths = iter(len(p) for p in prefixes)
    weights = np.ones(len(ids), np.float32)
    for i in masked:
        start = next(lengths) if i else 0
        weights[start:next(lengths)] = 0.0
    weights[:1] = 0.0
    return np.asarray(ids, np.int32), weights
