"""ftjax.train: exact resume after a kill, HF export, accumulation equivalence, loss masks, packing, bad input, NaN."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.cli import main
from ftjax.config import ModelConfig
from ftjax.data import Example, examples_from_rows, load_tokenizer
from ftjax.errors import FtjaxError
from ftjax.io.safetensors import SafetensorsFile
from ftjax.model import forward, init_params
from ftjax.params import load_params
from ftjax.rows import make_rows, step_batch, training_examples
from ftjax.train import TrainConfig, finetune, loss_sums, lr_at, make_optimizer, read_curves, train_step
from hf_models import LLAMA, make_hf_model, make_tokenizer, lm_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = make_hf_model(root / "m1")
    make_tokenizer(model)
    data = write_jsonl(root / "train.jsonl", lm_rows())
    return root, model, data


def _tensors(model_dir: Path) -> dict[str, np.ndarray]:
    with SafetensorsFile(model_dir / "model.safetensors") as f:
        return {n: np.array(f.get(n)) for n in f.names()}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftjax.cli", *args]


def test_killed_run_resumes_bitwise(setup, tmp_path):
    """SIGKILL after the first checkpoint, re-run the same command: same final bits as an uninterrupted run."""
    _, model, data = setup
    common = ["--init", str(model), "--data", str(data), "--steps", "12", "--batch-size", "2", "--grad-accum", "2",
              "--max-len", "32", "--save-every", "2", "--lr", "1e-3", "--warmup", "2", "--quiet"]
    # A persistent compilation cache: the three processes compile the same step once (a hit is the same executable).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    whole = subprocess.run(_cli("finetune", *common, "--out", str(tmp_path / "a")), cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "b"
    proc = subprocess.Popen(_cli("finetune", *common, "--out", str(out)), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "2" / "ftjax_complete.json").is_file() and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "final").exists()

    resumed = subprocess.run(_cli("finetune", *common, "--out", str(out), "--json"), cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from"] >= 2
    a, b = _tensors(tmp_path / "a" / "final"), _tensors(out / "final")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
    assert not np.array_equal(a["model.norm.weight"], _tensors(model)["model.norm.weight"])  # it did train
    assert read_curves(tmp_path / "a") == read_curves(out)  # same losses, lr and grad norms, bit for bit
    assert read_curves(out)["step"] == list(range(1, 13))  # the log was cut back to the checkpoint, no duplicates


def test_export_loads_in_transformers_with_same_logits(setup, tmp_path):
    import torch
    import transformers

    root, model, data = setup
    eval_data = write_jsonl(tmp_path / "eval.jsonl", lm_rows(6, seed=1))
    result = finetune(model, data, tmp_path / "run", config=TrainConfig(steps=3, lr=1e-3, batch_size=4, max_len=32),
                      eval_data=eval_data, eval_every=2, progress=False)
    final = Path(result["final"])
    assert (final / "tokenizer.json").is_file()
    cfg, params = load_params(final)
    tokens = np.random.default_rng(0).integers(0, 128, (2, 12)).astype(np.int32)
    ours = np.asarray(forward(params, jnp.asarray(tokens), cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-5)
    curves = read_curves(tmp_path / "run")
    assert curves["step"] == [1, 2, 3] and curves["eval_step"] == [0, 2, 3]
    assert all(np.isfinite(curves["grad_norm"])) and curves["lr"][0] > 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(e["nonpad_tokens_per_s"] > 0 for e in log if "loss" in e)
    assert result["nonpad_tokens_per_s"] == log[-2]["nonpad_tokens_per_s"]  # the last step's (then its eval)


def _tiny_state(cfg: ModelConfig, tcfg: TrainConfig):
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    return {"params": params, "opt_state": make_optimizer(tcfg).init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(0))}


def test_grad_accumulation_matches_larger_batch():
    """grad_accum=2 x batch 2 == grad_accum=1 x batch 4 (token-weighted over the whole step), up to rounding."""
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **LLAMA})
    examples = examples_from_rows(lm_rows(8), None)
    rows = make_rows(training_examples(examples, 32), 32)
    results = []
    for accum, batch in ((2, 2), (1, 4)):
        tcfg = TrainConfig(steps=2, lr=1e-3, batch_size=batch, grad_accum=accum, max_len=32, dtype="float32",
                           warmup=0, weight_decay=0.1)
        step = jax.jit(lambda s, b, t=tcfg: train_step(s, b, lr_at(t, 1), cfg=cfg, step_cfg=t.step_config,
                                                             optimizer=make_optimizer(t)))
        state = _tiny_state(cfg, tcfg)
        state, m1 = step(state, step_batch(rows, 0, batch, accum, tcfg.seed))
        assert step_batch(rows, 0, batch, accum, tcfg.seed)[0].shape == (accum, batch, 32)
        results.append((state["params"], m1))
    (p_a, m_a), (p_b, m_b) = results
    np.testing.assert_allclose(m_a["loss"], m_b["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_a["grad_norm"], m_b["grad_norm"], rtol=1e-5)
    assert m_a["loss_tokens"] == m_b["loss_tokens"]
    for a, b in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_b)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_completion_loss_mask_and_packing(tmp_path):
    """Prompt/completion rows weigh completion tokens only; packed rows (segment ids) give the unpacked loss."""
    tok_dir = make_tokenizer(tmp_path / "tok")
    rows = [{"prompt": "one plus two equals", "completion": " three"},
            {"prompt": "what is the answer", "completion": " four five six"},
            {"text": "the question is this one"}]
    examples = training_examples(examples_from_rows(rows, load_tokenizer(tok_dir)), 64)
    plain = make_rows(examples, 64)
    n_prompt = len(load_tokenizer(tok_dir).encode("one plus two equals").ids)
    w = plain.weights_nt[0]
    assert w[:n_prompt].sum() == 0 and w[n_prompt] == 1 and w.sum() == 1
    assert plain.weights_nt[1].sum() == 3
    assert plain.weights_nt[2].sum() == len(examples[2].tokens_t) - 1

    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **LLAMA})
    params = init_params(cfg, jax.random.key(1), jnp.float32)
    # completion-only loss equals the NLL of the completion tokens read off the logits
    logits = np.asarray(forward(params, jnp.asarray(plain.tokens_nt[:1]), cfg))[0]
    targets = plain.tokens_nt[0]
    manual = sum(float(jax.nn.logsumexp(logits[t - 1]) - logits[t - 1, targets[t]]) for t in np.flatnonzero(w))
    nll, weight = loss_sums(params, cfg, *(jnp.asarray(a[:1]) for a in (plain.tokens_nt, plain.segments_nt,
                                                                         plain.positions_nt, plain.weights_nt)))
    np.testing.assert_allclose(float(nll), manual, rtol=1e-5)
    assert float(weight) == 1

    packed = make_rows(examples, 64, pack=True)
    assert packed.tokens_nt.shape[0] == 1 and set(np.unique(packed.segments_nt)) == {0, 1, 2, 3}
    sums = [loss_sums(params, cfg, *(jnp.asarray(a) for a in (r.tokens_nt, r.segments_nt, r.positions_nt,
                                                                r.weights_nt))) for r in (plain, packed)]
    np.testing.assert_allclose(float(sums[0][0]), float(sums[1][0]), rtol=1e-5)
    assert float(sums[0][1]) == float(sums[1][1])


def _error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftjax: error:") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_input_is_one_line_error_before_training(setup, tmp_path, capsys):
    root, model, data = setup
    base = ["finetune", "--init", str(model), "--data", str(data), "--max-len", "32", "--quiet"]
    out = tmp_path / "run"
    assert "--steps must be positive" in _error(capsys, *base, "--steps", "0", "--out", str(out))
    for flag, value in (("--batch-size", "0"), ("--grad-accum", "-1")):
        err = _error(capsys, *base, "--steps", "2", flag, value, "--out", str(out))
        assert f"{flag[2:]} must be positive" in err
    assert not out.exists()

    long_prompt = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "one two three four five six seven eight nine",
                                                          "completion": " ten"}])
    err = _error(capsys, "finetune", "--init", str(model), "--data", str(long_prompt), "--max-len", "4", "--steps", "2",
                 "--out", str(out))
    assert "no tokens to train on after truncation" in err and not out.exists()

    assert main([*base, "--steps", "1", "--batch-size", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    err = _error(capsys, *base, "--steps", "1", "--batch-size", "2", "--lr", "1e-4", "--out", str(out))
    assert "different configuration" in err and "lr" in err
    other = make_hf_model(tmp_path / "m_other", hidden_size=48, intermediate_size=96)
    capsys.readouterr()
    err = _error(capsys, "finetune", "--init", str(other), "--data", str(data), "--max-len", "32", "--steps", "1",
                 "--batch-size", "2", "--out", str(out))
    assert "different configuration" in err and "init" in err and "model config" in err
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert before == ["1"]  # nothing was trained or saved by the refused runs


def test_nan_loss_stops_and_keeps_last_good_checkpoint(setup, tmp_path, capsys):
    _, model, data = setup
    out = tmp_path / "run"
    err = _error(capsys, "finetune", "--init", str(model), "--data", str(data), "--max-len", "32", "--steps", "6",
                 "--batch-size", "2", "--lr", "1e30", "--warmup", "0", "--schedule", "constant", "--save-every", "1",
                 "--dtype", "float32", "--out", str(out), "--quiet")
    assert "diverged at step 2" in err and "last good checkpoint is step 1" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    assert not (out / "final").exists()
    with pytest.raises(FtjaxError, match="no tokens"):
        training_examples([Example(np.array([1, 2], np.int32), np.array([0, 0], np.float32))], 8)


def test_mesh_and_remat_match_single_device(setup, tmp_path):
    """data=2,fsdp=2 sharding (optimizer state sharded like the params) with remat gives the single-device result."""
    from jax.sharding import NamedSharding, PartitionSpec

    from ftjax.layout import shardings_for
    from ftjax.params import flatten, make_mesh
    from ftjax.train import batch_sharding, state_shardings

    _, model, data = setup
    tcfg = TrainConfig(steps=2, lr=1e-3, batch_size=4, max_len=32, dtype="float32", warmup=0)
    single = finetune(model, data, tmp_path / "single", config=tcfg, progress=False)
    mesh = make_mesh("data=2,fsdp=2", devices=jax.devices()[:4])
    sharded = finetune(model, data, tmp_path / "sharded", config=TrainConfig(**{**tcfg.__dict__, "remat": True}),
                       mesh=mesh, progress=False)
    a, b = _tensors(Path(single["final"])), _tensors(Path(sharded["final"]))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=2e-6, err_msg=name)

    cfg, params = load_params(model, mesh=mesh)
    opt = make_optimizer(tcfg)
    abstract = jax.eval_shape(lambda p: {"params": p, "opt_state": opt.init(p)}, params)
    param_sh = shardings_for({n: x.shape for n, x in flatten(params).items()}, mesh)
    sh = state_shardings(abstract, param_sh, mesh)
    mu = sh["opt_state"][1][0].mu  # chain(clip, chain(adam, decay)): the ScaleByAdamState
    assert flatten(mu) == param_sh
    assert any(s.spec != () for s in param_sh.values())
    assert batch_sharding(mesh, 4).spec == PartitionSpec(None, ("data", "fsdp"), None)
    assert isinstance(batch_sharding(mesh, 2), NamedSharding) and batch_sharding(mesh, 2).spec[1] == "data"
    assert batch_sharding(mesh, 3).spec[1] is None


def test_resume_skips_checkpoints_a_crash_cut_short(setup, tmp_path, capsys):
    """The newest checkpoint truncated (or missing a file): resume from the newest one that verifies, say which was
    skipped and why, end with the same bits as an uninterrupted run; none verifies: one line naming the directory."""
    _, model, data = setup
    tcfg = TrainConfig(steps=6, lr=1e-3, warmup=0, batch_size=2, max_len=32)
    whole = finetune(model, data, tmp_path / "a", config=tcfg, save_every=2, keep=3, progress=False)
    run = tmp_path / "b"
    finetune(model, data, run, config=tcfg, save_every=2, keep=3, progress=False)
    shutil.rmtree(run / "final")  # as if killed after the last checkpoint, while a disk fault truncated it

    def corrupt(step: int, how: str) -> None:
        files = sorted((p for p in (run / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()),
                       key=lambda p: p.stat().st_size)
        if how == "truncate":
            files[-1].write_bytes(files[-1].read_bytes()[:-7])
        else:
            files[-1].unlink()

    corrupt(6, "truncate")
    corrupt(4, "delete")
    capsys.readouterr()
    resumed = finetune(model, data, run, config=tcfg, save_every=2, keep=3, progress=False)
    err = capsys.readouterr().err
    assert resumed["resumed_from"] == 2
    assert "skipped checkpoint(s)" in err and "6: " in err and "4: " in err and "is missing" in err, err
    assert "bytes" in err and "resuming from step 2" in err
    a, b = _tensors(Path(whole["final"])), _tensors(run / "final")
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)
    assert read_curves(tmp_path / "a") == read_curves(run)

    shutil.rmtree(run / "final")
    for step in (2, 4, 6):
        corrupt(step, "truncate")
    assert main(["finetune", "--init", str(model), "--data", str(data), "--steps", "6", "--lr", "1e-3", "--warmup",
                 "0", "--batch-size", "2", "--max-len", "32", "--save-every", "2", "--keep", "3", "--out",
                 str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftjax: error:") and err.count("\n") == 1 and str(run / "checkpoints") in err, err
    assert "no checkpoint verifies" in err

    for step in (2, 4, 6):  # saves a kill cut short before they completed: start again from step 0
        (run / "checkpoints" / str(step) / "ftjax_complete.json").unlink()
    again = finetune(model, data, run, config=tcfg, save_every=2, keep=3, progress=False)
    assert again["resumed_from"] is None and "resuming from step 0" in capsys.readouterr().err
    b = _tensors(run / "final")
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)


def test_second_process_on_a_run_directory_is_refused_naming_the_first(setup, tmp_path):
    """While one process holds a run directory (finetune or recycle), another exits 2 with one line naming its pid;
    the lock goes with the process (a killed holder leaves nothing to clean up)."""
    _, model, data = setup
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from ftjax.runlog import run_dir_lock\n"
                               "with run_dir_lock(Path(sys.argv[1]), 'finetune'):\n"
                               "    print('locked', flush=True); time.sleep(120)", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for argv in (["finetune", "--init", str(model)], ["recycle", "--versions", str(model)]):
            second = subprocess.run(_cli(*argv, "--data", str(data), "--steps", "1", "--out", str(out), "--quiet"),
                                    cwd=ROOT, capture_output=True, text=True,
                                    env={**os.environ, "JAX_PLATFORMS": "cpu"})
            assert second.returncode == 2, second.stderr
            assert second.stderr.count("\n") == 1 and f"process {holder.pid}" in second.stderr, second.stderr
            assert str(out) in second.stderr and "Traceback" not in second.stderr
    finally:
        holder.kill()
        holder.wait()
    tcfg = TrainConfig(steps=1, lr=1e-3, batch_size=2, max_len=32)
    assert Path(finetune(model, data, out, config=tcfg, progress=False)["final"]).is_dir()  # free again


def test_batch_sharding_names_only_the_axes_the_mesh_has():
    """A mesh of fsdp=8 (no data axis, as `--mesh fsdp=8` builds) shards rows over fsdp or replicates them (issue 18)."""
    from jax.sharding import PartitionSpec

    from ftjax.params import make_mesh
    from ftjax.train import batch_sharding

    mesh = make_mesh("fsdp=8")
    assert batch_sharding(mesh, 16).spec == PartitionSpec(None, "fsdp", None)
    assert batch_sharding(mesh, 12).spec == PartitionSpec(None, None, None)
    assert batch_sharding(make_mesh("data=8"), 4).spec == PartitionSpec(None, None, None)
    assert batch_sharding(make_mesh("data=2,fsdp=4"), 6).spec == PartitionSpec(None, "data", None)
