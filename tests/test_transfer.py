"""transfer/diff/apply on tiny bf16 Llama checkpoints: bitwise references, policies, HF output, safety."""

import errno
import hashlib
import shutil
import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import importlib

T = importlib.import_module("ftjax.transfer")  # the package re-exports the function `transfer` under the same name
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import HFCheckpoint, save_hf
from hf_models import make_hf_model, sparse_model
from reference import bits, reference

BF16 = ml_dtypes.bfloat16
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": TEMPLATE}))
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "do_sample": True}))


def _derive(src: Path, dst: Path, seed: int, *, extra_rows: int = 0, edit=None, **cfg) -> Path:
    """dst = src + N(0, 0.01) noise (bf16), optionally with extra vocab rows or an edit of the tensors."""
    ck = HFCheckpoint(src)
    rng = np.random.default_rng(seed)
    tens = {}
    for n in ck.names():
        x = ck.get(n).astype(np.float32)
        x = x + rng.normal(0, 0.01, x.shape).astype(np.float32)
        if extra_rows and n in (T.EMBED, T.LM_HEAD):
            x = np.concatenate([x, rng.normal(0, 0.05, (extra_rows,) + x.shape[1:])])
        tens[n] = x.astype(BF16)
    if edit:
        edit(tens)
    config = {**ck.config, **cfg, "vocab_size": ck.config["vocab_size"] + extra_rows}
    return save_hf(dst, tens, config=config, aux_from=src)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    b = make_hf_model(d / "base_s", dtype="bfloat16", seed=0)
    t = make_hf_model(d / "base_t", dtype="bfloat16", seed=1)
    f = _derive(b, d / "ft_s", 2)
    _tokenizer(f)
    return b, f, t


def _ref_ckpt(out, b, f, t, alpha_of=lambda n: 1.0, keep=lambda n: False):
    o, cb, cf, ct = (HFCheckpoint(p) for p in (out, b, f, t))
    assert sorted(o.names()) == sorted(ct.names())
    for n in ct.names():
        if keep(n):
            np.testing.assert_array_equal(bits(o.get(n)), bits(ct.get(n)), err_msg=n)
        else:
            ref = reference(ct.get(n), cf.get(n), cb.get(n), alpha_of(n), BF16)
            np.testing.assert_array_equal(bits(o.get(n)), bits(ref), err_msg=n)


def _tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_whole_model_bitwise_and_hf_output(models, tmp_path):
    b, f, t = models
    hashes = [_tree_hash(p) for p in models]
    rep = T.transfer(b, f, t, tmp_path / "out", progress=False)
    assert [_tree_hash(p) for p in models] == hashes, "inputs must be untouched"
    _ref_ckpt(tmp_path / "out", b, f, t)
    assert rep.tensors == rep.transferred == len(HFCheckpoint(t).names()) and not rep.nonfinite
    d = rep.to_dict()
    assert json.loads(json.dumps(d))["kind"] == "transfer" and "GB/s" in rep.summary()
    prov = json.loads((tmp_path / "out" / T.PROVENANCE).read_text())
    assert prov["alpha"] == 1.0 and prov["vocab"] == "pad" and prov["inputs"]["source_ft"] == str(f)
    assert prov["ftjax_version"] and prov["created"] and prov["tokenizer_from"] == "source-ft"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == TEMPLATE
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["temperature"] == 0.3


def test_logits_match_transformers_reference_merge(models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    b, f, t = models
    T.transfer(b, f, t, tmp_path / "out", progress=False)
    ms = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16) for p in (b, f, t, tmp_path / "out")]
    sb, sf, st = (m.state_dict() for m in ms[:3])
    ms[2].load_state_dict({k: (st[k].double() + (sf[k].double() - sb[k].double())).to(torch.bfloat16) for k in st})
    tokens = torch.tensor([[1, 5, 9, 17, 33, 65, 127]])
    with torch.no_grad():
        ref, got = ms[2](tokens).logits.float(), ms[3](tokens).logits.float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)  # the same weights, bit for bit: the same logits


def test_alpha_for_skip_and_identities(models, tmp_path):
    b, f, t = models
    T.transfer(b, f, t, tmp_path / "a", alpha=0.5, alpha_for=[("mlp", 0.25), ("self_attn", 2.0)], skip=["norm"],
               progress=False)
    _ref_ckpt(tmp_path / "a", b, f, t, alpha_of=lambda n: 0.25 if "mlp" in n else 2.0 if "self_attn" in n else 0.5,
              keep=lambda n: "norm" in n)
    T.transfer(b, f, t, tmp_path / "zero", alpha=0.0, progress=False)
    T.transfer(b, f, b, tmp_path / "self", progress=False)
    for out, want in ((tmp_path / "zero", t), (tmp_path / "self", f)):
        o, w = HFCheckpoint(out), HFCheckpoint(want)
        for n in w.names():
            np.testing.assert_array_equal(bits(o.get(n)), bits(w.get(n)), err_msg=n)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_alpha_is_refused_before_anything_is_written(models, tmp_path, bad):
    """alpha or an alpha_for value that is NaN/Inf: FtjaxError naming it from transfer, apply and transfer_params,
    nothing written (before the fix: an all-NaN model, exit 0)."""
    from ftjax.params import load_params

    b, f, t = models
    for kw, name in (({"alpha": bad}, "--alpha"), ({"alpha_for": [("mlp", bad)]}, "--alpha-for 'mlp'")):
        with pytest.raises(FtjaxError, match=f"{name}.* must be a finite number"):
            T.transfer(b, f, t, tmp_path / "o", progress=False, **kw)
        assert list(tmp_path.iterdir()) == []
    T.diff(b, f, tmp_path / "d", progress=False)
    with pytest.raises(FtjaxError, match="--alpha must be a finite number"):
        T.apply(t, tmp_path / "d", tmp_path / "o", alpha=bad, progress=False)
    assert not (tmp_path / "o").exists()
    (_, pb), (_, pf), (_, pt) = (load_params(p) for p in (b, f, t))
    with pytest.raises(FtjaxError, match="--alpha-for 'norm'.* must be a finite number"):
        T.transfer_params(pt, pf, pb, alpha_for=[("norm", bad)])


def test_a_pattern_that_matches_nothing_is_an_error_and_dry_run_lists_matches(models, tmp_path):
    b, f, t = models
    for kw, rule in (({"alpha_for": [("mlp", 0.5), ("mpl", 0.5)]}, "--alpha-for mpl"),
                     ({"skip": ["norm", "nrom"]}, "--skip nrom")):
        with pytest.raises(FtjaxError, match=f"'{rule}': matches no tensor") as e:
            T.transfer(b, f, t, tmp_path / "o", progress=False, **kw)
        assert "mlp" not in str(e.value).split(":")[0] and "'--skip norm'" not in str(e.value)
        assert list(tmp_path.iterdir()) == []
    rep = T.transfer(b, f, t, tmp_path / "o", alpha_for=[("mlp", 0.5)], skip=["norm"], dry_run=True, progress=False)
    names = HFCheckpoint(t).names()
    assert rep.matched == {"--alpha-for mlp": [n for n in names if "mlp" in n],
                           "--skip norm": [n for n in names if "norm" in n]}
    assert json.loads(json.dumps(rep.to_dict()))["matched"] == rep.matched
    assert f"--skip norm matched {sum('norm' in n for n in names)} tensor(s): " in rep.summary()


def test_vocab_policies(models, tmp_path):
    b, f, t = models
    big = _derive(b, tmp_path / "ft_big", 3, extra_rows=8)
    rep = T.transfer(b, big, t, tmp_path / "pad", progress=False)
    o, cf, ct, cb = (HFCheckpoint(p) for p in (tmp_path / "pad", big, t, b))
    assert json.loads((tmp_path / "pad" / "config.json").read_text())["vocab_size"] == 136
    assert rep.vocab["policy"] == "pad"
    for n in (T.EMBED, T.LM_HEAD):
        out = o.get(n)
        assert out.shape[0] == 136
        np.testing.assert_array_equal(bits(out[:128]), bits(reference(ct.get(n), cf.get(n)[:128], cb.get(n), 1, BF16)))
        np.testing.assert_array_equal(bits(out[128:]), bits(cf.get(n)[128:]))
    T.transfer(b, big, t, tmp_path / "trunc", vocab="truncate", progress=False)
    assert HFCheckpoint(tmp_path / "trunc").info(T.EMBED).shape[0] == 128
    assert json.loads((tmp_path / "trunc" / "config.json").read_text())["vocab_size"] == 128
    with pytest.raises(FtjaxError, match="--vocab error"):
        T.transfer(b, big, t, tmp_path / "err", vocab="error", progress=False)
    small = make_hf_model(tmp_path / "small", dtype="bfloat16", seed=5, vocab_size=120)
    for policy in ("pad", "truncate", "error"):
        with pytest.raises(FtjaxError, match=r"\(120 rows\) is smaller than the bases' \(128\)"):
            T.transfer(b, small, t, tmp_path / "err", vocab=policy, progress=False)
    assert not (tmp_path / "err").exists()
    # diff + apply reproduce the padded transfer bitwise
    T.diff(b, big, tmp_path / "d", progress=False)
    T.apply(t, tmp_path / "d", tmp_path / "pad2", progress=False)
    o2 = HFCheckpoint(tmp_path / "pad2")
    for n in o.names():
        np.testing.assert_array_equal(bits(o2.get(n)), bits(o.get(n)), err_msg=n)


def test_tied_and_untied(tmp_path):
    bt = make_hf_model(tmp_path / "bt", dtype="bfloat16", seed=0, tie_word_embeddings=True)
    ft = _derive(bt, tmp_path / "ft", 1)
    tu = make_hf_model(tmp_path / "tu", dtype="bfloat16", seed=2)  # untied target
    assert T.LM_HEAD not in HFCheckpoint(bt)
    rep = T.transfer(bt, ft, tu, tmp_path / "o1", progress=False)
    assert any("tying differs" in w for w in rep.warnings)
    o, cb, cf, ct = (HFCheckpoint(p) for p in (tmp_path / "o1", bt, ft, tu))
    assert T.LM_HEAD in o and not json.loads((tmp_path / "o1" / "config.json").read_text())["tie_word_embeddings"]
    # source tied: the lm_head gets the change of the source's output embedding (= its embed_tokens)
    np.testing.assert_array_equal(bits(o.get(T.LM_HEAD)),
                                  bits(reference(ct.get(T.LM_HEAD), cf.get(T.EMBED), cb.get(T.EMBED), 1, BF16)))
    # target tied, source untied: embedding delta applied once, no lm_head in the output
    bu = make_hf_model(tmp_path / "bu", dtype="bfloat16", seed=3)
    fu = _derive(bu, tmp_path / "fu", 4)
    tt = make_hf_model(tmp_path / "tt", dtype="bfloat16", seed=5, tie_word_embeddings=True)
    T.transfer(bu, fu, tt, tmp_path / "o2", progress=False)
    o, cb, cf, ct = (HFCheckpoint(p) for p in (tmp_path / "o2", bu, fu, tt))
    assert T.LM_HEAD not in o
    np.testing.assert_array_equal(bits(o.get(T.EMBED)),
                                  bits(reference(ct.get(T.EMBED), cf.get(T.EMBED), cb.get(T.EMBED), 1, BF16)))


def test_diff_apply_bitwise_with_inexact_differences(models, tmp_path):
    b, f, t = models

    def edit(tens):  # differences that float32 cannot hold: ft large where base is tiny
        w = tens["model.layers.0.mlp.up_proj.weight"]
        w[:4, :4] = BF16(-3.0e-9)
    base2 = _derive(b, tmp_path / "b2", 7, edit=edit)
    T.diff(base2, f, tmp_path / "d", progress=False)
    meta = json.loads((tmp_path / "d" / T.DIFF_META).read_text())
    assert meta["lo_tensors"] and meta["base"] == str(base2) and meta["ft"] == str(f)
    assert (tmp_path / "d" / "tokenizer.json").exists() and (tmp_path / "d" / "config.json").exists()
    for alpha in (1.0, 0.5):
        T.transfer(base2, f, t, tmp_path / f"t{alpha}", alpha=alpha, progress=False)
        T.apply(t, tmp_path / "d", tmp_path / f"a{alpha}", alpha=alpha, progress=False)
        o1, o2 = HFCheckpoint(tmp_path / f"t{alpha}"), HFCheckpoint(tmp_path / f"a{alpha}")
        for n in o1.names():
            np.testing.assert_array_equal(bits(o1.get(n)), bits(o2.get(n)), err_msg=n)
    _ref_ckpt(tmp_path / "t1.0", base2, f, t)


def test_mismatches_in_one_error_and_warnings(models, tmp_path):
    b, f, t = models
    other = make_hf_model(tmp_path / "other", dtype="bfloat16", hidden_size=64, num_hidden_layers=3)
    with pytest.raises(FtjaxError) as e:
        T.transfer(b, f, other, tmp_path / "o", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "hidden_size" in msg and "num_hidden_layers" in msg and "follow from them" in msg
    assert not (tmp_path / "o").exists()
    rope = make_hf_model(tmp_path / "rope", dtype="bfloat16", seed=1, rope_theta=500000.0)
    rep = T.transfer(b, f, rope, tmp_path / "o", progress=False, dry_run=True)
    assert any("rope" in w for w in rep.warnings) and not (tmp_path / "o").exists()
    fam = make_hf_model(tmp_path / "fam", "mistral", dtype="bfloat16", seed=1)
    with pytest.raises(FtjaxError, match="model_type"):
        T.transfer(b, f, fam, tmp_path / "o", progress=False)


def test_output_safety(models, tmp_path):
    b, f, t = models
    with pytest.raises(FtjaxError, match="lies in input"):
        T.transfer(b, f, t, Path(t) / "sub", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FtjaxError, match="already exists"):
        T.transfer(b, f, t, tmp_path / "exists", progress=False)
    T.transfer(b, f, t, tmp_path / "exists", overwrite=True, progress=False)
    assert (tmp_path / "exists" / "model.safetensors").exists()


def test_nonfinite_reported_and_strict(models, tmp_path):
    b, f, t = models

    def edit(tens):
        tens["model.norm.weight"][0] = BF16(np.inf)
    fi = _derive(f, tmp_path / "fi", 8, edit=edit)
    rep = T.transfer(b, fi, t, tmp_path / "o", progress=False)
    assert rep.nonfinite == ["model.norm.weight"] and "NaN/Inf" in rep.summary()
    with pytest.raises(FtjaxError, match="model.norm.weight"):
        T.transfer(b, fi, t, tmp_path / "o2", strict=True, progress=False)
    assert not (tmp_path / "o2").exists()


def test_full_disk_leaves_nothing(models, tmp_path, monkeypatch):
    from ftjax.io import safetensors as st

    def full(self, name, array):
        def boom():
            raise OSError(errno.ENOSPC, "No space left on device")
        self._io(boom)
    monkeypatch.setattr(st.SafetensorsWriter, "write", full)
    with pytest.raises(FtjaxError, match="no space left"):
        T.transfer(*models, tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_dry_run_and_sharded_output(models, tmp_path):
    b, f, t = models
    rep = T.transfer(b, f, t, tmp_path / "dry", dry_run=True, progress=False)
    assert rep.dry_run and rep.tensors > 0 and list(tmp_path.iterdir()) == []
    T.transfer(b, f, t, tmp_path / "sh", max_shard_bytes=20_000, progress=False)
    assert (tmp_path / "sh" / "model.safetensors.index.json").exists()
    _ref_ckpt(tmp_path / "sh", b, f, t)


def test_small_chunks_bitwise(models, tmp_path, monkeypatch):
    import collections

    from ftjax.engine import outputs, streaming

    monkeypatch.setattr(outputs, "CHUNK_ELEMS", 1000)  # what write_checkpoint passes to the engine
    blocks = collections.Counter()
    write = streaming.WriteBehind.write

    def counted(self, name, array):
        blocks[name] += 1
        return write(self, name, array)
    monkeypatch.setattr(streaming.WriteBehind, "write", counted)
    T.transfer(*models, tmp_path / "o", alpha=0.3, progress=False)
    embed = HFCheckpoint(models[2]).info(T.EMBED)
    assert embed.shape[1] <= 1000 < embed.shape[0] * embed.shape[1]
    assert blocks[T.EMBED] > 1, blocks  # streamed in several row blocks (with the default: one)
    _ref_ckpt(tmp_path / "o", *models, alpha_of=lambda n: 0.3)


def test_cli_transfer_alpha_half_is_the_float64_formula_rounded_once(models, tmp_path):
    from ftjax.cli import main

    b, f, t = models
    assert main(["transfer", "--source-base", str(b), "--source-ft", str(f), "--target-base", str(t),
                 "--out", str(tmp_path / "o"), "--alpha", "0.5", "--quiet"]) == 0
    _ref_ckpt(tmp_path / "o", b, f, t, alpha_of=lambda n: 0.5)


def test_transfer_params_in_memory_sharded(models):
    from ftjax.params import flatten, load_params, make_mesh

    b, f, t = models
    mesh = make_mesh("data=2,fsdp=4")
    (_, pb), (_, pf), (_, pt) = (load_params(p) for p in (b, f, t))
    (_, st) = load_params(t, mesh=mesh)
    out = T.transfer_params(st, pf, pb, skip=["norm"])
    o, tt = flatten(out), flatten(st)
    ff, bb = flatten(pf), flatten(pb)
    for n, x in o.items():
        assert x.sharding == tt[n].sharding
        want = np.asarray(tt[n]) if "norm" in n else reference(np.asarray(tt[n]), np.asarray(ff[n]), np.asarray(bb[n]),
                                                               1.0, BF16)
        np.testing.assert_array_equal(bits(np.asarray(x)), bits(want), err_msg=n)
    # A second call with the same layout reuses the compiled function (no retrace, no recompile).
    misses = T._transfer_fn.cache_info().misses
    again = T.transfer_params(st, pf, pb, skip=["norm"])
    assert T._transfer_fn.cache_info().misses == misses
    assert all(np.array_equal(bits(np.asarray(x)), bits(np.asarray(y))) for x, y in zip(jax.tree.leaves(out),
                                                                                    jax.tree.leaves(again)))
    with pytest.raises(FtjaxError, match="shapes"):
        T.transfer_params(pt, {**pf, "model": {**pf["model"], "norm": {"weight": jax.numpy.ones(3)}}}, pb)


def test_killed_mid_write_leaves_nothing_and_next_run_succeeds(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    m = sparse_model(tmp_path / "m", 1 << 16, 2048)  # 256 MB of bf16
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ftjax.cli", "transfer", "--source-base", str(m), "--source-ft", str(m),
           "--target-base", str(m), "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp = tmp_path / f".out.ftjax-tmp-{p.pid}"
    deadline = time.monotonic() + 120
    while not (tmp / "model.safetensors").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert p.poll() is None, f"transfer ended before it could be killed: {p.stderr.read().decode()[-500:]}"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists() and tmp.exists()  # the partial output stays in the temp sibling only
    rep = T.transfer(m, m, m, out, progress=False)
    assert rep.transferred == 1 and HFCheckpoint(out).info(T.EMBED).shape == (1 << 16, 2048)
    assert not tmp.exists(), "the dead process's temp sibling is cleaned up"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["m", "out"]


def test_reports_count_the_bytes_actually_read(models, tmp_path):
    from ftjax.io.safetensors import SafetensorsFile

    b, f, t = models
    size = HFCheckpoint(t).total_bytes
    rep = T.transfer(b, f, t, tmp_path / "t", progress=False)
    assert rep.bytes_read == 3 * size and rep.bytes_written == size
    T.diff(b, f, tmp_path / "d", progress=False)
    diff_bytes = HFCheckpoint(tmp_path / "d", allow_diff=True).total_bytes
    lo = tmp_path / "d" / T.DIFF_LO
    lo_bytes = sum(SafetensorsFile(lo).info(n).nbytes for n in SafetensorsFile(lo).names()) if lo.exists() else 0
    rep = T.apply(t, tmp_path / "d", tmp_path / "a", progress=False)
    assert rep.bytes_read == size + diff_bytes + lo_bytes  # no bytes counted for the implicit zero remainders


def test_a_diff_directory_is_refused_as_a_model_and_inspected_as_a_diff(models, tmp_path, capsys):
    from ftjax.cli import main
    from ftjax.convert import inspect_checkpoint

    b, f, t = models
    d = tmp_path / "d"
    T.diff(b, f, d, progress=False)
    data = tmp_path / "rows.jsonl"
    data.write_text('{"input_ids": [1, 2, 3, 4]}\n')
    for argv in (["eval", "--model", str(d), "--data", str(data)],
                 ["generate", "--model", str(d), "--prompt", "hello"],
                 ["scan", "--a", str(b), "--b", str(d), "--data", str(data), "--out", str(tmp_path / "s")],
                 ["transfer", "--source-base", str(b), "--source-ft", str(d), "--target-base", str(t),
                  "--out", str(tmp_path / "o")],
                 ["finetune", "--init", str(d), "--data", str(data), "--steps", "1", "--out", str(tmp_path / "r")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "is a diff written by `ftjax diff`" in err and "ftjax apply" in err and err.count("\n") == 1, argv
    info = inspect_checkpoint(d)
    ck_b, ck_f = HFCheckpoint(b), HFCheckpoint(f)
    want = np.sqrt(sum(np.sum((ck_f.get(n).astype(np.float64) - ck_b.get(n).astype(np.float64)) ** 2)
                       for n in ck_b.names()))
    assert info["format"] == "ftjax-diff" and info["dtype"] == "float32" and str(b) in info["diff_of"]
    assert info["norm"] == pytest.approx(want, rel=1e-6) and len(info["largest_tensor_norms"]) == 5
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_inputs_that_look_swapped_are_warned_about(models, tmp_path):
    b, f, t = models
    instruct = tmp_path / "Model-Instruct"
    shutil.copytree(f, instruct)
    rep = T.diff(instruct, b, tmp_path / "d", progress=False)  # diff --base FT --ft BASE
    assert any("are --base and --ft swapped" in w for w in rep.warnings)
    assert not T.diff(b, instruct, tmp_path / "d2", progress=False).warnings
    # --source-base and --target-base swapped: F = S + small noise is far closer to S than to T
    rep = T.transfer(t, f, b, tmp_path / "o", progress=False)
    assert any("swapped" in w and "‖F − T‖" in w for w in rep.warnings)
    assert not T.transfer(b, f, t, tmp_path / "o2", progress=False).warnings
    rep = T.transfer(b, b, t, tmp_path / "o3", progress=False)
    assert any("diff is (nearly) zero" in w for w in rep.warnings)


def test_swapped_source_pair_is_named_not_the_target(models, tmp_path):
    """--source-base and --source-ft swapped, with a target base close to the real base (a new version that moved
    less than the fine-tune did): F (really the base) is closer to T than to S, and S has the chat template. The
    warnings name the source pair and never blame --target-base."""
    b, f, _ = models
    cb, rng = HFCheckpoint(b), np.random.default_rng(9)
    near = {n: (cb.get(n).astype(np.float32) + rng.normal(0, 0.001, cb.get(n).shape)).astype(BF16) for n in cb.names()}
    t_near = save_hf(tmp_path / "t_near", near, config=cb.config, aux_from=b)
    rep = T.transfer(f, b, t_near, tmp_path / "o", dry_run=True, progress=False)
    assert any("‖F − T‖" in w and "are --source-base and --source-ft swapped?" in w for w in rep.warnings), rep.warnings
    assert not any("--target-base" in w for w in rep.warnings), rep.warnings
