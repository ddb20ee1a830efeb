"""Running a merge plan: streamed from checkpoint directories (`merge`, `ftjax merge CONFIG --out OUT`) or over
pytrees already in memory (`merge_params`). Both run the same Tasks with the same kernels, so they give the same
bits; the streaming one never holds a tensor (statistics come from extra passes, memory is the engine's buffers).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.engine import outputs
from ftjax.engine import plan as P
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, HFCheckpoint, check_output
from ftjax.io.safetensors import TensorInfo
from ftjax.layout import Layout
from ftjax.merge.config import MergeConfig, load, parse
from ftjax.merge.plan import (
    STAGES,
    Inputs,
    Task,
    plan_tensors,
    slice_layers,
    slice_target,
    stage_add,
    stage_finish,
    stage_kernel,
    stage_start,
    write_kernel,
)
from ftjax.engine.outputs import Finish, Output, provenance, write_checkpoint
from ftjax.engine.streaming import Job, Source, row_elems, stream
from ftjax.engine.plan import Report

RECORD = "ftjax_merge.json"
DEFAULT_SEED = 0


def _inputs(config: MergeConfig, layouts: dict[str, Layout], keys: dict[str, str]) -> Inputs:
    """Inputs from the layouts of every referenced model (keyed by reference: base, m{i}, d{j})."""
    entries = {f"m{i}": e for i, e in enumerate(config.models)}
    deltas = {}
    for k, e in entries.items():
        deltas[k] = "base" if e.delta_base is None or e.delta_base == config.base_model else keys[e.delta_base]
    tok = config.tokenizer_source
    if tok in (None, "base"):
        tok_key = "base" if config.base_model else "m0"
    else:
        found = [k for k, e in entries.items() if e.model == tok] + (["base"] if tok == config.base_model else [])
        if not found:
            raise FtjaxError(f"tokenizer_source {tok} is not one of the merged models")
        tok_key = found[0]
    return Inputs(layouts, entries, "base" if config.base_model else None, deltas, tok_key)


# --- streaming ----------------------------------------------------------------------------------------------------


def _open(config: MergeConfig) -> tuple[dict[str, HFCheckpoint], dict[str, str]]:
    """Every referenced checkpoint by key (one reader per directory), and delta-base reference -> key."""
    opened: dict[str, HFCheckpoint] = {}

    def ck(ref: str) -> HFCheckpoint:
        if "+" in ref and not Path(ref).exists():
            raise FtjaxError(f"{ref}: BASE+ADAPTER (a LoRA adapter merged into its base) is not supported yet; merge "
                             "the adapter first (PEFT's merge_and_unload) and give that directory")
        if ref not in opened:
            opened[ref] = HFCheckpoint(ref)
        return opened[ref]

    handles = {}
    if config.base_model:
        handles["base"] = ck(config.base_model)
    for i, e in enumerate(config.models):
        handles[f"m{i}"] = ck(e.model)
    delta_keys = {}
    for e in config.models:
        if e.delta_base is not None and e.delta_base != config.base_model and e.delta_base not in delta_keys:
            delta_keys[e.delta_base] = f"d{len(delta_keys)}"
            handles[delta_keys[e.delta_base]] = ck(e.delta_base)
    return handles, delta_keys


def _run_stages(tasks: list[Task], source: Any, progress: bool) -> None:
    """Every statistics pass, in order, streamed over the tasks that need it."""
    by_name = {t.name: t for t in tasks}
    for stage in STAGES:
        todo = [t for t in tasks if stage in t.stages]
        if not todo:
            continue
        jobs = []
        for t in todo:
            stage_start(t, stage)
            kernel, args = stage_kernel(t, stage)
            shape = (t.rows,) + t.out.shape[1:] if t.out.shape else ()
            jobs.append(Job(TensorInfo(t.name, np.dtype(np.float32), shape), tuple(source(r) for r in t.refs),
                            kernel, args, rows=t.rows))
        stream(jobs, lambda job, outs, stage=stage: stage_add(by_name[job.name], stage, outs),
               Report("merge", None, {}), progress,
               chunk_elems=outputs.CHUNK_ELEMS, desc=f"ftjax merge ({stage})")
        for t in todo:
            stage_finish(t, stage)


def _jobs(tasks: list[Task], source: Any) -> list[Job]:
    jobs = []
    for t in tasks:
        kernel, args = write_kernel(t)
        srcs = tuple(source(r) for r in t.refs)
        if kernel is None:
            jobs.append(Job(t.out, srcs[:1]))
        else:
            jobs.append(Job(t.out, srcs, kernel, args, rows=t.rows,
                            rest=source(t.rest) if t.rest is not None else None))
    return jobs


def merge(config: str | Path | MergeConfig, out: str | Path, *, seed: int = DEFAULT_SEED, overwrite: bool = False,
          dry_run: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
          progress: bool = True) -> Report:
    """Merge the models of a mergekit config (a YAML file, its text, or a parsed MergeConfig) into `out` (a Hugging
    Face checkpoint, atomic, with `ftjax_merge.json`). seed: of DARE / DELLA masks (recorded)."""
    t0 = time.perf_counter()
    config = load(config)[0] if not isinstance(config, MergeConfig) else config
    handles, delta_keys = _open(config)
    report = Report("merge", str(out), {k: str(h.path) for k, h in handles.items()}, dry_run=dry_run)
    out = check_output(out, overwrite=overwrite, inputs=[h.path for h in handles.values()])
    problems = P.compare_configs({k: _shape_config(h.config, config) for k, h in handles.items()}, report.warnings)
    P.fail(problems, "inputs do not match")
    layouts = {k: Layout.of_checkpoint(h) for k, h in handles.items()}
    inputs = _inputs(config, layouts, delta_keys)
    tasks = plan_tensors(config, inputs, seed=seed, warnings=report.warnings)
    report.tensors, report.transferred = len(tasks), sum(t.kind != "copy" for t in tasks)
    report.copied_non_float = [t.name for t in tasks if t.kind == "copy" and config.method.name != "passthrough"]
    out_key = slice_target(config, inputs) if config.slices else inputs.base or "m0"
    cfg = P.out_config(handles[out_key].config, layouts[out_key], [t.out for t in tasks])
    if config.slices:
        cfg = _sliced_config(cfg, [(handles[k].config, i) for k, i in slice_layers(config, inputs)])
    if dry_run:
        return report
    source = lambda ref: Source(handles[ref[0]], ref[1])
    _run_stages(tasks, source, progress)
    jobs = _jobs(tasks, source)
    record = provenance("merge", report.inputs, cfg, method=config.method.name, seed=seed, merge_config=config.text,
                        formula=config.method.formula,
                        numerics="float32 error-free arithmetic, one rounding to the output dtype; 'dtype' in the "
                                 "config sets only the output dtype")
    tok = handles[inputs.tokenizer]
    edit = None if config.chat_template is None else functools.partial(_set_chat_template, config=config,
                                                                        handles=handles)
    finish = Finish(cfg, tok.path, RECORD, record, ("ftjax_transfer.json", "ftjax_diff.json", RECORD), edit)
    write_checkpoint(Output(out, tuple(h.path for h in handles.values()), overwrite, max_shard_bytes, progress),
                     jobs, report, finish, t0=t0)
    return report


PER_LAYER = ("layer_types", "no_rope_layers")  # config.json lists with one entry per layer


def _shape_config(cfg: dict, config: MergeConfig) -> dict:
    """What must agree between the inputs: a slices merge may stack models of different depths."""
    return {k: v for k, v in cfg.items() if k not in ("num_hidden_layers", *PER_LAYER)} if config.slices else cfg


def _sliced_config(cfg: dict, layers: Sequence[tuple[dict, int]]) -> dict:
    """The output config of a slices merge: `num_hidden_layers` the stacked layers' count, and each per-layer list
    (layer_types, ...) the entries of the layers it took ((the source model's config, its layer) per output layer)."""
    cfg = {**cfg, "num_hidden_layers": len(layers)}
    for key in PER_LAYER:
        if isinstance(cfg.get(key), list):
            if not all(isinstance(c.get(key), list) and i < len(c[key]) for c, i in layers):
                raise FtjaxError(f"config.json: {key} is a per-layer list in the output model but not in every "
                                 "sliced model; slice models that all list it")
            cfg[key] = [c[key][i] for c, i in layers]
    return cfg


def _set_chat_template(out: Path, *, config: MergeConfig, handles: Mapping[str, HFCheckpoint]) -> None:
    """mergekit's chat_template: "auto" (the most common among the inputs) or a Jinja template, into the output's
    tokenizer_config.json and chat_template.jinja (in the temp dir `out`, before it is renamed)."""
    import collections
    import json

    from ftjax.chat import load_chat_template

    template = config.chat_template
    if template == "auto":
        found = [t for t in (load_chat_template(h.path) for h in handles.values()) if t]
        if not found:
            return
        template = collections.Counter(found).most_common(1)[0][0]
    elif "{" not in template:
        raise FtjaxError(f"chat_template {template!r}: give 'auto' or a Jinja template (named built-in templates are "
                         "not bundled)")
    cfg_path = Path(out) / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    tok_cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (Path(out) / "chat_template.jinja").write_text(template)


# --- in memory ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _jit(fn: Any, static: tuple, positional: bool) -> Any:
    def run(*a):
        return fn(*a, *((jnp.uint32(0), jnp.uint32(0)) if positional else ()), *static)

    return jax.jit(run)


def _call(kernel, args, arrays: Sequence[jax.Array], rows: int) -> tuple:
    """A kernel on whole tensors: flat inputs over `rows` rows."""
    flat = [x[:rows].reshape(-1) if x.ndim else x.reshape(1) for x in arrays]
    outs = _jit(kernel.fn, kernel.static, kernel.positional)(*flat, *args)
    return outs if isinstance(outs, tuple) else (outs,)


def merge_params(method: str, base: Any, models: Sequence[Any], *, seed: int = DEFAULT_SEED,
                 out_dtype: str | None = None, tokenizer_source: str | None = None, **parameters: Any) -> Any:
    """The merge of pytrees already in memory (HF-named, possibly sharded), with the same plan and bits as the
    streaming command.

    models: pytrees, or dicts {"params": pytree, "delta_base": pytree?, <per-model parameters>: value}; `base` may
    be None for methods without one. parameters: the config's top-level parameters (weight, density, t, normalize,
    ...: scalars, gradients or filter lists as in a mergekit config)."""
    from ftjax.params import flatten, nest

    trees: dict[str, dict] = {}
    entries, delta_refs = [], {}
    if base is not None:
        trees["base"] = flatten(base)
    for i, m in enumerate(models):
        m = m if isinstance(m, dict) and "params" in m else {"params": m}
        trees[f"m{i}"] = flatten(m["params"])
        delta = None
        if m.get("delta_base") is not None:
            delta = f"delta{i}"
            delta_refs[delta] = f"d{len(delta_refs)}"
            trees[delta_refs[delta]] = flatten(m["delta_base"])
        entries.append({"model": f"m{i}", **({"delta_base": delta} if delta else {}),
                        "parameters": {k: v for k, v in m.items() if k not in ("params", "delta_base")}})
    data = {"merge_method": method, "models": entries, "parameters": parameters}
    if base is not None:
        data["base_model"] = "base"
    if out_dtype is not None:
        data["out_dtype"] = out_dtype
    if tokenizer_source is not None:
        data["tokenizer_source"] = tokenizer_source
    config = parse(data, source="merge_params")
    for i, e in enumerate(config.models):  # an input-weighted base (karcher) is appended as one more model
        trees.setdefault(f"m{i}", trees[e.model] if e.model == "base" else trees[f"m{i}"])
    layouts = {k: Layout.of_tree(t) for k, t in trees.items()}
    inputs = _inputs(config, layouts, delta_refs)
    tasks = plan_tensors(config, inputs, seed=seed)
    arrays = lambda t: [trees[k][n] for k, n in t.refs]
    for stage in STAGES:
        for t in (t for t in tasks if stage in t.stages):
            stage_start(t, stage)
            kernel, args = stage_kernel(t, stage)
            stage_add(t, stage, tuple(np.asarray(o) for o in _call(kernel, args, arrays(t), t.rows)))
            stage_finish(t, stage)
    out = {}
    for t in tasks:
        kernel, args = write_kernel(t)
        if kernel is None:
            out[t.name] = _placed(jnp.asarray(trees[t.refs[0][0]][t.refs[0][1]]).astype(t.out.dtype),
                                  trees[t.refs[0][0]][t.refs[0][1]])
            continue
        y = _call(kernel, args, arrays(t), t.rows)[0]
        y = y[: t.rows * row_elems(t.out.shape)].reshape((t.rows,) + t.out.shape[1:]) if t.out.shape else y[0]
        if t.rest is not None:
            extra = jnp.asarray(trees[t.rest[0]][t.rest[1]])[t.rows: t.out.shape[0]].astype(t.out.dtype)
            y = jnp.concatenate([y, extra])
        out[t.name] = _placed(y, trees[t.refs[0][0]][t.refs[0][1]])
    return nest(out)


def _placed(y: jax.Array, like: Any) -> jax.Array:
    """y with the sharding of the input tensor it replaces (when that is a sharded jax.Array of the same shape)."""
    sharding = getattr(like, "sharding", None)
    if isinstance(like, jax.Array) and like.shape == y.shape and sharding is not None:
        return jax.device_put(y, sharding)
    return y

