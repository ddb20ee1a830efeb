"""Light follow-up fine-tuning: optax AdamW, one jitted train step, resumable Orbax checkpoints, HF export.

Run directory layout (`finetune(init, data, out)`):
    out/run.json          what this run is: init model, model config, TrainConfig, data file hash (checked on resume)
    out/log.jsonl         one line per step (loss, lr, grad_norm, tokens, tokens_per_s) and per evaluation (eval_*)
    out/checkpoints/<k>/  Orbax: float32 params, optimizer state, step, RNG key (`state`) + data position (`meta`)
    out/final/            the fine-tuned model as a Hugging Face directory, in the init's dtypes

Numerics: float32 master weights and optimizer state; the forward/backward runs in `TrainConfig.dtype` (bfloat16
by default) by casting the params inside the step, so gradients arrive in float32. The loss is the token-weighted
mean NLL over the whole optimizer step: gradient accumulation scans micro-batches summing NLL and weights and divides
once, so `grad_accum=2, batch=b` equals `grad_accum=1, batch=2b` up to float rounding.

Resume is exact: the data order is a seeded permutation of fixed training rows per epoch, so the data position is
just `step * batch_size * grad_accum`, and the state holds everything else. Re-running the same command after a kill
restarts from the last checkpoint and ends with the same bits as an uninterrupted run (on CPU).

Multi-process (ftjax.distributed): every process runs `finetune` with the same arguments and holds the (small) row
table; each puts only its own devices' slices of a batch on device; process 0 writes run.json, the log and the
exported model, Orbax writes the checkpoints from all processes. Without a mesh, a multi-process run uses
`make_mesh()` (every device on fsdp).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax import distributed
from ftjax.config import ModelConfig
from ftjax.errors import FtjaxError
from ftjax.evaluate import cast_params
from ftjax.rows import Rows, load_examples, load_rows, step_batch
from ftjax.model import forward

RUN_FILE, LOG_FILE, CKPT_DIR, FINAL_DIR = "run.json", "log.jsonl", "checkpoints", "final"
SCHEDULES = ("linear", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the training trajectory (a resumed run must match it exactly).

    warmup: a fraction of `steps` if < 1, else a number of steps. batch_size: rows per micro-batch; an optimizer
    step sees batch_size * grad_accum rows of max_len tokens (fewer when the longest example is shorter).
    dtype: compute dtype, bfloat16 or float32 (master weights are float32 either way). remat: recompute
    activations in the backward pass except weight matmuls (saves the attention scores and elementwise buffers).
    pack: pack several examples per row (segment ids keep attention within each document).
    """

    steps: int
    lr: float = 5e-6
    schedule: str = "linear"
    warmup: float = 0.03
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int = 2048
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    dtype: str = "bfloat16"
    remat: bool = False
    pack: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def check(self) -> None:
        """FtjaxError for options that cannot train (before anything is loaded)."""
        problems = []
        if self.steps < 0:
            problems.append(f"steps must be >= 0, got {self.steps}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_len < 2:
            problems.append(f"max-len must be at least 2, got {self.max_len}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a finite number >= 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup < 0 or (self.warmup >= 1 and self.warmup != int(self.warmup)):
            problems.append(f"warmup must be a fraction in [0, 1) or a whole number of steps, got {self.warmup}")
        if self.dtype not in ("bfloat16", "float32"):
            problems.append(f"dtype must be bfloat16 or float32, got {self.dtype!r}")
        if self.clip < 0 or self.weight_decay < 0:
            problems.append("clip and weight-decay must be >= 0")
        if problems:
            raise FtjaxError("bad training options: " + "; ".join(problems))

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.steps)) if self.warmup < 1 else int(self.warmup)

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum


# ---------------------------------------------------------------------------------------------------------- step
def loss_sums(params: Any, cfg: ModelConfig, tokens_bt: jax.Array, segments_bt: jax.Array, positions_bt: jax.Array,
              weights_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted next-token NLL in nats, sum of weights) over a batch of rows; column 0 is never scored."""
    logits_btv = forward(params, tokens_bt, cfg, attention_mask_bt=segments_bt > 0, segment_ids_bt=segments_bt,
                         positions_bt=positions_bt)[:, :-1]
    targets_bt = tokens_bt[:, 1:]
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    nll_bt = jax.nn.logsumexp(logits_btv, axis=-1) - target_logit_bt
    w_bt = weights_bt[:, 1:]
    # where(), not a product: padding rows may hold NaN logits, and NaN * 0 is NaN.
    return jnp.sum(jnp.where(w_bt > 0, nll_bt * w_bt, 0.0)), jnp.sum(w_bt)


def learning_rate_schedule(tcfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps, then linear decay to 0, cosine decay to 0, or constant."""
    lr, warm, total = tcfg.lr, tcfg.warmup_steps, max(tcfg.steps, 1)
    decay = max(total - warm, 1)
    after = {"linear": optax.linear_schedule(lr, 0.0, decay), "cosine": optax.cosine_decay_schedule(lr, decay),
             "constant": optax.constant_schedule(lr)}[tcfg.schedule]
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW; weight decay on matrices only (not norms or biases)."""
    adamw = optax.adamw(learning_rate_schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                        weight_decay=tcfg.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    return optax.chain(optax.clip_by_global_norm(tcfg.clip), adamw) if tcfg.clip > 0 else adamw


def train_step(state: dict, batch: tuple[jax.Array, ...], *, cfg: ModelConfig, tcfg: TrainConfig,
               optimizer: optax.GradientTransformation) -> tuple[dict, dict]:
    """One optimizer step over a [grad_accum, batch, T] batch. state: {"params", "opt_state", "step", "rng"}.

    Returns the new state and scalar metrics: loss (token-weighted mean NLL, nats), grad_norm (before clipping),
    lr (used for this update), tokens (scored tokens), finite (loss, gradient and new params all finite)."""
    compute = jnp.dtype(tcfg.dtype)

    def micro_loss(params, micro):
        return loss_sums(cast_params(params, compute), cfg, *micro)

    if tcfg.remat:
        micro_loss = jax.checkpoint(micro_loss, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, micro):
        grads, nll, weight = carry
        (n, w), g = grad_fn(state["params"], micro)
        return (jax.tree.map(jnp.add, grads, g), nll + n, weight + w), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    (grads, nll, weight), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), batch)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(nll) & jnp.isfinite(grad_norm)
    finite &= jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
    metrics = {"loss": nll / denom, "grad_norm": grad_norm, "lr": learning_rate_schedule(tcfg)(state["step"]),
               "tokens": weight, "finite": finite}
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
    return new_state, metrics


# ---------------------------------------------------------------------------------------------------------- state
def _trailing_name(path: tuple) -> str:
    keys = []
    for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        keys.append(str(k.key))
    return ".".join(reversed(keys))


def state_shardings(abstract_state: dict, param_shardings: dict[str, NamedSharding], mesh: Mesh) -> dict:
    """NamedShardings of a train state: optimizer moments like their parameter, scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        s = param_shardings.get(_trailing_name(path))
        return s if s is not None and len(s.spec) <= leaf.ndim else replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """[A, B, T] batches: B over data x fsdp when it divides, else over data, else replicated."""
    d, f = mesh.shape.get("data", 1), mesh.shape.get("fsdp", 1)
    axes = ("data", "fsdp") if batch_size % (d * f) == 0 else ("data" if batch_size % d == 0 else None)
    return NamedSharding(mesh, PartitionSpec(None, axes, None))


def _to_saved(state: dict) -> dict:
    """Orbax-friendly tree: optimizer state (NamedTuples) as {"00000": leaf, ...} in flatten order."""
    leaves = jax.tree.leaves(state["opt_state"])
    return {"params": state["params"], "opt_state": {f"{i:05d}": x for i, x in enumerate(leaves)},
            "step": state["step"], "rng": state["rng"]}


def _from_saved(saved: dict, opt_treedef: Any) -> dict:
    leaves = [saved["opt_state"][k] for k in sorted(saved["opt_state"])]
    return {"params": saved["params"], "opt_state": jax.tree.unflatten(opt_treedef, leaves), "step": saved["step"],
            "rng": saved["rng"]}


def _manager(out: Path) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: a save cut short by a kill leaves a temporary directory; it is removed on resume.
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager((out / CKPT_DIR).absolute(), options=options)


# ---------------------------------------------------------------------------------------------------------- run
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run_record(init: Path, cfg: ModelConfig, tcfg: TrainConfig, data: Path) -> dict:
    model = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return {"format": "ftjax-finetune", "init": str(init.resolve()), "model": model,
            "train": dataclasses.asdict(tcfg), "data": {"path": str(data), "sha256": _sha256(data)}}


def _check_resume(out: Path, record: dict) -> bool:
    """True when `out` holds an earlier run of the same configuration; FtjaxError when it holds something else."""
    file = out / RUN_FILE
    if not file.is_file():
        if out.exists() and any(out.iterdir()):
            raise FtjaxError(f"{out} exists and is not an ftjax finetune directory; choose another --out")
        return False
    try:
        old = json.loads(file.read_text())
    except ValueError:
        raise FtjaxError(f"{file}: unreadable run record; remove {out} or choose another --out") from None
    differ = [f"init ({old.get('init')} vs {record['init']})"] if old.get("init") != record["init"] else []
    differ += ["model config"] if old.get("model") != record["model"] else []
    old_train = old.get("train", {})
    differ += [f"{k} ({old_train.get(k)!r} vs {v!r})" for k, v in record["train"].items() if old_train.get(k) != v]
    differ += ["data file contents"] if old.get("data", {}).get("sha256") != record["data"]["sha256"] else []
    if differ:
        raise FtjaxError(f"{out} holds a run with a different configuration ({'; '.join(differ)}); resume with the "
                         "same options or choose another --out")
    return True


def _read_log(out: Path, upto: int) -> list[dict]:
    try:
        lines = (out / LOG_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if entry.get("step", 0) <= upto:
            entries.append(entry)
    return entries


def read_curves(run_dir: str | Path) -> dict[str, list]:
    """A run's curves from its log.jsonl: step/loss/lr/grad_norm of training steps, eval_step/eval_loss of evals."""
    if not (Path(run_dir) / LOG_FILE).is_file():
        raise FtjaxError(f"{run_dir} has no {LOG_FILE}; is it an `ftjax finetune` output directory?")
    entries = _read_log(Path(run_dir), upto=sys.maxsize)
    train = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval_loss" in e]
    return {"step": [e["step"] for e in train], "loss": [e["loss"] for e in train], "lr": [e["lr"] for e in train],
            "grad_norm": [e["grad_norm"] for e in train], "eval_step": [e["step"] for e in evals],
            "eval_loss": [e["eval_loss"] for e in evals]}


class _Log:
    """Appends JSON lines to out/log.jsonl (flushed each line) and draws a one-line progress bar on stderr."""

    def __init__(self, out: Path, keep: list[dict], total: int, progress: bool):
        self.total, self.progress, self.file = total, progress and distributed.is_main(), None
        if not distributed.is_main():  # one writer in a multi-process run
            return
        tmp = out / (LOG_FILE + ".tmp")  # rewrite the kept entries atomically: a kill here must not lose the log
        tmp.write_text("".join(json.dumps(e) + "\n" for e in keep))
        os.replace(tmp, out / LOG_FILE)
        self.file = open(out / LOG_FILE, "a")

    def write(self, entry: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                    for k, v in entry.items()}) + "\n")
        self.file.flush()

    def bar(self, entry: dict) -> None:
        if self.progress:
            done = int(30 * entry["step"] / max(self.total, 1))
            print(f"\r[{'#' * done}{'.' * (30 - done)}] step {entry['step']}/{self.total}  loss {entry['loss']:.4f}"
                  f"  lr {entry['lr']:.2e}  {entry['tokens_per_s']:.0f} tok/s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress:
            print(file=sys.stderr)
        if self.file is not None:
            self.file.close()


_STEPS: dict[tuple, Any] = {}


def _jitted_step(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh | None, optimizer, state_sh, batch_sh, scalar_sh):
    """The jitted train step, reused across runs of one process (recycle): shardings follow from (cfg, tcfg, mesh)."""
    key = (cfg, tcfg, mesh)
    if key not in _STEPS:
        _STEPS.clear()
        _STEPS[key] = jax.jit(functools.partial(train_step, cfg=cfg, tcfg=tcfg, optimizer=optimizer),
                              donate_argnums=0, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, scalar_sh))
    return _STEPS[key]


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def finetune(init: str | Path, data: str | Path, out: str | Path, *, config: TrainConfig,
             eval_data: str | Path | None = None, eval_every: int = 0, save_every: int = 0, mesh: Mesh | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Fine-tune the HF model `init` on a JSONL file; resumable; the result is exported to `out/final/`.

    eval_data: JSONL evaluated (ftjax.evaluate.evaluate_loss) at step 0, every `eval_every` steps and at the end.
    save_every: Orbax checkpoint period in steps (0: only at the end; the last two are kept). mesh: shard params,
    optimizer state (like the params) and batches over `data`/`fsdp` axes (None: one device). config.steps == 0
    exports `init` unchanged through the same path (used by `recycle` for a pure transfer chain).
    Returns a summary: out, final, steps, resumed_from, loss (last step), eval (last evaluation), seconds.
    """
    from ftjax.io.checkpoint import HFCheckpoint, resolve_model_path
    from ftjax.layout import shardings_for
    from ftjax.params import flatten, load_params, make_mesh, save_params

    t0 = time.perf_counter()
    config.check()
    if eval_every < 0 or save_every < 0:
        raise FtjaxError(f"--eval-every and --save-every must be >= 0, got {eval_every} and {save_every}")
    init_dir, out, data = resolve_model_path(init), Path(out), Path(data)
    hf_config = HFCheckpoint(init_dir).config
    cfg = ModelConfig.from_hf(hf_config)
    rows = load_rows(data, init_dir, cfg, config)
    eval_examples = None if eval_data is None else load_examples(eval_data, init_dir, cfg)
    if mesh is None and jax.process_count() > 1:
        mesh = make_mesh()
    record = _run_record(init_dir, cfg, config, data)
    resuming = _check_resume(out, record)
    distributed.barrier("ftjax.finetune:checked")  # every process decided before process 0 writes run.json
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if not resuming:
            (out / RUN_FILE).write_text(json.dumps(record, indent=1) + "\n")
    distributed.barrier("ftjax.finetune:recorded")
    manager = _manager(out)
    latest = manager.latest_step() if resuming else None
    summary = {"out": str(out), "final": str(out / FINAL_DIR), "steps": config.steps, "resumed_from": latest}
    if latest == config.steps and (out / FINAL_DIR / "config.json").is_file():
        manager.close()
        return {**summary, **_last_metrics(out), "seconds": time.perf_counter() - t0}

    # -- state: float32 master params + optimizer state, sharded like the params
    _, params = load_params(init_dir, mesh=mesh)
    out_dtypes = jax.tree.map(lambda x: x.dtype, params)
    optimizer = make_optimizer(config)
    key_data = jax.random.key_data(jax.random.key(config.seed))

    def init_state(p):
        p = cast_params(p, jnp.float32)
        return {"params": p, "opt_state": optimizer.init(p), "step": jnp.zeros((), jnp.int32), "rng": key_data}

    abstract = jax.eval_shape(init_state, params)
    if mesh is not None:
        shapes = {n: tuple(x.shape) for n, x in flatten(params).items()}
        state_sh = state_shardings(abstract, shardings_for(shapes, mesh), mesh)
        batch_sh, scalar_sh = batch_sharding(mesh, config.batch_size), NamedSharding(mesh, PartitionSpec())
    else:
        device = jax.sharding.SingleDeviceSharding(distributed.local_device())
        state_sh, batch_sh, scalar_sh = jax.tree.map(lambda _: device, abstract), device, device
    step_fn = _jitted_step(cfg, config, mesh, optimizer, state_sh, batch_sh, scalar_sh)
    if latest is not None:
        state = _restore(manager, latest, abstract, state_sh, rows, config, out)
    else:
        state = jax.jit(init_state, out_shardings=state_sh)(params)
    del params
    start = int(distributed.to_host(state["step"]))
    # Keep the log up to the restored step (a fresh start re-evaluates step 0, so it keeps nothing).
    log = _Log(out, _read_log(out, start) if resuming and start > 0 else [], config.steps, progress)

    def evaluate(step: int) -> None:
        from ftjax.evaluate import evaluate_loss

        result = evaluate_loss(state["params"], cfg, eval_examples, batch_size=config.batch_size,
                               max_len=config.max_len, dtype=config.dtype, mesh=mesh)
        keys = ("loss", "ppl", "tokens", "exact_match", "acc", "acc_norm")
        log.write({"step": step, **{f"eval_{k}": result[k] for k in keys if k in result}})
        summary["eval"] = {k: result[k] for k in keys if k in result}

    clock = {"t0": time.perf_counter(), "tokens": 0, "first": True}

    def record_metrics(step: int, metrics: dict, real_tokens: int) -> None:
        m = {k: v.item() for k, v in distributed.to_host(metrics).items()}
        if not m["finite"]:
            good = manager.latest_step()
            where = f"the last good checkpoint is step {good} in {out / CKPT_DIR}" if good is not None else \
                "no checkpoint was saved yet"
            raise FtjaxError(f"training diverged at step {step}: loss {m['loss']}, grad norm {m['grad_norm']} "
                             f"(NaN/Inf); stopped, {where}; lower --lr or check the data")
        # tokens/s: input tokens (padding excluded) per second since the first step (which includes compilation).
        now = time.perf_counter()
        clock["tokens"] += real_tokens
        rate = clock["tokens"] / max(now - clock["t0"], 1e-9)
        if clock["first"]:
            clock.update(t0=now, tokens=0, first=False)
        entry = {"step": step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                 "tokens": int(m["tokens"]), "tokens_per_s": rate}
        log.write(entry)
        log.bar(entry)
        summary["loss"] = m["loss"]

    try:
        if eval_examples is not None and start == 0:
            evaluate(0)
        pending = None
        for step in range(start, config.steps):
            host = step_batch(rows, step, config)
            # Each process copies only its own devices' slices of the (identical) host batch.
            state, metrics = step_fn(state, tuple(distributed.put_global(a, batch_sh) for a in host))
            if pending is not None:  # fetch the previous step's metrics while this one runs
                record_metrics(*pending)
            pending = (step + 1, metrics, int((host[1] > 0).sum()))
            done = step + 1
            do_eval = eval_examples is not None and (done == config.steps or (eval_every and done % eval_every == 0))
            do_save = done == config.steps or (save_every and done % save_every == 0)
            if do_eval or do_save:
                record_metrics(*pending)
                pending = None
                if do_eval:
                    evaluate(done)
                if do_save:
                    _save(manager, state, done, rows, config)
    finally:
        log.close()
    manager.close()
    final = jax.tree.map(lambda x, dt: x.astype(dt), state["params"], out_dtypes)
    save_params(final, out / FINAL_DIR, config=hf_config, aux_from=init_dir, overwrite=True, inputs=[init_dir])
    return {**summary, "seconds": time.perf_counter() - t0}


def _meta(step: int, rows: Rows, tcfg: TrainConfig) -> dict:
    position = step * tcfg.rows_per_step
    return {"step": step, "data_position": position, "epoch": position // rows.tokens_nt.shape[0],
            "rows": int(rows.tokens_nt.shape[0]), "seed": tcfg.seed}


def _save(manager: ocp.CheckpointManager, state: dict, step: int, rows: Rows, tcfg: TrainConfig) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(_to_saved(state)),
                              meta=ocp.args.JsonSave(_meta(step, rows, tcfg)))
    try:
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
    except OSError as e:
        raise FtjaxError(f"writing checkpoint {step} under {manager.directory} failed: {e.strerror or e}") from None


def _restore(manager: ocp.CheckpointManager, step: int, abstract: dict, shardings: dict, rows: Rows,
             tcfg: TrainConfig, out: Path) -> dict:
    target = _to_saved(_abstract(abstract, shardings))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 meta=ocp.args.JsonRestore()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FtjaxError(f"{out / CKPT_DIR}/{step}: cannot restore the train state ({str(e).splitlines()[0]}); "
                         "it was written by a different model or optimizer configuration") from None
    if restored.meta != _meta(step, rows, tcfg):
        raise FtjaxError(f"{out / CKPT_DIR}/{step}: data position {restored.meta} does not match this run's data "
                         f"({_meta(step, rows, tcfg)}); choose another --out")
    return _from_saved(restored.state, jax.tree.structure(abstract["opt_state"]))


def _last_metrics(out: Path) -> dict:
    entries = _read_log(out, upto=sys.maxsize)
    loss = [e["loss"] for e in entries if "loss" in e]
    evals = [{k.removeprefix("eval_"): v for k, v in e.items() if k.startswith("eval_")} for e in entries
             if "eval_loss" in e]
    return {**({"loss": loss[-1]} if loss else {}), **({"eval": evals[-1]} if evals else {})}
