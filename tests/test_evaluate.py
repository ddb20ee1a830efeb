"""eval: token-weighted NLL equals transformers' on the same tokens; independent of batching; bad data files."""

import json
import math

import numpy as np
import pytest

from ftjax.cli import main
from ftjax.data import examples_from_rows, load_tokenizer, read_jsonl
from ftjax.errors import FtjaxError
from ftjax.evaluate import evaluate_loss
from ftjax.params import load_params
from hf_models import make_hf_model, make_tokenizer


def transformers_loss(model_dir, sequences):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
            total -= logp.gather(-1, x[0, 1:, None]).sum().item()
            count += len(ids) - 1
    return total / count, count


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tokenizer(make_hf_model(tmp_path_factory.mktemp("eval") / "m", std=0.1))


def test_loss_matches_transformers(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 128, n).tolist() for n in (5, 17, 33, 64, 9, 600)]
    text = ["the answer is two plus two", "one of the three"]
    tok = load_tokenizer(model_dir)
    want, count = transformers_loss(model_dir, seqs + [tok.encode(t).ids for t in text])
    data = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": s} for s in seqs] + [{"text": t} for t in text])
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--json", "--batch-size", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["tokens"] == count
    assert abs(got["loss"] - want) < 1e-5 and abs(got["ppl"] - math.exp(want)) < 1e-4 * math.exp(want)
    assert got["tokens_per_s"] > 0


def test_independent_of_batch_size_and_padding(model_dir):
    rng = np.random.default_rng(1)
    rows = [{"input_ids": rng.integers(0, 128, int(n)).tolist()} for n in rng.integers(2, 60, 11)]
    cfg, params = load_params(model_dir)
    examples = examples_from_rows(rows)
    results = [evaluate_loss(params, cfg, examples, batch_size=b, max_len=64)["loss"] for b in (1, 4, 16)]
    assert max(results) - min(results) < 1e-6


def test_bfloat16_compute_is_close(model_dir):
    rows = [{"input_ids": list(range(1, 60))}]
    cfg, params = load_params(model_dir)
    ex = examples_from_rows(rows)
    f32 = evaluate_loss(params, cfg, ex, dtype="float32")["loss"]
    bf16 = evaluate_loss(params, cfg, ex, dtype="bfloat16")["loss"]
    assert bf16 != f32 and abs(bf16 - f32) < 1e-3 * f32  # measured: 1.2e-4 relative


def test_truncation_warns_with_count(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": list(range(50))}] * 3 + [{"input_ids": [1, 2, 3]}])
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--max-len", "16", "--json"]) == 0
    captured = capsys.readouterr()
    assert "3 sequence(s)" in captured.err
    assert json.loads(captured.out)["tokens"] == 3 * 15 + 2


@pytest.mark.parametrize("content, message", [
    ('{"input_ids": [1, 2]}\n{"input_ids": [1,\n', ":2:"),
    ("", "no rows"),
    ('{"label": 3}\n', "bad.jsonl:1:"),
    ('[1, 2]\n', ":1:"),
])
def test_bad_data_files(model_dir, tmp_path, capsys, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    assert main(["eval", "--model", str(model_dir), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftjax: error:") and message in err and err.count("\n") == 1


def test_missing_data_file(model_dir, tmp_path):
    with pytest.raises(FtjaxError, match="does not exist"):
        read_jsonl(tmp_path / "none.jsonl")


def transformers_logprobs(model_dir, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 and the greedy token at each position, from transformers (float64)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
    return logp.gather(-1, x[0, 1:, None])[:, 0].numpy(), logp.argmax(-1).numpy()


def test_completion_and_multiple_choice_match_transformers(model_dir):
    """loss over completion tokens, exact match (is_greedy) and acc / acc_norm, as lm-evaluation-harness scores."""
    tok = load_tokenizer(model_dir)
    prompt = "one plus one equals"
    n = len(tok.encode(prompt).ids)
    # A completion that is the model's own greedy continuation (exact match 1) and one that is not.
    ids = tok.encode(prompt).ids
    for _ in range(2):
        ids = ids + [int(transformers_logprobs(model_dir, ids + [0])[1][-1])]  # argmax after the last token
    greedy_text = " " + " ".join(tok.id_to_token(i) for i in ids[n:])
    assert tok.encode(prompt + greedy_text).ids == ids
    _, argmax = transformers_logprobs(model_dir, tok.encode(prompt + " the").ids)
    other = next(w for w in ("the", "a") if tok.token_to_id(w) != argmax[n - 1])
    question, choices = "what is two plus two", ["four", "one of the three", "nine"]
    rows = [{"prompt": prompt, "completion": greedy_text}, {"prompt": prompt + " ", "completion": other},
            {"question": question, "choices": choices, "answer": 1}]

    want_nll, want_count, lls = 0.0, 0, []
    for row in rows[:2]:
        whole = tok.encode(prompt + " " + row["completion"].lstrip()).ids
        lp, _ = transformers_logprobs(model_dir, whole)
        want_nll -= lp[n - 1:].sum()
        want_count += len(whole) - n
    for choice in choices:
        whole = tok.encode(question + " " + choice).ids
        lp, _ = transformers_logprobs(model_dir, whole)
        lls.append(lp[len(tok.encode(question).ids) - 1:].sum())
    want_nll -= lls[1]
    want_count += len(tok.encode(question + " " + choices[1]).ids) - len(tok.encode(question).ids)

    cfg, params = load_params(model_dir)
    got = evaluate_loss(params, cfg, examples_from_rows(rows, tok), batch_size=2)
    assert got["tokens"] == want_count and abs(got["loss"] - want_nll / want_count) < 1e-5
    assert got["exact_match"] == 0.5 and got["completion_rows"] == 2
    lls = np.array(lls)
    assert got["acc"] == float(np.argmax(lls) == 1)
    assert got["acc_norm"] == float(np.argmax(lls / np.array([len(c) for c in choices])) == 1)
    assert got["choice_rows"] == 1


def test_mixed_rows_independent_of_batch_size(model_dir):
    tok = load_tokenizer(model_dir)
    rows = [{"text": "the answer is two plus two"}, {"prompt": "one plus", "completion": " one equals two"},
            {"question": "one of the", "choices": ["two", "three", "four five six"], "answer": 2},
            {"question": "is it", "choices": ["one", "two"], "answer": 0}, {"input_ids": list(range(3, 40))}]
    cfg, params = load_params(model_dir)
    ex = examples_from_rows(rows, tok)
    results = [evaluate_loss(params, cfg, ex, batch_size=b) for b in (1, 3, 8)]
    for key in ("loss", "tokens", "exact_match", "acc", "acc_norm"):
        values = [r[key] for r in results]
        assert max(values) - min(values) < 1e-6, key
    assert all(r["compiles"] <= 2 for r in results)


def test_sharded_eval_matches(model_dir):
    from ftjax.params import make_mesh

    rows = [{"input_ids": list(range(1, n))} for n in (9, 30, 50)]
    mesh = make_mesh("data=2,fsdp=4")
    cfg, params = load_params(model_dir)
    _, sharded = load_params(model_dir, mesh=mesh)
    ex = examples_from_rows(rows)
    a = evaluate_loss(params, cfg, ex, batch_size=4)["loss"]
    b = evaluate_loss(sharded, cfg, ex, batch_size=4, mesh=mesh)["loss"]
    assert abs(a - b) < 1e-6


def test_cli_eval_multiple_choice_output(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "mc.jsonl", [{"question": "one plus one", "choices": ["two", "three"], "answer": 0},
                                              {"prompt": "the", "completion": " answer"}])
    assert main(["eval", "--model", str(model_dir), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "acc " in out and "acc_norm" in out and "exact_match" in out and "tokens/s" in out
    bad = write_jsonl(tmp_path / "oov.jsonl", [{"input_ids": [1, 500]}])
    assert main(["eval", "--model", str(model_dir), "--data", str(bad)]) == 2
    assert "outside the model's vocabulary" in capsys.readouterr().err


def test_checkpoints_that_differ_only_in_metadata_compile_once(tmp_path, count_calls):
    """A base and its instruct model differ in token ids and dtype metadata, not in architecture: one compilation."""
    import jax

    import ftjax.evaluate as E
    from hf_models import make_hf_model

    a = make_hf_model(tmp_path / "a", seed=0, eos_token_id=2, bos_token_id=1)
    b = make_hf_model(tmp_path / "b", seed=1, eos_token_id=[2, 5], bos_token_id=3, pad_token_id=0,
                      initializer_range=0.01)
    (cfg_a, pa), (cfg_b, pb) = load_params(a), load_params(b)
    assert cfg_a == cfg_b and hash(cfg_a) == hash(cfg_b)
    examples = examples_from_rows([{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [6, 7, 8]}])
    jax.clear_caches()
    traced = count_calls(E, "forward")  # called only while the evaluator is traced
    E.evaluate_loss(pa, cfg_a, examples, batch_size=2)
    E.evaluate_loss(pb, cfg_b, examples, batch_size=2)
    assert traced["n"] == 1


def test_rows_whose_scored_tokens_max_len_cuts_are_skipped_and_counted(model_dir, tmp_path, capsys):
    """A completion (or a choice) longer than --max-len - 1 tokens is skipped and counted, not judged on a part of
    it; the summary says how many rows each metric covers."""
    tok = load_tokenizer(model_dir)
    long = " " + " ".join(["one two three"] * 6)
    fits = {"prompt": "one plus", "completion": " two"}
    rows = [fits, {"prompt": "one plus", "completion": long},
            {"question": "is it", "choices": ["one", long], "answer": 0},
            {"question": "is it", "choices": ["one", "two"], "answer": 1}, {"text": long}]
    assert len(tok.encode(long).ids) > 15
    cfg, params = load_params(model_dir)
    capsys.readouterr()
    got = evaluate_loss(params, cfg, examples_from_rows(rows, tok), max_len=16)
    assert "skipped 2 row(s) whose completion, choices or assistant turns --max-len 16 cuts off" in \
        capsys.readouterr().err
    want = evaluate_loss(params, cfg, examples_from_rows([rows[0], rows[3], rows[4]], tok), max_len=16)
    assert got["cut_rows"] == 2 and want["cut_rows"] == 0
    assert (got["completion_rows"], got["choice_rows"], got["loss_rows"]) == (1, 1, 3)
    for key in ("loss", "tokens", "exact_match", "acc"):
        assert got[key] == want[key], key
    with pytest.raises(FtjaxError, match="--max-len 16 cuts off what every row scores"):
        evaluate_loss(params, cfg, examples_from_rows([rows[1]], tok), max_len=16)

    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--max-len", "16"]) == 0
    line = capsys.readouterr().out
    assert "(5 rows: loss on 3, exact_match on 1, acc on 1, 2 skipped as --max-len cuts what they score;" in line
