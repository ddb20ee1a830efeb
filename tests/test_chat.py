"""ftjax.chat renders chat templates exactly as transformers' apply_chat_template does."""

import json

import pytest
import transformers
from hf_models import make_tokenizer

from ftjax.chat import chat_messages, load_chat_template, render_chat, require_chat_template, special_tokens
from ftjax.errors import FtjaxError

# Llama 3's template, shortened: bos_token, a system-message split, a messages loop with trim, raise_exception,
# add_generation_prompt; plus a namespace, loop controls, tojson and strftime_now as other Hub templates use them.
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%Y") | length | string + "\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- set ns = namespace(users=0) %}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- if message['role'] == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
    {%- if message['role'] == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] | tojson + '<|eot_id|>' }}
        {%- continue %}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
{# users: {{ ns.users }} #}
"""

# A template that leans on trim_blocks / lstrip_blocks (blocks on their own lines) and a {% generation %} block.
BLOCKS = """{% for message in messages %}
    {% if message.role == 'assistant' %}
<|assistant|>
{% generation %}{{ message.content }}{% endgeneration %}
    {% else %}
<|{{ message.role }}|>
{{ message.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "  one plus two?  "}],
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! ünïcode <b>"}, {"role": "tool", "content": {"x": "é<>", "n": [1, 2]}},
     {"role": "user", "content": "And?", "name": None}],
]


def hf_render(path, messages, add_generation_prompt=True):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("template", [LLAMA3, BLOCKS], ids=["llama3", "blocks"])
@pytest.mark.parametrize("conversation", [0, 1])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_apply_chat_template(template, conversation, add_generation_prompt, tmp_path):
    make_tokenizer(tmp_path, chat_template=template)
    messages = CONVERSATIONS[conversation]
    expected = hf_render(tmp_path, messages, add_generation_prompt)
    got = render_chat(load_chat_template(tmp_path), messages, add_generation_prompt=add_generation_prompt,
                      special=special_tokens(tmp_path))
    assert got == expected


def test_template_sources(tmp_path):
    make_tokenizer(tmp_path)
    assert load_chat_template(tmp_path) is None
    with pytest.raises(FtjaxError, match="has no chat template"):
        require_chat_template(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config["bos_token"] = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "rstrip": False,
                           "normalized": False, "single_word": False, "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(tmp_path) == "D"
    assert special_tokens(tmp_path)["bos_token"] == "<s>"
    (tmp_path / "chat_template.jinja").write_text(LLAMA3)  # the file wins, as in transformers 5
    assert load_chat_template(tmp_path) == LLAMA3 == hf_tok_template(tmp_path)


def hf_tok_template(path):
    return transformers.AutoTokenizer.from_pretrained(path).chat_template


def test_template_errors_are_one_line():
    with pytest.raises(FtjaxError, match="refused the conversation: Unknown role: robot"):
        render_chat(LLAMA3, [{"role": "robot", "content": "x"}], special={"bos_token": "<s>"})
    with pytest.raises(FtjaxError, match="syntax error at line 1"):
        render_chat("{% if %}", [{"role": "user", "content": "x"}])
    with pytest.raises(FtjaxError, match="empty conversation"):
        render_chat(LLAMA3, [])


def test_sandbox_blocks_python_internals():
    with pytest.raises(FtjaxError):
        render_chat("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
                    [{"role": "user", "content": "x"}])
    with pytest.raises(FtjaxError):
        render_chat("{% set ns = namespace() %}{% set ns._x = 1 %}", [{"role": "user", "content": "x"}])


def test_chat_messages():
    assert chat_messages("hi") == [{"role": "user", "content": "hi"}]
    assert chat_messages("hi", "sys") == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    given = [{"role": "system", "content": "own"}, {"role": "user", "content": "hi"}]
    assert chat_messages(given, "sys") == given  # a conversation's own system message is kept
    with pytest.raises(FtjaxError, match="role"):
        chat_messages([{"content": "x"}])
