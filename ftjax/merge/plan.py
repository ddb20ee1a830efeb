"""Planning a merge: for each output tensor, which tensors of which inputs it reads, the value of every parameter for
it, the statistics passes its method needs and, once those have run, the kernel and arguments that write it.

Inputs are named by keys: "base" (base_model), "m0", "m1", ... (the config's models, in order), "d0", ... (delta
bases other than the base). A `Task` addresses tensors as (key, tensor name); `ftjax.merge.run` maps keys to files
(streaming) or to arrays (in memory), so both run exactly the same plan.

Output tensors: those of the base (or, without one, the first model), in its order and tying. Vocabulary rows: the
kernel merges the rows every input has; rows beyond them come from the tokenizer source (the base by default), as
`ftjax transfer --vocab pad` takes new tokens from source-ft. A shape mismatch elsewhere is an error naming the
tensor and the models (mergekit skips such tensors with a warning). Integer tensors are the base's.

A slices config is planned as mergekit plans it (`_plan_slices`): each slice is a merge of its own sources, layer by
layer, against the slice's base (its own base_model, else the top-level one), its layers renumbered after the previous
slices'; the embeddings come from the first slice's sources and base, the final norm and head from the last slice's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ftjax.errors import FtjaxError
from ftjax.io.safetensors import TensorInfo
from ftjax.layout import Layout
from ftjax.merge import kernels as K
from ftjax.merge import passes
from ftjax.merge.config import MergeConfig, ModelEntry, Slice, layer_t, value
from ftjax.engine import plan as P
from ftjax.engine.streaming import Kernel, row_elems, rows_of

Ref = tuple[str, str]
Source = Callable[[str, str], str]  # (input key, output tensor name) -> the input's tensor name


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The models of a merge by key, with their roles."""

    layouts: Mapping[str, Layout]
    entries: Mapping[str, ModelEntry]  # "m{i}" -> the config's model entry
    base: str | None  # "base" or None
    deltas: Mapping[str, str]  # "m{i}" -> the key of its delta base ("base" or "d{j}")
    tokenizer: str  # the key whose vocabulary rows the output keeps


@dataclasses.dataclass
class Task:
    """One output tensor: read `refs` (kernel inputs, in order) over `rows` rows, rows beyond from `rest`."""

    name: str
    out: TensorInfo
    kind: str  # "gta", "comb", "fusion", "ram", "nearswap", "scale" or "copy"
    refs: tuple[Ref, ...]
    rows: int
    rest: Ref | None = None
    spec: Any = None
    values: dict = dataclasses.field(default_factory=dict)  # host numbers: weights, densities, thresholds, ...
    stages: list[str] = dataclasses.field(default_factory=list)  # statistics passes still to run, in order
    state: dict = dataclasses.field(default_factory=dict)


STAGES = ("keys_hi", "keys_lo", "l1", "sq", "counts", "gram")


def out_dtype(config: MergeConfig, stored: np.dtype) -> np.dtype:
    return P.DTYPES[config.output_dtype] if config.output_dtype else np.dtype(stored)


def mask_key(seed: int, model: int, name: str) -> np.ndarray:
    """The random-mask key of (seed, model index, tensor name): three uint32 words of a stable hash."""
    digest = hashlib.blake2b(f"{seed}\0{model}\0{name}".encode(), digest_size=12).digest()
    return np.frombuffer(digest, np.uint32).copy()


def plan_tensors(config: MergeConfig, inputs: Inputs, *, seed: int, warnings: list[str] | None = None) -> list[Task]:
    """One Task per output tensor (every mismatch of the inputs in one FtjaxError: `ftjax.engine.plan`'s checks,
    shared with transfer/diff/apply); warnings (tying that differs) are appended to `warnings`."""
    if config.slices:
        return _plan_slices(config, inputs, seed)
    out_key = inputs.base or next(iter(inputs.entries))
    out_layout = inputs.layouts[out_key]
    num_layers = _num_layers(out_layout)
    problems = P.check_keysets(inputs.layouts, _labels(inputs), out_key, [] if warnings is None else warnings)
    tasks = []
    for name in out_layout.names:
        try:
            tasks.append(_task(config, inputs, out_key, name, layer_t(name, num_layers), seed, problems))
        except _Skip:
            continue
    P.fail(problems, "inputs do not match")
    return tasks


# --- slices -------------------------------------------------------------------------------------------------------

_LAYER_PREFIX = re.compile(r"^model\.layers\.(\d+)\.")


def _relayer(name: str, layer: int) -> str:
    return _LAYER_PREFIX.sub(f"model.layers.{layer}.", name, count=1)


def _key_of(inputs: Inputs, model: str) -> str:
    return next(k for k, e in inputs.entries.items() if e.model == model)


def slice_target(config: MergeConfig, inputs: Inputs) -> str:
    """The key of the model whose config and non-layer tensor names the output of a slices merge takes: the first
    slice's base when it is one of its sources, else that slice's first source. mergekit takes the top-level
    base_model's config, else `referenced_models()[0]`, the first of a set (its order changes with PYTHONHASHSEED);
    the first slice's base, whose embeddings the output keeps, is the deterministic choice."""
    first = [e.model for e, _, _ in config.slices[0].sources]
    base = config.slices[0].base_model
    return _key_of(inputs, base if base in first else first[0])


def slice_layers(config: MergeConfig, inputs: Inputs) -> list[tuple[str, int]]:
    """(key, layer) of the model each output layer takes its config entries (layer_types, ...) from, in order."""
    out = []
    for sl in config.slices:
        models = [e.model for e, _, _ in sl.sources]
        j = models.index(sl.base_model) if sl.base_model in models else 0
        entry, start, _ = sl.sources[j]
        out += [(_key_of(inputs, entry.model), start + i) for i in range(sl.num_layers)]
    return out


def _slice_inputs(config: MergeConfig, inputs: Inputs, sl: Slice, where: str, vocab: bool
                  ) -> tuple[MergeConfig, Inputs, dict[str, int], dict[str, str]]:
    """The slice as a merge of its own: its config (its sources as the models, its base, its parameters), its
    inputs keyed "base" / "m{j}" as plan_tensors keys them, each key's first layer and the key of the merge's inputs
    it stands for. vocab: it plans the embeddings or head."""
    entries, layouts, first, glob = {}, {}, {}, {}
    base = None
    for j, (e, start, _) in enumerate(sl.sources):
        key = _key_of(inputs, e.model)
        entries[f"m{j}"], layouts[f"m{j}"], first[f"m{j}"], glob[f"m{j}"] = e, inputs.layouts[key], start, key
        if e.model == sl.base_model and base is None:
            base, layouts["base"], first["base"], glob["base"] = "base", inputs.layouts[key], start, key
    tok = "base" if base else "m0"
    if config.tokenizer_source not in (None, "base"):  # a model's vocabulary: rows beyond the common ones are its
        found = [k for k, e in entries.items() if e.model == config.tokenizer_source]
        tok = found[0] if found else tok
        if not found and vocab:
            raise FtjaxError(f"{where}: tokenizer_source {config.tokenizer_source} is not one of its sources (the "
                             "embeddings come from the first slice's sources, the head from the last's); add it there")
    view = dataclasses.replace(config, base_model=sl.base_model, models=tuple(entries.values()),
                               slice_parameters=sl.parameters)
    return view, Inputs(layouts, entries, base, {k: "base" for k in entries}, tok), first, glob


def _plan_slices(config: MergeConfig, inputs: Inputs, seed: int) -> list[Task]:
    """mergekit's plan of a slices config: the embeddings merged from the first slice's sources, each slice's layers
    (renumbered consecutively, t over the slice's own layers), then the final norm and head from the last slice's
    sources; non-layer tensors at t = 0."""
    for i, sl in enumerate(config.slices):
        for e, start, end in sl.sources:
            n = _num_layers(inputs.layouts[_key_of(inputs, e.model)])
            if end > n:
                raise FtjaxError(f"slices[{i}]: layer_range [{start}, {end}] of {e.model} is past its {n} layers; "
                                 f"give an end <= {n}")
    target = inputs.layouts[slice_target(config, inputs)]
    outside = [n for n in target.names if not _LAYER_PREFIX.match(n)]
    pre, post = [n for n in outside if ".embed" in n], [n for n in outside if ".embed" not in n]
    problems: list[str] = []
    tasks: list[Task] = []
    last = len(config.slices) - 1
    views = [_slice_inputs(config, inputs, sl, f"slices[{i}]", i in (0, last)) for i, sl in enumerate(config.slices)]

    def add(view: tuple, names: Sequence[str], t: float, idx: int | None) -> None:
        """Plan `names` with a slice's inputs; idx: the slice's layer they are (None: tensors outside the layers)."""
        cfg, ins, first, glob = view
        out_key = ins.base or "m0"

        def src(key: str, name: str) -> str:
            name = target.source_of(name, ins.layouts[key])
            return name if idx is None else _relayer(name, first[key] + idx)

        for name in names:
            try:
                task = _task(cfg, ins, out_key, name, t, seed, problems, src)
            except _Skip:
                continue
            task.refs = tuple((glob[k], n) for k, n in task.refs)
            task.rest = None if task.rest is None else (glob[task.rest[0]], task.rest[1])
            tasks.append(task)

    add(views[0], pre, 0.0, None)
    layer = 0
    for view, sl in zip(views, config.slices):
        out_key = view[1].base or "m0"
        layout, start = view[1].layouts[out_key], view[2][out_key]
        for idx in range(sl.num_layers):
            names = [_relayer(n, layer) for n in layout.names if (m := _LAYER_PREFIX.match(n))
                     and int(m.group(1)) == start + idx]
            add(view, names, idx / (sl.num_layers - 1) if sl.num_layers > 1 else 1.0, idx)
            layer += 1
    add(views[-1], post, 0.0, None)
    P.fail(problems, "inputs do not match")
    return tasks


class _Skip(Exception):
    pass


def _num_layers(layout: Layout) -> int:
    idx = [int(m.group(1)) for n in layout.names if (m := re.match(r"model\.layers\.(\d+)\.", n))]
    return max(idx) + 1 if idx else 0


def _label(inputs: Inputs, key: str) -> str:
    if key == "base":
        return "base_model"
    entry = inputs.entries.get(key)
    return entry.model if entry is not None else f"delta base {key}"


def _labels(inputs: Inputs) -> dict[str, str]:
    return {k: _label(inputs, k) for k in inputs.layouts}


def _task(config: MergeConfig, inputs: Inputs, out_key: str, name: str, t: float, seed: int, problems: list[str],
          source: Source | None = None) -> Task:
    """The Task writing output tensor `name` at gradient coordinate t; source(key, name): the tensor of input `key`
    it reads (default: the same name, an untied head reading a tied model's embedding)."""
    m = config.method
    # a model entry that is the base itself (mergekit configs often list it) is the base, not one more input
    model_keys = [k for k, e in inputs.entries.items() if m.base == "input" or e.model != config.base_model]
    if m.family == "gta":
        delta_keys = sorted({inputs.deltas[k] for k in model_keys} - {"base"})
        keys = ["base", *model_keys, *delta_keys]
    elif m.family == "linear" or m.family == "karcher":
        keys = model_keys
    elif m.family in ("slerp", "model_stock", "nearswap", "fusion", "ram"):
        keys = ["base", *model_keys]
    elif m.family in ("nuslerp", "multislerp"):
        keys = (["base"] if inputs.base else []) + model_keys
    else:  # passthrough
        keys = model_keys
    checked = P.check_tensor(name, out_key, keys, inputs.layouts, _labels(inputs), problems, source=source,
                             vocab_keys=inputs.layouts.keys())
    if checked is None:
        raise _Skip
    stored, shape, refs = checked.stored, checked.shapes[out_key], checked.refs
    if not checked.is_float:  # integer / bool buffers: the base's, verbatim
        return Task(name, TensorInfo(name, stored, shape), "copy", refs, 0)
    shapes = {key: checked.shapes[key] for key, _ in refs}
    rows, rest = _rows(inputs, out_key, name, shapes, source or (lambda k, n: inputs.layouts[out_key].source_of(
        n, inputs.layouts[k])))
    tok_shape = shapes.get(inputs.tokenizer, shape)
    out = TensorInfo(name, out_dtype(config, stored), (max(rows_of(tok_shape), rows),) + tuple(shape[1:])
                     if shape else ())
    entries = [inputs.entries[k] for k in model_keys]
    task = Task(name, out, "", tuple(refs), rows, rest)
    if m.family in ("gta", "linear"):
        _gta(task, config, entries, model_keys, inputs, keys, t, seed, problems)
    elif m.family == "nearswap":
        task.kind, task.values["t"] = "nearswap", float(value(config, "t", name, t))
    elif m.family == "fusion":
        width = (task.out.shape[-1] if len(task.out.shape) >= 2 else max(task.rows, 1)) if task.out.shape else 1
        task.kind, task.spec = "fusion", K.FusionSpec(width, task.out.dtype)
        task.stages += ["keys_hi", "keys_lo"]
    elif m.family == "ram":
        _ram(task, config, len(model_keys), t)
    elif m.family == "passthrough":
        scale = value(config, "scale", name, t, entries[0])
        task.kind = "copy" if scale is None else "scale"
        task.values["scale"] = None if scale is None else float(scale)
    else:
        _comb(task, config, entries, inputs, t)
    return task


def _rows(inputs: Inputs, out_key: str, name: str, shapes: dict[str, tuple], source: Source
          ) -> tuple[int, Ref | None]:
    """(rows every input has, where the rows beyond come from) for a tensor `P.check_tensor` passed."""
    first = shapes[out_key] if out_key in shapes else next(iter(shapes.values()))
    if len(set(shapes.values())) == 1:
        return rows_of(first), None
    rows = min(s[0] for s in shapes.values())
    tok = inputs.tokenizer
    tok_layout = inputs.layouts[tok]
    src = source(tok, name)
    if tok_layout.shapes.get(src, (0,))[0] > rows:
        return rows, (tok, src)
    return rows, None


def _num(v: Any, what: str, name: str, entry: ModelEntry | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        who = f" of {entry.model}" if entry is not None else ""
        raise FtjaxError(f"{what}{who} must be a number, got {v!r} (tensor {name})")
    return float(v)


def _bool(v: Any, what: str) -> bool:
    if isinstance(v, bool) or v in (0, 1):
        return bool(v)
    raise FtjaxError(f"{what} must be true or false, got {v!r}")


def _gta(task: Task, config: MergeConfig, entries: list[ModelEntry], model_keys: list[str], inputs: Inputs,
         keys: list[str], t: float, seed: int, problems: list[str]) -> None:
    m, name = config.method, task.name
    g = lambda key: value(config, key, name, t)
    sce = m.sparsify == "variance"  # weights from the statistics pass ("sq"), one density for all models
    if sce:
        w, topk = np.ones(len(entries)), _num(g("select_topk"), "select_topk", name)
        _bool(g("int8_mask"), "int8_mask")  # mergekit's mask storage; no effect on the result
        if not 0.0 <= topk <= 1.0:
            raise FtjaxError(f"select_topk is {topk} for {name}; it must be in [0, 1] (the share of elements kept)")
        dens = np.full(len(entries), topk)
    else:
        w = np.array([_num(value(config, "weight", name, t, e), "weight", name, e) for e in entries])
        dens = np.array([_num(value(config, "density", name, t, e), "density", name, e) if "density" in m.per_model
                         else 1.0 for e in entries])
    for e, d in zip(entries, dens):
        if not 0.0 <= d <= 1.0:
            raise FtjaxError(f"density of {e.model} is {d} for {name}; it must be in [0, 1]")
    normalize = _bool(g("normalize"), "normalize") if "normalize" in m.globals else sce
    rescale = _bool(g("rescale"), "rescale") if "rescale" in m.globals else False
    lam = _num(g("lambda"), "lambda", name) if "lambda" in m.globals else 1.0
    election = g("sign_election") if "sign_election" in m.globals and m.consensus else \
        ("unweighted" if sce else "weighted")
    mode = g("rescale_mode") if "rescale_mode" in m.globals else "l1"
    if election not in ("weighted", "unweighted"):
        raise FtjaxError(f"sign_election must be 'weighted' (mergekit) or 'unweighted' (the TIES paper), got {election!r}")
    if mode not in ("l1", "inverse_density"):
        raise FtjaxError(f"rescale_mode must be 'l1' (mergekit) or 'inverse_density' (the papers), got {mode!r}")
    n = len(entries)
    if m.consensus and n > 16:
        raise FtjaxError(f"{m.name} elects signs over at most 16 models at once, got {n}")
    extra = 0.0
    if m.sparsify == "outliers":
        extra = np.array([_num(value(config, "gamma", name, t, e), "gamma", name, e) for e in entries])
    elif m.sparsify == "della":
        extra = np.array([_num(value(config, "epsilon", name, t, e), "epsilon", name, e) for e in entries])
        for e, d, eps in zip(entries, dens, extra):
            if 0 < d < 1 and not (0 < d - eps and d + eps < 1):
                raise FtjaxError(f"epsilon {eps} of {e.model} for {name}: density ± epsilon must lie in (0, 1)")
    width = 0
    if m.sparsify == "della":
        width = row_elems(task.out.shape) if len(task.out.shape) >= 2 else max(task.rows, 1)
    trimmed = m.sparsify is not None and bool(np.any(dens < 1))
    rescale_mode = None
    if rescale and trimmed:
        rescale_mode = "inverse_density" if mode == "inverse_density" and m.sparsify in ("random", "della") \
            else "factor"
    delta_keys = keys[1 + n:] if m.family == "gta" else []
    spec = K.GtaSpec(n, tuple(-1 if inputs.deltas[k] == "base" else delta_keys.index(inputs.deltas[k])
                              for k in model_keys) if m.family == "gta" else (0,) * n,
                     len(delta_keys), m.family == "gta", m.sparsify if trimmed else None, m.consensus, election,
                     rescale_mode, normalize, task.out.dtype, width, den_floor=1e-6 if sce else 0.0)
    div = float(w.sum()) if normalize and not m.consensus else 1.0
    if normalize and not m.consensus and abs(div) < 1e-8:
        if m.family == "linear":
            raise FtjaxError(f"the weights of {name} sum to {div}: normalize divides by that; set normalize: false")
        div = 1.0  # mergekit's guard
    model_index = [int(k[1:]) for k in model_keys]
    task.kind, task.spec = "gta", spec
    task.values.update(w=w, dens=dens, extra=extra, lam=lam, div=div, r=np.ones(n), thr_lo=np.full(n, -1.0),
                       thr_hi=np.full(n, np.inf), keys=np.stack([mask_key(seed, i, name) for i in model_index]),
                       sparsify=spec.sparsify)
    if trimmed and m.sparsify in ("magnitude", "outliers", "variance"):
        task.stages += ["keys_hi", "keys_lo"]
    if sce:
        task.stages.append("sq")
    if rescale_mode == "factor" and mode == "inverse_density":  # magnitude masks keep a fraction `density`
        task.values["r"] = np.where(dens > 0, 1.0 / np.maximum(dens, 1e-30), 1.0)
    elif rescale_mode == "factor":  # after the thresholds: the l1 factor counts what the masks keep
        task.stages.append("l1")


def _ram(task: Task, config: MergeConfig, n: int, t: float) -> None:
    """ram / ramplus_tl: epsilon as the largest float32 <= it (|fl32(δ)| > that is |fl32(δ)| > epsilon exactly);
    ramplus_tl counts each model's shared and unique changes first (stage "counts")."""
    name, m = task.name, config.method
    eps = _num(value(config, "epsilon", name, t), "epsilon", name)
    if eps < 0:
        raise FtjaxError(f"epsilon is {eps} for {name}; it must be >= 0 (deltas with |δ| > epsilon count as changes)")
    e32 = np.float32(eps)
    task.kind, task.spec = "ram", K.RamSpec(n, task.out.dtype)
    task.values.update(eps=e32 if float(e32) <= eps else np.nextafter(e32, np.float32(-np.inf)), lam=np.ones(n))
    if m.name == "ramplus_tl":
        task.values["r"] = _num(value(config, "r", name, t), "r", name)
        task.values["alpha"] = _num(value(config, "alpha", name, t), "alpha", name)
        task.values["epsilon"] = eps
        if task.values["alpha"] < 0:
            raise FtjaxError(f"alpha is {task.values['alpha']} for {name}; it must be >= 0 (ρ is clamped to "
                             "[0, alpha])")
        task.stages.append("counts")


def _comb(task: Task, config: MergeConfig, entries: list[ModelEntry], inputs: Inputs, t: float) -> None:
    m, name = config.method, task.name
    fam = m.family
    delta = fam in ("model_stock",) or (fam in ("nuslerp", "multislerp") and inputs.base is not None)
    n = len(task.refs) - (1 if delta else 0)
    width = row_elems(task.out.shape) if len(task.out.shape) >= 2 else max(task.rows, 1)
    per_row = (fam == "nuslerp" and not _bool(value(config, "nuslerp_flatten", name, t), "nuslerp_flatten")
               and not _bool(value(config, "nuslerp_row_wise", name, t), "nuslerp_row_wise")) or \
              (fam == "model_stock" and _bool(value(config, "filter_wise", name, t), "filter_wise"))
    per_col = (fam == "nuslerp" and not _bool(value(config, "nuslerp_flatten", name, t), "nuslerp_flatten")
               and _bool(value(config, "nuslerp_row_wise", name, t), "nuslerp_row_wise"))
    if (per_row or per_col) and len(task.out.shape) < 2:
        per_row, per_col = True, False  # a vector is one row (mergekit unsqueezes it)
    task.kind = "comb"
    task.spec = K.CombSpec(n, delta, task.out.dtype, per_row, per_col, width)
    task.values.update(family=fam, n=n, delta=delta, width=width)
    if fam == "slerp":
        task.values["t"] = _num(value(config, "t", name, t), "t", name)
    elif fam in ("nuslerp", "multislerp"):
        task.values["w"] = np.array([_num(value(config, "weight", name, t, e), "weight", name, e) for e in entries])
        if fam == "multislerp":
            task.values["normalize_weights"] = _bool(value(config, "normalize_weights", name, t), "normalize_weights")
            task.values["eps"] = _num(value(config, "eps", name, t), "eps", name)
    elif fam == "karcher":
        task.values["max_iter"] = int(_num(value(config, "max_iter", name, t), "max_iter", name))
        task.values["tol"] = _num(value(config, "tol", name, t), "tol", name)
    task.stages.append("gram")


# --- stage kernels and host reductions ----------------------------------------------------------------------------


def stage_kernel(task: Task, stage: str) -> tuple[Kernel, tuple]:
    """(kernel, args) of a statistics pass over `task`."""
    v, spec = task.values, task.spec
    width = spec.width if task.kind == "fusion" else 0  # its score needs whole rows
    if stage == "keys_hi":
        return Kernel(passes.keys_hi_fn, (spec,), width=width), ()
    if stage == "keys_lo":
        return Kernel(passes.keys_lo_fn, (spec,), width=width), (np.asarray(task.state["bins"], np.uint32),)
    if stage in ("l1", "sq"):
        width = spec.width or row_elems(task.out.shape) or 1
        s = dataclasses.replace(spec, width=width)
        fn = passes.l1_fn if stage == "l1" else passes.sq_fn
        return Kernel(fn, (s,), positional=True, width=width), _mask_args(v)
    if stage == "counts":
        return Kernel(passes.ram_counts_fn, (spec,)), (v["eps"],)
    if stage == "gram":
        per_element = spec.per_col
        width = 1 if per_element else (spec.width if spec.per_row else (row_elems(task.out.shape) or 1))
        if not spec.per_row and len(task.out.shape) < 2:
            width = 1  # a vector's "rows" are its elements
        return Kernel(passes.gram_fn, ((spec.delta, spec.n, width, per_element),), width=width), ()
    raise ValueError(stage)


def _mask_args(v: dict) -> tuple:
    """(density, low threshold, high threshold, mask keys) per model; DELLA's epsilon travels as the low
    threshold (it has no magnitude threshold)."""
    thr_lo = v["extra"] if v["sparsify"] == "della" else v["thr_lo"]
    return (np.asarray(v["dens"], np.float32), np.asarray(thr_lo, np.float32), np.asarray(v["thr_hi"], np.float32),
            np.asarray(v["keys"], np.uint32))


def stage_start(task: Task, stage: str) -> None:
    v, spec = task.values, task.spec
    if stage == "keys_hi":
        n_el = task.rows * row_elems(task.out.shape) if task.out.shape else 1
        sel = []
        if task.kind == "fusion":  # mergekit's quantiles: sorted[int(q·(N − 1))], q = 0.5, 0.25, 0.75
            sel.append(passes.RadixSelect([int(q * (n_el - 1)) for q in (0.5, 0.25, 0.75)], ordered=True))
        for i, d in enumerate([] if task.kind == "fusion" else v["dens"]):
            if spec.sparsify == "variance":  # one selection over all models; its rank needs the count of zeros
                sel.append(passes.RadixSelect([0]))
                break
            if spec.sparsify == "magnitude":
                k = max(1, int(d * n_el))
                ranks = [n_el - k] if d < 1 else [0]
            else:
                target = int(d * n_el)
                n_top = int(v["extra"][i] * n_el)
                n_bot = max(0, n_el - target - n_top)
                ranks = [n_bot, min(n_bot + max(target, 1) - 1, n_el - 1)]
            sel.append(passes.RadixSelect(ranks))
        task.state["select"] = sel
    elif stage == "l1":
        task.state["l1"] = [[] for _ in range(2 * spec.n)]
    elif stage == "sq":
        task.state["sq"] = [[] for _ in range(spec.n)]
    elif stage == "counts":
        task.state["counts"] = np.zeros(2 * spec.n, np.int64)
    elif stage == "gram":
        task.state["gram"] = [np.zeros(spec.width) if spec.per_col else [] for _ in passes.pairs(spec.n)]


def stage_add(task: Task, stage: str, outs: tuple[np.ndarray, ...]) -> None:
    if stage == "keys_hi":
        for sel, keys in zip(task.state["select"], outs):
            sel.add_hi(keys)
    elif stage == "keys_lo":
        j = 0
        for sel in task.state["select"]:
            for r in range(len(sel.ranks)):
                sel.add_lo(r, outs[j + r])
            j += task.state["bins_per_model"]
    elif stage == "counts":
        task.state["counts"] += [int(np.count_nonzero(o)) for o in outs]
    elif stage == "gram" and task.spec.per_col:  # column sums over this block's rows, accumulated in float64
        for acc, o in zip(task.state["gram"], outs):
            acc += np.asarray(o, np.float64).reshape(-1, task.spec.width).sum(axis=0)
    else:
        for acc, o in zip(task.state[stage], outs):
            acc.append(np.asarray(o, np.float32).reshape(-1).copy())


def stage_finish(task: Task, stage: str) -> None:
    v, spec = task.values, task.spec
    if stage == "keys_hi":
        if task.kind == "gta" and spec.sparsify == "variance":  # mergekit: k = int(count_nonzero(var) · select_topk)
            sel = task.state["select"][0]
            k = int((sel.n - int(sel.hist[0])) * float(v["dens"][0]))
            task.state["k"] = k
            sel.ranks = [sel.n - max(k, 1)]
        for sel in task.state["select"]:
            sel.choose_bins()
        per = max(len(sel.bins) for sel in task.state["select"])
        task.state["bins_per_model"] = per
        task.state["bins"] = [sel.bins + [sel.bins[-1]] * (per - len(sel.bins)) for sel in task.state["select"]]
    elif stage == "keys_lo" and task.kind == "fusion":  # median + 1.5·IQR in float32, as mergekit computes it
        med, q1, q3 = np.float32(task.state.pop("select")[0].values())
        v["thr"] = med + np.float32(1.5) * (q3 - q1)
    elif stage == "keys_lo":
        for i, (sel, d) in enumerate(zip(task.state.pop("select"), v["dens"])):
            vals = sel.values()
            if spec.sparsify == "variance":  # the one threshold, for every model (none kept when k = 0)
                v["thr_lo"][:] = vals[0] if task.state["k"] > 0 else np.inf
            elif spec.sparsify == "magnitude":
                v["thr_lo"][i] = vals[0] if d < 1 else -1.0
                if d <= 0:
                    v["thr_lo"][i] = np.inf
            else:
                n_el = task.rows * row_elems(task.out.shape) if task.out.shape else 1
                target = int(d * n_el)
                v["thr_lo"][i], v["thr_hi"][i] = (vals[0], vals[1]) if d < 1 else (-1.0, np.inf)
                if target == 0 and d < 1:
                    v["thr_lo"][i], v["thr_hi"][i] = np.inf, -np.inf
    elif stage == "l1":
        sums = [passes.fsum_rows(parts) for parts in task.state.pop("l1")]
        for i in range(spec.n):
            before, after = sums[2 * i], sums[2 * i + 1]
            v["r"][i] = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
    elif stage == "sq":  # sce's weights: mean(kept δᵢ²), normalised (uniform when their sum is below 1e-6)
        n_el = task.rows * row_elems(task.out.shape) if task.out.shape else 1
        ms = np.array([passes.fsum_rows(parts) for parts in task.state.pop("sq")]) / max(n_el, 1)
        v["w"] = ms / ms.sum() if abs(ms.sum()) >= 1e-6 else np.full(spec.n, 1.0 / spec.n)
    elif stage == "counts":  # ramplus_tl: λᵢ = 1 + r·clamp(shared / max(unique, epsilon), 0, alpha)
        c = task.state.pop("counts").reshape(-1, 2)
        rho = c[:, 0] / np.maximum(c[:, 1], v["epsilon"])
        v["lam"] = 1.0 + v["r"] * np.clip(rho, 0.0, v["alpha"])
    elif stage == "gram":
        parts = task.state.pop("gram")
        if spec.per_row:
            totals = [np.concatenate(p).astype(np.float64) for p in parts]
        elif spec.per_col:
            totals = parts
        else:
            totals = [passes.fsum_rows(p) for p in parts]
        v["coefs"] = _coefs(task, passes.gram_matrix(totals, spec.n))


def _coefs(task: Task, g: np.ndarray) -> np.ndarray:
    """The combination coefficients (float64 [n], or [n, rows] / [n, cols]) of a Gram-based method."""
    v = task.values
    fam = v["family"]
    if g.ndim == 3:  # per row or per column: one small problem each
        return np.stack([_coefs(task, gi) for gi in g], axis=-1)
    if fam == "slerp":
        return np.array(passes.slerp_coefs(g, v["t"]))
    if fam == "nuslerp":
        w0, w1 = v["w"]
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        return np.array(passes.nuslerp_coefs(g, t))
    if fam == "multislerp":
        w = v["w"] / v["w"].sum() if v["normalize_weights"] else v["w"]
        c = passes.multislerp_coefs(g, w, v["eps"])
        if c is None:
            if len(w) == 2:
                return np.asarray(w, np.float64)
            raise FtjaxError(f"{task.name}: the weighted sum of the inputs' directions is zero; multislerp is "
                             "undefined there (give other weights)")
        return c
    if fam == "karcher":
        return passes.karcher_coefs(g, v["max_iter"], v["tol"])
    if fam == "model_stock":
        t = passes.model_stock_t(g)
        return np.full(v["n"], t / v["n"])
    raise ValueError(fam)


def write_kernel(task: Task) -> tuple[Kernel | None, tuple]:
    """(kernel, args) of the write pass (kernel None: a plain copy of the first ref)."""
    v = task.values
    if task.kind == "copy":
        return None, ()
    if task.kind == "gta":
        w_hi, w_lo = K.split(v["w"])
        r_hi, r_lo = K.split(v["r"])
        dens, thr_lo, thr_hi, keys = _mask_args(v)
        lam = np.stack(K.split(v["lam"]))
        div = K.agreement_reciprocals(v["w"], task.spec.den_floor) if task.spec.consensus else np.stack(K.split(v["div"]))
        return Kernel(_gta_write, (task.spec,), positional=True, width=task.spec.width), (
            w_hi, w_lo, dens, thr_lo, thr_hi, r_hi, r_lo, keys, lam, div)
    if task.kind == "comb":
        c_hi, c_lo = K.split(v["coefs"])
        return Kernel(_comb_write, (task.spec,), positional=True,
                      width=task.spec.width if task.spec.per_row or task.spec.per_col else 0), (c_hi, c_lo)
    if task.kind == "ram":
        lam_hi, lam_lo = K.split(v["lam"])
        return Kernel(_ram_write, (task.spec,)), (lam_hi, lam_lo, v["eps"])
    if task.kind == "fusion":
        return Kernel(_fusion_write, (task.spec,), width=task.spec.width), (np.float32(v["thr"]),)
    if task.kind == "nearswap":
        return Kernel(_nearswap_write, (task.out.dtype,)), (np.float32(v["t"]),)
    s_hi, s_lo = K.split(v["scale"])
    return Kernel(_scale_write, (task.out.dtype,)), (s_hi, s_lo)


def _gta_write(*a):
    *xs, spec = a
    return K.gta_kernel(*xs, spec=spec)


def _comb_write(*a):
    *xs, spec = a
    return K.comb_kernel(*xs, spec=spec)


def _ram_write(*a):
    *xs, spec = a
    return K.ram_kernel(*xs, spec=spec)


def _fusion_write(base, model, thr, spec):
    return K.fusion_kernel(base, model, thr, spec=spec)


def _nearswap_write(base, other, t, out_dtype):
    return K.nearswap_kernel(base, other, t, out_dtype=out_dtype)


def _scale_write(x, s_hi, s_lo, out_dtype):
    return K.scale_kernel(x, s_hi, s_lo, out_dtype=out_dtype)
