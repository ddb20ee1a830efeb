"""Planning. The input checks every plan shares, transfer/diff/apply and merge alike: a base plus N models, each with
an optional delta base (`check_keysets`, `check_tensor`, `compare_configs`: key sets, shapes, dtypes, tying and
vocabulary rows, every mismatch collected into one FtjaxError naming the input and the tensor). On them, the
transfer's plan (`plan`: base T + alpha * (model F - its delta base S), diff F - B, apply T + alpha * D) decides per
output tensor what happens to it (`TensorPlan`); the vocab / tied-embedding / non-float policies are documented in
`ftjax.transfer`'s module docstring and applied here, for the streaming commands and the in-memory
`transfer_params` alike (the merge's plan is `ftjax.merge.plan`). `Report` records what any command did."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Literal, TypedDict

import ml_dtypes
import numpy as np

from ftjax import dtypes
from ftjax.errors import FtjaxError, finite, first_few
from ftjax.io.checkpoint import HFCheckpoint
from ftjax.io.safetensors import TensorInfo
from ftjax.layout import EMBED, LM_HEAD, Layout, is_vocab
ERROR_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "head_dim", "hidden_act", "attention_bias", "mlp_bias")
WARN_KEYS = ("rope_scaling", "rope_parameters", "rope_theta", "max_position_embeddings", "rms_norm_eps",
             "sliding_window", "bos_token_id", "eos_token_id", "pad_token_id")
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


class VocabRows(TypedDict):
    """Rows of one vocabulary tensor whose source has more rows than the bases."""

    bases: int
    source_ft: int
    out: int


class VocabReport(TypedDict, total=False):
    """The vocabulary part of a report: transfer/apply's policy and grown tensors, or diff's base rows."""

    policy: str
    tensors: dict[str, VocabRows]
    base_rows: dict[str, int]  # diff: rows of the base of each tensor ft has more rows of


Kind = Literal["transfer", "diff", "apply", "transfer_params", "fit_alpha", "merge"]  # the command a report is of


@dataclasses.dataclass
class Report:
    """What a transfer/diff/apply/merge did (or would do, for dry_run); bytes in bytes, seconds in seconds.
    `to_dict()` is the CLI's --json."""

    kind: Kind
    out: str | None
    inputs: dict[str, str]
    tensors: int = 0
    transferred: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    skipped: list[str] = dataclasses.field(default_factory=list)
    copied_non_float: list[str] = dataclasses.field(default_factory=list)
    alphas: dict[str, float] = dataclasses.field(default_factory=dict)  # tensors whose alpha is not the default
    vocab: VocabReport = dataclasses.field(default_factory=VocabReport)
    warnings: list[str] = dataclasses.field(default_factory=list)
    nonfinite: list[str] = dataclasses.field(default_factory=list)
    matched: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # "--skip REGEX" -> target tensor names
    dry_run: bool = False

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_read + self.bytes_written) / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "gb_per_s": round(self.gb_per_s, 3)}

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        lines = [f"ftjax {self.kind}: {verb} {self.tensors} tensors ({self.transferred} transferred, "
                 f"{len(self.skipped)} skipped, {len(self.copied_non_float)} non-float copied) to {self.out}"]
        if not self.dry_run:
            lines.append(f"  {self.bytes_read / 1e9:.2f} GB read, {self.bytes_written / 1e9:.2f} GB written in "
                         f"{self.seconds:.1f} s ({self.gb_per_s:.2f} GB/s)")
        if self.vocab:
            lines.append(f"  vocab: {self.vocab}")
        for rule, names in self.matched.items():
            lines.append(f"  {rule} matched {len(names)} tensor(s)" + (f": {', '.join(names)}" if self.dry_run else ""))
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.nonfinite:
            lines.append(f"  NaN/Inf in {len(self.nonfinite)} output tensors: {', '.join(self.nonfinite[:8])}")
        return "\n".join(lines)


TransferReport = Report  # the name before merges shared it


def fail(problems: list[str], what: str, *, following: int = 0) -> None:
    """One-line FtjaxError: `what`, the first few problems and how many more; `following`: mismatches left out
    because they follow from these (the tensors of a different architecture)."""
    if problems:
        rest = f" (and {following} tensor mismatch(es) that follow from them)" if following else ""
        raise FtjaxError(f"{what}: {first_few(problems)}{rest}")


def config_differences(cfgs: dict[str, dict], keys: Sequence[str]) -> list[str]:
    """One entry per key of `keys` whose value is not the same in every config: "key: label value, label value"."""
    out = []
    for key in keys:
        values = [(label, c.get(key)) for label, c in cfgs.items()]
        if any(v != values[0][1] for _, v in values):
            out.append(f"{key} " + ", ".join(f"{label} {v!r}" for label, v in values))
    return out


def compare_configs(cfgs: dict[str, dict], warnings: list[str]) -> list[str]:
    """Family and shape-defining keys must agree (errors); keys that may differ on purpose -> warnings."""
    warnings += [f"config {d}" for d in config_differences(cfgs, WARN_KEYS)]
    return config_differences(cfgs, ("model_type", "architectures", *ERROR_KEYS))


def _names(names: set[str], shown: int = 3) -> str:
    first = sorted(names)
    return ", ".join(first[:shown]) + (", ..." if len(first) > shown else "")


def alpha_rules(alpha_for: Sequence[tuple[str, float]], skip: Sequence[str]) -> tuple[list, list]:
    """The compiled (regex, alpha) rules and skip regexes; FtjaxError for a bad regex or a non-finite alpha."""
    alphas = [finite(f"the alpha of --alpha-for {p!r}", a) for p, a in alpha_for]
    try:
        return [(re.compile(p), a) for (p, _), a in zip(alpha_for, alphas)], [re.compile(p) for p in skip]
    except re.error as e:
        raise FtjaxError(f"bad regular expression {e.pattern!r} in --alpha-for/--skip: {e}") from None


def rule_matches(names: Sequence[str], alpha_for: Sequence[tuple[str, float]], skip: Sequence[str]) -> dict:
    """{"--alpha-for REGEX" / "--skip REGEX": the names it re.search-matches}; FtjaxError naming every pattern that
    matches no name (a typo would otherwise silently leave alpha or the tensor as it is)."""
    matched = {f"--alpha-for {p}": [n for n in names if re.search(p, n)] for p, _ in alpha_for}
    matched |= {f"--skip {p}": [n for n in names if re.search(p, n)] for p in skip}
    unmatched = [rule for rule, found in matched.items() if not found]
    if unmatched:
        raise FtjaxError(f"{'; '.join(repr(r) for r in unmatched)}: matches no tensor of the target (patterns are "
                         f"regexes searched in names like {names[len(names) // 2] if names else '?'!r}); fix or "
                         "drop the pattern")
    return matched


def out_dtype(dtype: str, t_dtype: np.dtype) -> np.dtype:
    if dtype == "auto":
        return np.dtype(t_dtype)
    if dtype not in DTYPES:
        raise FtjaxError(f"unsupported output dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# --- checking the inputs of any plan: a base plus N models, each with an optional delta base -------------------


@dataclasses.dataclass(frozen=True)
class Checked:
    """One output tensor whose inputs passed `check_tensor`: the tensor it reads in each input key (in the order
    asked; only the output layout's own tensor when that is integer/bool) and their shapes (rows x ...)."""

    name: str
    refs: tuple[tuple[str, str], ...]  # (input key, that input's tensor name)
    shapes: Mapping[str, tuple[int, ...]]  # input key -> shape, the output layout's key included
    stored: np.dtype  # the output layout's dtype of the tensor

    @property
    def is_float(self) -> bool:
        return dtypes.is_float(self.stored)

    @property
    def rows(self) -> int:
        """Rows every input has (a 0-d tensor is one row)."""
        return min(s[0] if s else 1 for s in self.shapes.values())


Resolve = Callable[[str, str], str]  # (input key, output tensor name) -> that input's tensor name


def check_keysets(layouts: Mapping[str, Layout], labels: Mapping[str, str], out: str,
                  warnings: list[str]) -> list[str]:
    """Key sets and tying of every input against the output layout `out` (the base, or the model the output follows):
    a problem per input with tensors the output lacks (lm_head aside: tying decides it; a tensor an input lacks is
    `check_tensor`'s problem), and warnings when the inputs tie their embeddings differently (the output follows
    `out`)."""
    own = set(layouts[out].names) | {LM_HEAD}
    problems = [f"{len(extra)} tensor(s) in {labels[k]} not in {labels[out]}: {_names(extra)}"
                for k, m in layouts.items() if (extra := set(m.names) - own)]
    if len({m.tied for m in layouts.values()}) > 1:
        ties = ", ".join(f"{labels[k]} {'tied' if m.tied else 'untied'}" for k, m in layouts.items())
        warnings.append(f"embedding tying differs ({ties}); output follows {labels[out]}")
        untied = [labels[k] for k, m in layouts.items() if not m.tied]
        if layouts[out].tied:
            warnings.append(f"{labels[out]} ties embeddings: the separate lm_head of {', '.join(untied)} is not used")
    return problems


def check_tensor(name: str, out: str, keys: Sequence[str], layouts: Mapping[str, Layout], labels: Mapping[str, str],
                 problems: list[str], *, source: Resolve | None = None, vocab_keys: Collection[str] = (),
                 hint: str = "") -> Checked | None:
    """Check output tensor `name` (of layout `out`) in the inputs `keys`: present, float and computable where the
    output's is float, and of the output's shape, except that the inputs of `vocab_keys` may have another number
    of rows of a vocabulary tensor. None (with the problems, naming tensor and input, in `problems`) when not.
    source(key, name): the tensor of input `key` it reads (default: the same name, an untied head reading a tied
    model's embedding). hint: appended to the unsupported-dtype problem (what the user can do)."""
    source = source or (lambda key, n: layouts[out].source_of(n, layouts[key]))
    own = source(out, name)
    if own not in layouts[out].shapes:
        problems.append(f"{own}: missing from {labels[out]}")
        return None
    stored, shape = layouts[out].dtypes[own], layouts[out].shapes[own]
    if not dtypes.is_float(stored):  # integer / bool buffers: the output layout's, verbatim
        return Checked(name, ((out, own),), {out: shape}, stored)
    refs = []
    for key in keys:
        if (src := source(key, name)) not in layouts[key].shapes:
            problems.append(f"{name}: missing from {labels[key]}")
            return None
        refs.append((key, src))
    found = len(problems)
    for key, src in dict([(out, own), *refs]).items():
        dt = layouts[key].dtypes[src]
        if not dtypes.is_float(dt):
            problems.append(f"{name}: dtype {dt} in {labels[key]}, float {stored} in {labels[out]}")
        elif not dtypes.is_computable(dt):
            problems.append(f"{name}: {dt} in {labels[key]}; ftjax computes on bfloat16, float16 and float32 "
                            f"tensors{hint}")
    shapes = {out: shape} | {key: layouts[key].shapes[src] for key, src in refs}
    if any(s != shape and not (key in vocab_keys and is_vocab(name) and s[1:] == shape[1:])
           for key, s in shapes.items()):
        problems.append(f"{name}: shapes differ: " + ", ".join(f"{list(s)} in {labels[k]}" for k, s in shapes.items()))
    return None if len(problems) > found else Checked(name, tuple(refs), shapes, stored)


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """What happens to one output tensor: `kernel` (target + alpha * delta over `rows` rows; rows beyond are copied
    from the source: vocab padding), `copy` (integer/bool: the target's) or `skip` (--skip: the target's)."""

    name: str
    out: TensorInfo
    action: str
    source: str | None = None  # the tensor read from source-ft (or the diff)
    base: str | None = None  # the tensor read from source-base (None for apply)
    rows: int = 0
    alpha: float = 1.0


VOCAB_POLICIES = ("pad", "truncate", "error")


def plan(target: Layout, src: Layout, base: Layout | None, *, alpha: float, alpha_for: Sequence[tuple[str, float]],
         skip: Sequence[str], vocab: str, dtype: str, report: Report, labels: dict[str, str] | None = None,
         base_rows: dict[str, int] | None = None, configs: dict[str, dict] | None = None) -> list[TensorPlan]:
    """Plan every output tensor, in the target's order, as a plan of a base plus one model with a delta base
    (`check_keysets` / `check_tensor`, every mismatch and, given the config.json dicts, `compare_configs` in one
    FtjaxError): transfer = base `target` + alpha * (model `src` - its delta base `base`); diff: `base` is `target`
    (no base of its own: src - base); apply: `base` None, `src` a diff (`base_rows`: its base vocabulary rows).

    Only `src` may have more vocabulary rows than the bases (the vocab policy). labels: how messages name the three
    roles (default target / source-ft / source-base)."""
    if vocab not in VOCAB_POLICIES:
        raise FtjaxError(f"unknown vocab policy {vocab!r}; use pad, truncate or error")
    alpha = finite("--alpha", alpha)
    rules, skips = alpha_rules(alpha_for, skip)
    report.matched = rule_matches(target.names, alpha_for, skip)
    label = {"target": "target", "source": "source-ft" if base else "diff", "base": "source-base", **(labels or {})}
    layouts = {"target": target, "source": src} | ({"base": base} if base is not None and base is not target else {})
    names = {k: f"the {label[k]}" for k in layouts}
    architecture = compare_configs(configs, report.warnings) if configs else []
    problems = check_keysets(layouts, names, "target", report.warnings)
    plans: list[TensorPlan] = []
    vocab_rows: dict[str, VocabRows] = {}
    for name in target.names:
        out = TensorInfo(name, out_dtype(dtype, target.dtypes[name]), target.shapes[name])
        if any(r.search(name) for r in skips):
            report.skipped.append(name)
            plans.append(TensorPlan(name, out, "skip"))
            continue
        c = check_tensor(name, "target", list(layouts)[1:], layouts, names, problems, vocab_keys=("source",),
                         hint=" (skip the tensor with --skip, or use an unquantized model)")
        if c is None:
            continue
        if not c.is_float:
            report.copied_non_float.append(name)
            plans.append(TensorPlan(name, TensorInfo(name, c.stored, out.shape), "copy"))  # keeps its dtype
            continue
        t_shape, s_name = out.shape, dict(c.refs)["source"]
        s_shape, rows = c.shapes["source"], c.shapes["target"][0] if t_shape else 1
        if base is None and t_shape and (b_rows := (base_rows or {}).get(s_name, s_shape[0])) != rows:
            problems.append(f"{name}: shapes differ: {list(t_shape)} in the {label['target']}, "
                            f"{[b_rows, *s_shape[1:]]} in the {label['base']}")  # the diff's base
            continue
        if s_shape != t_shape:  # vocabulary rows (check_tensor refused any other difference)
            if s_shape[0] < rows:
                problems.append(f"{name}: {label['source']} vocabulary ({s_shape[0]} rows) is smaller than the "
                                f"bases' ({rows}); transfer needs a source vocabulary at least as large")
                continue
            if vocab == "error":
                problems.append(f"{name}: {label['source']} has {s_shape[0]} rows, the bases {rows} (--vocab error); "
                                "use --vocab pad or truncate")
                continue
            if vocab == "pad":
                out = TensorInfo(name, out.dtype, s_shape)
            vocab_rows[name] = VocabRows(bases=rows, source_ft=s_shape[0], out=out.shape[0])
        a = next((a for r, a in rules if r.search(name)), float(alpha))
        if a != float(alpha):
            report.alphas[name] = a
        b_name = target.source_of(name, base) if base is not None else None
        plans.append(TensorPlan(name, out, "kernel", s_name, b_name, rows, a))
    fail(architecture, "architectures differ (config.json)", following=len(problems))
    fail(problems, "inputs do not match")
    if vocab_rows:
        report.vocab = VocabReport(policy=vocab, tensors=vocab_rows)
    report.tensors, report.transferred = len(plans), sum(p.action == "kernel" for p in plans)
    return plans


def out_config(cfg: dict, target: Layout, outs: Sequence[TensorInfo]) -> dict:
    """The output's config.json: `cfg` with the vocab size, tying and dtype of what is written."""
    cfg = json.loads(json.dumps(cfg))
    sizes = {o.name: o.shape[0] for o in outs if o.name in (EMBED, LM_HEAD)}
    if sizes:
        cfg["vocab_size"] = max(sizes.values())
    cfg["tie_word_embeddings"] = target.tied
    dts = {str(o.dtype) for o in outs if dtypes.is_float(o.dtype)}
    if len(dts) == 1:
        cfg["dtype"] = next(iter(dts))
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
    return cfg


# --- inputs that look swapped ---------------------------------------------------------------------------------

_FINETUNE_WORDS = re.compile(r"(instruct|chat|[-_]it\b|sft|dpo|rlhf|grpo|orpo|tulu|hermes|zephyr|vicuna)", re.I)


def _looks_finetuned(ck: HFCheckpoint) -> bool:
    return bool(_FINETUNE_WORDS.search(ck.path.name)) or "chat_template" in _tokenizer_config(ck)


def _tokenizer_config(ck: HFCheckpoint) -> dict:
    try:
        return json.loads((ck.path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def swapped_base_warnings(base: HFCheckpoint, ft: HFCheckpoint, base_flag: str, ft_flag: str) -> list[str]:
    """A warning when `base` looks fine-tuned and `ft` does not (its directory name says instruct/chat/sft/...,
    or only it has a chat template): `diff --base FT --ft BASE` is an easy mistake with no error."""
    if _looks_finetuned(base) and not _looks_finetuned(ft):
        return [f"{base_flag} {base.path.name} looks fine-tuned and {ft_flag} {ft.path.name} does not (name or chat "
                f"template): are {base_flag} and {ft_flag} swapped? The diff is {ft_flag} minus {base_flag}"]
    return []


def sampled_distances(models: dict[str, HFCheckpoint], names: Sequence[str], rows: int = 32,
                      tensors: int = 4) -> dict[tuple[str, str], float]:
    """L2 distances between every pair of `models` on a sample: `rows` evenly spaced rows of up to `tensors` 2-D
    float tensors spread over `names` (a few MB read, so a plan can sanity-check its inputs before streaming)."""
    picks = [n for n in names if not is_vocab(n) and len(models[next(iter(models))].info(n).shape) == 2]
    picks = [picks[round(i * (len(picks) - 1) / max(tensors - 1, 1))] for i in range(min(tensors, len(picks)))]
    sq: dict[tuple[str, str], float] = {}
    for name in dict.fromkeys(picks):
        infos = {k: m.info(name) for k, m in models.items()}
        if len({i.shape for i in infos.values()}) > 1 or not all(dtypes.is_float(i.dtype) for i in infos.values()):
            continue
        idx = np.linspace(0, infos[next(iter(infos))].shape[0] - 1, rows).round().astype(int)
        x = {k: np.asarray(m.get(name)[np.unique(idx)], np.float64) for k, m in models.items()}
        keys = list(x)
        for a_i, a in enumerate(keys):
            for b in keys[a_i + 1:]:
                sq[(a, b)] = sq.get((a, b), 0.0) + float(np.sum((x[a] - x[b]) ** 2))
    return {pair: float(np.sqrt(v)) for pair, v in sq.items()}


def transfer_warnings(base: HFCheckpoint, ft: HFCheckpoint, target: HFCheckpoint, names: Sequence[str]) -> list[str]:
    """Warnings for transfer inputs that look swapped or wrong, from names, chat templates and sampled distances:
    source-ft much closer to the target base than to its own base (‖F − T‖ < ‖F − S‖ / 2) means that S is the odd
    one out: --source-base swapped with --target-base, or with --source-ft (then T is close to the real base). The
    distances cannot tell these apart; when S looks fine-tuned and F does not (name or chat template), the source
    pair is the one named. F equal to S gives a zero diff."""
    out = swapped_base_warnings(base, ft, "--source-base", "--source-ft")
    source_pair_swapped = bool(out)
    d = sampled_distances({"S": base, "F": ft, "T": target}, names)
    fs, ft_, ts = d.get(("S", "F")), d.get(("F", "T")), d.get(("S", "T"))
    if fs is not None and ft_ is not None:
        if fs == 0:
            out.append("source-ft equals source-base on a sample of tensors: the diff is (nearly) zero; is "
                       "--source-ft the fine-tuned model?")
        elif ft_ < fs / 2 and ts:
            suspect = ("are --source-base and --source-ft swapped?" if source_pair_swapped else
                       "is --source-base swapped with --target-base, or with --source-ft?")
            out.append(f"source-ft is closer to the target base than to the source base on a sample of tensors "
                       f"(‖F − T‖ = {ft_:.4g}, ‖F − S‖ = {fs:.4g}): {suspect}")
    return out
