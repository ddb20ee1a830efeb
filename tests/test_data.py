"""data: row forms, harness-style pair tokenization, truncation, fixed-shape batches, bad rows."""

import numpy as np
import pytest

from ftjax.data import (CHOICE, COMPLETION, LM, Example, batches, bucket_length, check_vocab, encode_pair,
                        encode_rows, examples_from_rows, load_tokenizer, read_jsonl, truncate)
from ftjax.errors import FtjaxError
from hf_models import make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


def test_encode_pair_moves_trailing_spaces_and_splits_at_context_length(tok):
    whole, n = encode_pair(tok, "one plus one equals  ", "two")
    assert whole == tok.encode("one plus one equals  two").ids
    assert n == len(tok.encode("one plus one equals").ids)
    assert whole[0] == 1 and tok.id_to_token(whole[n]) == "two"  # BOS from the tokenizer's own post-processor


def test_row_forms(tok):
    rows = [{"input_ids": [5, 6, 7]}, {"text": "the answer is two"},
            {"prompt": "one plus one equals", "completion": " two"},
            {"question": "one plus one equals", "choices": ["two", "three four"], "answer": 1},
            {"prompt": "two plus", "choices": ["two", "one"], "answer": 0}]
    ex = examples_from_rows(rows, tok)
    assert [e.kind for e in ex] == [LM, LM, COMPLETION, CHOICE, CHOICE, CHOICE, CHOICE]
    assert [e.row for e in ex] == [0, 1, 2, 3, 3, 4, 4]
    assert ex[0].weights_t.tolist() == [0, 1, 1]
    assert ex[1].tokens_t.tolist() == tok.encode("the answer is two").ids and ex[1].weights_t.sum() == 4
    n = len(tok.encode("one plus one equals").ids)
    assert ex[2].weights_t.tolist() == [0] * n + [1]  # completion tokens only
    three_four = ex[4]
    assert three_four.weights_t.tolist() == [0] * n + [1, 1] and three_four.chars == len("three four")
    assert (three_four.choice, three_four.answer) == (1, 1)
    assert all(e.tokens_t.dtype == np.int32 and e.weights_t.dtype == np.float32 for e in ex)


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "choices": ["a"], "answer": 0}, "at least two"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "answer"),
    ({"question": 3, "choices": ["a", "b"], "answer": 0}, "'question' must be a string"),
    ({"prompt": "one", "completion": 2}, "'completion' must be a string"),
    ({"input_ids": [1, -2]}, "non-negative"),
    ({"label": 1}, "expected"),
])
def test_bad_rows_name_the_row(tok, row, message):
    with pytest.raises(FtjaxError, match=message) as e:
        examples_from_rows([{"input_ids": [1, 2]}, row], tok, source="d.jsonl")
    assert "d.jsonl row 2" in str(e.value)


def test_rows_with_nothing_to_score_are_skipped_and_named_by_file_line(tok, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [1, 2]}\n\n{"input_ids": [7]}\n{"prompt": "one", "completion": ""}\n'
                    '{"text": "two three"}\n')
    encoded = encode_rows(read_jsonl(data), tok)
    assert encoded.skipped == [f"{data}:3", f"{data}:4"]  # file lines, blank line 2 counted
    assert [e.where for e in encoded.examples] == [f"{data}:1", f"{data}:5"]
    examples_from_rows(read_jsonl(data), tok)
    assert "skipped 2 row(s)" in capsys.readouterr().err


def test_text_rows_need_a_tokenizer():
    with pytest.raises(FtjaxError, match="tokenizer"):
        examples_from_rows([{"prompt": "a", "completion": "b"}])


def test_check_vocab():
    with pytest.raises(FtjaxError, match="row 2: token id 200"):
        check_vocab(examples_from_rows([{"input_ids": [1, 2]}, {"input_ids": [3, 200]}]), 128)


def test_read_jsonl_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n\n{"text": \n')
    with pytest.raises(FtjaxError, match=r"a.jsonl:3:"):
        read_jsonl(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text("\n  \n")
    with pytest.raises(FtjaxError, match="no rows"):
        read_jsonl(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_bytes(b"\xff\xfe")
    with pytest.raises(FtjaxError, match="c.jsonl:1: not UTF-8"):
        read_jsonl(tmp_path / "c.jsonl")


def test_invalid_utf8_is_reported_with_its_line(tmp_path):
    """Like every other data error: file:line, the byte and its column (was: the whole file 'is not UTF-8')."""
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "one"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(FtjaxError, match=r"d.jsonl:3: not UTF-8 text \(byte 0xe9 at column 14\)"):
        read_jsonl(tmp_path / "d.jsonl")
    # A JSON string holding U+2028 is one row, not two broken lines.
    (tmp_path / "e.jsonl").write_text('{"text": "a\u2028b"}\n{"text": "c"}\n', encoding="utf-8")
    rows = read_jsonl(tmp_path / "e.jsonl")
    assert rows == [{"text": "a\u2028b"}, {"text": "c"}] and rows.lines == [1, 2]


def test_truncate_keeps_scored_end_of_completions(capsys):
    lm = Example(np.arange(10, dtype=np.int32), np.r_[0, np.ones(9)].astype(np.float32))
    comp = Example(np.arange(10, dtype=np.int32), np.r_[np.zeros(7), np.ones(3)].astype(np.float32), kind=COMPLETION)
    short = Example(np.arange(3, dtype=np.int32), np.r_[0, 1, 1].astype(np.float32))
    out = truncate([lm, comp, short], 4)
    assert "2 sequence(s)" in capsys.readouterr().err
    assert out[0].tokens_t.tolist() == [0, 1, 2, 3] and out[0].weights_t.tolist() == [0, 1, 1, 1]
    assert out[1].tokens_t.tolist() == [6, 7, 8, 9] and out[1].weights_t.tolist() == [0, 1, 1, 1]
    assert out[2] is short
    with pytest.raises(FtjaxError, match="at least 2"):
        truncate([lm], 1)


def test_batches_have_fixed_bucketed_shapes():
    rng = np.random.default_rng(0)
    ex = examples_from_rows([{"input_ids": rng.integers(0, 50, int(n)).tolist()} for n in rng.integers(2, 70, 13)])
    out = list(batches(ex, 4, 64))
    assert all(b.tokens_bt.shape[0] == 4 and b.tokens_bt.shape[1] in (16, 32, 64) for b in out)
    assert sorted(i for b in out for i in b.index_b if i >= 0) == list(range(13))
    last = out[-1]
    assert (last.index_b == -1).sum() == 3 and last.mask_bt[last.index_b == -1].sum() == 0
    for b in out:
        for row, i in enumerate(b.index_b):
            if i >= 0:
                n = len(ex[i].tokens_t)
                assert b.tokens_bt[row, :n].tolist() == ex[i].tokens_t.tolist() and b.mask_bt[row].sum() == n
    assert bucket_length(17, 1000) == 32 and bucket_length(3, 1000) == 16 and bucket_length(900, 600) == 600
    with pytest.raises(FtjaxError, match="batch size"):
        list(batches(ex, 0, 64))
