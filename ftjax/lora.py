"""LoRA adapters (PEFT's format) as diffs: read and check an adapter, its delta per module, and the streaming
command that adds it to a base (`transfer_lora`: `ftjax transfer --source-lora`, `ftjax apply --diff ADAPTER`).

What an adapter means is PEFT's (peft 0.21, `tuners/lora`), for the modules the four families have (nn.Linear,
nn.Embedding):
- a linear module's weight [out, in] changes by `scaling * B @ A` (A: `lora_A.weight` [r, in], B: `lora_B.weight`
  [out, r]); an embedding's [V, d] by `scaling * (B @ A).T` (A: `lora_embedding_A` [r, V], B: `lora_embedding_B`
  [d, r]);
- scaling = alpha / r, or alpha / sqrt(r) with `use_rslora`; r and alpha per module from `rank_pattern` /
  `alpha_pattern` (the first key K with `re.match(rf"(.*\\.)?({K})$", module)` wins), else `r` / `lora_alpha`;
- `fan_in_fan_out` is ignored for nn.Linear (PEFT resets it with a warning; only GPT-2's Conv1D uses it);
- whole tensors: `modules_to_save` (e.g. lm_head.weight), trained biases (`bias: all | lora_only`) and an
  embedding's `base_layer.weight` are saved whole and replace the base's.

The delta is computed in float64 from the adapter's A and B, block of rows by block of rows (bounded memory) and
given to the kernel as two float32 words (hi + lo), so `T + alpha * delta` is rounded once, like the transfer. With
whole tensors W and a source base S the output is `T + alpha * ((W - S) + delta)`: the change of the fine-tune;
`apply` takes the target as the adapter's base (S = T), which with alpha = 1 is PEFT's merge (W + delta).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ftjax.engine import plan as P
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, HFCheckpoint, _read_json, check_output, resolve_model_path
from ftjax.io.safetensors import SafetensorsFile, TensorInfo
from ftjax.layout import LM_HEAD, Layout
from ftjax.merge.kernels import dd_add
from ftjax.engine.outputs import Finish, Output, provenance, write_checkpoint
from ftjax.engine.streaming import ZEROS, Job, Kernel, Source
from ftjax.transfer import _OWN_FILES, PROVENANCE
from ftjax.treeops import axpy_exact, diff_exact

ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
# adapter_config.json keys that change what PEFT computes into something ftjax does not implement: refused when set
REFUSED = {"use_dora": "DoRA (use_dora)", "lora_bias": "a bias on lora_B (lora_bias)",
           "target_parameters": "LoRA on nn.Parameters (target_parameters)",
           "trainable_token_indices": "trainable tokens (trainable_token_indices)", "use_qalora": "QA-LoRA",
           "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)", "arrow_config": "Arrow routing",
           "layer_replication": "layer replication", "megatron_config": "Megatron-parallel layers",
           "use_bdlora": "BD-LoRA", "kasa_config": "KaSA", "velora_config": "VeLoRA",
           "monteclora_config": "MonteCLoRA", "loftq_config": "LoftQ (a quantized base)"}
# keys whose values do not change the arithmetic (the saved tensors already say which modules are adapted)
KNOWN = {"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "bias",
         "modules_to_save", "init_lora_weights", "base_model_name_or_path", "revision", "task_type", "inference_mode",
         "auto_mapping", "peft_version", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
         "layers_pattern", "megatron_core", "qalora_group_size", "eva_config", "corda_config", "lora_ga_config",
         "ensure_weight_tying", *REFUSED}
# files of an adapter directory that describe its tokenizer (written by trainers beside the adapter)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "tokenizer.model")
# init_lora_weights values whose adapters expect a modified base (residual of an SVD, quantized, ...)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclasses.dataclass(frozen=True)
class Module:
    """One adapted module: `tensor` (the checkpoint's weight name) changes by scaling * B @ A (`embedding`:
    its transpose), A and B being tensors `a`, `b` of the adapter file."""

    tensor: str
    a: str
    b: str
    rank: int
    scaling: float
    embedding: bool


@dataclasses.dataclass
class Adapter:
    """A PEFT LoRA adapter directory, checked: modules by target tensor name, whole tensors, warnings."""

    path: Path
    config: dict
    file: SafetensorsFile
    modules: dict[str, Module]
    whole: dict[str, str]  # checkpoint tensor name -> adapter tensor name
    warnings: list[str]

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    def delta_shape(self, m: Module) -> tuple[int, int]:
        a, b = self.file.info(m.a).shape, self.file.info(m.b).shape
        return (a[1], b[0]) if m.embedding else (b[0], a[1])

    def delta_rows(self, m: Module, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of the module's delta, float64 (exact products of the adapter's values, float64 sums)."""
        a, b = self.file.get(m.a).astype(np.float64), self.file.get(m.b).astype(np.float64)
        block = a[:, r0:r1].T @ b.T if m.embedding else b[r0:r1] @ a
        return block * m.scaling

    def delta(self, m: Module) -> np.ndarray:
        """The module's whole delta, float64 [out, in] (or [V, d] for an embedding)."""
        return self.delta_rows(m, 0, self.delta_shape(m)[0])


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's get_pattern_key: first match in the dict's order
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(cfg: Any, path: Path) -> list[str]:
    where = path / ADAPTER_CONFIG
    if not isinstance(cfg, dict):
        raise FtjaxError(f"{where}: must be a JSON object")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise FtjaxError(f"{where}: peft_type is {kind!r}; ftjax reads LoRA adapters (peft_type LORA) only")
    for key, what in REFUSED.items():
        if cfg.get(key):
            raise FtjaxError(f"{where}: {what} is not supported (ftjax applies plain LoRA only); "
                             f"merge it with PEFT instead (PeftModel.merge_and_unload)")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise FtjaxError(f"{where}: init_lora_weights={init!r} trains against a modified base, not the published "
                         "one; convert the adapter with PEFT's path_initial_model_for_weight_conversion first")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise FtjaxError(f"{where}: bias must be none, all or lora_only, got {cfg.get('bias')!r}")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise FtjaxError(f"{where}: {key} must be a positive number, got {cfg.get(key)!r}")
    warnings = [f"{ADAPTER_CONFIG}: unknown key {k!r} ignored (as PEFT does)" for k, v in cfg.items()
                if k not in KNOWN and v not in (None, False, {}, [], "")]
    if cfg.get("fan_in_fan_out"):
        warnings.append("fan_in_fan_out ignored: the adapted modules are nn.Linear (PEFT resets it too)")
    return warnings


def _module(cfg: dict, name: str, a: str, b: str, a_shape: tuple, b_shape: tuple, embedding: bool,
            where: Path) -> Module:
    r = _pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"])
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] != r:
        raise FtjaxError(f"{where}: module {name}: A {tuple(a_shape)} and B {tuple(b_shape)} are not a rank-{r} "
                         "LoRA pair (rank from r / rank_pattern)")
    scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return Module(name + ".weight", a, b, int(r), float(scaling), embedding)


def load_adapter(path_or_repo_id: str | os.PathLike) -> Adapter:
    """Open and check a PEFT LoRA adapter directory (or a cached Hub repo): FtjaxError naming what is wrong."""
    path = resolve_model_path(path_or_repo_id)
    if not (path / ADAPTER_CONFIG).is_file():
        raise FtjaxError(f"{path}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    cfg = _read_json(path / ADAPTER_CONFIG, ADAPTER_CONFIG)
    warnings = _check_config(cfg, path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickle = " (found adapter_model.bin: ftjax never unpickles; convert it once with PEFT: PeftModel."\
                 "from_pretrained(base, ADAPTER).save_pretrained(OUT, safe_serialization=True))" \
            if (path / "adapter_model.bin").is_file() else ""
        raise FtjaxError(f"{path}: no {ADAPTER_WEIGHTS}{pickle}")
    f = SafetensorsFile(weights)
    pairs: dict[tuple[str, bool], dict[str, str]] = {}
    whole: dict[str, str] = {}
    for key in f.names():
        if not key.startswith(PREFIX):
            raise FtjaxError(f"{weights}: tensor {key!r} does not start with {PREFIX!r}; not a PEFT-saved adapter")
        rest = key[len(PREFIX):]
        if ".lora_magnitude_vector" in rest:
            raise FtjaxError(f"{weights}: tensor {key!r} is a DoRA magnitude; DoRA is not supported")
        m = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", rest) or re.fullmatch(r"(.+)\.lora_embedding_(A|B)", rest)
        if m:
            pairs.setdefault((m.group(1), "embedding_" in rest), {})[m.group(2)] = key
        elif re.search(r"\.lora_[A-Za-z_]+", rest):
            raise FtjaxError(f"{weights}: tensor {key!r} is not a plain LoRA weight (lora_A/lora_B); unsupported")
        else:  # modules_to_save, biases, an embedding's base layer
            whole[rest.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = key
    modules = {}
    for (name, embedding), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise FtjaxError(f"{weights}: module {name} has lora_{''.join(ab)} but not its pair")
        mod = _module(cfg, name, ab["A"], ab["B"], f.info(ab["A"]).shape, f.info(ab["B"]).shape, embedding, weights)
        modules[mod.tensor] = mod
    if not modules and not whole:
        raise FtjaxError(f"{weights}: no LoRA weights in the adapter")
    return Adapter(path, cfg, f, modules, whole, warnings)


class DeltaReader:
    """The engine's view of an adapter's deltas: tensor `hi:NAME` / `lo:NAME` is the float32 high / low word of
    module NAME's float64 delta, computed per block of rows (the last block is kept, so hi and lo cost one product)."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self._last: tuple[tuple[str, int, int], np.ndarray] | None = None

    def _split(self, name: str) -> tuple[str, Module]:
        word, _, tensor = name.partition(":")
        return word, self.adapter.modules[tensor]

    def info(self, name: str) -> TensorInfo:
        _, m = self._split(name)
        return TensorInfo(name, np.dtype(np.float32), self.adapter.delta_shape(m))

    def rows(self, name: str, r0: int, r1: int) -> tuple[np.ndarray, int]:
        word, m = self._split(name)
        key = (m.tensor, r0, r1)
        if self._last is None or self._last[0] != key:
            self._last = (key, self.adapter.delta_rows(m, r0, r1))
            f = self.adapter.file
            nbytes = (f.info(m.a).nbytes + f.info(m.b).nbytes) if r0 == 0 else 0  # A and B read once per module
        else:
            nbytes = 0
        d = self._last[1]
        hi = d.astype(np.float32)
        return (hi if word == "hi" else (d - hi.astype(np.float64)).astype(np.float32)), nbytes

    def get(self, name: str) -> np.ndarray:
        return self.rows(name, 0, self.info(name).shape[0])[0]

    def file_of(self, name: str) -> Path:
        return self.adapter.file.path


def _lora_op(t, w, s, d_hi, d_lo, alpha, out_dtype):
    """round(t + alpha * ((w - s) + (d_hi + d_lo))), one rounding: w - s exact in two float32 words, then summed
    with the delta's two words (double-float32, ~2^-46 relative)."""
    hi, lo = dd_add(diff_exact(w, s), (d_hi, d_lo))
    return axpy_exact(t, hi, lo, alpha, out_dtype)


def is_adapter(path_or_repo_id: str | os.PathLike) -> bool:
    """Whether the path (or cached Hub repo) is a PEFT adapter directory (it has adapter_config.json)."""
    try:
        return (resolve_model_path(path_or_repo_id) / ADAPTER_CONFIG).is_file()
    except FtjaxError:
        return False


def _tokenizer_edit(adapter: Adapter) -> Any:
    """Copies the adapter's tokenizer files (trainers save the chat template they trained with) over the target's."""
    files = [adapter.path / n for n in TOKENIZER_FILES if (adapter.path / n).is_file()]
    if not files:
        return None

    def edit(tmp: Path) -> None:
        for f in files:
            (tmp / f.name).write_bytes(f.read_bytes())

    return edit


def _source_base(adapter: Adapter, source_base: str | os.PathLike | None, warnings: list[str]) -> HFCheckpoint | None:
    """The adapter's base, needed only for its whole tensors: --source-base, else base_model_name_or_path when it
    is a local dir or cached; without one, whole tensors are taken as they are (warned)."""
    if source_base is not None:
        return HFCheckpoint(source_base)
    if not adapter.whole:
        return None
    if adapter.base:
        try:
            return HFCheckpoint(adapter.base)
        except FtjaxError:
            pass
    warnings.append(f"no source base (base_model_name_or_path {adapter.base!r} not found; give --source-base): the "
                    f"adapter's whole tensors ({', '.join(sorted(adapter.whole)[:4])}) replace the target's instead of "
                    "adding their change")
    return None


def transfer_lora(adapter: str | os.PathLike, target_base: str | os.PathLike, out: str | os.PathLike, *,
                  source_base: str | os.PathLike | None = None, alpha: float = 1.0,
                  alpha_for: Sequence[tuple[str, float]] = (), skip: Sequence[str] = (), dtype: str = "auto",
                  tokenizer_from: str = "source-ft", target_is_base: bool = False, overwrite: bool = False, dry_run: bool = False, strict: bool = False,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> P.Report:
    """Write target_base + alpha * (the adapter's change) as a HF checkpoint at `out` (streaming, atomic).

    The change of a LoRA module is its delta; of a whole tensor W, W - source_base's (see the module docstring).
    `target_is_base` (`ftjax apply`): the target is the adapter's own base (S = T; alpha = 1 gives PEFT's merge).
    alpha_for: (regex, alpha) pairs, first re.search match wins; skip: regexes of tensors kept from the target;
    tokenizer_from: source-ft (the adapter's tokenizer files where it has them, else the target's) | target."""
    t0 = time.perf_counter()
    if tokenizer_from not in ("source-ft", "target"):
        raise FtjaxError(f"tokenizer_from must be 'source-ft' or 'target', got {tokenizer_from!r}")
    ad, t = load_adapter(adapter), HFCheckpoint(target_base)
    report = P.Report("apply" if target_is_base else "transfer", str(out),
                              {"adapter": str(ad.path), "target_base": str(t.path)}, dry_run=dry_run)
    report.warnings += ad.warnings
    s = t if target_is_base else _source_base(ad, source_base, report.warnings)
    if s is not None and not target_is_base:
        report.inputs["source_base"] = str(s.path)
    out = check_output(out, overwrite=overwrite, inputs=[ad.path, t.path] + ([s.path] if s is not None else []))
    lt = Layout.of_checkpoint(t)
    alphas, skips = P.alpha_rules(alpha_for, skip)
    problems = _problems(ad, lt, s)
    P.fail(problems, f"adapter {ad.path} does not fit target {t.path}")
    deltas, jobs = DeltaReader(ad), []
    for name in lt.names:
        info = TensorInfo(name, P.out_dtype(dtype, lt.dtypes[name]), lt.shapes[name])
        touched = name in ad.modules or name in ad.whole
        kept = ([] if not touched else report.copied_non_float if not lt.is_float(name) else
                report.skipped if any(r.search(name) for r in skips) else None)
        if kept is not None:
            kept.append(name)
            jobs.append(Job(info, (Source(t, name),)))
            continue
        a = next((a for r, a in alphas if r.search(name)), float(alpha))
        if a != alpha:
            report.alphas[name] = a
        w = ad.whole.get(name)
        base, whole, sub = ((Source(t, name), Source(ad.file, w), Source(s, name)) if w and s is not None else
                            (Source(ad.file, w), ZEROS, ZEROS) if w else (Source(t, name), ZEROS, ZEROS))
        hi, lo = (Source(deltas, f"hi:{name}"), Source(deltas, f"lo:{name}")) if name in ad.modules else (ZEROS, ZEROS)
        jobs.append(Job(info, (base, whole, sub, hi, lo), Kernel(_lora_op, (a, info.dtype)), rows=info.shape[0]))
        report.transferred += 1
    report.tensors = len(jobs)
    cfg = P.out_config(t.config, lt, [j.out for j in jobs])
    if dry_run:
        return report
    record = provenance(report.kind, report.inputs, cfg, alpha=float(alpha),
                        alpha_for=[[p, float(a)] for p, a in alpha_for], skip=list(skip), dtype=dtype,
                        tokenizer_from=tokenizer_from, adapter={k: ad.config.get(k) for k in ("r", "lora_alpha", "use_rslora", "rank_pattern",
                                                               "alpha_pattern", "modules_to_save", "bias",
                                                               "base_model_name_or_path")},
                        formula="target + alpha * (scaling * B @ A [+ (whole - source_base)]), exact, one rounding")
    write_checkpoint(Output(out, (ad.path, t.path) + ((s.path,) if s is not None else ()), overwrite,
                            max_shard_bytes, progress, strict), jobs, report,
                     Finish(cfg, t.path, PROVENANCE, record, _OWN_FILES,
                            _tokenizer_edit(ad) if tokenizer_from == "source-ft" else None), t0=t0)
    return report


def _problems(ad: Adapter, lt: Layout, s: HFCheckpoint | None) -> list[str]:
    """Every way the adapter (and its source base) does not fit the target's tensors."""
    out = []
    for name, m in ad.modules.items():
        mod = name.removesuffix(".weight")
        if name not in lt.shapes:
            out.append(f"module {mod}: the target has no {name}" +
                       (" (its lm_head is tied to the embedding)" if name == LM_HEAD and lt.tied else ""))
        elif ad.delta_shape(m) != lt.shapes[name]:
            out.append(f"module {mod}: the adapter's delta is {ad.delta_shape(m)}, the target's {name} is "
                       f"{lt.shapes[name]}")
    for name, key in ad.whole.items():
        shape = tuple(ad.file.info(key).shape)
        if name not in lt.shapes:
            out.append(f"whole tensor {key}: the target has no {name}")
        elif shape != lt.shapes[name]:
            out.append(f"whole tensor {key} is {shape}, the target's {name} is {lt.shapes[name]}")
        elif s is not None and (name not in s or tuple(s.info(name).shape) != shape):
            out.append(f"whole tensor {key}: the source base {s.path} has no {name} of shape {shape}")
    return out
