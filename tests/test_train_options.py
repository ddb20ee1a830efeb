"""ftjax.train options a first fine-tuning day runs into: the lr schedule's first and last steps, --keep pruning
(resume still exact), evaluation dtype and console lines, and what the token counts count."""

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import LLAMA, make_hf_model, make_tokenizer, lm_rows, write_jsonl

from ftjax.cli import main
from ftjax.config import ModelConfig
from ftjax.errors import FtjaxError
from ftjax.evaluate import evaluate_loss
from ftjax.io.safetensors import SafetensorsFile
from ftjax.model import init_params
from ftjax.params import load_params
from ftjax.rows import load_examples, load_rows, step_batch
from ftjax.train import TrainConfig, finetune, learning_rate_schedule, lr_at, make_optimizer, read_curves, train_step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    model = make_hf_model(root / "m1")
    make_tokenizer(model)
    return model, write_jsonl(root / "train.jsonl", lm_rows(24, 0)), write_jsonl(root / "eval.jsonl", lm_rows(6, 1))


def _tensors(model_dir: Path) -> dict[str, bytes]:
    with SafetensorsFile(Path(model_dir) / "model.safetensors") as f:
        return {n: np.array(f.get(n)).tobytes() for n in f.names()}


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_first_peak_and_last_step(schedule):
    """Step 1 trains at lr/W (not 0), step W at lr, the last step above 0; W = 0 starts at the peak."""
    steps, warm, lr = 10, 4, 1e-3
    got = np.asarray(lr_at(TrainConfig(steps=steps, lr=lr, warmup=warm, schedule=schedule), np.arange(1, 11)))
    last = {"linear": lr / 7, "cosine": lr * (1 + math.cos(math.pi * 6 / 7)) / 2, "constant": lr}[schedule]
    np.testing.assert_allclose([got[0], got[warm - 1], got[-1]], [lr / warm, lr, last], rtol=1e-5)  # f32 cos
    np.testing.assert_allclose(got[:warm], lr * np.arange(1, warm + 1) / warm, rtol=1e-6)
    assert np.all(got > 0) and np.all(np.diff(got[warm - 1:]) <= 0)
    # optax counts updates from 0: its schedule is lr_at one step on
    tcfg = TrainConfig(steps=steps, lr=lr, warmup=warm, schedule=schedule)
    assert float(learning_rate_schedule(tcfg)(0)) == float(lr_at(tcfg, 1))

    flat = np.asarray(lr_at(TrainConfig(steps=steps, lr=lr, warmup=0, schedule=schedule), np.arange(1, 11)))
    last = {"linear": lr / 10, "cosine": lr * (1 + math.cos(math.pi * 9 / 10)) / 2, "constant": lr}[schedule]
    np.testing.assert_allclose([flat[0], flat[-1]], [lr, last], rtol=1e-5)


@pytest.mark.parametrize("field", ["lr", "warmup", "weight_decay", "clip", "b1", "b2", "eps"])
def test_non_finite_training_options_are_refused(field):
    """TrainConfig.check refuses NaN/Inf in any float option, naming its flag (NaN passed every `< 0` test)."""
    for bad in (float("nan"), float("inf")):
        with pytest.raises(FtjaxError, match=f"--{field.replace('_', '-')} must be a finite number"):
            TrainConfig(steps=10, **{field: bad}).check()


def test_warmup_rounding_and_first_update():
    assert [TrainConfig(steps=n, warmup=0.03).warmup_steps for n in (0, 10, 50, 100, 101)] == [0, 1, 2, 3, 4]
    with pytest.raises(FtjaxError, match="longer than the run"):
        TrainConfig(steps=10, warmup=20).check()
    # the first AdamW update moves weights by ~lr/W per element (|g| >> eps), not 0
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **LLAMA})
    tcfg = TrainConfig(steps=10, lr=1e-2, warmup=4, clip=0.0, dtype="float32", batch_size=2, max_len=16)
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    state = {"params": params, "opt_state": make_optimizer(tcfg).init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(0))}
    tokens = np.random.default_rng(0).integers(3, 128, (1, 2, 16)).astype(np.int32)
    batch = (tokens, np.ones_like(tokens), np.broadcast_to(np.arange(16, dtype=np.int32), tokens.shape),
             np.ones(tokens.shape, np.float32))
    new, metrics = train_step(state, batch, lr_at(tcfg, 1), cfg=cfg, step_cfg=tcfg.step_config,
                              optimizer=make_optimizer(tcfg))
    assert float(metrics["lr"]) == pytest.approx(1e-2 / 4)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(params)))
    assert moved == pytest.approx(1e-2 / 4, rel=1e-3)


def test_keep_prunes_checkpoints_and_resume_stays_exact(setup, tmp_path):
    model, data, _ = setup
    tcfg = TrainConfig(steps=6, lr=1e-3, warmup=2, batch_size=2, grad_accum=2, max_len=32, dtype="float32")
    a = finetune(model, data, tmp_path / "a", config=tcfg, save_every=2, progress=False)  # keep=2 by default
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["4", "6"]
    reference, curves = _tensors(Path(a["final"])), read_curves(tmp_path / "a")

    # a run cut short after the pruning: no final/, newest checkpoint lost -> resumes from 4, same bits
    shutil.rmtree(tmp_path / "a" / "final")
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "6")
    again = finetune(model, data, tmp_path / "a", config=tcfg, save_every=2, progress=False)
    assert again["resumed_from"] == 4 and _tensors(Path(again["final"])) == reference
    assert read_curves(tmp_path / "a") == curves

    b = finetune(model, data, tmp_path / "b", config=tcfg, save_every=1, keep=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["6"]
    assert _tensors(Path(b["final"])) == reference

    c = finetune(model, data, tmp_path / "c", config=tcfg, save_every=2, keep=0, progress=False)
    assert list((tmp_path / "c" / "checkpoints").iterdir()) == [] and _tensors(Path(c["final"])) == reference
    done = finetune(model, data, tmp_path / "c", config=tcfg, keep=0, progress=False)  # finished: nothing to do
    assert done["loss"] == c["loss"] and done["resumed_from"] is None
    with pytest.raises(FtjaxError, match="--keep must be >= 0"):
        finetune(model, data, tmp_path / "d", config=tcfg, keep=-1, progress=False)


def test_step0_eval_is_ftjax_eval_in_float32_and_printed(setup, tmp_path, capsys):
    """bfloat16 training, float32 evaluations (the default): step 0 is `evaluate_loss(init, float32)`."""
    model, data, eval_data = setup
    common = ["finetune", "--init", str(model), "--data", str(data), "--eval-data", str(eval_data), "--steps", "2",
              "--batch-size", "4", "--max-len", "32", "--lr", "1e-3"]
    assert main([*common, "--keep", "0", "--out", str(tmp_path / "f32")]) == 0
    err = capsys.readouterr().err
    assert list((tmp_path / "f32" / "checkpoints").iterdir()) == [] and (tmp_path / "f32" / "final").is_dir()
    log = _log(tmp_path / "f32")
    evals = [e for e in log if "eval_loss" in e]
    assert [e["step"] for e in evals] == [0, 2] and {e["eval_dtype"] for e in evals} == {"float32"}
    cfg, params = load_params(model)
    reference = evaluate_loss(params, cfg, load_examples(eval_data, model, cfg), dtype="float32")
    assert abs(evals[0]["eval_loss"] - reference["loss"]) < 1e-6
    assert f"eval step 0: loss {evals[0]['eval_loss']:.6f} nats" in err and "(float32 compute)" in err
    assert "tokens/s (non-pad)" in err

    # what the step's token counts count: non-padding input tokens, and tokens with a loss weight
    rows, _ = load_rows(data, model, cfg, max_len=32)
    tokens, segments, _, weights = step_batch(rows, 0, 4, 1, 0)
    step1 = next(e for e in log if e.get("step") == 1 and "loss" in e)
    assert step1["nonpad_tokens"] == int((segments > 0).sum()) < tokens.size
    assert step1["loss_tokens"] == int(weights.sum())

    assert main([*common, "--eval-dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    assert "(bfloat16 compute)" in capsys.readouterr().err
    bf16 = [e for e in _log(tmp_path / "bf16") if "eval_loss" in e]
    assert bf16[0]["eval_dtype"] == "bfloat16" and abs(bf16[0]["eval_loss"] - reference["loss"]) > 1e-6


def test_runs_that_differ_in_lr_steps_or_seed_compile_the_step_once(setup, tmp_path, count_calls):
    """The compiled step depends on StepConfig only: lr (traced per step), steps, schedule and seed do not recompile."""
    import ftjax.train as T

    model, train, _ = setup
    traced = count_calls(T, "loss_sums")  # called only while the step is traced
    base = dict(batch_size=2, max_len=32, warmup=0, dtype="float32")
    finetune(model, train, tmp_path / "a", config=TrainConfig(steps=2, lr=1e-3, seed=0, **base), progress=False)
    first = traced["n"]
    finetune(model, train, tmp_path / "b", config=TrainConfig(steps=3, lr=5e-4, seed=7, schedule="cosine", **base),
             progress=False)
    assert first >= 1 and traced["n"] == first
    assert TrainConfig(steps=2, lr=1e-3, seed=0).step_config == TrainConfig(steps=9, lr=1.0, seed=3).step_config


def test_final_eval_scores_the_model_as_saved_and_save_dtype(tmp_path_factory, capsys):
    """bfloat16 init: the last evaluation is of final/ as written (`ftjax eval` on it gives the same loss), the log
    names the weights of each evaluation, lost updates are counted and warned about; --save-dtype float32 keeps
    the master weights bit for bit."""
    root = tmp_path_factory.mktemp("save_dtype")
    model = make_hf_model(root / "bf16", dtype="bfloat16")
    make_tokenizer(model)
    data, eval_data = write_jsonl(root / "train.jsonl", lm_rows(24, 0)), write_jsonl(root / "eval.jsonl", lm_rows(6, 1))
    tcfg = TrainConfig(steps=4, lr=1e-4, warmup=0, batch_size=4, max_len=32)
    run = finetune(model, data, root / "run", config=tcfg, eval_data=eval_data, eval_every=2, progress=True)
    err = capsys.readouterr().err
    evals = [e for e in _log(root / "run") if "eval_loss" in e]
    assert [(e["step"], e["eval_weights"]) for e in evals] == [(0, "float32 master"), (2, "float32 master"),
                                                               (4, "as saved, bfloat16")]
    cfg, saved = load_params(root / "run" / "final")
    assert {str(x.dtype) for x in jax.tree.leaves(saved)} == {"bfloat16"}
    as_saved = evaluate_loss(saved, cfg, load_examples(eval_data, model, cfg), batch_size=4, max_len=32,
                             dtype="float32")
    assert evals[-1]["eval_loss"] == as_saved["loss"] == run["eval"]["loss"]
    assert read_curves(root / "run")["eval_loss"][-1] == as_saved["loss"]
    assert "weights: as saved, bfloat16" in err and "weights: float32 master" in err
    assert run["lost_update_share"] > 0.1
    assert f"{run['lost_update_share']:.1%} of the weights training changed" in err and "--save-dtype float32" in err

    f32 = finetune(model, data, root / "f32", config=tcfg, eval_data=eval_data, eval_every=2, save_dtype="float32",
                   progress=False)
    cfg, master = load_params(root / "f32" / "final")
    assert {str(x.dtype) for x in jax.tree.leaves(master)} == {"float32"} and f32["lost_update_share"] == 0.0
    assert json.loads((root / "f32" / "final" / "config.json").read_text())["dtype"] == "float32"
    assert [e["eval_weights"] for e in _log(root / "f32") if "eval_loss" in e][-1] == "as saved, float32"
    # the same trajectory: the bfloat16 export is the float32 one rounded
    for a, b in zip(jax.tree.leaves(master), jax.tree.leaves(saved)):
        assert np.array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
    with pytest.raises(FtjaxError, match="--save-dtype must be one of"):
        finetune(model, data, root / "bad", config=tcfg, save_dtype="int8", progress=False)


def test_optimizer_steps_match_torch_adamw_with_weight_decay_and_clipping():
    """train_step (float32) against torch.optim.AdamW fed the same gradients, clipped by torch's
    clip_grad_norm_, weight decay on matrices only: updated params agree to ~1e-6 after each of two steps."""
    import torch

    from ftjax.data import examples_from_rows
    from ftjax.params import flatten
    from ftjax.rows import make_rows, training_examples
    from ftjax.train import loss_sums

    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **LLAMA})
    tcfg = TrainConfig(steps=2, lr=1e-2, warmup=0, schedule="constant", batch_size=4, max_len=32, dtype="float32",
                       weight_decay=0.1, clip=0.05, b1=0.8, b2=0.95, eps=1e-6)
    rows = make_rows(training_examples(examples_from_rows(lm_rows(8), None), 32), 32)
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    state = {"params": params, "opt_state": make_optimizer(tcfg).init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(0))}
    ours = jax.jit(lambda s, b: train_step(s, b, jnp.float32(tcfg.lr), cfg=cfg, step_cfg=tcfg.step_config,
                                           optimizer=make_optimizer(tcfg)))

    def mean_loss(p, batch):
        nll, weight = loss_sums(p, cfg, *(x[0] for x in batch))
        return nll / weight

    names = list(flatten(params))
    torch_params = {n: torch.nn.Parameter(torch.tensor(np.asarray(x))) for n, x in flatten(params).items()}
    groups = [{"params": [torch_params[n] for n in names if torch_params[n].ndim >= 2], "weight_decay": 0.1},
              {"params": [torch_params[n] for n in names if torch_params[n].ndim < 2], "weight_decay": 0.0}]
    reference = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.b1, tcfg.b2), eps=tcfg.eps)
    for step in range(2):
        batch = tuple(jnp.asarray(x) for x in step_batch(rows, step, 4, 1, 0))
        grads = flatten(jax.grad(mean_loss)(state["params"], batch))
        state, metrics = ours(state, batch)
        for n, p in torch_params.items():
            p.grad = torch.tensor(np.asarray(grads[n]))
        norm = torch.nn.utils.clip_grad_norm_(list(torch_params.values()), tcfg.clip)
        assert float(norm) > 2 * tcfg.clip  # clipping is active
        np.testing.assert_allclose(float(metrics["grad_norm"]), float(norm), rtol=1e-5)
        reference.step()
        got = flatten(state["params"])
        for n in names:
            np.testing.assert_allclose(np.asarray(got[n]), torch_params[n].detach().numpy(), rtol=0, atol=2e-6,
                                       err_msg=f"{n} after step {step + 1}")
