"""Errors at the command line: one line naming the file for every failure (ours or a third-party library's), exit
status 2 (bad input) or 1 (anything else), the full traceback only with --debug or FTJAX_DEBUG=1."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_models import make_hf_model, make_tokenizer, write_jsonl

from ftjax.cli import main
from ftjax.errors import FtjaxError, about_file, describe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model(tmp_path):
    path = make_hf_model(tmp_path / "m", "llama")
    make_tokenizer(path)
    return path


def run_main(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_one_line(err: str, *names: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftjax: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, err)
    return lines[0]


def test_corrupted_safetensors_is_one_line_and_debug_shows_the_traceback(model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FTJAX_DEBUG", raising=False)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": "hello world"}])
    code, err = run_main(capsys, "eval", "--model", str(model), "--data", str(data))
    assert code == 2
    assert_one_line(err, str(weights))
    for argv in (["--debug", "eval", "--model", str(model), "--data", str(data)],
                 ["eval", "--model", str(model), "--data", str(data), "--debug"]):
        code, err = run_main(capsys, *argv)
        assert code == 2 and "Traceback (most recent call last)" in err
        assert err.strip().splitlines()[-1].startswith("ftjax: error: ") and str(weights) in err


def test_corrupted_tokenizer_is_one_line_and_debug_shows_the_library_error(model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FTJAX_DEBUG", raising=False)
    (model / "tokenizer.json").write_bytes(b"\xff\xfe\x00 not a tokenizer")
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": "hello world"}])
    code, err = run_main(capsys, "eval", "--model", str(model), "--data", str(data))
    assert code == 2
    assert_one_line(err, str(model / "tokenizer.json"))
    monkeypatch.setenv("FTJAX_DEBUG", "1")
    code, err = run_main(capsys, "eval", "--model", str(model), "--data", str(data))
    assert code == 2 and "Traceback (most recent call last)" in err
    assert "stream did not contain valid UTF-8" in err.split("ftjax: error: ")[0]  # the tokenizers library's own


def test_third_party_error_is_one_line_naming_the_file(model, tmp_path, capsys):
    """Orbax (TensorStore) reading a checkpoint whose data files were truncated: through the console entry point,
    exit 1, one line with the error type and the checkpoint, nothing written; FTJAX_DEBUG=1 gives the traceback."""
    code, err = run_main(capsys, "convert", str(model), str(tmp_path / "orbax"), "--to", "orbax")
    assert code == 0, err
    blobs = list((tmp_path / "orbax" / "params").glob("ocdbt.process_*/d/*"))  # array data (metadata intact)
    assert blobs
    for blob in blobs:
        blob.write_bytes(blob.read_bytes()[:20])
    argv = [sys.executable, "-m", "ftjax.cli", "convert", str(tmp_path / "orbax"), str(tmp_path / "back"), "--to",
            "hf"]
    env = {k: v for k, v in os.environ.items() if k != "FTJAX_DEBUG"}
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stderr
    line = assert_one_line(done.stderr, f"in {tmp_path / 'orbax' / 'params'}: ",
                           "(rerun with --debug for the traceback)")
    assert line.startswith("ftjax: error: ValueError in ")
    assert not (tmp_path / "back").exists()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "FTJAX_DEBUG": "1"})
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert "rerun with --debug" not in done.stderr


def test_unexpected_filesystem_error_names_the_file(model, tmp_path, capsys, monkeypatch):
    """An OSError nothing caught (here from a patched loader): its type, file and reason, exit 1."""
    import ftjax.params

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(model / "model.safetensors"))

    monkeypatch.delenv("FTJAX_DEBUG", raising=False)
    monkeypatch.setattr(ftjax.params, "load_params", failing)
    data = write_jsonl(tmp_path / "rows.jsonl", [{"input_ids": [1, 2, 3]}])
    code, err = run_main(capsys, "eval", "--model", str(model), "--data", str(data))
    assert code == 1
    assert assert_one_line(err) == (f"ftjax: error: OSError in {model / 'model.safetensors'}: Input/output error "
                                    "(rerun with --debug for the traceback)")


def test_about_file_and_describe():
    with pytest.raises(RuntimeError) as info, about_file("outer.bin"), about_file("inner.bin"):
        raise RuntimeError("multi\nline")
    assert describe(info.value) == "RuntimeError in inner.bin: multi"
    with pytest.raises(FtjaxError) as mine, about_file("x"):
        raise FtjaxError("already one line")
    assert not hasattr(mine.value, "ftjax_file")
    assert describe(RuntimeError("x" * 500), limit=10) == "RuntimeError: xxxxxxxxx…"
    assert describe(FileNotFoundError(errno.ENOENT, "No such file or directory", "a.json")) == (
        "FileNotFoundError in a.json: No such file or directory")
    try:
        try:
            raise ValueError("byte range not valid")
        except ValueError as inner:
            raise Exception("error while reading array index") from inner
    except Exception as e:
        assert describe(e) == "ValueError: byte range not valid"


def test_architecture_mismatch_is_one_readable_line(tmp_path, capsys):
    """Four shape-defining config keys differ (hidden, layers, heads, intermediate): the first three are named with
    every input's value, the rest counted; the tensor mismatches that follow from them are counted, not listed."""
    make_hf_model(tmp_path / "a", "llama")
    make_hf_model(tmp_path / "b", "llama", hidden_size=48, num_hidden_layers=3, intermediate_size=80,
                  num_attention_heads=6, num_key_value_heads=2)
    code, err = run_main(capsys, "transfer", "--source-base", str(tmp_path / "a"), "--source-ft", str(tmp_path / "a"),
                         "--target-base", str(tmp_path / "b"), "--out", str(tmp_path / "out"))
    assert code == 2 and not (tmp_path / "out").exists()
    line = assert_one_line(err, "architectures differ", "hidden_size target 48, source-ft 32, source-base 32",
                           "num_hidden_layers target 3, source-ft 2, source-base 2")
    assert "; and 1 more (and " in line and "tensor mismatch(es) that follow from them" in line
    assert "model.layers" not in line and len(line) < 400, line
    code, err = run_main(capsys, "diff", "--base", str(tmp_path / "a"), "--ft", str(tmp_path / "b"), "--out",
                         str(tmp_path / "d"))
    line = assert_one_line(err, "architectures differ", "hidden_size base 32, ft 48")
    assert code == 2 and "model.layers" not in line and len(line) < 400, line
