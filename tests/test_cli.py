"""The CLI surface: every command has help, scripts/transfer.py is `ftjax transfer`, errors are one line + exit 2."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ftjax.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_has_help(capsys):
    from ftjax.cli import COMMANDS

    commands = list(COMMANDS)
    assert {"transfer", "diff", "apply", "convert", "inspect", "eval", "demo"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: ftjax " + name in capsys.readouterr().out


def test_script_is_ftjax_transfer(tmp_path):
    """`python scripts/transfer.py ARGS` and `ftjax transfer ARGS` fail identically on the same bad input."""
    args = ["--source-base", str(tmp_path / "a"), "--source-ft", str(tmp_path / "b"),
            "--target-base", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    script = subprocess.run([sys.executable, str(ROOT / "scripts" / "transfer.py"), *args], capture_output=True, text=True)
    module = subprocess.run([sys.executable, "-m", "ftjax.cli", "transfer", *args], capture_output=True, text=True)
    assert script.returncode == module.returncode == 2
    assert script.stderr == module.stderr
    assert script.stderr.startswith("ftjax: error:") and script.stderr.count("\n") == 1
    assert "Traceback" not in script.stderr
    assert not (tmp_path / "o").exists()
    helped = subprocess.run([sys.executable, str(ROOT / "scripts" / "transfer.py"), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--source-base" in helped.stdout


TRANSFER = ["transfer", "--source-base", "a", "--source-ft", "b", "--target-base", "c", "--out", "o"]


def test_usage_errors_exit_2(capsys):
    """A bad --alpha-for rule is refused for itself (the required arguments are all given), a valid one parses."""
    assert build_parser().parse_args([*TRANSFER, "--alpha-for", "mlp=0.5"]).alpha_for == [("mlp", 0.5)]
    for rule in ("no-equals-sign", "(=0.5", "mlp=x", "mlp=nan", "mlp=inf"):
        with pytest.raises(SystemExit) as e:
            main([*TRANSFER, "--alpha-for", rule])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "argument --alpha-for" in err and repr(rule) in err, err


@pytest.mark.parametrize("args", [
    [*TRANSFER, "--alpha", "nan"], [*TRANSFER, "--alpha", "inf"],
    ["apply", "--target", "t", "--diff", "d", "--out", "o", "--alpha", "NaN"],
    ["finetune", "--init", "m", "--data", "d", "--steps", "1", "--out", "o", "--lr", "nan"],
    ["finetune", "--init", "m", "--data", "d", "--steps", "1", "--out", "o", "--warmup", "inf"],
    ["finetune", "--init", "m", "--data", "d", "--steps", "1", "--out", "o", "--clip", "nan"],
    ["finetune", "--init", "m", "--data", "d", "--steps", "1", "--out", "o", "--weight-decay", "inf"],
    ["generate", "--model", "m", "--prompt", "p", "--temperature", "nan"],
])
def test_non_finite_float_flags_are_refused(args, capsys):
    """Every float flag refuses NaN and ±Inf at parse time (exit 2, the flag named), before anything is computed."""
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {args[-2]}: expected a f" in err and f"got {args[-1]!r}" in err, err


def test_eval_help_lists_every_row_form(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    for form in ('{"text"}', '{"prompt", "completion"}', '{"input_ids"}', '{"question", "choices", "answer"}',
                 '{"messages": [{"role", "content"}, ...]}'):
        assert form in usage, form


def test_non_finite_range_is_refused():
    from ftjax.errors import FtjaxError
    from ftjax.lmc import parse_range

    assert parse_range("-0.5:1.5") == (-0.5, 1.5)
    for bad in ("0:inf", "nan:1", "-inf:1"):
        with pytest.raises(FtjaxError, match="--range .*finite"):
            parse_range(bad)


def test_every_readme_command_exists(capsys):
    """Each `ftjax COMMAND` the README shows is a real command whose --help runs, and its flags exist."""
    import re

    readme = (ROOT / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", readme, flags=re.S)).replace("\\\n", " ")
    lines = [ln.split("#")[0].strip() for ln in blocks.splitlines() if ln.strip().startswith("ftjax ")]
    assert len(lines) >= 10
    for line in lines:
        words = line.split()
        command = words[1]
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0, line
        usage = capsys.readouterr().out
        for flag in (w for w in words[2:] if w.startswith("--")):
            assert flag in usage, f"{flag} not a flag of `ftjax {command}`"


def test_max_shard_size(capsys):
    parse = build_parser().parse_args
    base = ["transfer", "--source-base", "a", "--source-ft", "b", "--target-base", "c", "--out", "o"]
    assert parse(base).max_shard_size == 5 * 10**9
    assert parse(base + ["--max-shard-size", "500MB"]).max_shard_size == 5 * 10**8
    assert parse(base + ["--max-shard-size", "4.1GB"]).max_shard_size == 4_100_000_000  # exact, not 4099999999
    assert parse(["diff", "--base", "a", "--ft", "b", "--out", "o", "--max-shard-size", "2GiB"]).max_shard_size == 2**31
    for bad in ("lots", "0", "-5GB"):
        with pytest.raises(SystemExit) as e:
            parse(base + ["--max-shard-size", bad])
        assert e.value.code == 2
        assert "--max-shard-size" in capsys.readouterr().err


def test_transfer_process_exits_fast_with_its_report(tmp_path):
    """A CLI transfer ends with os._exit (no JAX teardown): the report still reaches stdout, rc 0, output complete."""
    import json
    import os

    from hf_models import make_hf_model

    m = make_hf_model(tmp_path / "m", dtype="bfloat16")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in ([sys.executable, "-m", "ftjax.cli", "transfer"], [sys.executable, str(ROOT / "scripts" / "transfer.py")]):
        out = tmp_path / f"out{len(cmd)}"
        r = subprocess.run([*cmd, "--source-base", str(m), "--source-ft", str(m), "--target-base", str(m),
                            "--out", str(out), "--json"], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        report = json.loads(r.stdout)
        assert report["kind"] == "transfer" and report["tensors"] > 0 and report["bytes_written"] > 0
        assert (out / "model.safetensors").is_file() and (out / "ftjax_transfer.json").is_file()


# Runs `ftjax ARGS` in a child that sends itself signal SIG right after the first call of the patched function (in
# the middle of writing the output): deterministic, unlike timing an external kill, and the same handler path.
_SIGNAL_DRIVER = """
import importlib, os, sys
sig, target, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
mod_name, _, qual = target.partition(":")
cls_name, _, attr = qual.partition(".")
cls = getattr(importlib.import_module(mod_name), cls_name)
original = getattr(cls, attr)
def patched(*a, **k):
    out = original(*a, **k)
    os.kill(os.getpid(), sig)
    return out
setattr(cls, attr, patched)
from ftjax.cli import run
run(argv)
"""


@pytest.fixture(scope="module")
def signal_inputs(tmp_path_factory):
    from hf_models import make_hf_model

    from ftjax import transfer
    from ftjax.convert import convert

    root = tmp_path_factory.mktemp("signal_inputs")
    base = make_hf_model(root / "base", dtype="bfloat16", seed=0)
    ft = make_hf_model(root / "ft", dtype="bfloat16", seed=1)
    transfer.diff(base, ft, root / "diff", progress=False)
    convert(base, root / "orbax", to="orbax")
    return root


_WRITE = "ftjax.io.safetensors:SafetensorsWriter.write"
SIGNAL_CASES = {
    "transfer": (_WRITE, ["transfer", "--source-base", "{r}/base", "--source-ft", "{r}/ft",
                          "--target-base", "{r}/base"]),
    "diff": (_WRITE, ["diff", "--base", "{r}/base", "--ft", "{r}/ft"]),
    "apply": (_WRITE, ["apply", "--target", "{r}/base", "--diff", "{r}/diff"]),
    "convert-hf": (_WRITE, ["convert", "{r}/orbax", "{out}", "--to", "hf"]),
    "convert-orbax": ("orbax.checkpoint:StandardCheckpointer.save", ["convert", "{r}/base", "{out}", "--to", "orbax"]),
}


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("case", list(SIGNAL_CASES))
def test_signal_mid_write_removes_the_partial_output(case, sig, code, signal_inputs, tmp_path):
    import os

    target, args = SIGNAL_CASES[case]
    out = tmp_path / "out"
    argv = [a.format(r=signal_inputs, out=out) for a in args]
    if "{out}" not in args:
        argv += ["--out", str(out), "--quiet"]
    before = sorted(p.name for p in signal_inputs.rglob("*"))
    r = subprocess.run([sys.executable, "-c", _SIGNAL_DRIVER, str(int(sig)), target, *argv], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == code, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("ftjax: ") and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == [], "the temp output directory is removed and nothing is at OUT"
    assert sorted(p.name for p in signal_inputs.rglob("*")) == before, "inputs untouched"


@pytest.mark.parametrize("command, shown", [
    ("eval", ["--batch-size BATCH_SIZE", "(default: 8)", "compute dtype (default: float32)"]),
    ("finetune", ["(default: 5e-06)", "(default: 2048)", "(default: 0.0)", "data order (default: 0)"]),
    ("transfer", ["(default: 5GB)", "(default: pad)", "(default: 1.0)"]),
    ("scan", ["(default: 11)", "(default: 0:1)"]),
])
def test_help_shows_defaults(command, shown, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in shown:
        assert s in text, (command, s)
