"""Running a merge plan: streamed from checkpoint directories (`merge`, `ftjax merge CONFIG --out OUT`) or over
pytrees already in memory (`merge_params`). Both run the same Tasks with the same kernels (`_run_task` on whole
tensors), so they give the same bits.

Streaming, a tensor whose method needs statistics (slerp's angle, model_stock's cosines, TIES' top-k, ...: all of
them are per tensor) is read once when its inputs fit in `ONE_PASS_BYTES` as float32: held whole, its statistics
and output computed in memory (`_Held`); a bigger one is never held: its statistics come from extra streamed passes
over it, memory is the engine's buffers. Both paths give the same bits.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import shutil
import tempfile
import threading
import time
import warnings as _warnings
from collections.abc import Iterator, Mapping, Sequence
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
from ftjax.engine.streaming import Files, Job, Source, aligned, row_elems, rows_of, stream
from ftjax.engine.plan import Report

RECORD = "ftjax_merge.json"
DEFAULT_SEED = 0
ONE_PASS_BYTES = 256 << 20  # bytes: a tensor with statistics is read once, held, when its inputs' rows take at most
#                             this as float32 (all inputs together; the kernels' temporaries add a few times that)
HELD_WORKERS = 2  # threads computing held tensors ahead of the write (each holds one tensor's inputs)


def _inputs(config: MergeConfig, layouts: dict[str, Layout], keys: dict[str, str]) -> Inputs:
    """Inputs from the layouts of every referenced model (keyed by reference: base, m{i}, d{j})."""
    entries = {f"m{i}": e for i, e in enumerate(config.models)}
    deltas = {}
    for k, e in entries.items():
        deltas[k] = "base" if e.delta_base is None or e.delta_base == config.base_model else keys[e.delta_base]
    tok = config.tokenizer_source
    if tok in (None, "base"):  # a slices merge with bases per slice only: the first slice's, which the embeddings keep
        first_base = config.slices[0].base_model if config.slices else None
        tok_key = "base" if config.base_model else next(
            (k for k, e in entries.items() if e.model == first_base), "m0")
    else:
        found = [k for k, e in entries.items() if e.model == tok] + (["base"] if tok == config.base_model else [])
        if not found:
            raise FtjaxError(f"tokenizer_source {tok} is not one of the merged models")
        tok_key = found[0]
    return Inputs(layouts, entries, "base" if config.base_model else None, deltas, tok_key)


# --- BASE+ADAPTER references ---------------------------------------------------------------------------------------


def adapter_ref(ref: str) -> tuple[str, str] | None:
    """(base, adapter) of mergekit's `BASE+ADAPTER` reference (a model with a LoRA adapter merged in); None for a
    plain reference (an existing path that contains '+' is a plain one)."""
    if "+" not in ref or Path(ref).exists():
        return None
    base, adapter = ref.split("+", 1)
    if not base or not adapter:
        raise FtjaxError(f"{ref}: a BASE+ADAPTER reference needs both a model and a LoRA adapter")
    return base, adapter


def _references(config: MergeConfig) -> list[str]:
    entries = [*config.models, *(e for sl in config.slices for e, _, _ in sl.sources)]
    refs = [config.base_model, *(e.model for e in entries), *(e.delta_base for e in entries), config.tokenizer_source]
    return [r for r in dict.fromkeys(refs) if r]


def _renamed(config: MergeConfig, new: Mapping[str, str]) -> MergeConfig:
    """The config with every model reference in `new` replaced (base, models, delta bases, slice sources, tokenizer)."""
    ref = lambda r: new.get(r, r) if r else r
    entry = lambda e: dataclasses.replace(e, model=ref(e.model), delta_base=ref(e.delta_base))
    slices = tuple(dataclasses.replace(sl, sources=tuple((entry(e), a, b) for e, a, b in sl.sources),
                                       base_model=ref(sl.base_model)) for sl in config.slices)
    return dataclasses.replace(config, base_model=ref(config.base_model), models=tuple(map(entry, config.models)),
                               slices=slices, tokenizer_source=ref(config.tokenizer_source))


@contextlib.contextmanager
def adapters_merged(config: MergeConfig, out: str | Path, *, dry_run: bool = False,
                    progress: bool = True) -> Iterator[tuple[MergeConfig, dict[str, str]]]:
    """The config with each `BASE+ADAPTER` reference replaced by that model with its adapter merged in, as mergekit
    means it: written by `ftjax apply` (exact: BASE + scaling·B@A in float32, rounded once to BASE's dtype) into a
    temporary directory beside `out` that is deleted afterwards. A dry run plans on BASE itself (same tensors and
    shapes) and writes nothing. Yields (that config, {merged model directory: its BASE+ADAPTER reference})."""
    from ftjax.transfer import apply

    pairs = {r: p for r in _references(config) if (p := adapter_ref(r))}
    if not pairs or dry_run:
        yield _renamed(config, {r: base for r, (base, _) in pairs.items()}), {}
        return
    parent = Path(out).absolute().parent
    if not parent.is_dir():
        raise FtjaxError(f"{out}: its parent directory does not exist; create it first")
    tmp = Path(tempfile.mkdtemp(prefix=".ftjax-adapters-", dir=parent))
    try:
        merged = {}
        for i, (ref, (base, adapter)) in enumerate(pairs.items()):
            merged[ref] = str(tmp / f"model{i}")
            apply(base, adapter, merged[ref], alpha=1.0, tokenizer_from="target", progress=progress)
        yield _renamed(config, merged), {str(Path(d).resolve()): r for r, d in merged.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- streaming ----------------------------------------------------------------------------------------------------


def _open(config: MergeConfig) -> tuple[dict[str, HFCheckpoint], dict[str, str]]:
    """Every referenced checkpoint by key (one reader per directory), and delta-base reference -> key."""
    opened: dict[str, HFCheckpoint] = {}

    def ck(ref: str) -> HFCheckpoint:
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


def _run_stages(tasks: list[Task], source: Any, progress: bool, report: Report) -> None:
    """Every statistics pass, in order, streamed over the tasks that need it; report.bytes_read counts the reads."""
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
        part = Report("merge", None, {})
        stream(jobs, lambda job, outs, stage=stage: stage_add(by_name[job.name], stage, outs), part, progress,
               chunk_elems=outputs.CHUNK_ELEMS, desc=f"ftjax merge ({stage})")
        report.bytes_read += part.bytes_read
        for t in todo:
            stage_finish(t, stage)


def one_pass(task: Task, budget: int) -> bool:
    """Whether `task` is read once and held (`_Held`): it has statistics passes, no rows from a second source, and
    its inputs' kernel rows take at most `budget` bytes as float32. Per-column Gram sums (nuslerp_row_wise) are
    float64 sums of row blocks, whose bits depend on the blocks: those tensors stay streamed."""
    n_el = task.rows * row_elems(task.out.shape) if task.out.shape else 1
    per_col = task.kind == "comb" and task.spec.per_col
    return bool(task.stages) and task.kind != "copy" and task.rest is None and not per_col and \
        4 * n_el * len(task.refs) <= budget


class _Held:
    """A computed Reader (`ftjax.engine.streaming.Reader`) of the outputs of one-pass tasks: each output reads each
    of its inputs once (pread into reused buffers), runs its statistics and write on those arrays (`_run_task`, in
    blocks of the engine's CHUNK_ELEMS elements, as the streamed passes run them) and is held until its last row is
    served (the engine asks in order, one tensor at a time). HELD_WORKERS threads compute the next held tensors (in
    task order) while the engine writes the current one; `close()` ends them."""

    def __init__(self, tasks: Sequence[Task], source: Any):
        self.tasks = {t.name: t for t in tasks}
        self.source = source
        self.order = [t.name for t in tasks]
        self.index = {n: i for i, n in enumerate(self.order)}
        self.pending: dict[str, concurrent.futures.Future] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(HELD_WORKERS, thread_name_prefix="ftjax-merge-held")
        self.local = threading.local()
        self.name: str | None = None
        self.out: np.ndarray | None = None
        self.files: list[Files] = []  # per worker: pread into buffers it reuses for every tensor (no page faults
        #                               of mmap or of fresh memory)

    def info(self, name: str) -> TensorInfo:
        return self.tasks[name].out

    def file_of(self, name: str) -> Any:
        src = self.source(self.tasks[name].refs[0])
        return src.reader.file_of(src.name)

    def get(self, name: str) -> np.ndarray:
        return self.rows(name, 0, rows_of(self.tasks[name].out.shape))[0]

    def _compute(self, name: str) -> tuple[np.ndarray, int]:
        """Output `name` (its first t.rows rows, the output dtype) and the bytes of its inputs."""
        t = self.tasks[name]
        arrays, nbytes = [], 0
        if not hasattr(self.local, "buffers"):
            self.local.buffers, self.local.files = [], Files()
            self.files.append(self.local.files)
        buffers, files = self.local.buffers, self.local.files
        for i, src in enumerate(map(self.source, t.refs)):
            info = src.reader.info(src.name)
            shape = (t.rows,) + tuple(info.shape[1:]) if info.shape else ()
            size = t.rows * row_elems(info.shape) * info.dtype.itemsize
            if i == len(buffers):
                buffers.append(aligned(0))
            if buffers[i].size < size:
                buffers[i] = aligned(size)
            a = buffers[i][:size].view(info.dtype)
            nbytes += files.read(src, 0, t.rows, a)
            arrays.append(a.reshape(shape))
        return np.asarray(_run_task(t, arrays, max(1, outputs.CHUNK_ELEMS // row_elems(t.out.shape)))), nbytes

    def rows(self, name: str, r0: int, r1: int) -> tuple[np.ndarray, int]:
        """Rows [r0, r1) of output `name`, and the bytes read from disk for them (all of its inputs' at r0 = 0)."""
        nbytes = 0
        if self.name != name:
            self.name, self.out = None, None  # the previous tensor's output is released first
            future = self.pending.pop(name, None) or self.pool.submit(self._compute, name)
            for nxt in self.order[self.index[name] + 1: self.index[name] + 1 + HELD_WORKERS]:
                if nxt not in self.pending:
                    self.pending[nxt] = self.pool.submit(self._compute, nxt)
            self.out, nbytes = future.result()
            self.name = name
        block = self.out[r0:r1] if self.out.ndim else self.out
        if r1 >= rows_of(self.tasks[name].out.shape):
            self.name, self.out = None, None
        return block, nbytes

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
        for files in self.files:
            files.close()


def _jobs(tasks: list[Task], source: Any, held: _Held | None = None) -> list[Job]:
    jobs = []
    for t in tasks:
        kernel, args = (None, ()) if held is not None and t.name in held.tasks else write_kernel(t)
        srcs = (Source(held, t.name),) if held is not None and t.name in held.tasks else \
            tuple(source(r) for r in t.refs)
        if kernel is None:
            jobs.append(Job(t.out, srcs[:1]))
        else:
            jobs.append(Job(t.out, srcs, kernel, args, rows=t.rows,
                            rest=source(t.rest) if t.rest is not None else None))
    return jobs


def merge(config: str | Path | MergeConfig, out: str | Path, *, seed: int = DEFAULT_SEED, overwrite: bool = False,
          dry_run: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
          progress: bool = True, one_pass_bytes: int = ONE_PASS_BYTES) -> Report:
    """Merge the models of a mergekit config (a YAML file, its text, or a parsed MergeConfig) into `out` (a Hugging
    Face checkpoint, atomic, with `ftjax_merge.json`). seed: of DARE / DELLA masks (recorded). one_pass_bytes: a
    tensor with statistics whose inputs take at most this many bytes as float32 is read once and held (0: every
    such tensor streamed in two or more passes; the output bits are the same). The report's bytes_read counts every
    pass's reads."""
    t0 = time.perf_counter()
    config = load(config)[0] if not isinstance(config, MergeConfig) else config
    refs = _references(config)
    paths = [p for r in refs for p in (adapter_ref(r) or (r,)) if Path(p).exists()]
    check_output(out, overwrite=overwrite, inputs=paths)  # before any adapter is merged
    with adapters_merged(config, out, dry_run=dry_run, progress=progress) as (merged, written):
        return _merge(merged, out, seed=seed, overwrite=overwrite, dry_run=dry_run, max_shard_bytes=max_shard_bytes,
                      progress=progress, t0=t0, names=written, one_pass_bytes=one_pass_bytes)


def _merge(config: MergeConfig, out: str | Path, *, seed: int, overwrite: bool, dry_run: bool, max_shard_bytes: int,
           progress: bool, t0: float, names: Mapping[str, str], one_pass_bytes: int = ONE_PASS_BYTES) -> Report:
    """`merge` on a config whose BASE+ADAPTER references are merged; names: such a model's directory -> the reference
    (what the report and provenance record)."""
    handles, delta_keys = _open(config)
    refs = {k: names.get(str(Path(h.path).resolve()), str(h.path)) for k, h in handles.items()}
    report = Report("merge", str(out), refs, dry_run=dry_run)
    report.warnings += config.warnings
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
    held = _Held([t for t in tasks if one_pass(t, one_pass_bytes)], source)
    try:
        _run_stages([t for t in tasks if t.name not in held.tasks], source, progress, report)
        jobs = _jobs(tasks, source, held)
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
    finally:
        held.close()
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
def _jit(fn: Any, static: tuple) -> Any:
    return jax.jit(lambda *a: fn(*a, *static))


def _call(kernel, args, arrays: Sequence[jax.Array], r0: int, r1: int, row: int) -> tuple:
    """A kernel on rows [r0, r1) of whole tensors (`row` elements each) as flat inputs; a positional kernel gets
    the block's first element index, as the streaming engine gives it."""
    flat = [x[r0:r1].reshape(-1) if x.ndim else x.reshape(1) for x in arrays]
    first = r0 * row
    words = (np.uint32(first >> 32), np.uint32(first & 0xFFFFFFFF)) if kernel.positional else ()
    outs = _jit(kernel.fn, kernel.static)(*flat, *args, *words)
    return outs if isinstance(outs, tuple) else (outs,)


def merge_params(method: str, base: Any, models: Sequence[Any], *, seed: int = DEFAULT_SEED,
                 out_dtype: str | None = None, tokenizer_source: str | None = None,
                 slices: Sequence[Mapping[str, Any]] | None = None, **parameters: Any) -> Any:
    """The merge of pytrees already in memory (HF-named, possibly sharded), with the same plan and bits as the
    streaming command.

    models: pytrees, or dicts {"params": pytree, "delta_base": pytree?, <per-model parameters>: value}; `base` may
    be None for methods without one. parameters: the config's top-level parameters (weight, density, t, normalize,
    ...: scalars, gradients or filter lists as in a mergekit config).
    slices: mergekit's slices form, e.g. [{"sources": [{"model": 0, "layer_range": [0, 8]}, ...], "parameters":
    {...}}, ...], where a source's "model" is an index into `models` (plain pytrees here) or "base"; the output's
    layers are the slices' layers stacked and renumbered from 0, as `ftjax merge` writes them.
    What the command prints as warnings (a setting without effect, inputs that tie embeddings differently) comes as
    a UserWarning."""
    from ftjax.params import flatten, nest

    if slices is not None:
        return _merge_slices_params(method, base, models, slices, seed=seed, out_dtype=out_dtype,
                                    tokenizer_source=tokenizer_source, parameters=parameters)
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
    config = _params_config({"merge_method": method, "models": entries, "parameters": parameters}, base is not None,
                            out_dtype, tokenizer_source)
    for i, e in enumerate(config.models):  # an input-weighted base (karcher) is appended as one more model
        trees.setdefault(f"m{i}", trees[e.model] if e.model == "base" else trees[f"m{i}"])
    return nest(_run_in_memory(config, trees, delta_refs, seed))


def _params_config(data: dict[str, Any], has_base: bool, out_dtype: str | None,
                   tokenizer_source: str | None) -> MergeConfig:
    """The MergeConfig of a merge_params call: `data` (method, parameters, models or slices) plus the options."""
    options = {"base_model": "base" if has_base else None, "out_dtype": out_dtype, "tokenizer_source": tokenizer_source}
    return parse({**data, **{k: v for k, v in options.items() if v is not None}}, source="merge_params")


def _merge_slices_params(method: str, base: Any, models: Sequence[Any], slices: Sequence[Mapping[str, Any]], *,
                         seed: int, out_dtype: str | None, tokenizer_source: str | None,
                         parameters: Mapping[str, Any]) -> Any:
    """merge_params of the slices form: the sources name models by index ("model{i}") or "base"."""
    from ftjax.params import flatten, nest

    pool = {f"model{i}": m for i, m in enumerate(models)}
    if base is not None:
        pool["base"] = base

    def ref(model: Any, where: str) -> str:
        key = "base" if model == "base" else f"model{model}" if isinstance(model, int) else None
        if key not in pool:
            raise FtjaxError(f"merge_params: {where}: model must be an index into models (0..{len(models) - 1}) or "
                             f"'base' (with a base given), got {model!r}")
        return key

    if not isinstance(slices, Sequence) or not all(isinstance(sl, Mapping) for sl in slices):
        raise FtjaxError("merge_params: slices must be a list of {sources: [...], parameters: {...}}")
    config = _params_config({"merge_method": method, "parameters": dict(parameters), "slices": [
        {**sl, "sources": [{**src, "model": ref(src.get("model"), f"slices[{i}].sources[{j}]")}
                           for j, src in enumerate(sl.get("sources") or [])],
         **({"base_model": ref(sl["base_model"], f"slices[{i}].base_model")} if sl.get("base_model") is not None
            else {})} for i, sl in enumerate(slices)]},
        base is not None, out_dtype, tokenizer_source)
    trees = {f"m{i}": flatten(pool[e.model]) for i, e in enumerate(config.models)}
    if base is not None:
        trees["base"] = flatten(base)
    return nest(_run_in_memory(config, trees, {}, seed))


def _run_in_memory(config: MergeConfig, trees: dict[str, dict], delta_refs: dict[str, str], seed: int) -> dict:
    """Plan and run `config` over flat trees keyed as the planner keys inputs (base, m{i}, d{j}); flat output."""
    layouts = {k: Layout.of_tree(t) for k, t in trees.items()}
    inputs = _inputs(config, layouts, delta_refs)
    notes = list(config.warnings)
    tasks = plan_tensors(config, inputs, seed=seed, warnings=notes)
    for note in notes:  # what the command prints with its report (a setting without effect, tying that differs)
        _warnings.warn(f"merge_params: {note}", UserWarning, stacklevel=3)
    out = {}
    for t in tasks:
        like = trees[t.refs[0][0]][t.refs[0][1]]
        if t.kind == "copy":
            out[t.name] = _placed(jnp.asarray(like).astype(t.out.dtype), like)
            continue
        y = _run_task(t, [trees[k][n] for k, n in t.refs])
        if t.rest is not None:
            extra = jnp.asarray(trees[t.rest[0]][t.rest[1]])[t.rows: t.out.shape[0]].astype(t.out.dtype)
            y = jnp.concatenate([y, extra])
        out[t.name] = _placed(y, like)
    return out


def _run_task(t: Task, arrays: Sequence[Any], step: int = 0) -> Any:
    """Every statistics pass of `t`, then its write, on whole tensors (its inputs in `t.refs` order, at least
    `t.rows` rows each), `step` rows per kernel call (0: all at once): the output's first `t.rows` rows, shape
    (t.rows, *t.out.shape[1:]) (a scalar: shape ()); a jax array for step 0, else numpy."""
    row = row_elems(t.out.shape)
    blocks = [(a, min(a + step, t.rows)) for a in range(0, t.rows, step)] if step else [(0, t.rows)]
    for stage in STAGES:
        if stage in t.stages:
            stage_start(t, stage)
            kernel, args = stage_kernel(t, stage)
            for r0, r1 in blocks:
                stage_add(t, stage, tuple(np.asarray(o) for o in _call(kernel, args, arrays, r0, r1, row)))
            stage_finish(t, stage)
    kernel, args = write_kernel(t)
    ys = [_call(kernel, args, arrays, r0, r1, row)[0][: (r1 - r0) * row] for r0, r1 in blocks]
    y = ys[0] if not step else np.concatenate([np.asarray(y) for y in ys])
    return y.reshape((t.rows,) + t.out.shape[1:]) if t.out.shape else y[0]


def _placed(y: jax.Array, like: Any) -> jax.Array:
    """y with the sharding of the input tensor it replaces (when that is a sharded jax.Array of the same shape)."""
    sharding = getattr(like, "sharding", None)
    if isinstance(like, jax.Array) and like.shape == y.shape and sharding is not None:
        return jax.device_put(y, sharding)
    return y

