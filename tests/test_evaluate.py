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
    rows = [{"input_ids": rng.integers(0, 128, int(n)).tolist()} for n in rng.integers(2, 80, 11)]
    cfg, params = load_params(model_dir)
    examples = examples_from_rows(rows)
    results = [evaluate_loss(params, cfg, examples, batch_size=b, max_len=128)["loss"] for b in (1, 4, 16)]
    assert max(results) - min(results) < 1e-6


def test_bfloat16_compute_is_close(model_dir):
    rows = [{"input_ids": list(range(1, 60))}]
    cfg, params = load_params(model_dir)
    ex = examples_from_rows(rows)
    f32 = evaluate_loss(params, cfg, ex, dtype="float32")["loss"]
    bf16 = evaluate_loss(params, cfg, ex, dtype="bfloat16")["loss"]
    assert bf16 != f32 and abs(bf16 - f32) < 0.05 * f32


def test_truncation_warns_with_count(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": list(range(50))}] * 3 + [{"input_ids": [1, 2, 3]}])
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--max-len", "16", "--json"]) == 0
    captured = capsys.readouterr()
    assert "3 sequence(s)" in captured.err
    assert json.loads(captured.out)["tokens"] == 3 * 15 + 2


@pytest.mark.parametrize("content, message", [
    ('{"input_ids": [1, 2]}\n{"input_ids": [1,\n', ":2:"),
    ("", "no rows"),
    ('{"label": 3}\n', "row 1"),
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
