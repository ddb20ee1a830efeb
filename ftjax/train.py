"""Light follow-up fine-tuning: optax AdamW, one jitted train step, resumable Orbax checkpoints, HF export.

Run directory layout (`finetune(init, data, out)`):
    out/run.json          what this run is: init model, model config, TrainConfig, data file hash (checked on resume)
    out/log.jsonl         one line per step (loss, lr, grad_norm, loss_tokens, nonpad_tokens, nonpad_tokens_per_s)
                          and per evaluation (eval_loss, eval_ppl, eval_tokens, ..., eval_dtype)
    out/checkpoints/<k>/  Orbax: float32 params, optimizer state, step, RNG key (`state`) + data position (`meta`);
                          the newest `keep` are kept (0: none once final/ is written)
    out/final/            the fine-tuned model as a Hugging Face directory, in the init's dtypes (never pruned)

(ftjax.runlog reads and writes run.json and log.jsonl.) Steps are counted from 1: step s is the s-th optimizer
update, logged as "step": s with the lr it used (`lr_at`). Per step, loss_tokens = tokens with a loss weight (the
NLL denominator) and nonpad_tokens = input tokens that are not padding (padding columns cost compute too but are
not counted). nonpad_tokens_per_s = non-padding tokens per second of training: for the first step of a process its
own tokens over its time, compilation included; afterwards the tokens of the later steps over the time since the
first, evaluations and checkpoint writes excluded. The console and the summary print the same figure, as
"tokens/s (non-pad)".

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
import json
import math
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
from ftjax.dtypes import is_float
from ftjax.errors import FtjaxError, finite
from ftjax.evaluate import cast_params, token_nll
from ftjax.model import forward
from ftjax.rows import Rows, load_examples, load_rows, step_batch
from ftjax.runlog import RUN_FILE, RunLog, check_resume, eval_line, last_metrics, locks_out, read_log, run_record
from ftjax.runlog import read_curves as read_curves  # re-exported: `ftjax.train.read_curves` is public

CKPT_DIR, FINAL_DIR = "checkpoints", "final"
SCHEDULES = ("linear", "cosine", "constant")
EVAL_DTYPES = ("float32", "bfloat16")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
LOST_UPDATE_WARN = 0.10  # warn when more than this share of the trained elements lose their update in the save cast
MASTER = "float32 master"  # the weights an evaluation used: the training state's, or "as saved, <dtype>"


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the compiled train step depends on besides the model: compute dtype, remat, AdamW's betas / eps, weight
    decay and clipping. The learning rate is an argument of each step (the schedule runs on the host) and the data
    order (seed) never reaches the device, so runs that differ in lr, schedule, steps or seed share a compilation."""

    dtype: str = "bfloat16"
    remat: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the training trajectory (a resumed run must match it exactly).

    warmup: a fraction of `steps` if < 1 (rounded up to whole steps, as transformers' Trainer does), else a
    number of steps (at most `steps`); see `lr_at` for the schedule. batch_size: rows per micro-batch; an optimizer
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
        for name in ("lr", "warmup", "weight_decay", "clip", "b1", "b2", "eps"):
            finite(f"--{name.replace('_', '-')}", getattr(self, name))
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
        elif self.warmup >= 1 and self.steps > 0 and self.warmup > self.steps:
            problems.append(f"warmup of {int(self.warmup)} steps is longer than the run ({self.steps} steps): the lr "
                            "would never reach --lr")
        if self.dtype not in ("bfloat16", "float32"):
            problems.append(f"dtype must be bfloat16 or float32, got {self.dtype!r}")
        if self.clip < 0 or self.weight_decay < 0:
            problems.append("clip and weight-decay must be >= 0")
        if problems:
            raise FtjaxError("bad training options: " + "; ".join(problems))

    @property
    def step_config(self) -> StepConfig:
        """The part of this configuration the compiled train step depends on (its jit key)."""
        return StepConfig(self.dtype, self.remat, self.b1, self.b2, self.eps, self.weight_decay, self.clip)

    @property
    def warmup_steps(self) -> int:
        """Warmup length in steps: a fraction rounds up (round(, 9) first: 0.03 * 100 is 3.0000000000000004)."""
        return math.ceil(round(self.warmup * self.steps, 9)) if self.warmup < 1 else int(self.warmup)

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum


# ---------------------------------------------------------------------------------------------------------- step
def loss_sums(params: Any, cfg: ModelConfig, tokens_bt: jax.Array, segments_bt: jax.Array, positions_bt: jax.Array,
              weights_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted next-token NLL in nats, sum of weights) over a batch of rows; column 0 is never scored."""
    logits_btv = forward(params, tokens_bt, cfg, attention_mask_bt=segments_bt > 0, segment_ids_bt=segments_bt,
                         positions_bt=positions_bt)[:, :-1]
    nll_bt = token_nll(logits_btv, tokens_bt[:, 1:])
    w_bt = weights_bt[:, 1:]
    # where(), not a product: padding rows may hold NaN logits, and NaN * 0 is NaN.
    return jnp.sum(jnp.where(w_bt > 0, nll_bt * w_bt, 0.0)), jnp.sum(w_bt)


def remat(fn: Any) -> Any:
    """`fn` under gradient checkpointing (`--remat`): the backward pass recomputes every activation except the
    outputs of weight matmuls (dots without batch dimensions), which are saved."""
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def lr_at(tcfg: TrainConfig, step: Any) -> jax.Array:
    """Learning rate of optimizer step `step` (1-based: step 1 is the first update; a scalar or an array of steps).

    With W = warmup_steps, S = steps and the peak step P = max(W, 1):
        warmup  (step <= P):  lr * step / W   (lr * 1/W at step 1 ... lr at step W; lr at step 1 when W = 0)
        decay   (step >= P):  lr * g((step - P) / (S + 1 - P)), g(x) = 1 - x (linear), (1 + cos(pi x)) / 2 (cosine)
                              or 1 (constant)
    Neither end trains at lr 0: warmup starts from 0 at the (virtual) step 0 and decay reaches 0 at step S + 1.
    """
    lr, warm = tcfg.lr, tcfg.warmup_steps
    peak, total = max(warm, 1), max(tcfg.steps, 1)
    s = jnp.asarray(step, jnp.float32)
    x = jnp.clip((s - peak) / max(total + 1 - peak, 1), 0.0, 1.0)
    decay = {"linear": 1.0 - x, "cosine": 0.5 * (1.0 + jnp.cos(jnp.pi * x)),
             "constant": jnp.ones_like(x)}[tcfg.schedule]
    warmup = s / warm if warm else jnp.ones_like(s)
    return lr * jnp.where(s < peak, warmup, decay)


def learning_rate_schedule(tcfg: TrainConfig) -> optax.Schedule:
    """The optax schedule: a function of the 0-based update count (optax's), i.e. `lr_at(tcfg, count + 1)`."""
    return lambda count: lr_at(tcfg, count + 1)


def make_optimizer(step_cfg: StepConfig | TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW without its learning rate (`train_step` multiplies the update by -lr, as
    optax.adamw's last stage does); weight decay on matrices only (not norms or biases)."""
    adam = optax.chain(optax.scale_by_adam(b1=step_cfg.b1, b2=step_cfg.b2, eps=step_cfg.eps),
                       optax.add_decayed_weights(step_cfg.weight_decay,
                                                 mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    return optax.chain(optax.clip_by_global_norm(step_cfg.clip), adam) if step_cfg.clip > 0 else adam


def train_step(state: dict, batch: tuple[jax.Array, ...], lr: jax.Array, *, cfg: ModelConfig, step_cfg: StepConfig,
               optimizer: optax.GradientTransformation) -> tuple[dict, dict]:
    """One optimizer step over a [grad_accum, batch, T] batch at learning rate `lr` (a float32 scalar, `lr_at`).
    state: {"params", "opt_state", "step", "rng"}.

    Returns the new state and scalar metrics: loss (token-weighted mean NLL, nats), grad_norm (before clipping),
    lr (used for this update), loss_tokens (sum of loss weights: the tokens scored), finite (loss, gradient and new
    params all finite)."""
    compute = jnp.dtype(step_cfg.dtype)

    def micro_loss(params, micro):
        return loss_sums(cast_params(params, compute), cfg, *micro)

    if step_cfg.remat:
        micro_loss = remat(micro_loss)
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
    updates = jax.tree.map(lambda u: jnp.asarray(-lr, u.dtype) * u, updates)
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(nll) & jnp.isfinite(grad_norm)
    finite &= jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
    metrics = {"loss": nll / denom, "grad_norm": grad_norm, "lr": lr,
               "loss_tokens": weight, "finite": finite}
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
    """[A, B, T] batches: B over data x fsdp when it divides, else over data, else replicated. Only the axes the
    mesh has are named (a mesh of `fsdp=8` has no data axis)."""
    d, f = mesh.shape.get("data", 1), mesh.shape.get("fsdp", 1)
    axes = ("data", "fsdp") if batch_size % (d * f) == 0 else (("data",) if batch_size % d == 0 else ())
    axes = tuple(a for a in axes if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(None, axes[0] if len(axes) == 1 else axes or None, None))


def _to_saved(state: dict) -> dict:
    """Orbax-friendly tree: optimizer state (NamedTuples) as {"00000": leaf, ...} in flatten order."""
    leaves = jax.tree.leaves(state["opt_state"])
    return {"params": state["params"], "opt_state": {f"{i:05d}": x for i, x in enumerate(leaves)},
            "step": state["step"], "rng": state["rng"]}


def _from_saved(saved: dict, opt_treedef: Any) -> dict:
    leaves = [saved["opt_state"][k] for k in sorted(saved["opt_state"])]
    return {"params": saved["params"], "opt_state": jax.tree.unflatten(opt_treedef, leaves), "step": saved["step"],
            "rng": saved["rng"]}


def _manager(out: Path, keep: int) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: a save cut short by a kill leaves a temporary directory; it is removed on resume.
    # keep=0 still keeps the newest one while the run lasts (to resume from); finetune deletes it after the export.
    options = ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), enable_async_checkpointing=False, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager((out / CKPT_DIR).absolute(), options=options)


# ---------------------------------------------------------------------------------------------------------- run
_STEPS: dict[tuple, Any] = {}


def _jitted_step(cfg: ModelConfig, step_cfg: StepConfig, mesh: Mesh | None, optimizer, state_sh, batch_sh,
                 scalar_sh):
    """The jitted train step, reused across runs of one process (recycle): one per (architecture, StepConfig,
    mesh), whatever the learning rate, steps or data order."""
    key = (cfg, step_cfg, mesh)
    if key not in _STEPS:
        _STEPS.clear()
        _STEPS[key] = jax.jit(functools.partial(train_step, cfg=cfg, step_cfg=step_cfg, optimizer=optimizer),
                              donate_argnums=0, in_shardings=(state_sh, batch_sh, scalar_sh),
                              out_shardings=(state_sh, scalar_sh))
    return _STEPS[key]


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@locks_out("finetune")
def finetune(init: str | Path, data: str | Path, out: str | Path, *, config: TrainConfig,
             eval_data: str | Path | None = None, eval_every: int = 0, save_every: int = 0, keep: int = 2,
             eval_dtype: str = "float32", save_dtype: str | None = None, mesh: Mesh | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Fine-tune the HF model `init` on a JSONL file; resumable; the result is exported to `out/final/`.

    eval_data: JSONL evaluated (ftjax.evaluate.evaluate_loss, rows cut to config.max_len) at step 0, every
    `eval_every` steps and at the end, in `eval_dtype` compute (float32 by default, as `ftjax eval`; independent of
    the training dtype); with `progress`, each evaluation also prints a line on stderr. Evaluations before the last
    step use the float32 master weights; the last one uses the weights as written to final/ (after the cast to the
    save dtype), so the log's final figure is that of the exported model; each log entry names its weights
    (`eval_weights`). save_dtype: dtype of the floating tensors of final/ (float32, bfloat16 or float16; None: each
    tensor in the init's dtype); a warning on stderr when the cast loses the update of more than LOST_UPDATE_WARN of
    the elements training changed (the share is in the summary, "lost_update_share"). save_every: Orbax
    checkpoint period in steps (0: only at the end). keep: checkpoints kept on disk, the newest (0: none once the
    run has finished and final/ is written; final/ itself is never pruned). mesh: shard params, optimizer state
    (like the params) and batches over `data`/`fsdp` axes (None: one device). config.steps == 0 exports `init`
    unchanged through the same path (used by `recycle` for a pure transfer chain). Re-running a finished run (final/
    complete) does nothing and returns its summary. Resuming starts from the newest checkpoint that verifies (newer
    ones a crash cut short are named on stderr and removed). `out` is locked while the run writes into it
    (`ftjax.runlog.run_dir_lock`): a second process on the same directory stops with an error naming the first.
    Returns a summary: out, final, steps, resumed_from, data (rows, examples, truncated, skipped), loss (last step),
    eval (last evaluation, with its dtype and weights), lost_update_share, nonpad_tokens_per_s (training throughput
    in non-padding input tokens, evaluation and checkpoint time excluded; compilation too, except in a run of one
    step), seconds.
    """
    from ftjax.io.checkpoint import HFCheckpoint, resolve_model_path
    from ftjax.layout import shardings_for
    from ftjax.params import flatten, load_params, make_mesh, save_params

    t0 = time.perf_counter()
    config.check()
    if eval_every < 0 or save_every < 0 or keep < 0:
        raise FtjaxError(f"--eval-every, --save-every and --keep must be >= 0, got {eval_every}, {save_every} and "
                         f"{keep}")
    if eval_dtype not in EVAL_DTYPES:
        raise FtjaxError(f"--eval-dtype must be one of {', '.join(EVAL_DTYPES)}, got {eval_dtype!r}")
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise FtjaxError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    init_dir, out, data = resolve_model_path(init), Path(out), Path(data)
    hf_config = HFCheckpoint(init_dir).config
    cfg = ModelConfig.from_hf(hf_config)
    rows, counts = load_rows(data, init_dir, cfg, max_len=config.max_len, pack=config.pack)
    eval_examples = None if eval_data is None else load_examples(eval_data, init_dir, cfg)
    if mesh is None and jax.process_count() > 1:
        mesh = make_mesh()
    record = run_record(init_dir, cfg, dataclasses.asdict(config), data)
    resuming = check_resume(out, record)
    distributed.barrier("ftjax.finetune:checked")  # every process decided before process 0 writes run.json
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if not resuming:
            (out / RUN_FILE).write_text(json.dumps(record, indent=1) + "\n")
    distributed.barrier("ftjax.finetune:recorded")
    finished = resuming and (out / FINAL_DIR / "config.json").is_file()  # the export is atomic and comes last
    latest = _newest_whole_checkpoint(out) if resuming and not finished else None
    manager = _manager(out, keep)
    summary = {"out": str(out), "final": str(out / FINAL_DIR), "steps": config.steps, "resumed_from": latest,
               "data": dataclasses.asdict(counts)}
    if finished:
        _close(manager, keep)
        return {**summary, **last_metrics(out), "resumed_from": manager.latest_step(),
                "seconds": time.perf_counter() - t0}

    # -- state: float32 master params + optimizer state, sharded like the params
    _, params = load_params(init_dir, mesh=mesh)
    out_dtypes = jax.tree.map(lambda x: x.dtype if save_dtype is None or not is_float(x.dtype)
                              else jnp.dtype(save_dtype), params)
    saved_weights = "as saved, " + "/".join(sorted({str(dt) for dt in jax.tree.leaves(out_dtypes)}))
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
    step_fn = _jitted_step(cfg, config.step_config, mesh, optimizer, state_sh, batch_sh, scalar_sh)
    if latest is not None:
        state = _restore(manager, latest, abstract, state_sh, rows, config, out)
    else:
        state = jax.jit(init_state, out_shardings=state_sh)(params)
    del params
    start = int(distributed.to_host(state["step"]))
    # Keep the log up to the restored step (a fresh start re-evaluates step 0, so it keeps nothing).
    log = RunLog(out, read_log(out, start) if resuming and start > 0 else [], config.steps, progress)
    # Throughput clock: "base" is when the first step's metrics arrived (compilation is before it); time spent in
    # evaluations and checkpoint writes after it is "paused" and not counted.
    clock = {"t0": 0.0, "base": None, "tokens": 0, "paused": 0.0}

    def evaluate(step: int, params: Any, weights: str) -> None:
        from ftjax.evaluate import evaluate_loss

        began = time.perf_counter()
        result = evaluate_loss(params, cfg, eval_examples, batch_size=config.batch_size,
                               max_len=config.max_len, dtype=eval_dtype, mesh=mesh)
        keys = ("loss", "ppl", "tokens", "exact_match", "acc", "acc_norm")
        summary["eval"] = {**{k: result[k] for k in keys if k in result}, "dtype": eval_dtype, "weights": weights}
        log.write({"step": step, **{f"eval_{k}": v for k, v in summary["eval"].items()}})
        log.line(eval_line(step, summary["eval"]))
        clock["paused"] += time.perf_counter() - began

    def save(step: int) -> None:
        began = time.perf_counter()
        _save(manager, state, step, rows, config)
        clock["paused"] += time.perf_counter() - began

    def record_metrics(step: int, metrics: dict, nonpad: int) -> None:
        m = {k: v.item() for k, v in distributed.to_host(metrics).items()}
        if not m["finite"]:
            good = manager.latest_step()
            where = f"the last good checkpoint is step {good} in {out / CKPT_DIR}" if good is not None else \
                "no checkpoint was saved yet"
            raise FtjaxError(f"training diverged at step {step}: loss {m['loss']}, grad norm {m['grad_norm']} "
                             f"(NaN/Inf); stopped, {where}; lower --lr or check the data")
        now = time.perf_counter()
        if clock["base"] is None:  # the first step of this process: its rate includes compilation
            rate = nonpad / max(now - clock["t0"], 1e-9)
            clock.update(base=now, paused=0.0)
        else:  # steps since the first: non-padding tokens over training time
            clock["tokens"] += nonpad
            rate = clock["tokens"] / max(now - clock["base"] - clock["paused"], 1e-9)
        entry = {"step": step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                 "loss_tokens": int(m["loss_tokens"]), "nonpad_tokens": nonpad, "nonpad_tokens_per_s": rate}
        log.write(entry)
        log.bar(entry)
        summary["loss"], summary["nonpad_tokens_per_s"] = m["loss"], rate

    try:
        if eval_examples is not None and start == 0:
            evaluate(0, state["params"], MASTER)
        clock["t0"] = time.perf_counter()
        pending = None
        for step in range(start, config.steps):
            host = step_batch(rows, step, config.batch_size, config.grad_accum, config.seed)
            # Each process copies only its own devices' slices of the (identical) host batch.
            lr = distributed.put_global(jnp.float32(lr_at(config, step + 1)), scalar_sh)
            state, metrics = step_fn(state, tuple(distributed.put_global(a, batch_sh) for a in host), lr)
            if pending is not None:  # fetch the previous step's metrics while this one runs
                record_metrics(*pending)
            pending = (step + 1, metrics, int((host[1] > 0).sum()))
            done = step + 1
            do_eval = eval_examples is not None and (done == config.steps or (eval_every and done % eval_every == 0))
            do_save = done == config.steps or (save_every and done % save_every == 0)
            if do_eval or do_save:
                record_metrics(*pending)
                pending = None
                if do_eval and done == config.steps:  # the model as final/ will hold it
                    evaluate(done, cast_params_to(state["params"], out_dtypes), saved_weights)
                elif do_eval:
                    evaluate(done, state["params"], MASTER)
                if do_save:
                    save(done)
    finally:
        log.close()
    final = cast_params_to(state["params"], out_dtypes)
    _, init_params = load_params(init_dir, mesh=mesh)
    summary["lost_update_share"] = lost = lost_update_share(init_params, state["params"], final)
    del init_params
    save_params(final, out / FINAL_DIR, config=hf_config, aux_from=init_dir, dtype=save_dtype, overwrite=True,
                inputs=[init_dir])
    if lost > LOST_UPDATE_WARN and distributed.is_main():
        print(f"ftjax: warning: {out / FINAL_DIR}: {lost:.1%} of the weights training changed were written equal to "
              f"the init's ({saved_weights}): their updates were smaller than half a unit of the save dtype and were "
              "lost in the cast; --save-dtype float32 keeps them", file=sys.stderr)
    _close(manager, keep)
    return {**summary, "seconds": time.perf_counter() - t0}


def cast_params_to(params: Any, dtypes: Any) -> Any:
    """`params` with each leaf cast to the dtype at the same place in `dtypes` (a tree of the same structure)."""
    return jax.tree.map(lambda x, dt: x.astype(dt), params, dtypes)


def lost_update_share(init: Any, master: Any, saved: Any) -> float:
    """Share (0..1) of the elements training changed (float32 `master` != `init`) whose value in `saved` (the
    master cast to the save dtype) still equals the init's: updates smaller than half a unit of the save dtype,
    lost in the cast. 0.0 when training changed nothing. Trees of the same structure, any dtypes."""
    counts = distributed.to_host(_count_lost(init, master, saved))  # per tensor: int32 sums cannot overflow
    changed, lost = sum(int(c) for c, _ in counts), sum(int(n) for _, n in counts)
    return lost / changed if changed else 0.0


@jax.jit
def _count_lost(init: Any, master: Any, saved: Any) -> list[tuple[jax.Array, jax.Array]]:
    counts = []
    for i, m, s in zip(jax.tree.leaves(init), jax.tree.leaves(master), jax.tree.leaves(saved)):
        moved = m != i.astype(m.dtype)
        counts.append((jnp.sum(moved, dtype=jnp.int32), jnp.sum(moved & (s == i.astype(s.dtype)), dtype=jnp.int32)))
    return counts


def _newest_whole_checkpoint(out: Path) -> int | None:
    """The newest step under out/checkpoints that verifies (`ftjax.io.orbax.verify_step`), None when there is none
    (the run starts from step 0). Newer ones that do not verify (a crash or a disk fault cut them short) are named
    on stderr and removed, so the run re-creates them. FtjaxError when none verifies although one was completed
    (has its STEP_COMPLETE marker): a whole checkpoint was damaged afterwards, and starting over is the user's call."""
    import shutil

    from ftjax.io.orbax import STEP_COMPLETE, verify_step

    root = out / CKPT_DIR
    steps = sorted((int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True) \
        if root.is_dir() else []
    problems = []
    for step in steps:
        problem = verify_step(root / str(step))
        if problem is None:
            break
        problems.append(f"{step}: {problem}")
    else:
        step = None
    if step is None and any((root / str(s) / STEP_COMPLETE).is_file() for s in steps):
        raise FtjaxError(f"{root}: no checkpoint verifies ({'; '.join(problems)}); remove {out} (or resume from a "
                         "copy of a whole checkpoint) and start again")
    distributed.barrier("ftjax.finetune:verified")  # every process has verified before process 0 removes
    if problems and distributed.is_main():
        for bad in steps[:len(problems)]:
            shutil.rmtree(root / str(bad))
        print(f"ftjax: warning: {root}: skipped checkpoint(s) that do not verify ({'; '.join(problems)}); removed "
              f"them and resuming from step {step or 0}", file=sys.stderr)
    distributed.barrier("ftjax.finetune:pruned")
    return step


def _close(manager: ocp.CheckpointManager, keep: int) -> None:
    """Close the checkpoint manager; keep=0 first deletes every checkpoint (only once final/ is complete)."""
    if keep == 0:
        for step in manager.all_steps():
            manager.delete(step)
    manager.close()


def _meta(step: int, rows: Rows, tcfg: TrainConfig) -> dict:
    position = step * tcfg.rows_per_step
    return {"step": step, "data_position": position, "epoch": position // rows.tokens_nt.shape[0],
            "rows": int(rows.tokens_nt.shape[0]), "seed": tcfg.seed}


def _save(manager: ocp.CheckpointManager, state: dict, step: int, rows: Rows, tcfg: TrainConfig) -> None:
    from ftjax.io.orbax import mark_step_complete

    args = ocp.args.Composite(state=ocp.args.StandardSave(_to_saved(state)),
                              meta=ocp.args.JsonSave(_meta(step, rows, tcfg)))
    try:
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
        if distributed.is_main():
            mark_step_complete(Path(manager.directory) / str(step))  # written last: the step is whole
        distributed.barrier(f"ftjax.finetune:saved:{step}")
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
