"""Learned transfer coefficients: fit one alpha per group of tensors by gradient descent (issue 18, AdaMerging-style).

    theta(alpha) = T + sum_d sum_g alpha[d, g] * Delta_d[g]        Delta_d = F_d - B_d (float32)

The frozen target T and diffs Delta are arguments of the jitted step that are never differentiated or updated; the
only trained state is alpha (float32 [n_diffs, n_groups]) and its adam moments. Objective `loss`: the mean weighted
next-token NLL (nats) of the calibration rows (`ftjax.rows`, `ftjax.train.loss_sums`); `entropy`: AdaMerging's
mean prediction entropy (nats) over every real token of unlabeled rows. Scores are next-token losses either way.

Groups (`GROUPINGS`):
- `layer` (default): one group per decoder layer index (`layers.<i>`), plus `embed` (input embedding), `norm` (final
  norm) and `lm_head` (an untied output embedding; a tied model has none, its embedding is `embed`).
- `layer-module`: `layers.<i>.attention` and `layers.<i>.mlp`, plus the same three. A layer's norms go with the
  sublayer whose input or output they normalise: Llama-style (`pre`) input_layernorm -> attention,
  post_attention_layernorm (the MLP's input norm) -> mlp; `post` / `sandwich` layouts (OLMo 2, Gemma)
  post_attention_layernorm -> attention, pre_/post_feedforward_layernorm -> mlp.
- `tensor`: one group per tensor (its name).

`ftjax.fit_alpha` is this module, callable as its function `fit_alpha` (so `ftjax.fit_alpha(target, diffs, data,
cfg=...)` works in a notebook and `ftjax.fit_alpha.GROUPINGS` too, whichever was imported first).

The CLI (`ftjax fit-alpha`) writes the merged checkpoint through `ftjax.transfer.transfer` with the learned alpha
as per-tensor `alpha_for` rules (`alpha_rules`), so it is reproducible from alpha.json by `ftjax transfer`; with
several diffs through `ftjax.merge.merge` from OUT/merge.yaml (`merge_config`). With a checkpoint directory the fit
saves its state every K steps and resumes from it bit-identically (`_save_state`, `_restore_state`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax.engine import plan as P
from ftjax.config import ModelConfig
from ftjax.data import Example
from ftjax.dtypes import is_float
from ftjax.errors import FtjaxError, finite
from ftjax.layout import EMBED, LM_HEAD, Layout
from ftjax.params import flatten, nest
from ftjax.rows import make_rows, step_batch, training_examples
from ftjax.runlog import LOCK_FILE, locks_out

GROUPINGS = ("layer", "layer-module", "tensor")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_ATTENTION = ("self_attn.", "input_layernorm.")
_MLP = ("mlp.", "pre_feedforward_layernorm.", "post_feedforward_layernorm.")


def group_of(name: str, grouping: str = "layer", layout: str = "pre") -> str:
    """The group of tensor `name` (HF naming) under `grouping`; `layout` (ModelConfig.layout: pre | post | sandwich)
    places post_attention_layernorm (see the module docstring)."""
    if grouping not in GROUPINGS:
        raise FtjaxError(f"unknown --groups {grouping!r}; use one of {', '.join(GROUPINGS)}")
    if grouping == "tensor":
        return name
    if name == EMBED:
        return "embed"
    if name == LM_HEAD:
        return "lm_head"
    m = _LAYER.match(name)
    if m is None:
        if name.startswith("model.norm."):
            return "norm"
        raise FtjaxError(f"tensor {name} is neither a decoder layer's, the embedding, the final norm nor lm_head; "
                         "use --groups tensor")
    layer, rest = m.groups()
    if grouping == "layer":
        return f"layers.{layer}"
    if rest.startswith(_ATTENTION) or (rest.startswith("post_attention_layernorm.") and layout != "pre"):
        return f"layers.{layer}.attention"
    if rest.startswith(_MLP) or rest.startswith("post_attention_layernorm."):
        return f"layers.{layer}.mlp"
    raise FtjaxError(f"tensor {name}: not part of a layer's attention or mlp; use --groups layer or tensor")


def assign_groups(names: Sequence[str], grouping: str = "layer", layout: str = "pre") -> dict[str, list[str]]:
    """{group: its tensor names}, groups in first-appearance order; every name in exactly one group."""
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(group_of(n, grouping, layout), []).append(n)
    return out


def alpha_rules(table: Mapping[str, float], groups: Mapping[str, Sequence[str]]) -> list[tuple[str, float]]:
    """`transfer` alpha_for rules (exact regex of each tensor name, alpha) that reproduce a fitted table
    {group: alpha} of one diff."""
    return [(f"^{re.escape(n)}$", float(table[g])) for g, names in groups.items() for n in names]


def parse_bounds(text: str | None) -> tuple[float, float]:
    """`LO:HI` (e.g. -0.5:2.0) as floats, LO <= HI; None: unbounded."""
    if text is None:
        return -math.inf, math.inf
    try:
        lo, hi = (finite(f"--bounds {text}: LO and HI", float(x)) for x in text.split(":"))
    except ValueError:
        raise FtjaxError(f"--bounds {text!r}: expected LO:HI, e.g. -0.5:2.0") from None
    if lo > hi:
        raise FtjaxError(f"--bounds {text}: LO must be <= HI")
    return lo, hi


def check_settings(init: float, bounds: tuple[float, float] | str | None, steps: int) -> tuple[float, tuple]:
    """(init, (LO, HI)) checked: finite init inside the bounds, steps >= 0; else a one-line FtjaxError."""
    lo, hi = parse_bounds(bounds) if isinstance(bounds, str) or bounds is None else tuple(map(float, bounds))
    init = finite("--init", float(init))
    if not lo <= init <= hi:
        raise FtjaxError(f"--init {init} lies outside --bounds {lo}:{hi}")
    if steps < 0:
        raise FtjaxError(f"--steps must be >= 0, got {steps}")
    return init, (lo, hi)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A prepared fit: flat frozen trees (device arrays) and the static structure that maps them to theta(alpha).

    target: {name: array} of the target (float leaves float32); deltas: one {name: float32 Delta} per diff, over
    the kernel tensors' first `rows` rows; extras: {name: rows appended after the merged rows} (vocab padding, as
    `transfer` --vocab pad); index: {name: group index}; cfg: the merged model's config."""

    target: dict[str, jax.Array]
    deltas: tuple[dict[str, jax.Array], ...]
    extras: dict[str, jax.Array]
    index: dict[str, int]
    groups: dict[str, list[str]]
    cfg: ModelConfig

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.deltas), len(self.groups)

    def merged(self, alpha_dg: jax.Array, target=None, deltas=None, extras=None) -> dict:
        """theta(alpha) as the nested float32 param tree (the frozen trees may be passed in, e.g. as jit args)."""
        return _merged(alpha_dg, target or self.target, deltas or self.deltas,
                       self.extras if extras is None else extras, self.index)


def _f32(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.float32) if is_float(x.dtype) else x


def prepare(target: Any, diffs: Sequence[Any] | tuple[Any, Any], cfg: ModelConfig, *, groups: str = "layer",
            pairs: bool = False, vocab: str = "pad") -> Problem:
    """Build the `Problem` of nested HF-named trees: `diffs` is a list of diff trees ({name: Delta} nested, the
    target's shapes; missing tensors: no change), or with pairs=True a list of (source_base, source_ft) trees whose
    diffs are taken as `transfer` does (tying, vocab padding with `vocab`)."""
    t = flatten(target)
    lt = Layout.of_tree(t)
    grouped = assign_groups(lt.names, groups, cfg.layout)
    index = {n: i for i, (_, names) in enumerate(grouped.items()) for n in names}
    deltas, extras, out_rows = [], {}, None
    for item in diffs:
        if pairs:
            b, f = (flatten(x) for x in item)
            report = P.Report("fit_alpha", None, {})
            plans = P.plan(lt, Layout.of_tree(f), Layout.of_tree(b), alpha=1.0, alpha_for=(), skip=(), vocab=vocab,
                           dtype="auto", report=report)
            delta = {}
            for p in plans:
                if p.action != "kernel":
                    continue
                v = t[p.name].shape[0] if t[p.name].shape else None
                src = _f32(f[p.source])
                delta[p.name] = src[:v] - _f32(b[p.base]) if v is not None else src - _f32(b[p.base])
                if tuple(p.out.shape) != tuple(t[p.name].shape):
                    if p.name in extras:
                        raise FtjaxError(f"{p.name}: several source-ft models pad the vocabulary; fit one at a time")
                    extras[p.name] = src[v:]
                    out_rows = p.out.shape[0]
        else:
            delta = {n: _f32(x) for n, x in flatten(item).items()}
            wrong = [f"{n} {tuple(x.shape)} (target {tuple(t[n].shape)})" if n in t else f"{n} (not in the target)"
                     for n, x in delta.items() if n not in t or x.shape != t[n].shape]
            if wrong:
                raise FtjaxError(f"diff tensors do not fit the target: {', '.join(wrong[:3])}")
        deltas.append(delta)
    if not deltas:
        raise FtjaxError("fit_alpha needs at least one diff")
    if out_rows is not None:
        cfg = dataclasses.replace(cfg, vocab_size=out_rows)
    return Problem({n: _f32(x) for n, x in t.items()}, tuple(deltas), extras, index, grouped, cfg)


OBJECTIVES = ("loss", "entropy")


def entropy_sums(params: Any, cfg: ModelConfig, tokens_bt: jax.Array, segments_bt: jax.Array,
                 positions_bt: jax.Array, weights_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token prediction entropies in nats, number of real tokens) over a batch of rows: AdaMerging's
    unsupervised objective, at every real token (segment > 0) whatever its weight; labels are never read."""
    from ftjax.model import forward

    logits_btv = forward(params, tokens_bt, cfg, attention_mask_bt=segments_bt > 0, segment_ids_bt=segments_bt,
                         positions_bt=positions_bt).astype(jnp.float32)
    logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
    h_bt = -jnp.sum(jnp.exp(logp_btv) * logp_btv, axis=-1)
    real_bt = segments_bt > 0
    # where(), not a product: padding rows may hold NaN logits.
    return jnp.sum(jnp.where(real_bt, h_bt, 0.0)), jnp.sum(real_bt).astype(jnp.float32)


def _merged(alpha_dg: jax.Array, target: dict, deltas: Sequence[dict], extras: dict, index: Mapping[str, int]) -> dict:
    """theta(alpha) = target + sum_d alpha[d, group] * delta_d per tensor (extras appended), nested."""
    flat = {}
    for name, x in target.items():
        y = x
        for d, delta in enumerate(deltas):
            if name in delta:
                y = y + alpha_dg[d, index[name]] * delta[name]
        flat[name] = jnp.concatenate([y, extras[name]]) if name in extras else y
    return nest(flat)


def loss_fn(problem: Problem, objective: str = "loss", remat: bool = False) -> Callable[..., jax.Array]:
    """(alpha_dg, target, deltas, extras, batch) -> the objective (nats, f32 scalar) of the batch (tokens, segments,
    positions, weights; each [B, T]) under theta(alpha): `loss` the mean weighted next-token NLL, `entropy` the mean
    prediction entropy over real tokens. Differentiate in argument 0 only. remat: the model's forward under
    `ftjax.train.remat` (fine-tuning's --remat: same value, less activation memory in the backward pass)."""
    if objective not in OBJECTIVES:
        raise FtjaxError(f"unknown --objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    return _loss(_static(problem), objective, remat)


def _static(problem: Problem) -> tuple:
    """What the compiled objective depends on beyond its array arguments: the group of each tensor and the config."""
    return tuple((n, int(g)) for n, g in problem.index.items()), problem.cfg


@functools.lru_cache(maxsize=32)
def _loss(static: tuple, objective: str, remat: bool = False) -> Callable[..., jax.Array]:
    """One objective function per (tensor groups, config, objective, remat), so repeated fits reuse one
    compilation."""
    from ftjax import train

    index_items, cfg = static
    index = dict(index_items)
    objective_sums = train.loss_sums if objective == "loss" else entropy_sums

    def sums(params, batch):
        return objective_sums(params, cfg, *batch)

    if remat:
        sums = train.remat(sums)

    def loss(alpha_dg, target, deltas, extras, batch):
        total, count = sums(_merged(alpha_dg, target, deltas, extras, index), batch)
        return total / jnp.maximum(count, 1.0)

    return loss


@functools.lru_cache(maxsize=32)
def _step(static: tuple, objective: str, lr: float, lo: float, hi: float, mesh: Mesh | None = None,
          remat: bool = False) -> Callable:
    """The jitted adam step on alpha (alpha clipped into [lo, hi]), one per settings: built once, compiled once.
    The frozen target, deltas and extras are arguments that are read, never donated or returned; on a mesh they
    keep the shardings they come with (`place`), the new alpha, adam state and loss are replicated."""
    opt = optax.adam(lr)
    grad = jax.value_and_grad(_loss(static, objective, remat))

    def step(alpha_dg, opt_state, target, deltas, extras, batch):
        loss, g = grad(alpha_dg, target, deltas, extras, batch)
        updates, opt_state = opt.update(g, opt_state, alpha_dg)
        return jnp.clip(optax.apply_updates(alpha_dg, updates), lo, hi), opt_state, loss

    return jax.jit(step, out_shardings=(replicated(mesh),) * 3), opt


def place(problem: Problem, mesh: Mesh | None) -> Problem:
    """`problem` with its target, every delta and the vocab-padding extras placed with fine-tuning's parameter
    shardings on `mesh` (`ftjax.layout.shardings_for`, as `load_params(mesh=...)`: fsdp over each tensor's largest
    divisible dimension); mesh None: unchanged."""
    from ftjax.layout import shardings_for

    if mesh is None:
        return problem

    def put(tree: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        sh = shardings_for({n: tuple(x.shape) for n, x in tree.items()}, mesh)
        return {n: jax.device_put(x, sh[n]) for n, x in tree.items()}

    return dataclasses.replace(problem, target=put(problem.target), deltas=tuple(put(d) for d in problem.deltas),
                               extras=put(problem.extras))


def replicated(mesh: Mesh | None) -> jax.sharding.Sharding:
    """Where alpha and the adam state live: replicated over `mesh`; no mesh: this process's first device. Placed
    there before the first step, so every step's inputs have the shardings of the one before: one compilation."""
    from ftjax import distributed

    if mesh is None:
        return jax.sharding.SingleDeviceSharding(distributed.local_device())
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh | None, rows: int) -> jax.sharding.Sharding:
    """The sharding of a [rows, T] batch: rows over the data axes as fine-tuning splits its batches
    (`ftjax.train.batch_sharding`); no mesh: this process's first device."""
    from ftjax import train

    if mesh is None:
        return replicated(None)
    return NamedSharding(mesh, PartitionSpec(*train.batch_sharding(mesh, rows).spec[1:]))


def _calibration_rows(examples: Sequence[Example], max_len: int):
    return make_rows(training_examples(examples, max_len, source="calibration data"), max_len)


def _diff_items(diffs: Sequence[Any] | tuple[Any, Any]) -> tuple[list, bool]:
    """(the diffs as a list, whether they are (source_base, source_ft) pairs) from `fit_alpha`'s `diffs`: one pair
    (a tuple), a list of pairs (tuples) or a list of diff trees."""
    if isinstance(diffs, tuple):
        if len(diffs) != 2:
            raise FtjaxError(f"fit_alpha: a tuple of diffs means (source_base, source_ft), got {len(diffs)} trees; "
                             "pass diff trees as a list")
        return [diffs], True
    items = list(diffs)
    kinds = {isinstance(x, tuple) for x in items}
    if len(kinds) > 1:
        raise FtjaxError("fit_alpha: diffs mix (source_base, source_ft) tuples and diff trees; pass one kind")
    if any(isinstance(x, tuple) and len(x) != 2 for x in items):
        raise FtjaxError("fit_alpha: each tuple of diffs is one (source_base, source_ft) pair")
    return items, kinds == {True}


def fit_alpha(target: Any, diffs: Sequence[Any] | tuple[Any, Any], data: Sequence[Example], *, cfg: ModelConfig,
              groups: str = "layer", steps: int = 100, lr: float = 0.05, init: float = 1.0,
              bounds: tuple[float, float] | str | None = None, seed: int = 0, batch_size: int | None = None,
              max_len: int = 1024, eval_data: Sequence[Example] | None = None, vocab: str = "pad",
              objective: str = "loss", checkpoint_dir: str | os.PathLike | None = None, save_every: int = 0,
              run_info: Mapping[str, Any] | None = None, mesh: Mesh | None = None,
              remat: bool = False) -> dict[str, Any]:
    """Fit alpha (one per group per diff) by adam on the calibration examples `data` (ftjax.data Examples, any row
    form; `ftjax.rows.load_examples` reads a JSONL file). objective: `loss` (next-token NLL of the weighted tokens)
    or `entropy` (AdaMerging: mean prediction entropy of every real token, labels unused).

    diffs: a (source_base, source_ft) tuple of nested trees, a list of such tuples (several diffs, each taken as
    `transfer` does), or a list of diff trees (nested, the target's shapes).
    bounds: (LO, HI) or "LO:HI"; alpha is clipped into them after each step. batch_size: rows per step (None: all
    calibration rows every step; else a seeded permutation per epoch, as `finetune`). Returns a dict: groups
    (names), tensors ({group: tensor names}), alpha ([n_diffs][n_groups] floats), table ([{group: alpha}] per diff),
    curve (the objective of each step's batch before its update, nats), scores ({"calibration": {"init", "fit"}, and
    "eval" with eval_data}: evaluate_loss metrics), the settings, and resumed_from (the step a resumed fit started
    from, else None).

    checkpoint_dir, save_every: the fit's state (alpha, the adam moments and count, the curve so far) is saved every
    `save_every` steps into checkpoint_dir/<step>/ (`ftjax_complete.json` written last, the newest two kept); a fit
    with the same settings, calibration rows and `run_info` (e.g. the input paths) resumes from the newest one that
    verifies and ends with the same bits as an uninterrupted fit.

    mesh: shard as `finetune` does (`ftjax.params.make_mesh`): the frozen target and diffs with the parameter
    shardings (`place`), each batch's rows over the data axes, alpha and the adam state replicated; the fit equals
    the unsharded one up to float32 reassociation. remat: gradient checkpointing as `finetune --remat`."""
    from ftjax import distributed
    from ftjax.evaluate import evaluate_loss

    items, pairs = _diff_items(diffs)
    problem = place(prepare(target, items, cfg, groups=groups, pairs=pairs, vocab=vocab), mesh)
    init, (lo, hi) = check_settings(init, bounds, steps)
    rows = _calibration_rows(data, max_len)
    n_rows = rows.tokens_nt.shape[0]
    bs = n_rows if batch_size is None else batch_size
    if bs < 1:
        raise FtjaxError(f"--batch-size must be >= 1, got {bs}")
    loss_fn(problem, objective)  # checks the objective's name
    step, opt = _step(_static(problem), objective, float(lr), float(lo), float(hi), mesh, bool(remat))
    batch_sh = batch_sharding(mesh, bs)

    settings = {"groups": groups, "steps": steps, "lr": lr, "init": init, "seed": seed,
                "bounds": [x if math.isfinite(x) else None for x in (lo, hi)], "batch_size": batch_size,
                "max_len": max_len, "objective": objective, "diffs": len(problem.deltas), "remat": bool(remat),
                "mesh": None if mesh is None else dict(mesh.shape)}
    if save_every < 0 or (save_every and checkpoint_dir is None):
        raise FtjaxError(f"--save-every must be >= 0 and needs a checkpoint directory, got {save_every}")
    alpha = jnp.full(problem.shape, init, jnp.float32)
    opt_state = opt.init(alpha)
    curve, start, fingerprint = [], 0, None
    if checkpoint_dir is not None:
        fingerprint = _fingerprint(settings, list(problem.groups), rows, run_info)
        restored = _restore_state(Path(checkpoint_dir), fingerprint, opt_state)
        if restored is not None:
            start, alpha, opt_state, curve = restored
    alpha, opt_state = jax.device_put((alpha, opt_state), replicated(mesh))
    for i in range(start, steps):
        host = [a[0] for a in step_batch(rows, i, bs, 1, seed)] if batch_size else (
            rows.tokens_nt, rows.segments_nt, rows.positions_nt, rows.weights_nt)
        batch = tuple(distributed.put_global(a, batch_sh) for a in host)
        alpha, opt_state, loss = step(alpha, opt_state, problem.target, problem.deltas, problem.extras, batch)
        curve.append(float(loss))
        if save_every and (i + 1) % save_every == 0:
            _save_state(Path(checkpoint_dir), i + 1, fingerprint, alpha, opt_state, curve)
    alpha_np = np.asarray(alpha, np.float64)
    names = list(problem.groups)

    def scores(examples):
        return {k: evaluate_loss(problem.merged(a), problem.cfg, examples, max_len=max_len, mesh=mesh)["loss"]
                for k, a in (("init", jnp.full(problem.shape, init, jnp.float32)), ("fit", alpha))}

    result_scores = {"calibration": scores(data)}
    if eval_data is not None:
        result_scores["eval"] = scores(eval_data)
    return {"groups": names, "tensors": problem.groups, "alpha": alpha_np.tolist(),
            "table": [dict(zip(names, map(float, a))) for a in alpha_np], "curve": curve, "scores": result_scores,
            "settings": settings, "resumed_from": start or None}


# --- resumable fits: the state every K steps -----------------------------------------------------------------------
_STATE, _META, _KEEP = "state.npz", "meta.json", 2


def _fingerprint(settings: Mapping[str, Any], groups: Sequence[str], rows: Any,
                 run_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a saved state must have been fitted with to be resumed: the settings, the groups, a SHA-256 of the
    calibration rows (tokens, segments, positions, weights) and the caller's run_info, as JSON values."""
    import hashlib
    import json

    h = hashlib.sha256()
    for a in (rows.tokens_nt, rows.segments_nt, rows.positions_nt, rows.weights_nt):
        h.update(np.ascontiguousarray(a).tobytes())
    return json.loads(json.dumps({"settings": dict(settings), "groups": list(groups), "rows_sha256": h.hexdigest(),
                                  "run": dict(run_info or {})}, default=str))


def _save_state(root: Path, step: int, fingerprint: dict, alpha: jax.Array, opt_state: Any,
                curve: Sequence[float]) -> None:
    """root/<step>/: state.npz (alpha float32 [D, G], the optimizer state's leaves opt_00000..., the curve as
    float64), meta.json (step, fingerprint), then `ftjax_complete.json`; older steps beyond the newest two go."""
    import json
    import shutil

    from ftjax.io.orbax import mark_step_complete

    step_dir = root / str(step)
    try:
        if step_dir.exists():
            shutil.rmtree(step_dir)
        step_dir.mkdir(parents=True)
        leaves = {f"opt_{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt_state))}
        with open(step_dir / _STATE, "wb") as f:
            np.savez(f, alpha=np.asarray(alpha), curve=np.asarray(curve, np.float64), **leaves)
        (step_dir / _META).write_text(json.dumps({"format": "ftjax-fit-alpha-state", "step": step,
                                                  "fit": fingerprint}))
        mark_step_complete(step_dir)
        for old in sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)[_KEEP:]:
            shutil.rmtree(root / str(old))
    except OSError as e:
        raise FtjaxError(f"writing the fit state {step_dir} failed: {e.strerror or e}") from None


def _restore_state(root: Path, fingerprint: dict, opt_state: Any) -> tuple[int, jax.Array, Any, list] | None:
    """(step, alpha, optimizer state, curve) of the newest state under root that verifies (`verify_step`), None
    when there is none; FtjaxError when it was saved by a fit with other settings, rows or inputs."""
    import json

    from ftjax.io.orbax import verify_step

    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True) if root.is_dir() else []
    for step in steps:
        step_dir = root / str(step)
        if verify_step(step_dir) is not None:
            continue
        meta = json.loads((step_dir / _META).read_text())
        if meta.get("fit") != fingerprint:
            old = meta.get("fit", {})
            differ = [k for k in ("settings", "groups", "rows_sha256", "run") if old.get(k) != fingerprint[k]]
            raise FtjaxError(f"{step_dir} holds the state of a fit with other {', '.join(differ) or 'settings'}; "
                             f"rerun with the same options and data, or remove {root}")
        with np.load(step_dir / _STATE) as z:
            leaves = [jnp.asarray(z[f"opt_{i:05d}"]) for i in range(len(jax.tree.leaves(opt_state)))]
            return (step, jnp.asarray(z["alpha"]), jax.tree.unflatten(jax.tree.structure(opt_state), leaves),
                    [float(x) for x in z["curve"]])
    return None


def merge_config(tables: Sequence[Mapping[str, float]], groups: Mapping[str, Sequence[str]], target: str,
                 pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The `ftjax merge` config (mergekit's task_arithmetic, ftjax's per-model `delta_base`) that writes
    T + sum_d alpha[d, group] * (F_d - B_d): per diff d (`pairs[d]` = (source_ft, source_base), `tables[d]` =
    {group: alpha}) one `weight` filter per tensor name. Filters are substrings and the first match wins, so they are
    listed longest first: a tensor's own name is the first filter it contains."""
    models = []
    for table, (ft, base) in zip(tables, pairs, strict=True):
        rules = sorted(((n, float(table[g])) for g, names in groups.items() for n in names), key=lambda r: -len(r[0]))
        models.append({"model": str(ft), "delta_base": str(base),
                       "parameters": {"weight": [{"filter": n, "value": a} for n, a in rules]}})
    return {"merge_method": "task_arithmetic", "base_model": str(target),
            "parameters": {"lambda": 1.0, "normalize": False}, "models": models}


def _as_list(x: Any) -> list:
    return [x] if isinstance(x, (str, os.PathLike)) else list(x)


@locks_out("fit-alpha")
def fit_to_dir(target: str | os.PathLike, source_ft: str | os.PathLike | Sequence[str | os.PathLike],
               source_base: str | os.PathLike | Sequence[str | os.PathLike], data: str | os.PathLike,
               out: str | os.PathLike, *, eval_data: str | os.PathLike | None = None, overwrite: bool = False,
               progress: bool = True, save_every: int = 0, **fit_kwargs: Any) -> dict[str, Any]:
    """`ftjax fit-alpha`: load the checkpoints and the JSONL rows (any `ftjax eval` row form, tokenized with the
    target's tokenizer), `fit_alpha`, then write OUT/model/, OUT/alpha.png and .pdf (`plots.plot_alpha`) and
    OUT/alpha.json (the result of `fit_alpha`, the rules and the inputs). source_ft / source_base: one path each, or
    equal-length lists (diff d = source_ft[d] - source_base[d], one alpha per group per diff). One diff: the model is
    written by `ftjax.transfer.transfer` with the learned alpha as exact per-tensor `alpha_for` rules (kept in
    alpha.json); several: by `ftjax.merge.merge` from OUT/merge.yaml (`merge_config`), so `ftjax merge
    OUT/merge.yaml` writes it again. save_every K > 0: the fit's state goes to OUT/checkpoints/<step>/ every K steps
    and the same command after an interruption resumes from it, with the same bits as an uninterrupted fit; the
    checkpoints are removed once alpha.json is written. fit_kwargs: `fit_alpha`'s (mesh: the checkpoints are also
    read sharded over it). Every output check happens before the fit; the model is
    written atomically, alpha.json last."""
    import shutil

    import yaml

    from ftjax import plots, transfer
    from ftjax.io.checkpoint import check_files_dir, check_output, resolve_model_path
    from ftjax.params import load_params
    from ftjax.results import write_json
    from ftjax.rows import load_examples

    check_settings(fit_kwargs.get("init", 1.0), fit_kwargs.get("bounds"), fit_kwargs.get("steps", 100))
    fts, bases = _as_list(source_ft), _as_list(source_base)
    if len(fts) != len(bases) or not fts:
        raise FtjaxError(f"give one --source-base per --source-ft (paired in order), got {len(fts)} --source-ft and "
                         f"{len(bases)} --source-base")
    paths = {"target": resolve_model_path(target), "source_ft": [resolve_model_path(p) for p in fts],
             "source_base": [resolve_model_path(p) for p in bases]}
    several = len(fts) > 1
    out = check_files_dir(out, ("alpha.json", "alpha.png", "alpha.pdf", "model", "checkpoints", LOCK_FILE)
                          + (("merge.yaml",) if several else ()))
    check_output(out / "model", overwrite=overwrite,
                 inputs=[paths["target"], *paths["source_ft"], *paths["source_base"]])
    mesh = fit_kwargs.get("mesh")  # each device reads only its own slices, as `finetune --mesh`
    cfg, t = load_params(paths["target"], mesh=mesh)
    pairs = []
    for ft, base in zip(paths["source_ft"], paths["source_base"]):
        cfg_f, f = load_params(ft, mesh=mesh)
        if several and cfg_f.vocab_size != cfg.vocab_size:
            raise FtjaxError(f"{ft}: vocabulary of {cfg_f.vocab_size} tokens, the target's has {cfg.vocab_size}; with "
                             "several diffs every source-ft must have the target's vocabulary (fit one diff at a time)")
        pairs.append((load_params(base, mesh=mesh)[1], f))
    examples = load_examples(data, paths["target"], cfg)
    dev = None if eval_data is None else load_examples(eval_data, paths["target"], cfg)
    inputs = {"target": str(paths["target"]), "source_ft": [str(p) for p in paths["source_ft"]],
              "source_base": [str(p) for p in paths["source_base"]], "data": str(data),
              "eval": None if eval_data is None else str(eval_data)}
    result = fit_alpha(t, pairs, examples, cfg=cfg, eval_data=dev, save_every=save_every, run_info=inputs,
                       checkpoint_dir=out / "checkpoints" if save_every else None, **fit_kwargs)
    del t, pairs
    if several:
        from ftjax import merge

        text = yaml.safe_dump(merge_config(result["table"], result["tensors"], inputs["target"],
                                           list(zip(inputs["source_ft"], inputs["source_base"]))), sort_keys=False)
        merge.merge(text, out / "model", overwrite=overwrite, progress=progress)
        (out / "merge.yaml").write_text(text)
        result.update(merge_config=str(out / "merge.yaml"))
    else:
        rules = alpha_rules(result["table"][0], result["tensors"])
        transfer.transfer(paths["source_base"][0], paths["source_ft"][0], paths["target"], out / "model",
                          alpha_for=rules, vocab=fit_kwargs.get("vocab", "pad"), overwrite=overwrite,
                          progress=progress)
        result.update(alpha_for=[[r, a] for r, a in rules])
    result.update(model=str(out / "model"), inputs=inputs)
    plots.plot_alpha(result, out / "alpha")
    write_json(out / "alpha.json", result)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result
