"""mergekit's YAML config, read strictly: what a config says and, per output tensor, the value of every parameter.

Schema (mergekit's): `merge_method`, `base_model`, `models: [{model, parameters}]` or `slices: [{sources: [{model,
layer_range: [a, b], parameters}], parameters}]` (layers a..b-1 of each source; the sources of one slice have ranges of
one length and are merged layer by layer; the slices are stacked, their layers renumbered from 0; a slice's own
`base_model`, one of its sources, is the base of its layers, slices[0]'s of the embeddings and slices[-1]'s of the norm
and head, as in mergekit; `residual_weight`, which mergekit reads but never applies, is accepted and ignored with a
warning),
top-level `parameters`, `dtype`, `out_dtype`, `tokenizer_source` / `tokenizer: {source}`, `chat_template`. ftjax adds
`delta_base` to a model entry: that model's delta is `model - delta_base` (mergekit has one base for every delta).

Parameter values as mergekit evaluates them: a scalar; a list of numbers, a gradient interpolated over the layers
(layer i of L gets t = i / (L - 1), a one-layer model t = 1, tensors outside the layers t = 0); a list of other
values, a step function of t; a list of `{filter, value}` (the first whose filter is a substring of the tensor
name, or "*", or no filter, wins; its value may be a gradient). A model's own setting wins over its slice's, which
wins over its module's (`modules: {default: {models | slices, parameters}}`, mergekit's per-module form; a
decoder-only model has the one module "default"), which wins over the top-level one; a filter list that matches
nothing falls through to the next. In a slice, the gradient runs over the slice's own layers (its layer i of n gets
t = i / (n - 1), one layer t = 1), as mergekit's planner does.

Where mergekit silently accepts a mistake, ftjax refuses it in one line: unknown keys (with the nearest name), a
global parameter set on one model (mergekit ignores it), a YAML syntax error (with its line), a missing `weight`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ftjax.errors import FtjaxError
from ftjax.merge.methods import REQUIRED, Method, method

_TOP = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
        "tokenizer_source", "tokenizer", "chat_template", "name")
_MODEL = ("model", "parameters", "delta_base")
_SLICE_SOURCE = ("model", "layer_range", "parameters", "delta_base")
DTYPES = ("bfloat16", "float16", "float32")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One input model: its reference (a directory or cached Hub id, `BASE+ADAPTER` for a LoRA-merged model), the
    reference its delta is taken from (None: the base model) and its own parameter settings."""

    model: str
    delta_base: str | None = None
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Slice:
    """One output slice: layers [start, end) of each source (equal lengths), merged layer by layer, the slice's
    own parameter settings (between its sources' and the top-level ones) and its base model: the slice's own
    `base_model`, else the top-level one (mergekit's ConfigReader.base_model)."""

    sources: tuple[tuple[ModelEntry, int, int], ...]
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    base_model: str | None = None

    @property
    def num_layers(self) -> int:
        return self.sources[0][2] - self.sources[0][1]


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    method: Method
    base_model: str | None
    models: tuple[ModelEntry, ...]
    parameters: Mapping[str, Any]
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # "base", a model reference, or None (the base's / first model's files)
    chat_template: str | None = None
    text: str = ""  # the config as written (kept in the output's provenance)
    slices: tuple[Slice, ...] = ()  # the slices form (empty: the models form)
    slice_parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # of the slice being planned
    module_parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # `modules: {default: ...}`'s
    warnings: tuple[str, ...] = ()  # what the config sets that has no effect (printed with the merge's report)

    @property
    def output_dtype(self) -> str | None:
        """mergekit's rule: out_dtype, else dtype, else the base model's own dtype (None)."""
        return self.out_dtype or self.dtype


def _unknown(keys: Sequence[str], allowed: Sequence[str], where: str) -> None:
    for key in keys:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            raise FtjaxError(f"{where}: unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                             + f" (allowed: {', '.join(allowed)})")


def _ref(value: Any, where: str) -> str:
    if isinstance(value, dict):  # mergekit's dict form {model, lora}
        _unknown(list(value), ("model", "lora"), where)
        if not isinstance(value.get("model"), str):
            raise FtjaxError(f"{where}: 'model' must be a path or Hub id string")
        return value["model"] + (f"+{value['lora']}" if value.get("lora") else "")
    if not isinstance(value, str) or not value:
        raise FtjaxError(f"{where}: expected a model path or Hub id, got {value!r}")
    return value


def _check_setting(value: Any, where: str) -> Any:
    """A parameter setting as written: scalar, list (gradient or steps), or {filter, value} conditions."""
    if isinstance(value, dict):
        value = [value]  # a bare condition is a one-element list (mergekit 0.1.5)
    if isinstance(value, list):
        if not value:
            raise FtjaxError(f"{where}: empty list")
        if all(isinstance(v, dict) for v in value):
            for v in value:
                _unknown(list(v), ("filter", "value"), where)
                if "value" not in v:
                    raise FtjaxError(f"{where}: a condition needs a 'value'")
                if v.get("filter") is not None and not isinstance(v["filter"], str):
                    raise FtjaxError(f"{where}: 'filter' must be a string")
                _check_setting(v["value"], where)
            return value
        if any(isinstance(v, (dict, list)) for v in value):
            raise FtjaxError(f"{where}: a list holds either numbers (a gradient) or {{filter, value}} conditions")
        return value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise FtjaxError(f"{where}: unsupported value {value!r}")


def _params(raw: Any, where: str, allowed: Sequence[str], scope: str, m: Method) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise FtjaxError(f"{where}: 'parameters' must be a mapping")
    for key in raw:
        if key not in allowed:
            if scope == "model" and key in m.globals:
                raise FtjaxError(f"{where}: {key!r} is a global parameter of {m.name} (one value for all models); "
                                 "set it under the top-level parameters")
            near = difflib.get_close_matches(str(key), allowed, n=1)
            raise FtjaxError(f"{where}: {m.name} has no parameter {key!r}" + (f"; did you mean {near[0]!r}?" if near
                             else "") + f" (its parameters: {', '.join(allowed) or 'none'})")
    return {k: _check_setting(v, f"{where}: {k}") for k, v in raw.items()}


def parse(data: Any, *, source: str = "config") -> MergeConfig:
    """A MergeConfig from the parsed YAML of a mergekit config; every problem a one-line FtjaxError naming `source`."""
    if not isinstance(data, dict):
        raise FtjaxError(f"{source}: a merge config is a YAML mapping with merge_method and models")
    _unknown(list(data), _TOP, source)
    if "merge_method" not in data:
        raise FtjaxError(f"{source}: no merge_method")
    m = method(data["merge_method"], f"{source}: merge_method")
    data, module_raw = _without_modules(data, source) if "modules" in data else (data, None)
    if ("models" in data) == ("slices" in data):
        raise FtjaxError(f"{source}: give exactly one of 'models' and 'slices'")
    base = _ref(data["base_model"], f"{source}: base_model") if data.get("base_model") is not None else None
    warnings: list[str] = []
    slices = _slices(data, source, m, base, warnings) if "slices" in data else ()
    entries = _models(data, source, m) if not slices else _distinct(slices)
    if m.base == "required" and (base is None if not slices else any(sl.base_model is None for sl in slices)):
        raise FtjaxError(f"{source}: {m.name} needs a base_model")
    if m.base == "input" and base is not None and base not in [e.model for e in entries] and not slices:
        if "weight" in m.per_model:
            raise FtjaxError(f"{source}: {m.name} weighs the base_model like the other inputs: list {base} under "
                             "models with its own weight (mergekit would fail on its missing weight)")
        entries.append(ModelEntry(base))  # mergekit appends it as one more input
    if m.base == "none" and base is not None:
        raise FtjaxError(f"{source}: {m.name} takes no base_model")
    groups = [(source, entries, base)] if not slices else [
        (f"{source}: slices[{i}]", [e for e, _, _ in sl.sources], sl.base_model) for i, sl in enumerate(slices)]
    for where, group, group_base in groups:
        inputs = [e for e in group if e.model != group_base or m.base == "input"]
        if len(inputs) < m.min_models or (m.max_models is not None and len(inputs) > m.max_models):
            n = m.min_models if m.max_models is None else (m.min_models, m.max_models)
            want = f"at least {n}" if m.max_models is None else (f"exactly {n[0]}" if n[0] == n[1] else
                                                                f"{n[0]}-{n[1]}")
            raise FtjaxError(f"{where}: {m.name} merges {want} model(s) besides the base, got {len(inputs)}")
    for e in entries:
        if e.delta_base is not None and m.family != "gta":
            raise FtjaxError(f"{source}: delta_base ({e.model}) is for task-arithmetic methods, not {m.name}")
    globals_ = _params(data.get("parameters"), f"{source}: parameters", [*m.globals, *m.per_model], "top", m)
    module_params = _params(module_raw, f"{source}: modules.default.parameters", [*m.globals, *m.per_model], "top", m)
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in DTYPES:
            raise FtjaxError(f"{source}: {key} {data[key]!r} is not one of {', '.join(DTYPES)}")
    tok = data.get("tokenizer_source")
    if data.get("tokenizer") is not None:
        if tok is not None:
            raise FtjaxError(f"{source}: give tokenizer_source or tokenizer, not both")
        if not isinstance(data["tokenizer"], dict):
            raise FtjaxError(f"{source}: tokenizer must be a mapping {{source: ...}}")
        _unknown(list(data["tokenizer"]), ("source", "tokens", "pad_to_multiple_of"), f"{source}: tokenizer")
        if data["tokenizer"].get("tokens") or data["tokenizer"].get("pad_to_multiple_of"):
            raise FtjaxError(f"{source}: tokenizer.tokens / pad_to_multiple_of (per-token embedding surgery) are not "
                             "supported; merge with tokenizer_source: base, or one model's tokenizer")
        tok = data["tokenizer"].get("source", "union")
    if tok == "union":
        raise FtjaxError(f"{source}: tokenizer_source: union (a merged vocabulary) is not supported; use "
                         "tokenizer_source: base or a model (rows beyond that model's vocabulary are refused)")
    if tok is not None:
        tok = _ref(tok, f"{source}: tokenizer_source")
    template = data.get("chat_template")
    if template is not None and (not isinstance(template, str) or (template != "auto" and "{" not in template)):
        raise FtjaxError(f"{source}: chat_template {template!r}: give 'auto' (the inputs' most common one) or a Jinja "
                         "template (mergekit's named built-in templates are not bundled)")
    return MergeConfig(m, base, tuple(entries), globals_, data.get("dtype"), data.get("out_dtype"), tok, template,
                       slices=slices, module_parameters=module_params, warnings=tuple(warnings))


def _without_modules(data: dict, source: str) -> tuple[dict, Any]:
    """mergekit's `modules: {default: {models | slices, parameters}}` as the plain form, and the module's raw
    parameters (they rank between a slice's and the top-level ones). A decoder-only model has one module, which
    mergekit names "default"; other modules (a multimodal model's towers) are refused."""
    mods = data["modules"]
    if "models" in data or "slices" in data:
        raise FtjaxError(f"{source}: give exactly one of 'models', 'slices' and 'modules'")
    if not isinstance(mods, dict) or not mods:
        raise FtjaxError(f"{source}: modules must be a mapping {{default: {{models or slices, parameters}}}}")
    other = next((k for k in mods if k != "default"), None)
    if other is not None:
        raise FtjaxError(f"{source}: modules: {other!r}: ftjax merges decoder-only language models, whose one module "
                         "mergekit names 'default' (the modules of multimodal models are not supported)")
    mod, where = mods["default"], f"{source}: modules.default"
    if not isinstance(mod, dict):
        raise FtjaxError(f"{where}: expected a mapping with models or slices, and parameters")
    _unknown(list(mod), ("models", "slices", "parameters"), where)
    if ("models" in mod) == ("slices" in mod):
        raise FtjaxError(f"{where}: give exactly one of 'models' and 'slices'")
    flat = {k: v for k, v in data.items() if k != "modules"}
    return {**flat, **{k: mod[k] for k in ("models", "slices") if k in mod}}, mod.get("parameters")


def _models(data: dict, source: str, m: Method) -> list[ModelEntry]:
    if not isinstance(data["models"], list) or not data["models"]:
        raise FtjaxError(f"{source}: models must be a non-empty list")
    return [_entry(e, f"{source}: models[{i}]", _MODEL, m) for i, e in enumerate(data["models"])]


def _entry(e: Any, where: str, keys: Sequence[str], m: Method) -> ModelEntry:
    if isinstance(e, str):
        e = {"model": e}
    if not isinstance(e, dict) or "model" not in e:
        raise FtjaxError(f"{where}: each entry needs a 'model'")
    _unknown(list(e), keys, where)
    delta = _ref(e["delta_base"], f"{where}: delta_base") if e.get("delta_base") is not None else None
    return ModelEntry(_ref(e["model"], where), delta, _params(e.get("parameters"), where, list(m.per_model), "model", m))


def _slices(data: dict, source: str, m: Method, base: str | None, warnings: list[str]) -> tuple[Slice, ...]:
    """The slices as mergekit reads them, each with its base (its own base_model, else `base`); ranges checked here
    as far as the config alone allows (a range past a model's layers is found when the checkpoints are read); a
    residual_weight (mergekit reads it and never applies it) appends a line to `warnings`."""
    raw = data["slices"]
    if not isinstance(raw, list) or not raw:
        raise FtjaxError(f"{source}: slices must be a non-empty list of {{sources: [...]}}")
    out = []
    for i, sl in enumerate(raw):
        where = f"{source}: slices[{i}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise FtjaxError(f"{where}: a slice is a mapping with a non-empty 'sources' list")
        _unknown(list(sl), ("sources", "parameters", "base_model", "residual_weight"), where)
        own = sl.get("base_model") is not None
        if own and m.base == "none":
            raise FtjaxError(f"{where}: {m.name} takes no base_model")
        slice_base = _ref(sl["base_model"], f"{where}: base_model") if own else base
        rw = sl.get("residual_weight")
        if rw is not None:
            if isinstance(rw, bool) or not isinstance(rw, (int, float)):
                raise FtjaxError(f"{where}: residual_weight must be a number, got {rw!r}")
            warnings.append(f"{where}: residual_weight {rw} ignored: mergekit reads it but never applies it, so "
                            "ftjax ignores it as well (the output is mergekit's)")
        sources = []
        for j, src in enumerate(sl["sources"]):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "layer_range" not in src:
                raise FtjaxError(f"{at}: each source needs a model and a layer_range: [start, end]")
            entry = _entry(src, at, _SLICE_SOURCE, m)
            if entry.delta_base is not None:
                raise FtjaxError(f"{at}: delta_base is not supported in slices; write the config with models:")
            r = src["layer_range"]
            if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in r)):
                raise FtjaxError(f"{at}: layer_range of {entry.model} must be [start, end] (integers), got {r!r}")
            if r[0] < 0 or r[1] <= r[0]:
                raise FtjaxError(f"{at}: layer_range {r} of {entry.model} is empty or negative; give [start, end] "
                                 "with 0 <= start < end")
            sources.append((entry, r[0], r[1]))
        lengths = {b - a for _, a, b in sources}
        if len(lengths) > 1:
            raise FtjaxError(f"{where}: the layer_ranges of one slice must have one length, got "
                             + ", ".join(f"[{a}, {b}] ({b - a}) of {e.model}" for e, a, b in sources))
        if slice_base is not None and (own or m.base in ("required", "optional")) and slice_base not in [
                e.model for e, _, _ in sources]:
            which = "its base_model" if own else "base_model"
            raise FtjaxError(f"{where}: {which} {slice_base} is not one of its sources; list it with its layer_range")
        params = _params(sl.get("parameters"), f"{where}: parameters", [*m.globals, *m.per_model], "top", m)
        out.append(Slice(tuple(sources), params, slice_base))
    return tuple(out)


def _distinct(slices: Sequence[Slice]) -> list[ModelEntry]:
    """The models a slices config reads, once each, in order of first use (their settings live in the slices)."""
    return [ModelEntry(m) for m in dict.fromkeys(e.model for sl in slices for e, _, _ in sl.sources)]


def load(path_or_text: str | Path) -> tuple[MergeConfig, dict]:
    """Read a config file (or YAML text: a str with a newline); returns (MergeConfig, the raw mapping). YAML errors
    name their line."""
    import yaml

    path = None if isinstance(path_or_text, str) and "\n" in path_or_text else Path(path_or_text)  # text or a file
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FtjaxError(f"merge config {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise FtjaxError(f"merge config {path}: cannot be read ({e})") from None
    else:
        text = str(path_or_text)
    source = str(path) if path is not None else "config"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise FtjaxError(f"{source}{line}: YAML syntax error: {getattr(e, 'problem', None) or e}") from None
    config = parse(data, source=source)
    return dataclasses.replace(config, text=text), data


# --- parameter values per tensor -----------------------------------------------------------------------------------


def layer_t(name: str, num_layers: int) -> float:
    """The gradient coordinate of tensor `name`: i / (L - 1) for layer i (1 for a one-layer model), 0 outside."""
    m = _LAYER.search(name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(setting: Any, name: str, t: float) -> Any:
    """mergekit's value of a setting for tensor `name` at gradient coordinate t (None: no condition matched)."""
    if not isinstance(setting, list):
        return setting
    if all(isinstance(v, dict) for v in setting):
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or f in name:
                return evaluate(cond["value"], name, t)
        return None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting[int(t * (len(setting) - 1))]


def value(config: MergeConfig, key: str, name: str, t: float, model: ModelEntry | None = None) -> Any:
    """The value of parameter `key` for tensor `name` (and `model`, for per-model parameters): the model's own setting,
    else its slice's, else the module's, else the top-level one, else the method's default; FtjaxError when a
    required one is missing."""
    m = config.method
    for settings in ([model.parameters] if model is not None else []) + [config.slice_parameters,
                                                                         config.module_parameters, config.parameters]:
        if key in settings:
            v = evaluate(settings[key], name, t)
            if v is not None:
                return v
    default = m.per_model.get(key, m.globals.get(key))
    if default is REQUIRED:
        who = f" for {model.model}" if model is not None else ""
        raise FtjaxError(f"missing required parameter {key}{who} (tensor {name}); set {key} under "
                         + ("the model's parameters" if model is not None else "the top-level parameters"))
    return default
