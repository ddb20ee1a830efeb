"""ftjax as an lm-evaluation-harness backend: every request type equals the harness's own hf backend (HFLM) on a
tiny random llama, request by request and metric by metric on local YAML/JSONL tasks (nothing downloads)."""

import json
import os

import pytest

from tests.hf_models import (QWEN2_EOT, QWEN2_VOCAB, make_hf_model, make_qwen2_tokenizer, make_tokenizer,
                              write_jsonl)

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MAX_LENGTH = 16  # short, so the rolling and truncation paths are exercised by short texts
LONG_TEXT = " ".join(["one plus two equals three and the answer is four or five"] * 4)  # ~48 tokens: 4 windows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_hf_model(tmp_path_factory.mktemp("llama") / "m")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def hf(model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), backend="causal", dtype="float32", device="cpu", batch_size=4,
                max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def ours(model_dir):
    from ftjax.lm_eval import FtjaxLM

    return FtjaxLM(pretrained=str(model_dir), dtype="float32", batch_size=4, max_length=MAX_LENGTH)


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=0, metadata=("t", i, 1)) for i, a in enumerate(args)]


def _assert_scores_match(ours, hf):
    """Log-likelihoods (with is_greedy) and rolling log-likelihoods of a few requests equal the hf backend's."""
    pairs = [("the answer is", " one"), ("", "two three"), (LONG_TEXT, " five six")]
    got, expected = (lm.loglikelihood(_instances("loglikelihood", pairs)) for lm in (ours, hf))
    assert [g for _, g in got] == [g for _, g in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-4)
    texts = [(LONG_TEXT,), ("the answer is one",)]
    got, expected = (lm.loglikelihood_rolling(_instances("loglikelihood_rolling", texts)) for lm in (ours, hf))
    assert got == pytest.approx(expected, abs=1e-4)


def _greedy_word(hf, context):
    """The hf backend's greedy next word after `context` (so one request is greedy for sure)."""
    return hf.generate_until(_instances("generate_until", [(context, {"until": ["\n"], "max_gen_toks": 1})]))[0]


def _pairs(hf):
    context = "the answer is"
    return [(context, " one"), (context, " " + _greedy_word(hf, context).strip()), ("", "two three"),
            ("one plus one equals", " two"),
            ("one plus one equals ", "two four"), (LONG_TEXT, " five six"), ("it was", " the question")]


def test_loglikelihood_matches_hf(hf, ours):
    pairs = _pairs(hf)
    expected = hf.loglikelihood(_instances("loglikelihood", pairs))
    got = ours.loglikelihood(_instances("loglikelihood", pairs))
    assert [g for _, g in got] == [g for _, g in expected]
    assert got[1][1] is True  # the greedy continuation
    for (ll, _), (ref, _) in zip(got, expected):
        assert ll == pytest.approx(ref, abs=1e-4)


def test_loglikelihood_rolling_matches_hf(hf, ours):
    texts = [(LONG_TEXT,), ("the answer is one",), (LONG_TEXT[:40],)]
    assert len(ours.tok_encode(LONG_TEXT)) > 3 * MAX_LENGTH  # several windows
    expected = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    got = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    assert got == pytest.approx(expected, abs=1e-4)


def test_generate_until_matches_hf(hf, ours):
    prompt = "one plus one equals"
    free = hf.generate_until(_instances("generate_until", [(prompt, {"until": ["\n"], "max_gen_toks": 8})]))
    stop = free[0].split()[3]  # a word the model does generate (4th, first seen there): the stop string cuts there
    requests = [(prompt, {"until": [stop], "max_gen_toks": 8}),
                ("the answer is", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}),
                (LONG_TEXT, {"until": ["\n"], "max_gen_toks": 4}),
                ("two", {"until": ["\n"], "max_gen_toks": 4}),  # stops at once on EOS
                ("it was", {"until": [stop, "\n"], "max_gen_toks": 6})]
    expected = hf.generate_until(_instances("generate_until", requests))
    got = ours.generate_until(_instances("generate_until", requests))
    assert got == expected
    assert stop not in got[0] and len(got[0].split()) == 3


def test_batch_size_and_buckets_do_not_change_results(model_dir, ours, count_calls):
    """Requests of 3..49 tokens fall in the buckets 16, 32, 64: at most three compilations for any batch size, and
    every result equals the hf backend's whatever the batch size."""
    import ftjax.lm_eval as backend
    from ftjax.lm_eval import FtjaxLM
    from lm_eval.models.huggingface import HFLM

    words = LONG_TEXT.split()
    pairs = [(" ".join(words[:n]), " " + words[n]) for n in (2, 5, 9, 14, 20, 27, 33, 40, 46)] + [("", "two three")]
    reference = HFLM(pretrained=str(model_dir), backend="causal", dtype="float32", device="cpu", batch_size=3,
                     max_length=64)
    expected = reference.loglikelihood(_instances("loglikelihood", pairs))
    for batch_size in (1, 3, 16):
        lm = FtjaxLM.from_params(ours.params, ours.cfg, model_dir, batch_size=batch_size, max_length=64)
        traces = count_calls(backend, "forward")
        got = lm.loglikelihood(_instances("loglikelihood", pairs))
        assert traces["n"] <= 3, batch_size  # one per bucket, not one per request
        for (ll, g), (ref, ref_g) in zip(got, expected):
            assert ll == pytest.approx(ref, abs=1e-4) and g == ref_g


@pytest.mark.parametrize("options", [dict(add_bos_token=False), dict(add_bos_token=False, prefix_token_id=2),
                                     dict(prefix_token_id=5), dict(add_bos_token=True)])
def test_bos_and_prefix_options_match_hf(model_dir, options):
    """add_bos_token / prefix_token_id (lm_eval --model_args) change tokens and scores as in the hf backend."""
    from lm_eval.models.huggingface import HFLM

    from ftjax.lm_eval import FtjaxLM

    hf = HFLM(pretrained=str(model_dir), backend="causal", dtype="float32", device="cpu", batch_size=4,
              max_length=MAX_LENGTH, **options)
    ours = FtjaxLM(pretrained=str(model_dir), batch_size=4, max_length=MAX_LENGTH, **options)
    assert ours.prefix_token_id == hf.prefix_token_id
    for text in ("the answer is one", "an answer is one"):  # "an" is token 5: no BOS before a prefix token text
        assert ours.tok_encode(text) == hf.tok_encode(text), text
    _assert_scores_match(ours, hf)
    requests = [("one plus one equals", {"until": ["\n"], "max_gen_toks": 6})]
    got, expected = (lm.generate_until(_instances("generate_until", requests)) for lm in (ours, hf))
    assert got == expected


def test_bad_bos_and_prefix_options_are_refused(ours):
    from ftjax.errors import FtjaxError
    from ftjax.lm_eval import FtjaxLM

    with pytest.raises(FtjaxError, match="prefix_token_id must be a token id in 0..127"):
        FtjaxLM.from_params(ours.params, ours.cfg, ours.tok.tokenizer, eos_token_id=2, prefix_token_id=128)
    with pytest.raises(FtjaxError, match="add_bos_token must be True or False"):
        FtjaxLM.from_params(ours.params, ours.cfg, ours.tok.tokenizer, eos_token_id=2, add_bos_token="maybe")


@pytest.mark.parametrize("option", [dict(enable_thinking=False), dict(think_end_token="</think>"),
                                    dict(chat_template_args={"enable_thinking": False}), dict(peft="adapter")])
def test_hf_options_that_change_scores_are_refused(model_dir, option):
    """Options of the hf backend this backend does not implement are refused by name, not silently ignored."""
    from ftjax.errors import FtjaxError
    from ftjax.lm_eval import FtjaxLM

    with pytest.raises(FtjaxError, match=f"does not support {next(iter(option))} "):
        FtjaxLM(pretrained=str(model_dir), max_length=MAX_LENGTH, **option)
    assert FtjaxLM(pretrained=str(model_dir), max_length=MAX_LENGTH, device="cpu", enable_thinking=None).max_length


def test_from_params_with_a_tokenizer_object(ours):
    from ftjax.lm_eval import FtjaxLM

    with pytest.raises(Exception, match="eos_token_id"):
        FtjaxLM.from_params(ours.params, ours.cfg, ours.tok.tokenizer)
    lm = FtjaxLM.from_params(ours.params, ours.cfg, ours.tok.tokenizer, eos_token_id=2, bos_token_id=1,
                             max_length=MAX_LENGTH)
    pairs = [("", "two three"), ("the answer is", " one")]
    requests = _instances("loglikelihood", pairs)
    assert lm.loglikelihood(requests) == ours.loglikelihood(requests)


def test_unsupported_generation_settings_are_refused(ours):
    from ftjax.errors import FtjaxError

    with pytest.raises(FtjaxError, match="num_beams"):
        ours.generate_until(_instances("generate_until", [("the answer is", {"until": ["\n"], "num_beams": 4})]))


def test_registered_as_ftjax():
    import ftjax.lm_eval as backend
    from lm_eval.api.registry import get_model

    assert get_model("ftjax") is backend.FtjaxLM


# ------------------------------------------------------------------------------------------------ local tasks
MC_ROWS = [{"question": "one plus one equals", "choices": ["two", "three", "four"], "answer": 0},
           {"question": "the answer is", "choices": ["one", "five six", "ten"], "answer": 2},
           {"question": "two plus two equals", "choices": ["four", "two"], "answer": 0},
           {"question": "it was", "choices": ["the question", "an answer", "a"], "answer": 1}]
PPL_ROWS = [{"text": LONG_TEXT}, {"text": "the answer is one"}, {"text": "one two three four five six seven"}]
GEN_ROWS = [{"question": "one plus one equals", "answer": "two"}, {"question": "the answer is", "answer": "one"},
            {"question": "it was", "answer": "the"}]


def write_tasks(root):
    """Three tasks over local JSONL: multiple choice (acc, acc_norm), perplexity, generation (exact match)."""
    root.mkdir(parents=True, exist_ok=True)
    data = {name: write_jsonl(root / f"{name}.jsonl", rows)
            for name, rows in (("mc", MC_ROWS), ("ppl", PPL_ROWS), ("gen", GEN_ROWS))}

    def task(name, body):
        (root / f"{name}.yaml").write_text(
            f"task: tiny_{name}\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
            f"    test: {json.dumps(str(data[name]))}\ntest_split: test\n{body}metadata:\n  version: 1.0\n")

    task("mc", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_target: answer\n'
               'doc_to_choice: "{{choices}}"\ntarget_delimiter: " "\nmetric_list:\n'
               "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
               "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    task("ppl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
                + "".join(f"  - metric: {m}\n    aggregation: {a}\n    higher_is_better: false\n" for m, a in
                        (("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                         ("bits_per_byte", "bits_per_byte"))))
    task("gen", 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                'generation_kwargs:\n  until: ["\\n", "five"]\n  max_gen_toks: 4\n  do_sample: false\n'
                "filter_list:\n  - name: first\n    filter:\n      - function: regex\n"
                '        regex_pattern: "(\\\\w+)"\n      - function: take_first\n'
                "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return root


TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def _evaluate(lm, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=TaskManager(include_path=str(task_dir)),
                                  log_samples=False, bootstrap_iters=0)
    return out["results"]


def test_simple_evaluate_matches_hf(hf, ours, task_dir):
    got, expected = _evaluate(ours, task_dir), _evaluate(hf, task_dir)
    assert set(got) == set(TASKS)
    for task in TASKS:
        metrics = {k: v for k, v in expected[task].items() if isinstance(v, (int, float)) and "stderr" not in k}
        assert metrics, task
        for key, value in metrics.items():
            assert got[task][key] == pytest.approx(value, rel=1e-5), (task, key)
    assert "acc_norm,none" in got["tiny_mc"] and "word_perplexity,none" in got["tiny_ppl"]
    assert "exact_match,first" in got["tiny_gen"]


# ------------------------------------------------------------------------------------------------------ the CLI
def test_cli_lm_eval_prints_the_table_and_writes_the_results(hf, model_dir, task_dir, tmp_path, capsys):
    from ftjax.cli import main

    out = tmp_path / "res" / "lm_eval.json"
    assert main(["lm-eval", "--model", str(model_dir), "--tasks", "tiny_mc,tiny_gen", "--include-path",
                 str(task_dir), "--limit", "3", "--max-length", str(MAX_LENGTH), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "acc_norm" in printed and "exact_match" in printed and str(out) in printed
    written = json.loads(out.read_text())["results"]
    import lm_eval
    from lm_eval.tasks import TaskManager

    expected = lm_eval.simple_evaluate(model=hf, tasks=["tiny_mc", "tiny_gen"], limit=3, log_samples=False,
                                       task_manager=TaskManager(include_path=str(task_dir)))["results"]
    for task in ("tiny_mc", "tiny_gen"):
        for key, value in expected[task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert written[task][key] == pytest.approx(value, rel=1e-5), (task, key)


@pytest.mark.parametrize("extra, message", [(["--tasks", "no_such_task"], "unknown task no_such_task"),
                                            (["--tasks", "tiny_mc", "--include-path", "/nonexistent"],
                                             "--include-path /nonexistent"),
                                            (["--tasks", "tiny_mc", "--limit", "-1"], "--limit"),
                                            (["--tasks", "tiny_mc", "--batch-size", "auto"], "--batch-size auto"),
                                            (["--tasks", "tiny_mc", "--fewshot-as-multiturn"],
                                             "needs --apply-chat-template")])
def test_cli_lm_eval_errors_are_one_line(model_dir, task_dir, tmp_path, capsys, extra, message):
    from ftjax.cli import main

    out = tmp_path / "lm_eval.json"
    if "--include-path" not in extra:
        extra = extra + ["--include-path", str(task_dir)]
    assert main(["lm-eval", "--model", str(model_dir), *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


CHAT = ("{% for m in messages %}{{ m['role'] }} says {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant says {% endif %}")  # word-level: a space before the answer


def test_chat_template_tasks_match_hf(tmp_path, task_dir):
    """apply_chat_template=True: the prompts the harness renders through each backend score the same."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ftjax.lm_eval import FtjaxLM

    path = make_hf_model(tmp_path / "chat", seed=1)
    make_tokenizer(path, chat_template=CHAT)
    hf = HFLM(pretrained=str(path), backend="causal", dtype="float32", device="cpu", batch_size=4, max_length=64)
    ours = FtjaxLM(pretrained=str(path), batch_size=4, max_length=64)
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one plus one"},
               {"role": "assistant", "content": "two "}]
    for prompt in (True, False):
        assert ours.apply_chat_template(history, prompt) == hf.apply_chat_template(history, prompt)

    def run(lm):
        return lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_gen"], apply_chat_template=True,
                                       log_samples=False, task_manager=TaskManager(include_path=str(task_dir)),
                                       system_instruction="be brief")["results"]

    got, expected = run(ours), run(hf)
    for task in ("tiny_mc", "tiny_gen"):
        for key, value in expected[task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert got[task][key] == pytest.approx(value, rel=1e-5), (task, key)


def test_cli_lm_eval_chat_flags_reach_the_harness(tmp_path, task_dir, local_tasks_only, capsys):
    """--apply-chat-template / --system-instruction / --fewshot-as-multiturn are passed as lm_eval's CLI passes
    them: the results say so, and the scores are those of simple_evaluate with the same settings."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from ftjax.cli import main
    from ftjax.lm_eval import FtjaxLM

    path = make_hf_model(tmp_path / "chat", seed=1)
    make_tokenizer(path, chat_template=CHAT)
    runs = {}
    for name, flags in (("chat", ["--apply-chat-template", "--system-instruction", "be brief", "--num-fewshot", "1"]),
                        ("single_turn", ["--apply-chat-template", "--fewshot-as-multiturn", "false",
                                         "--num-fewshot", "1"])):
        out = tmp_path / f"{name}.json"
        assert main(["lm-eval", "--model", str(path), "--tasks", "tiny_mc", "--include-path", str(task_dir),
                     "--max-length", "64", "--out", str(out), *flags]) == 0
        runs[name] = json.loads(out.read_text())
    capsys.readouterr()
    chat, config = runs["chat"], runs["chat"]["config"]
    assert config["system_instruction"] == "be brief" and config["fewshot_as_multiturn"] is True
    assert config["apply_chat_template"] is True and config["chat_template"] == CHAT
    assert runs["single_turn"]["config"]["fewshot_as_multiturn"] is False
    expected = lm_eval.simple_evaluate(
        model=FtjaxLM(pretrained=str(path), max_length=64), tasks=["tiny_mc"], num_fewshot=1, log_samples=False,
        task_manager=TaskManager(include_path=str(task_dir)), apply_chat_template=True,
        system_instruction="be brief", fewshot_as_multiturn=True)["results"]["tiny_mc"]
    for key in ("acc,none", "acc_norm,none"):
        assert chat["results"]["tiny_mc"][key] == pytest.approx(expected[key], rel=1e-6)


QWEN_FAMILIES = ("qwen2", "qwen3")  # real ones: byte-level BPE tokenizers with no BOS


def _family_model(path, family):
    """A tiny `family` checkpoint with its tokenizer, the config's BOS/EOS ids those of the tokenizer. Qwen families
    get a Qwen2-like tokenizer (byte-level BPE, no BOS, "<|endoftext|>" ends text): transformers' AutoTokenizer
    loads every qwen2 checkpoint as Qwen2Tokenizer, whose byte-level pipeline turns make_tokenizer's word-level
    vocabulary into empty encodings."""
    if family in QWEN_FAMILIES:
        make_hf_model(path, family, vocab_size=QWEN2_VOCAB, bos_token_id=QWEN2_EOT, eos_token_id=QWEN2_EOT)
        return make_qwen2_tokenizer(path)
    make_hf_model(path, family, bos_token_id=1, eos_token_id=2, pad_token_id=None)  # <s>, </s>
    return make_tokenizer(path)


@pytest.mark.parametrize("family", ["mistral", "olmo2", "olmo3", "qwen2", "qwen3", "smollm3", "gemma2",
                                    "gemma3_text", "phi3", "granite"])  # every dense family ftjax's forward runs
def test_other_families_match_hf(tmp_path, family):
    """Log-likelihoods, rolling windows and generations of the other tiny families equal the hf backend's."""
    from lm_eval.models.huggingface import HFLM

    from ftjax.lm_eval import FtjaxLM

    path = _family_model(tmp_path / family, family)
    hf = HFLM(pretrained=str(path), backend="causal", dtype="float32", device="cpu", batch_size=4,
              max_length=MAX_LENGTH)
    ours = FtjaxLM(pretrained=str(path), batch_size=4, max_length=MAX_LENGTH)
    assert (ours.prefix_token_id, ours.eot_token_id) == (hf.prefix_token_id, hf.eot_token_id)
    if family in QWEN_FAMILIES:  # no BOS: an empty context and each rolling window start from end-of-text
        assert hf.tokenizer.bos_token_id is None and ours.prefix_token_id == QWEN2_EOT
    assert ours.tok_encode(LONG_TEXT) == hf.tok_encode(LONG_TEXT)
    _assert_scores_match(ours, hf)
    requests = [("one plus one equals", {"until": ["\n"], "max_gen_toks": 6}), ("it was", {"max_gen_toks": 4})]
    got, expected = (lm.generate_until(_instances("generate_until", requests)) for lm in (ours, hf))
    assert got == expected and any(text.strip() for text in expected)  # some text is generated


# ---------------------------------------------------------------------------------------- scan --tasks
@pytest.fixture(scope="module")
def two_models(tmp_path_factory, model_dir):
    other = make_hf_model(tmp_path_factory.mktemp("llama_b") / "b", seed=1)
    make_tokenizer(other)
    return model_dir, other


@pytest.fixture
def local_tasks_only(monkeypatch):
    """The harness indexes only --include-path (not its ~10 s of built-in task YAMLs): same tasks, same scores."""
    import functools

    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                         include_defaults=False))


def _scan_with_tasks(models, task_dir, out, points):
    from ftjax.cli import main
    from tests.hf_models import lm_rows

    data = write_jsonl(out.parent / f"{out.name}.jsonl", lm_rows(4))
    return main(["scan", *models, "--data", str(data), "--points", str(points), "--max-len", str(MAX_LENGTH),
                 "--batch-size", "4", "--tasks", ",".join(TASKS), "--include-path", str(task_dir), "--limit", "3",
                 "--out", str(out), "--json"])


def test_cli_scan_tasks_endpoints_equal_lm_eval(two_models, task_dir, tmp_path, capsys, local_tasks_only):
    """Every point of `scan --tasks` is scored by the harness; at λ = 0 and 1 the scores are those of `lm-eval`
    on the two model directories, and scan.json has one curve per task metric (--along-diff too)."""
    from ftjax.cli import main

    a, b = two_models
    out = tmp_path / "scan"
    assert _scan_with_tasks(["--a", str(a), "--b", str(b)], task_dir, out, 3) == 0
    capsys.readouterr()
    result = json.loads((out / "scan.json").read_text())
    assert result["lambda"] == [0.0, 0.5, 1.0]
    curves = result["tasks"]
    assert set(curves) == set(TASKS)
    assert {"acc,none", "acc_norm,none"} <= set(curves["tiny_mc"]) and "exact_match,first" in curves["tiny_gen"]
    assert "word_perplexity,none" in curves["tiny_ppl"]
    assert all(len(v) == 3 for m in curves.values() for v in m.values())
    # --along-diff T + λ·(F − S) with F = S: the target B at every λ, scored with the target's tokenizer
    along = tmp_path / "along"
    assert _scan_with_tasks(["--along-diff", "--target", str(b), "--source-ft", str(a), "--source-base", str(a)],
                            task_dir, along, 2) == 0
    along_curves = json.loads((along / "scan.json").read_text())["tasks"]
    for k, model in ((0, a), (2, b)):
        path = tmp_path / f"lm_eval_{k}.json"
        assert main(["lm-eval", "--model", str(model), "--tasks", ",".join(TASKS), "--include-path", str(task_dir),
                     "--limit", "3", "--max-length", str(MAX_LENGTH), "--batch-size", "4", "--out", str(path)]) == 0
        expected = json.loads(path.read_text())["results"]
        for task, metrics in curves.items():
            for key, values in metrics.items():
                assert values[k] == pytest.approx(expected[task][key], rel=1e-6), (task, key, k)
                if k == 2:
                    assert along_curves[task][key] == pytest.approx([expected[task][key]] * 2, rel=1e-6)
    ppl = curves["tiny_ppl"]["word_perplexity,none"]
    assert ppl[0] != ppl[2]  # two different models: the test can tell the endpoints apart
    assert (out / "scan.png").stat().st_size > 1000


def test_scan_tasks_compile_once_for_all_points(two_models, task_dir, count_calls, local_tasks_only):
    """The forward (and the interpolation) compile as often for a 4-point scan as for a 2-point one."""
    import jax

    import ftjax.lm_eval as backend
    from ftjax import lmc
    from ftjax.params import load_params

    (cfg, a), (_, b) = (load_params(m) for m in two_models)
    counts = []
    for lambdas in ([0.0, 1.0], [-0.5, 0.0, 0.5, 1.5]):
        jax.clear_caches()
        forward_traces, point_traces = count_calls(backend, "forward"), count_calls(lmc, "_point")
        points = backend.evaluate_path("lerp", (a, b), [[lam] for lam in lambdas], cfg, two_models[0],
                                       ["tiny_mc", "tiny_ppl"], include_path=task_dir, limit=3, batch_size=4,
                                       max_length=MAX_LENGTH)
        assert len(points) == len(lambdas)
        counts.append((forward_traces["n"], point_traces["n"]))
    assert counts[0] == counts[1] and counts[0] >= (1, 1)
