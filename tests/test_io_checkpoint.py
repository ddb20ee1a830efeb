"""ftjax.io.checkpoint: HF directories and cached Hub repos, sharded writes, atomic output, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import (
    HFCheckpoint,
    HFCheckpointWriter,
    atomic_output_dir,
    copy_aux_files,
    plan_shards,
    resolve_model_path,
    save_hf,
)
from ftjax.io.safetensors import DTYPES, SafetensorsFile, SafetensorsWriter, TensorInfo


def sample(code: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random bytes viewed as dtype `code` (NaN payloads included: round trips must keep every bit)."""
    raw = np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) * DTYPES[code].itemsize, dtype=np.uint8)
    return (raw % 2 if code == "BOOL" else raw).view(DTYPES[code]).reshape(shape)


ALL = {f"t.{code}.{i}": sample(code, shape, i) for code in DTYPES for i, shape in enumerate([(3, 5), (), (0, 4), (7,)])}


def assert_bytes_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def write_file(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    with SafetensorsWriter(path, [TensorInfo(k, v.dtype, v.shape) for k, v in tensors.items()]) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return path


def make_dir(path: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int = 10**9, **extra: str) -> Path:
    """A model dir written by our own writer plus a config.json and the given extra text files."""
    save_hf(path, tensors, config=CONFIG, max_shard_bytes=max_shard_bytes)
    for name, text in extra.items():
        (path / name).write_text(text)
    return path


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---------------------------------------------------------------- reading and round trips


@pytest.mark.parametrize("max_shard_bytes", [10**9, 64])
def test_round_trip_every_dtype_single_and_sharded(tmp_path, max_shard_bytes):
    src = make_dir(tmp_path / "src", ALL, max_shard_bytes)
    ckpt = HFCheckpoint(src)
    sharded = max_shard_bytes == 64
    assert (src / "model.safetensors.index.json").exists() == sharded
    assert (src / "model.safetensors").exists() == (not sharded)
    assert ckpt.config == CONFIG
    assert sorted(ckpt.names()) == sorted(ALL)
    assert ckpt.total_bytes == sum(v.nbytes for v in ALL.values())
    for k, v in ALL.items():
        assert_bytes_equal(ckpt.get(k), v)
        assert ckpt.info(k) == TensorInfo(k, v.dtype, v.shape)
        assert ckpt.file_of(k) in ckpt.files
    # read -> write -> read is byte-exact, including through the other layout
    out = save_hf(tmp_path / "out", {k: ckpt.get(k) for k in ckpt.names()}, config=ckpt.config, aux_from=src,
                  max_shard_bytes=10**9 if sharded else 64)
    back = HFCheckpoint(out)
    for k, v in ALL.items():
        assert_bytes_equal(back.get(k), v)
    assert json.loads((out / "config.json").read_text()) == CONFIG
    ckpt.close()
    back.close()


def test_sharded_layout_names_index_and_metadata(tmp_path):
    tensors = {f"w{i}": np.full((4,), i, np.float32) for i in range(5)}  # 16 bytes each
    out = make_dir(tmp_path / "m", tensors, max_shard_bytes=40)
    files = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert tree(out) == sorted(["config.json", "model.safetensors.index.json", *files])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == {
        "metadata": {"total_size": 80},
        "weight_map": {"w0": files[0], "w1": files[0], "w2": files[1], "w3": files[1], "w4": files[2]},
    }
    for f in files:
        assert SafetensorsFile(out / f).metadata == {"format": "pt"}
    ckpt = HFCheckpoint(out)
    assert ckpt.files == [out / f for f in files]
    assert ckpt.file_of("w3") == out / files[1]
    np.testing.assert_array_equal(ckpt.get_slice("w4", (slice(1, 3),)), [4.0, 4.0])


def test_plan_shards_greedy_in_key_order():
    infos = [TensorInfo(n, np.uint8, (s,)) for n, s in [("a", 3), ("b", 3), ("c", 10), ("d", 1), ("e", 4)]]
    plan = [[i.name for i in shard] for shard in plan_shards(infos, 6)]
    assert plan == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_shards([], 6) == [[]]
    assert plan_shards(infos, 5 * 10**9) == [infos]
    with pytest.raises(FtjaxError, match="positive"):
        plan_shards(infos, 0)


def test_checkpoint_writer_chunks_and_order(tmp_path):
    emb = np.arange(60, dtype=np.float32).reshape(15, 4)
    infos = [TensorInfo("emb", np.float32, (15, 4)), TensorInfo("b", np.int64, (2,))]
    with HFCheckpointWriter(tmp_path, infos, max_shard_bytes=100) as w:
        for r in range(0, 15, 4):
            w.write("emb", emb[r : r + 4])
        w.write("b", np.array([1, 2]))
    (tmp_path / "config.json").write_text("{}")
    ckpt = HFCheckpoint(tmp_path)
    np.testing.assert_array_equal(ckpt.get("emb"), emb)
    assert len(ckpt.files) == 2
    d = tmp_path / "bad"
    with pytest.raises(FtjaxError, match="'emb' written out of order"):
        with HFCheckpointWriter(d, infos, max_shard_bytes=100) as w:
            w.write("emb", emb)
            w.write("b", np.array([1, 2]))
            w.write("emb", emb)
    assert tree(d) == []  # partial shards removed
    with pytest.raises(FtjaxError, match="incomplete: tensor 'b'"):
        with HFCheckpointWriter(d, infos, max_shard_bytes=100) as w:
            w.write("emb", emb)
    assert tree(d) == []


def test_files_named_by_index_only_and_aux_files(tmp_path):
    src = make_dir(tmp_path / "m", {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}, max_shard_bytes=16,
                   **{"tokenizer.json": "{}", "generation_config.json": "{}", "chat_template.jinja": "x",
                      "README.md": "card", "pytorch_model.bin": "pickle", ".gitattributes": ""})
    # a consolidated file with other names beside the HF shards must be ignored
    write_file(src / "consolidated.safetensors", {"tok_embeddings.weight": np.ones(2, np.float32)})
    ckpt = HFCheckpoint(src)
    assert ckpt.names() == ["a", "b"]
    assert [p.name for p in ckpt.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert [p.name for p in ckpt.aux_files()] == [
        "chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json"]
    dst = tmp_path / "dst"
    dst.mkdir()
    copy_aux_files(src, dst, skip=["config.json"])
    assert tree(dst) == ["chat_template.jinja", "generation_config.json", "tokenizer.json"]


# ---------------------------------------------------------------- Hub cache (offline only)


def fake_hub_repo(cache: Path, repo_id: str, tensors: dict[str, np.ndarray], ref: str = "main") -> Path:
    """The huggingface_hub cache layout: models--org--name/{refs/<ref>, blobs/, snapshots/<hash>/ -> blobs}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    src = make_dir(repo / "staging", tensors)
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.move(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    src.rmdir()
    (repo / "refs").mkdir()
    (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_repo_id_resolves_through_local_cache(tmp_path, monkeypatch, env):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "hub"
    monkeypatch.setenv(env, str(cache if env == "HF_HUB_CACHE" else tmp_path))
    snap = fake_hub_repo(cache, "org/name", {"w": np.arange(3, dtype=np.float32)})
    fake_hub_repo(cache, "org/other", {"v": np.ones(1, np.int8)}, ref="v1")
    assert resolve_model_path("org/name") == snap
    ckpt = HFCheckpoint("org/name")
    np.testing.assert_array_equal(ckpt.get("w"), [0, 1, 2])
    assert ckpt.config == CONFIG
    assert HFCheckpoint("org/other@v1").names() == ["v"]
    with pytest.raises(FtjaxError, match="org/missing: neither a directory nor a Hub repo in the local cache"):
        HFCheckpoint("org/missing")
    with pytest.raises(FtjaxError, match="neither a directory nor a Hub repo"):
        HFCheckpoint("org/other")  # only the v1 ref is cached


def test_nonexistent_path_and_file_path(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(FtjaxError, match=f"{missing}: neither a directory nor a Hub repo"):
        HFCheckpoint(missing)
    f = write_file(tmp_path / "x.safetensors", {"a": np.ones(1, np.float32)})
    with pytest.raises(FtjaxError, match="is a file; expected a Hugging Face model directory"):
        HFCheckpoint(f)


# ---------------------------------------------------------------- bad model directories


def sharded(tmp_path: Path) -> Path:
    return make_dir(tmp_path / "m", {"a": np.ones(4, np.float32), "b": np.zeros(4, np.float32)}, max_shard_bytes=16)


def edit_index(d: Path, fn) -> Path:
    p = d / "model.safetensors.index.json"
    p.write_text(json.dumps(fn(json.loads(p.read_text()))))
    return p


def test_missing_or_bad_config(tmp_path):
    d = sharded(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(FtjaxError, match=f"{d}: no config.json"):
        HFCheckpoint(d)
    (d / "config.json").write_text("{oops")
    with pytest.raises(FtjaxError, match=f"{d / 'config.json'}: config.json is not valid JSON"):
        HFCheckpoint(d)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda ix: "not json {", "is not valid JSON"),
        (lambda ix: {"metadata": {}}, 'has no "weight_map"'),
        (lambda ix: {"weight_map": {**ix["weight_map"], "c": "model-00009-of-00009.safetensors"}},
         "names shard 'model-00009-of-00009.safetensors', which does not exist"),
        (lambda ix: {"weight_map": {"a": "../m/model-00001-of-00002.safetensors"}}, "tensor 'a' maps to shard '../m"),
        (lambda ix: {"weight_map": {"a": "sub/x.safetensors"}}, "not a plain file name"),
        (lambda ix: {"weight_map": {"a": "sub\\x.safetensors"}}, "not a plain file name"),
        (lambda ix: {"weight_map": {"a": "/etc/passwd"}}, "not a plain file name"),
        (lambda ix: {"weight_map": {"a": 3}}, "not a plain file name"),
    ],
)
def test_bad_index(tmp_path, edit, match):
    d = sharded(tmp_path)
    p = d / "model.safetensors.index.json"
    new = edit(json.loads(p.read_text()))
    p.write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(FtjaxError, match=match) as e:
        HFCheckpoint(d)
    assert str(p) in str(e.value)


def test_tensor_in_index_but_not_in_shard(tmp_path):
    d = sharded(tmp_path)
    p = edit_index(d, lambda ix: {"weight_map": {**ix["weight_map"], "ghost": "model-00001-of-00002.safetensors"}})
    ckpt = HFCheckpoint(d)
    with pytest.raises(FtjaxError, match=f"{p}: lists tensor 'ghost' in .*model-00001-of-00002.safetensors, but that"):
        ckpt.get("ghost")
    with pytest.raises(FtjaxError, match="'ghost'"):
        ckpt.total_bytes
    with pytest.raises(FtjaxError, match="checkpoint has no tensor 'nope'"):
        ckpt.info("nope")


def test_truncated_shard_names_file_and_tensor(tmp_path):
    d = sharded(tmp_path)
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    ckpt = HFCheckpoint(d)  # lazy: shard 2 is opened on first use
    np.testing.assert_array_equal(ckpt.get("a"), np.ones(4))
    with pytest.raises(FtjaxError, match=f"{shard}: tensor 'b'.*truncated"):
        ckpt.get("b")


@pytest.mark.parametrize("names", [["pytorch_model.bin"], ["pytorch_model-00001-of-00002.bin"], ["model.pth"]])
def test_pickle_only_is_refused_with_conversion_hint(tmp_path, names):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    for n in names:
        (d / n).write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(FtjaxError, match=f"{d}: only PyTorch pickle weights.*never unpickles.*safe_serialization=True"):
        HFCheckpoint(d)


def test_no_weights_at_all(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    write_file(d / "consolidated.safetensors", {"x": np.ones(1, np.float32)})
    with pytest.raises(FtjaxError, match=f"{d}: no model.safetensors.*found consolidated.safetensors"):
        HFCheckpoint(d)


# ---------------------------------------------------------------- atomic output


def test_atomic_output_refuses_existing_and_nested(tmp_path):
    src = sharded(tmp_path)
    t = {"x": np.ones(2, np.float32)}
    (tmp_path / "exists").mkdir()
    with pytest.raises(FtjaxError, match="already exists; pass --overwrite"):
        save_hf(tmp_path / "exists", t, config={})
    for out in (src, src / "sub", tmp_path):
        with pytest.raises(FtjaxError, match="choose an output outside the inputs"):
            save_hf(out, t, config={}, inputs=[src], overwrite=True)
    with pytest.raises(FtjaxError, match="outside the inputs"):
        save_hf(src / "sub", t, config={}, aux_from=src)  # aux source counts as an input
    assert tree(tmp_path / "exists") == [] and not (src / "sub").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "m"]


def test_atomic_output_overwrite_replaces_only_when_complete(tmp_path):
    out = make_dir(tmp_path / "out", {"old": np.ones(2, np.float32)})
    before = tree(out)
    with pytest.raises(FtjaxError, match="'y'"):  # fails half-way: old output untouched, no temp left
        with atomic_output_dir(out, overwrite=True) as tmp:
            assert tmp.parent == out.parent and tmp.name == f".out.ftjax-tmp-{os.getpid()}"
            (tmp / "config.json").write_text("{}")
            with HFCheckpointWriter(tmp, [TensorInfo("y", np.float32, (2,))]) as w:
                w.write("y", np.ones(3, np.float32))
    assert tree(out) == before and HFCheckpoint(out).names() == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    save_hf(out, {"new": np.zeros(3, np.int32)}, config={}, overwrite=True)
    assert HFCheckpoint(out).names() == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_input_while_writing_leaves_nothing(tmp_path):
    bad = sharded(tmp_path)
    (bad / "model-00002-of-00002.safetensors").write_bytes(b"\x07\0\0\0\0\0\0\0{broken")
    ckpt = HFCheckpoint(bad)
    infos = [TensorInfo(k, np.float32, (4,)) for k in ckpt.names()]
    with pytest.raises(FtjaxError, match="model-00002-of-00002.safetensors: header is not valid JSON"):
        with atomic_output_dir(tmp_path / "out", inputs=[bad]) as tmp:
            with HFCheckpointWriter(tmp, infos) as w:
                for k in ckpt.names():  # streaming: "a" is written before "b" is found broken
                    w.write(k, ckpt.get(k))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_repo_id_inputs_are_guarded_too(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = fake_hub_repo(tmp_path / "hub", "org/name", {"w": np.ones(2, np.float32)})
    with pytest.raises(FtjaxError, match="outside the inputs"):
        save_hf(snap / "out", {"w": np.ones(2, np.float32)}, config={}, inputs=["org/name"])
    assert not (snap / "out").exists()


def test_atomic_output_removes_stale_temp_of_dead_pid_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.ftjax-tmp-{dead_pid}"
    live = tmp_path / f".out.ftjax-tmp-{os.getppid()}"
    other = tmp_path / f".other.ftjax-tmp-{dead_pid}"
    for d in (stale, live, other):
        (d / "junk").mkdir(parents=True)
    save_hf(tmp_path / "out", {"x": np.ones(1, np.float32)}, config={})
    assert not stale.exists() and live.exists() and other.exists()


def test_enospc_is_one_line_error_and_leaves_nothing(tmp_path, monkeypatch):
    """Simulated full disk while copying aux files (always runs; the tmpfs test below is the real thing)."""
    src = make_dir(tmp_path / "src", {"x": np.ones(1, np.float32)}, **{"tokenizer.json": "{}"})

    def full(a, b, *args, **kwargs):
        raise OSError(28, "No space left on device", str(b))

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(FtjaxError, match="no space left on device while writing .*tokenizer.json"):
        save_hf(tmp_path / "out", {"x": np.ones(1, np.float32)}, config={}, aux_from=src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 64k tmpfs to simulate a full disk (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("max_shard_bytes", [10**9, 50_000])
def test_full_disk_on_real_tmpfs(tiny_tmpfs, max_shard_bytes):
    tensors = {f"w{i}": np.ones((100, 250), np.float32) for i in range(3)}  # 300 kB > 64 kB
    out = tiny_tmpfs / "out"
    with pytest.raises(FtjaxError, match=r"no space left on device while writing .*\.safetensors") as e:
        save_hf(out, tensors, config=CONFIG, max_shard_bytes=max_shard_bytes)
    assert "\n" not in str(e.value)
    assert not out.exists() and list(tiny_tmpfs.iterdir()) == []


# ---------------------------------------------------------------- interop with transformers


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """A tiny random Llama saved by transformers, once single-file and once sharded (20 KB shards)."""
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root / "single", root / "sharded"


def test_reads_files_written_by_transformers(hf_models):
    from safetensors.numpy import load_file

    single, shards = hf_models
    assert (shards / "model.safetensors.index.json").exists() and not (single / "model.safetensors.index.json").exists()
    for d in hf_models:
        ckpt = HFCheckpoint(d)
        index = json.loads((d / "model.safetensors.index.json").read_text()) if d == shards else None
        expected = {}
        for f in ckpt.files:
            expected.update(load_file(str(f)))
        assert sorted(ckpt.names()) == sorted(expected)
        if index:
            assert len(ckpt.files) > 1 and ckpt.names() == list(index["weight_map"])
        for k, v in expected.items():
            assert_bytes_equal(ckpt.get(k), v)


@pytest.mark.parametrize("max_shard_bytes", [5 * 10**9, 30_000])
def test_rewritten_checkpoint_loads_in_transformers_with_equal_logits(hf_models, tmp_path, max_shard_bytes):
    from safetensors.numpy import load_file

    src = hf_models[1]
    ckpt = HFCheckpoint(src)
    out = save_hf(tmp_path / "out", {k: ckpt.get(k) for k in ckpt.names()}, config=ckpt.config, aux_from=src,
                  inputs=[src], max_shard_bytes=max_shard_bytes)
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (out / "model.safetensors.index.json").exists() == (max_shard_bytes < 10**6)
    for f in HFCheckpoint(out).files:  # every file is readable by the reference library
        for k, v in load_file(str(f)).items():
            assert_bytes_equal(v, ckpt.get(k))
    tokens = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(src).eval()(tokens).logits
        got = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(tokens).logits
    assert torch.equal(ref, got)



def _precious(path: Path) -> list[str]:
    """A folder a user cares about: a file and a subfolder ftjax never wrote."""
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("four years of work")
    (path / "figures").mkdir()
    (path / "figures" / "fig1.png").write_bytes(b"png")
    return tree(path)


def test_overwrite_replaces_only_what_ftjax_could_have_written(tmp_path):
    from ftjax.io.checkpoint import check_replaceable

    t = {"x": np.ones(2, np.float32)}
    before = _precious(tmp_path / "thesis")
    with pytest.raises(FtjaxError, match="holds figures/, which ftjax did not write"):
        save_hf(tmp_path / "thesis", t, config={}, overwrite=True)
    assert tree(tmp_path / "thesis") == before
    # a downloaded model directory carries files ftjax never writes (README.md, LICENSE)
    hub = make_dir(tmp_path / "hub", t)
    (hub / "README.md").write_text("model card")
    with pytest.raises(FtjaxError, match="holds README.md"):
        check_replaceable(hub)
    # replaceable: an empty directory, a plain model directory, an ftjax output with its record
    (tmp_path / "empty").mkdir()
    model = make_dir(tmp_path / "model", t)
    (model / "tokenizer.json").write_text("{}")
    for out in (tmp_path / "empty", model):
        check_replaceable(out)
        save_hf(out, t, config={}, overwrite=True)
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    (recorded / "LICENSE").write_text("copied from the source model")
    (recorded / "ftjax_transfer.json").write_text(json.dumps({"files": ["LICENSE", "ftjax_transfer.json"]}))
    check_replaceable(recorded)
    (recorded / "notes.txt").write_text("added by hand later")
    with pytest.raises(FtjaxError, match="holds notes.txt"):
        check_replaceable(recorded)


def test_every_command_refuses_to_write_over_a_users_folder(tmp_path, capsys):
    from ftjax.cli import main
    from hf_models import make_hf_model

    m = make_hf_model(tmp_path / "m", dtype="bfloat16")
    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [1, 2, 3, 4]}\n')
    out = tmp_path / "thesis"
    before = _precious(out)
    both = ["--a", str(m), "--b", str(m)]
    for argv in (["transfer", "--source-base", str(m), "--source-ft", str(m), "--target-base", str(m), "--overwrite"],
                 ["diff", "--base", str(m), "--ft", str(m), "--overwrite"],
                 ["scan", *both, "--data", str(data)], ["plane", *both, "--c", str(m), "--data", str(data)],
                 ["stats", "--source-base", str(m), "--source-ft", str(m)],
                 ["eval", "--model", str(m), "--data", str(data)],
                 ["finetune", "--init", str(m), "--data", str(data), "--steps", "1"],
                 ["plot-curves", str(m)]):
        capsys.readouterr()
        assert main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("thesis.txt" in err or "figures" in err or "not an ftjax" in err), argv
        assert tree(out) == before, argv
    for argv in (["convert", str(m), str(out), "--to", "orbax", "--overwrite"],
                 ["demo", "--tiny", "--out", str(out), "--overwrite"]):
        assert main(argv) == 2
        assert tree(out) == before
    # an earlier output of the same command is replaced
    again = tmp_path / "again"
    for _ in range(2):
        assert main(["transfer", "--source-base", str(m), "--source-ft", str(m), "--target-base", str(m),
                     "--out", str(again), "--overwrite", "--quiet"]) == 0
        assert main(["convert", str(m), str(tmp_path / "orbax"), "--to", "orbax", "--overwrite"]) == 0
        assert main(["scan", *both, "--data", str(data), "--points", "2", "--out", str(tmp_path / "scan")]) == 0
