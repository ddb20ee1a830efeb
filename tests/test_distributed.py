"""Multi-process runs on jax.distributed: 2 processes x 4 CPU devices (gloo) give the numbers of 1 process x 8.

Each test spawns this file as a worker (`python tests/test_distributed.py WORKDIR [COORD N ID]`): one process with 8
fake CPU devices, then two processes with 4 each joined through `ftjax.distributed.initialize` on a free localhost
port. Both runs use the same mesh shape (data=2, fsdp=4) over the same global device order, so a sharded load, a
scan's losses and a few fine-tuning steps must agree (loads bitwise; computed numbers to float tolerance, since the
collectives differ: in-process all-reduce vs gloo).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MESH = "data=2,fsdp=4"


# ---------------------------------------------------------------------------------------------------------- worker
def worker(work: Path, coordinator: str | None, num_processes: int, process_id: int) -> None:
    """Load, scan and fine-tune on the mesh; write this process's numbers to work/out-<N>p/result-<id>.json."""
    from ftjax import distributed

    distributed.initialize(coordinator, num_processes if coordinator else None, process_id if coordinator else None)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ftjax import lmc
    from ftjax.data import examples_from_rows, read_jsonl
    from ftjax.io.checkpoint import HFCheckpoint
    from ftjax.params import flatten, load_params, make_mesh
    from ftjax.train import TrainConfig, finetune

    out = work / f"out-{num_processes}p"
    out.mkdir(exist_ok=True)
    result: dict = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
                    "local_devices": jax.local_device_count()}

    # 1. Sharded load. Count the elements this process reads, on an fsdp=8 mesh where it holds half of each matrix.
    read = {"elements": 0}
    get_slice = HFCheckpoint.get_slice

    def counting(self, name, index):
        x = get_slice(self, name, index)
        read["elements"] += x.size
        return x

    HFCheckpoint.get_slice = counting
    _, fsdp_params = load_params(work / "a", mesh=make_mesh("fsdp=8"))
    HFCheckpoint.get_slice = get_slice
    result["elements_read"] = read["elements"]
    result["elements_total"] = int(sum(x.size for x in jax.tree.leaves(fsdp_params)))
    # A cross-device reduction over the sharded leaves (a replicated scalar every process can read).
    result["fsdp8_checksum"] = float(jax.jit(lambda t: sum(jnp.sum(x) for x in jax.tree.leaves(t)))(fsdp_params))

    mesh = make_mesh(MESH)
    cfg, theta_a = load_params(work / "a", mesh=mesh)
    _, theta_b = load_params(work / "b", mesh=mesh)
    host_a = distributed.to_host(flatten(theta_a))
    result["load_sums"] = {n: float(np.sum(x, dtype=np.float64)) for n, x in host_a.items()}
    result["addressable_shards"] = len(theta_a["model"]["embed_tokens"]["weight"].addressable_shards)

    # 2. A scan (sharded params, batches over the data axis).
    examples = examples_from_rows(read_jsonl(work / "data.jsonl"), None, source="data")
    scan = lmc.scan(theta_a, theta_b, cfg, examples, [0.0, 0.5, 1.0], batch_size=4, max_len=32, mesh=mesh)
    result["scan_loss"] = scan["loss"]

    # 3. A few fine-tuning steps (params, optimizer state and batches sharded; Orbax saves from every process).
    tcfg = TrainConfig(steps=3, lr=1e-3, warmup=0, batch_size=8, max_len=32, dtype="float32")
    summary = finetune(work / "a", work / "data.jsonl", out / "run", config=tcfg, mesh=mesh, progress=False)
    result["train_loss"] = summary["loss"]
    (out / f"result-{jax.process_index()}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------- tests
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_ENABLE_X64"}
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": str(ROOT), "JAX_DEFAULT_MATMUL_PRECISION": "highest"}


def _spawn(work: Path, processes: int) -> list[subprocess.Popen]:
    me = str(Path(__file__).resolve())
    if processes == 1:
        args = [[sys.executable, me, str(work)]]
    else:
        coordinator = f"127.0.0.1:{_free_port()}"
        args = [[sys.executable, me, str(work), coordinator, str(processes), str(i)] for i in range(processes)]
    return [subprocess.Popen(a, cwd=ROOT, env=_env(8 // processes), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for a in args]


def _wait(procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]


def _tensors(model_dir: Path) -> dict:
    from ftjax.io.checkpoint import HFCheckpoint

    ckpt = HFCheckpoint(model_dir)
    return {n: ckpt.get(n).copy() for n in ckpt.names()}


def test_two_processes_match_one(tmp_path):
    import numpy as np

    from hf_models import make_hf_model

    make_hf_model(tmp_path / "a", seed=0)
    make_hf_model(tmp_path / "b", seed=1)
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(3, 128, rng.integers(17, 31)).tolist()} for _ in range(16)]  # one length bucket
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    t0 = time.perf_counter()
    # Both runs at once: the reference (1 process, 8 devices) and the distributed one (2 processes, 4 devices each).
    procs = _spawn(tmp_path, 1) + _spawn(tmp_path, 2)
    _wait(procs)
    print(f"1-process and 2-process runs: {time.perf_counter() - t0:.1f} s")

    one = json.loads((tmp_path / "out-1p" / "result-0.json").read_text())
    two = [json.loads((tmp_path / "out-2p" / f"result-{i}.json").read_text()) for i in range(2)]
    assert (one["processes"], one["devices"]) == (1, 8)
    assert [(r["process"], r["processes"], r["devices"], r["local_devices"]) for r in two] == [(0, 2, 8, 4),
                                                                                               (1, 2, 8, 4)]
    # Each process read only its own devices' slices: about half of the checkpoint on an fsdp=8 mesh.
    for r in two:
        assert r["elements_read"] < 0.6 * r["elements_total"], r
    assert one["elements_read"] >= one["elements_total"]
    for r in two:
        assert r["addressable_shards"] == 4
        # Loads are copies: bitwise equal sums; both processes see the same global numbers.
        assert r["load_sums"] == one["load_sums"]
        np.testing.assert_allclose(r["fsdp8_checksum"], one["fsdp8_checksum"], rtol=1e-6)
        np.testing.assert_allclose(r["scan_loss"], one["scan_loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["train_loss"], one["train_loss"], rtol=1e-5, atol=1e-6)

    # The fine-tuned model (written once, by process 0) equals the single-process one to float tolerance.
    ref, got = _tensors(tmp_path / "out-1p" / "run" / "final"), _tensors(tmp_path / "out-2p" / "run" / "final")
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert not any(p.name.startswith(".") for p in (tmp_path / "out-2p" / "run").iterdir())
    # Orbax wrote one checkpoint (step 3) from both processes together.
    assert (tmp_path / "out-2p" / "run" / "checkpoints" / "3").is_dir()


def _cli(args: list[str], coordinator: str | None = None, processes: int = 1) -> list[subprocess.Popen]:
    """`python -m ftjax.cli ARGS` as one process, or as `processes` processes joined at `coordinator`."""
    def cmd(i):
        dist = ["--coordinator", coordinator, "--num-processes", str(processes), "--process-id", str(i)]
        return [sys.executable, "-m", "ftjax.cli", *(dist if coordinator else []), *args]

    return [subprocess.Popen(cmd(i), cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(processes)]


def _same_bytes(a: Path, b: Path, provenance: str) -> int:
    """Assert dirs a and b hold the same files with the same bytes (the provenance JSON: apart from its creation
    time and timings); returns the number of safetensors files."""
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        if name == provenance:
            pa, pb = (json.loads((d / name).read_text()) for d in (a, b))
            for p in (pa, pb):
                p.pop("created")
                p["report"].pop("seconds"), p["report"].pop("gb_per_s")
                p["report"].pop("out"), p.pop("out", None)
            assert pa == pb
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return sum(n.endswith(".safetensors") for n in files)


def test_two_process_transfer_diff_apply_are_byte_identical(tmp_path):
    """The streaming transfer split over 2 processes (each writes its own shards, process 0 the index and small
    files) writes the same bytes as 1 process; so do `diff` (with its exact-remainder file) and `apply`."""
    from hf_models import make_hf_model, make_tokenizer

    base, ft, target = tmp_path / "b", tmp_path / "f", tmp_path / "t"
    make_hf_model(base, dtype="bfloat16", seed=0)
    make_hf_model(ft, dtype="bfloat16", seed=1, vocab_size=136)  # 8 added tokens: vocab rows copied (pad)
    make_hf_model(target, dtype="bfloat16", seed=2)
    make_tokenizer(ft, vocab_size=136, chat_template="{{ messages }}")
    base32, ft32 = make_hf_model(tmp_path / "b32", seed=0), make_hf_model(tmp_path / "f32", seed=1)  # inexact f32 diffs
    flags = ["--max-shard-size", "12KB", "--quiet"]
    commands = {"transfer": ["--source-base", str(base), "--source-ft", str(ft), "--target-base", str(target)],
                "diff": ["--base", str(base32), "--ft", str(ft32)],
                "apply": ["--target", str(base32), "--diff", str(tmp_path / "diff-1p"), "--alpha", "0.5"]}
    for command, args in commands.items():
        for n, tag in ((1, "1p"), (2, "2p")):
            out = ["--out", str(tmp_path / f"{command}-{tag}"), *flags]
            _wait(_cli([command, *args, *out], f"127.0.0.1:{_free_port()}" if n > 1 else None, n))
    shards = _same_bytes(tmp_path / "transfer-1p", tmp_path / "transfer-2p", "ftjax_transfer.json")
    assert shards >= 4  # both processes wrote shards
    assert (tmp_path / "transfer-2p" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "transfer-2p" / "tokenizer.json").is_file()
    assert _same_bytes(tmp_path / "diff-1p", tmp_path / "diff-2p", "ftjax_diff.json") >= 4
    meta = json.loads((tmp_path / "diff-2p" / "ftjax_diff.json").read_text())
    assert meta["lo_tensors"] and (tmp_path / "diff-2p" / "ftjax_diff_lo.safetensors").is_file()
    assert _same_bytes(tmp_path / "apply-1p", tmp_path / "apply-2p", "ftjax_transfer.json") >= 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def write_output_worker(work: Path, coordinator: str, process_id: int, fail: str) -> None:
    """distributed.write_output on 2 processes where `fail` ("work-1", "enospc", "finalize", "paths" or "none")
    raises."""
    from ftjax import distributed
    from ftjax.errors import FtjaxError

    distributed.initialize(coordinator, 2, process_id)

    def work_fn(tmp, me, n):
        (tmp / f"part-{me}").write_text(str(n))
        if fail == f"work-{me}":
            raise FtjaxError(f"process {me} broke")
        if fail == "enospc" and me == 1:  # what a full disk raises mid-write
            raise OSError(28, "No space left on device", str(tmp / "shard-2"))

    def finalize(tmp, n):
        if fail == "finalize":
            raise FtjaxError("finalize broke")
        (tmp / "index").write_text("done")

    out = work / (f"out{process_id}" if fail == "paths" else "out")  # "paths": each process names another output
    try:
        distributed.write_output(out, overwrite=False, inputs=[], work=work_fn, finalize=finalize)
        msg = "ok"
    except FtjaxError as e:
        msg = str(e)
    (work / f"result-{process_id}.txt").write_text(msg)


def test_write_output_fails_together(tmp_path):
    """A failure on any process (in its own part, or in process 0's finishing step) or processes naming different
    outputs raise on both processes and leave nothing; success leaves exactly the processes' files."""
    me = str(Path(__file__).resolve())
    for fail in ("work-1", "enospc", "finalize", "paths", "none"):
        work = tmp_path / fail
        work.mkdir()
        coordinator = f"127.0.0.1:{_free_port()}"
        _wait([subprocess.Popen([sys.executable, me, "--write-output", str(work), coordinator, str(i), fail], cwd=ROOT,
                                env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)], timeout=120)
        results = [(work / f"result-{i}.txt").read_text() for i in range(2)]
        left = sorted(p.name for p in work.iterdir() if not p.name.startswith("result-"))
        if fail == "none":
            assert results == ["ok", "ok"]
            assert left == ["out"]
            assert sorted(p.name for p in (work / "out").iterdir()) == ["index", "part-0", "part-1"]
        elif fail == "work-1":
            assert results[1] == "process 1 broke"
            assert results[0].startswith("process 1 failed (see its error); nothing was written at"), results[0]
            assert left == []
        elif fail == "enospc":
            assert results[1].startswith("no space left on device while writing ") and "shard-2" in results[1]
            assert results[0].startswith("process 1 failed (see its error)"), results[0]
            assert left == []
        elif fail == "paths":
            for i, r in enumerate(results):
                assert r.startswith(f"the processes were given different outputs ({work / f'out{i}'} on process {i})"), r
            assert left == []
        else:
            assert results[0] == "finalize broke"
            assert results[1].startswith("process 0 could not finish"), results[1]
            assert left == []


def test_settings_from_flags_and_env(monkeypatch):
    import pytest

    from ftjax.distributed import settings
    from ftjax.errors import FtjaxError

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert settings() is None
    assert settings("h:1", 2, 1) == {"coordinator": "h:1", "num_processes": 2, "process_id": 1}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert settings() == {"coordinator": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert settings(process_id=0)["process_id"] == 0  # a flag wins over the environment
    with pytest.raises(FtjaxError, match="process-id"):
        settings(process_id=4)
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(FtjaxError, match="--process-id"):
        settings()


if __name__ == "__main__":
    _work, *_rest = sys.argv[1:]
    if _work == "--write-output":
        write_output_worker(Path(_rest[0]), _rest[1], int(_rest[2]), _rest[3])
    elif _rest:
        worker(Path(_work), _rest[0], int(_rest[1]), int(_rest[2]))
    else:
        worker(Path(_work), None, 1, 0)
