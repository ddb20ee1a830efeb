"""Chat rows {"messages": [...]} for fine-tuning: tokens as transformers' apply_chat_template gives them, loss on the
assistant turns only (open-instruct's prefix-length masking), and the row-level errors and counts."""

import json
from pathlib import Path

import numpy as np
import pytest
import transformers
from hf_models import make_hf_model, make_tokenizer

from ftjax.chat import chat_token_weights, load_chat_template, special_tokens
from ftjax.cli import main
from ftjax.config import ModelConfig
from ftjax.data import load_tokenizer
from ftjax.errors import FtjaxError
from ftjax.data import CHAT
from ftjax.rows import load_examples, load_rows
from ftjax.train import TrainConfig, finetune

# open-instruct's "tulu" chat template (open_instruct/dataset_transformation.py), as in Tulu 3's tokenizers.
TULU = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + "
        "'\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}{% elif "
        "message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + "
        "eos_token + '\n' }}{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}"
        "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}")

# Llama 3 style: BOS from the template, a default system prompt, headers around every turn, tool turns.
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "the answer is one" %}
{%- endif %}
{{- "<|system|> " + system_message + " </s>" }}
{%- for message in messages %}
    {{- '<|' + message['role'] + '|> ' + message['content'] | trim + ' </s>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|> ' }}
{%- endif %}"""

TWO_TURNS = [{"role": "user", "content": "one plus two"}, {"role": "assistant", "content": "three"},
             {"role": "user", "content": "plus four"}, {"role": "assistant", "content": "seven"}]
CONVERSATIONS = [
    TWO_TURNS,
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the answer"},
     {"role": "assistant", "content": "the answer is two"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "tool", "content": "ten"},
     {"role": "assistant", "content": "nine"}, {"role": "user", "content": "and"}],  # ends on a user turn
    [{"role": "assistant", "content": "one two"}, {"role": "user", "content": "three"},
     {"role": "assistant", "content": "four"}],  # opens with the assistant
]
SPECIAL = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]


def chat_tokenizer(path: Path, template: str | None) -> Path:
    """make_tokenizer's word-level tokenizer plus the template's markers as special tokens (ids 123..127)."""
    from tokenizers import Tokenizer

    make_tokenizer(path, vocab_size=124, chat_template=template)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens(SPECIAL)  # "<s>", "</s>" are already ids 1, 2 (real tokenizer.json files list them)
    tok.save(str(path / "tokenizer.json"))
    return path


def open_instruct_weights(tok, messages):
    """open-instruct's mask_labels, written against transformers' apply_chat_template (the reference)."""
    def ids(msgs, gen):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def n(msgs, gen):
        return len(tok(ids(msgs, gen), add_special_tokens=False)["input_ids"])

    full = tok(ids(messages, False), add_special_tokens=False)["input_ids"]
    weights = np.ones(len(full), np.float32)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            nxt = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
            weights[0 if i == 0 else n(messages[:i], False):n(messages[:i + 1], nxt)] = 0
    weights[0] = 0
    return full, weights


def test_two_turn_mask_by_hand(tmp_path):
    """Tulu template, u1 a1 u2 a2: the user turns and the assistant headers are masked, answers + EOS trained."""
    path = chat_tokenizer(tmp_path / "tok", TULU)
    tokenizer = load_tokenizer(path)
    ids, weights = chat_token_weights(tokenizer, load_chat_template(path), TWO_TURNS, special=special_tokens(path))
    # "<|user|>\none plus two\n<|assistant|>\nthree</s>\n<|user|>\nplus four\n<|assistant|>\nseven</s>"
    words = ["<|user|>", "one", "plus", "two", "<|assistant|>", "three", "</s>",
             "<|user|>", "plus", "four", "<|assistant|>", "seven", "</s>"]
    assert ids.tolist() == [tokenizer.token_to_id(w) for w in words]
    # user 1: [0, len(u1 + generation prompt) = 5); user 2: [len(u1 a1) = 7, len(u1 a1 u2 + generation prompt) = 11)
    assert weights.tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1]
    trained = [w for w, x in zip(words, weights) if x]
    assert trained == ["three", "</s>", "seven", "</s>"]


@pytest.mark.parametrize("template", [TULU, LLAMA3], ids=["tulu", "llama3"])
def test_tokens_and_mask_match_transformers(template, tmp_path):
    path = chat_tokenizer(tmp_path / "tok", template)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ours_tok, special = load_tokenizer(path), special_tokens(path)
    for messages in CONVERSATIONS:
        ids, weights = chat_token_weights(ours_tok, load_chat_template(path), messages, special=special)
        assert ids.tolist() == hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        full, expected = open_instruct_weights(hf, messages)
        assert ids.tolist() == full
        np.testing.assert_array_equal(weights, expected)
        # every trained token is assistant text or an end-of-turn token; every assistant word is trained
        trained = {hf.convert_ids_to_tokens(int(t)) for t in ids[weights > 0]}
        said = {w for m in messages if m["role"] == "assistant" for w in m["content"].split()}
        if messages[0]["role"] == "assistant" and template == LLAMA3:
            # nothing precedes message 0 to mask: the preamble (default system prompt, header) is trained, as in
            # open-instruct (the docstring says so)
            assert {"<|system|>", "<|assistant|>"} <= trained
        else:
            assert said <= trained <= said | {"</s>"}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model = make_hf_model(root / "m")
    chat_tokenizer(model, TULU)
    plain = make_hf_model(root / "plain")
    make_tokenizer(plain)
    return root, model, plain


def test_chat_rows_train_with_skips_counted(chat_model, tmp_path, capsys):
    """A row whose assistant turns are all cut off by --max-len is skipped and counted, not fatal."""
    _, model, _ = chat_model
    long_prompt = {"messages": [{"role": "user", "content": " ".join(["one two three four"] * 10)},
                                {"role": "assistant", "content": "five"}]}
    data = _write(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS] + [long_prompt])
    cfg = ModelConfig.from_hf(json.loads((model / "config.json").read_text()))
    examples = load_examples(data, model, cfg)
    assert [e.kind for e in examples] == [CHAT] * 5 and [e.row for e in examples] == [0, 1, 2, 3, 4]
    rows, counts = load_rows(data, model, cfg, max_len=32)
    assert (counts.rows, counts.examples, counts.truncated, counts.skipped) == (5, 4, 1, 1)
    assert "1 skipped with no trained tokens left" in capsys.readouterr().err
    assert rows.weights_nt.sum() == sum(e.weights_t.sum() for e in examples[:4])

    result = finetune(model, data, tmp_path / "run", config=TrainConfig(steps=2, lr=1e-3, batch_size=2, max_len=32),
                      eval_data=data, progress=False)
    assert result["data"] == {"rows": 5, "examples": 4, "truncated": 1, "skipped": 1}
    assert np.isfinite(result["loss"]) and np.isfinite(result["eval"]["loss"])


def _error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftjax: error:") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_chat_row_errors_are_one_line(chat_model, tmp_path, capsys):
    _, model, plain = chat_model
    data = _write(tmp_path / "chat.jsonl", [{"messages": TWO_TURNS}])
    base = ["finetune", "--data", str(data), "--steps", "1", "--max-len", "32", "--quiet", "--out", str(tmp_path / "r")]
    err = _error(capsys, *base, "--init", str(plain))
    assert "'messages' rows need a chat template" in err and "chat_template.jinja" in err
    cfg = ModelConfig.from_hf(json.loads((model / "config.json").read_text()))
    bad = {"bad.jsonl:1: no 'assistant' message": [{"messages": [{"role": "user", "content": "one"}]}],
           "bad.jsonl:1: every message needs a 'role'": [{"messages": [{"content": "one"}]}],
           "bad.jsonl:1: 'messages' must be a non-empty list": [{"messages": []}]}
    for match, rows in bad.items():
        with pytest.raises(FtjaxError, match=match) as e:
            load_examples(_write(tmp_path / "bad.jsonl", rows), model, cfg)
        assert str(e.value).count("bad.jsonl:1") == 1, str(e.value)  # the location once, not repeated
    assert not (tmp_path / "r").exists()


def test_eval_scores_chat_rows_on_assistant_tokens(chat_model, tmp_path, capsys):
    """`ftjax eval` reads the same chat rows as fine-tuning: the loss counts the assistant tokens only."""
    _, model, _ = chat_model
    data = _write(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    cfg = ModelConfig.from_hf(json.loads((model / "config.json").read_text()))
    want = sum(int(e.weights_t.sum()) for e in load_examples(data, model, cfg))
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == want and result["rows"] == len(CONVERSATIONS)
