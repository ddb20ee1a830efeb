"""Fine-tuning transfer: out = target_base + alpha * (source_ft - source_base), tensor by tensor.

Streaming engine over HF safetensors directories (`transfer`, `diff`, `apply`) and an in-memory version over
loaded pytrees (`transfer_params`). Arithmetic: `treeops` (exact, one rounding; see its docstring).

Pipeline: a reader thread copies bounded row chunks (<= CHUNK_ELEMS elements, so a 128k-row embedding is never
whole in memory) out of the memory-mapped inputs and drops their pages again (RSS does not grow with model size);
the main thread dispatches the jitted kernel on bucket-padded flat chunks (few compiles); a writer thread
materialises results and streams them into the output shards. Queues are short, so memory stays bounded.

Policies (documented once, here):
- vocab: source-ft may have more embed/lm_head rows than the bases (Tulu 3: +8). `pad` (the paper's code): rows
  [0, V) = t + alpha*delta, rows >= V copied verbatim from source-ft (== padding both bases with zero rows);
  `truncate`: keep V rows; `error`: refuse. Fewer rows in source-ft: always an error.
- tied embeddings: a tied model's output embedding *is* embed_tokens. delta_lm = lm(ft) - lm(base) with lm(x) =
  x's lm_head, or its embed_tokens when x is tied. Target tied: the output has no lm_head and the embedding gets
  delta_embed exactly once (an untied source's separate lm_head delta is then dropped, with a warning). Target
  untied: lm_head gets delta_lm (for a tied source: its embedding delta, i.e. the change of its output
  embedding), embed_tokens gets delta_embed. The output follows the target's tying.
- integer/bool tensors: copied from the target, never transferred (listed in the report).
"""

from __future__ import annotations

import ctypes
import functools
import dataclasses
import datetime
import json
import mmap
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import ftjax
from ftjax import treeops
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import HFCheckpoint, HFCheckpointWriter, atomic_output_dir, copy_aux_files, write_json
from ftjax.io.safetensors import SafetensorsFile, SafetensorsWriter, TensorInfo

CHUNK_ELEMS = 1 << 22  # elements per kernel call: 16 MB in float32, 8 MB per bf16 input
MIN_BUCKET = 1 << 12
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
ERROR_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "head_dim", "hidden_act", "attention_bias", "mlp_bias")
WARN_KEYS = ("rope_scaling", "rope_parameters", "rope_theta", "max_position_embeddings", "rms_norm_eps",
             "sliding_window", "bos_token_id", "eos_token_id", "pad_token_id")
PROVENANCE, DIFF_META, DIFF_LO = "ftjax_transfer.json", "ftjax_diff.json", "ftjax_diff_lo.safetensors"
_OWN_FILES = (PROVENANCE, DIFF_META, "config.json")
_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


@dataclasses.dataclass
class TransferReport:
    """What a transfer/diff/apply did (or would do, for dry_run). `to_dict()` is the CLI's --json."""

    kind: str
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
    vocab: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    nonfinite: list[str] = dataclasses.field(default_factory=list)
    dry_run: bool = False

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_read + self.bytes_written) / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
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
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.nonfinite:
            lines.append(f"  NaN/Inf in {len(self.nonfinite)} output tensors: {', '.join(self.nonfinite[:8])}")
        return "\n".join(lines)


@dataclasses.dataclass
class _Job:
    name: str  # output tensor
    out: TensorInfo
    mode: str  # "kernel" | "copy"
    t: str | None = None  # tensor names in target / source(-ft or diff) / source-base
    s: str | None = None
    b: str | None = None
    rows: int = 0  # rows computed by the kernel; rows in [rows, out.shape[0]) are copied from the source
    alpha: float = 1.0


# --- planning -----------------------------------------------------------------------------------------------------


def _tied(ck: HFCheckpoint) -> bool:
    return bool(ck.config.get("tie_word_embeddings", False)) or LM_HEAD not in ck


def _lm(ck: HFCheckpoint) -> str:
    return EMBED if _tied(ck) else LM_HEAD


def _model_names(ck: HFCheckpoint) -> list[str]:
    return [n for n in ck.names() if not (n == LM_HEAD and _tied(ck))]


def _is_vocab(name: str) -> bool:
    return name in (EMBED, LM_HEAD) or name.endswith((".embed_tokens.weight", ".wte.weight"))


def _fail(problems: list[str], what: str) -> None:
    if problems:
        more = f"; ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise FtjaxError(f"{what}: {len(problems)} problem(s): {'; '.join(problems[:12])}{more}")


def _compare_configs(cfgs: dict[str, dict], warnings: list[str]) -> list[str]:
    """Family and shape-defining keys must agree (errors); keys that may differ on purpose -> warnings."""
    problems, (first, c0), *_ = [], *cfgs.items()
    for label, c in list(cfgs.items())[1:]:
        for key in ("model_type", "architectures", *ERROR_KEYS):
            if c0.get(key) != c.get(key):
                problems.append(f"config {key} differs: {first} {c0.get(key)!r} vs {label} {c.get(key)!r}")
        for key in WARN_KEYS:
            if c0.get(key) != c.get(key):
                warnings.append(f"config {key} differs: {first} {c0.get(key)!r} vs {label} {c.get(key)!r}")
    return problems


def _keyset_problems(sets: dict[str, list[str]]) -> list[str]:
    problems, (first, n0), *_ = [], *sets.items()
    for label, names in list(sets.items())[1:]:
        a, b = set(n0), set(names)
        if a - b:
            problems.append(f"{len(a - b)} tensor(s) in {first} missing from {label}: {', '.join(sorted(a - b)[:5])}")
        if b - a:
            problems.append(f"{len(b - a)} tensor(s) in {label} not in {first}: {', '.join(sorted(b - a)[:5])}")
    return problems


def _rules(alpha_for: Sequence[tuple[str, float]], skip: Sequence[str]) -> tuple[list, list]:
    try:
        return [(re.compile(p), float(a)) for p, a in alpha_for], [re.compile(p) for p in skip]
    except re.error as e:
        raise FtjaxError(f"bad regular expression {e.pattern!r} in --alpha-for/--skip: {e}") from None


def _out_dtype(dtype: str, t_dtype: np.dtype) -> np.dtype:
    if dtype == "auto":
        return np.dtype(t_dtype)
    if dtype not in _DTYPES:
        raise FtjaxError(f"unsupported output dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _plan(target: HFCheckpoint, src: HFCheckpoint, base: HFCheckpoint | None, *, alpha, alpha_for, skip, vocab,
          dtype, report: TransferReport, base_rows: dict[str, int] | None = None) -> list[_Job]:
    """Compare the inputs (every mismatch in one FtjaxError) and make one job per output tensor.

    `base` is None for apply (src is a diff dir; `base_rows` gives its base vocabulary rows)."""
    if vocab not in ("pad", "truncate", "error"):
        raise FtjaxError(f"unknown vocab policy {vocab!r}; use pad, truncate or error")
    rules, skips = _rules(alpha_for, skip)
    models = {"target": target, "source-ft" if base else "diff": src} | ({"source-base": base} if base else {})
    problems = _compare_configs({k: m.config for k, m in models.items()}, report.warnings)
    problems += _keyset_problems({k: [n for n in _model_names(m) if n != LM_HEAD] for k, m in models.items()})
    if _tied(target) != _tied(src) or (base and _tied(base) != _tied(src)):
        ties = ", ".join(f"{k} {'tied' if _tied(m) else 'untied'}" for k, m in models.items())
        report.warnings.append(f"embedding tying differs ({ties}); output follows the target")
        if _tied(target) and not _tied(src):
            report.warnings.append("target ties embeddings: the source's separate lm_head delta is not applied")
    jobs: list[_Job] = []
    vocab_rows: dict[str, Any] = {}
    for name in _model_names(target):
        s_name = _lm(src) if name == LM_HEAD else name
        b_name = (_lm(base) if name == LM_HEAD else name) if base else None
        if s_name not in src or (base and b_name not in base):
            continue  # reported as a key-set problem
        ti, si = target.info(name), src.info(s_name)
        bshape = base.info(b_name).shape if base else si.shape[:1] and (base_rows.get(s_name, si.shape[0]),) + si.shape[1:]
        out_dt = _out_dtype(dtype, ti.dtype)
        job = _Job(name, TensorInfo(name, out_dt, ti.shape), "copy", t=name, s=s_name, b=b_name)
        if any(r.search(name) for r in skips):
            report.skipped.append(name)
        elif not treeops.is_float(ti.dtype):
            report.copied_non_float.append(name)
            job.out = ti  # integer/bool buffers keep their dtype
        else:
            for info in (si,) + ((base.info(b_name),) if base else ()):
                if not treeops.is_float(info.dtype):
                    problems.append(f"{name}: dtype {info.dtype} in a source, float {ti.dtype} in the target")
            if ti.shape != tuple(bshape):
                problems.append(f"{name}: shape {list(ti.shape)} in target vs {list(bshape)} in source-base")
                continue
            rows = ti.shape[0] if ti.shape else 0
            if si.shape != ti.shape:
                if not (_is_vocab(name) and si.shape[1:] == ti.shape[1:]):
                    problems.append(f"{name}: shape {list(si.shape)} in source-ft vs {list(ti.shape)} in the bases")
                    continue
                if si.shape[0] < rows:
                    problems.append(f"{name}: source-ft vocabulary ({si.shape[0]} rows) is smaller than the bases' "
                                    f"({rows}); transfer needs a source-ft vocabulary at least as large")
                    continue
                if vocab == "error":
                    problems.append(f"{name}: source-ft has {si.shape[0]} rows, the bases {rows} (--vocab error); "
                                    "use --vocab pad or truncate")
                    continue
                if vocab == "pad":
                    job.out = TensorInfo(name, out_dt, si.shape)
                vocab_rows[name] = {"bases": rows, "source_ft": si.shape[0], "out": job.out.shape[0]}
            job.mode, job.rows = "kernel", rows
            job.alpha = next((a for r, a in rules if r.search(name)), float(alpha))
            if job.alpha != float(alpha):
                report.alphas[name] = job.alpha
        jobs.append(job)
    _fail(problems, "inputs do not match")
    if vocab_rows:
        report.vocab = {"policy": vocab, "tensors": vocab_rows}
    report.tensors, report.transferred = len(jobs), sum(j.mode == "kernel" for j in jobs)
    return jobs


# --- streaming pipeline -------------------------------------------------------------------------------------------

_LIBC = None


def _drop_pages(view: np.ndarray) -> None:
    """Unmap the resident pages of an mmap view (page cache keeps them), so RSS does not grow with model size."""
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL(None)
        start = view.ctypes.data & ~(mmap.PAGESIZE - 1)
        end = view.ctypes.data + view.nbytes
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED
    except Exception:  # not Linux: only an RSS optimisation
        pass


def _read_rows(ck: Any, name: str, r0: int, r1: int, bucket: int | None) -> np.ndarray:
    """Rows [r0, r1) of `name` copied into a fresh (optionally zero-padded flat) buffer."""
    view = ck.get(name) if ck.info(name).shape == () else ck.get_slice(name, (slice(r0, r1),))
    if bucket is None:
        out = np.array(view)
    else:
        out = np.empty(bucket, view.dtype)
        out[: view.size] = view.reshape(-1)
        out[view.size:] = 0
    _drop_pages(view)
    return out


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def _chunks(shape: tuple[int, ...], r0: int, r1: int) -> Iterator[tuple[int, int]]:
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    step = max(1, CHUNK_ELEMS // max(row, 1))
    for a in range(r0, r1, step):
        yield a, min(a + step, r1)


@jax.jit
def _nonfinite(x: jax.Array) -> jax.Array:
    return ~jnp.all(jnp.isfinite(x.astype(jnp.float32)))


def _run(jobs: list[_Job], read: Callable, compute: Callable, write: Callable, report: TransferReport,
         progress: bool) -> None:
    """reader thread -> kernel dispatch (this thread) -> writer thread, with short bounded queues."""
    q_in: queue.Queue = queue.Queue(maxsize=3)
    q_out: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()
    errors: list[BaseException] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(j.out.nbytes for j in jobs), unit="B", unit_scale=True, desc=f"ftjax {report.kind}",
                   leave=False, postfix={"tensors": len(jobs)})

    def put(q, item):
        while not stop.is_set():
            try:
                return q.put(item, timeout=0.05)
            except queue.Full:
                pass

    def get(q):
        while not stop.is_set():
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                pass
        return None

    def reader():
        try:
            for job in jobs:
                for item in read(job):
                    put(q_in, item)
            put(q_in, None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            stop.set()

    def writer():
        try:
            while (item := get(q_out)) is not None:
                job, arr, bad = item
                arr = np.asarray(arr)
                if bad is not None and bool(bad) and job.name not in report.nonfinite:
                    report.nonfinite.append(job.name)
                write(job, arr)
                report.bytes_written += arr.nbytes if arr.ndim == len(job.out.shape) else arr.nbytes // 2
                if bar is not None:
                    bar.update(job.out.dtype.itemsize * (arr.size if arr.ndim == len(job.out.shape) else arr.size // 2))
            done.set()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()

    done = threading.Event()
    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
    for th in threads:
        th.start()
    try:
        while (item := get(q_in)) is not None:
            put(q_out, compute(item))
        if not stop.is_set():
            put(q_out, None)
            threads[1].join()
    except BaseException:
        stop.set()
        raise
    finally:
        stop.set()
        for th in threads:
            th.join()
        if bar is not None:
            bar.close()
    if errors:
        raise errors[0]
    if not done.is_set():
        raise FtjaxError("internal error: the write pipeline stopped early")


class _Lazy:
    """A padded flat jax result (or a stack of two), materialised and unpadded in the writer thread."""

    def __init__(self, x, n, shape):
        self.x, self.n, self.shape = x, n, shape

    def __array__(self, dtype=None, copy=None):
        x = np.asarray(self.x)
        return x[: self.n].reshape(self.shape) if x.ndim == 1 else x[:, : self.n].reshape((2,) + self.shape)


def _stream(jobs: list[_Job], report: TransferReport, progress: bool, *, kernel_inputs: Callable,
            copy_input: Callable, extra_input: Callable, kernel: Callable, write: Callable) -> None:
    """Shared transfer/apply/diff loop. kernel_inputs(job, r0, r1, bucket) -> padded flat arrays;
    copy_input / extra_input(job, r0, r1) -> row blocks copied (cast) into the output."""

    def read(job: _Job):
        shape = job.out.shape
        total = shape[0] if shape else 1
        rows = job.rows if job.mode == "kernel" else total
        for r0, r1 in _chunks(shape, 0, rows):
            rshape = (r1 - r0,) + shape[1:] if shape else ()
            if job.mode == "kernel":
                n = int(np.prod(rshape))
                arrays = kernel_inputs(job, r0, r1, _bucket(n))
                report.bytes_read += sum(a.dtype.itemsize * n for a in arrays)
                yield job, arrays, n, rshape
            else:
                a = copy_input(job, r0, r1)
                report.bytes_read += a.nbytes
                yield job, a, a.size, rshape
        if job.mode == "kernel":
            for r0, r1 in _chunks(shape, rows, total):  # vocab rows beyond the bases: verbatim from source-ft
                a = extra_input(job, r0, r1)
                report.bytes_read += a.nbytes
                yield job, a, a.size, (r1 - r0,) + shape[1:]

    def compute(item):
        job, arrays, n, rshape = item
        if isinstance(arrays, tuple):
            out = kernel(job, *arrays)
            return job, _Lazy(out, n, rshape), _nonfinite(out)
        a = arrays.astype(job.out.dtype) if arrays.dtype != job.out.dtype else arrays
        bad = bool(not np.all(np.isfinite(a.astype(np.float32)))) if treeops.is_float(a.dtype) else None
        return job, a.reshape(rshape), bad

    _run(jobs, read, compute, write, report, progress)


# --- public API ---------------------------------------------------------------------------------------------------


def _check_out(out: str | os.PathLike, overwrite: bool, inputs: Sequence[Path]) -> Path:
    """The checks atomic_output_dir makes, done up front so dry runs and planning fail early."""
    out = Path(os.path.abspath(out))
    real = Path(os.path.realpath(out))
    for inp in inputs:
        r = Path(os.path.realpath(inp))
        if real == r or r in real.parents or real in r.parents:
            raise FtjaxError(f"output {out} is, contains or lies inside input {inp}; choose another output directory")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FtjaxError(f"{out} already exists; pass --overwrite to replace it, or choose another output")
    return out


def _out_config(cfg: dict, target: HFCheckpoint, jobs: list[_Job]) -> dict:
    cfg = json.loads(json.dumps(cfg))
    sizes = {j.name: j.out.shape[0] for j in jobs if j.name in (EMBED, LM_HEAD)}
    if sizes:
        cfg["vocab_size"] = max(sizes.values())
    cfg["tie_word_embeddings"] = _tied(target)
    dts = {str(j.out.dtype) for j in jobs if treeops.is_float(j.out.dtype)}
    if len(dts) == 1:
        cfg["dtype"] = next(iter(dts))
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
    return cfg


def _finish_dir(tmp: Path, cfg: dict, aux_src: Path, meta_name: str, meta: dict) -> None:
    copy_aux_files(aux_src, tmp, skip=(*_OWN_FILES, DIFF_LO))
    write_json(tmp / "config.json", cfg)
    write_json(tmp / meta_name, meta)


def _provenance(kind: str, report: TransferReport, **fields) -> dict:
    return {"ftjax_version": ftjax.__version__, "kind": kind, "inputs": report.inputs,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **fields}


def _finish_report(report: TransferReport, strict: bool, t0: float) -> None:
    report.seconds = time.perf_counter() - t0
    if report.nonfinite and strict:
        raise FtjaxError(f"NaN/Inf in {len(report.nonfinite)} output tensor(s): {', '.join(report.nonfinite[:8])} "
                         "(--strict); nothing was written")


def _copy_reader(ck: Any) -> Callable:
    return lambda job, r0, r1: _read_rows(ck, job.t, r0, r1, None)


def transfer(source_base: str | os.PathLike, source_ft: str | os.PathLike, target_base: str | os.PathLike,
             out: str | os.PathLike, *, alpha: float = 1.0, alpha_for: Sequence[tuple[str, float]] = (),
             skip: Sequence[str] = (), vocab: str = "pad", dtype: str = "auto", config_from: str = "target",
             tokenizer_from: str = "source-ft", overwrite: bool = False, dry_run: bool = False, strict: bool = False,
             max_shard_bytes: int = 5 * 10**9, progress: bool = True) -> TransferReport:
    """Write target_base + alpha * (source_ft - source_base) as a HF checkpoint at `out` (streaming, atomic).

    alpha_for: (regex, alpha) pairs, first re.search match wins; skip: regexes of tensors kept from the target;
    vocab: pad | truncate | error; dtype: auto (the target's) | bfloat16 | float16 | float32;
    config_from: target | source-ft; tokenizer_from: source-ft | target. Exact: see `treeops`."""
    t0 = time.perf_counter()
    b, f, t = HFCheckpoint(source_base), HFCheckpoint(source_ft), HFCheckpoint(target_base)
    roles = {"target": t, "source-ft": f}
    for opt, val in (("config_from", config_from), ("tokenizer_from", tokenizer_from)):
        if val not in roles:
            raise FtjaxError(f"{opt} must be 'target' or 'source-ft', got {val!r}")
    report = TransferReport("transfer", str(out), {"source_base": str(b.path), "source_ft": str(f.path),
                                                   "target_base": str(t.path)}, dry_run=dry_run)
    out = _check_out(out, overwrite, [b.path, f.path, t.path])
    jobs = _plan(t, f, b, alpha=alpha, alpha_for=alpha_for, skip=skip, vocab=vocab, dtype=dtype, report=report)
    cfg = _out_config(roles[config_from].config, t, jobs)
    if dry_run:
        return report

    def kernel_inputs(job, r0, r1, bucket):
        return tuple(_read_rows(ck, name, r0, r1, bucket) for ck, name in ((t, job.t), (f, job.s), (b, job.b)))

    def kernel(job, tc, fc, bc):
        return treeops.transfer_kernel(tc, fc, bc, alpha=job.alpha, out_dtype=job.out.dtype)

    meta = _provenance("transfer", report, alpha=float(alpha), alpha_for=[[p, float(a)] for p, a in alpha_for],
                       skip=list(skip), vocab=vocab, config_from=config_from, tokenizer_from=tokenizer_from,
                       dtype=dtype, out_dtypes=sorted({str(j.out.dtype) for j in jobs}),
                       formula="target_base + alpha * (source_ft - source_base), exact, one rounding")
    with atomic_output_dir(out, overwrite=overwrite, inputs=[b.path, f.path, t.path]) as tmp:
        with HFCheckpointWriter(tmp, [j.out for j in jobs], max_shard_bytes) as w:
            _stream(jobs, report, progress, kernel_inputs=kernel_inputs, copy_input=_copy_reader(t),
                    extra_input=lambda job, r0, r1: _read_rows(f, job.s, r0, r1, None), kernel=kernel,
                    write=lambda job, arr: w.write(job.name, arr))
        _finish_report(report, strict, t0)
        _finish_dir(tmp, cfg, roles[tokenizer_from].path, PROVENANCE, {**meta, "report": report.to_dict()})
    return report


def diff(base: str | os.PathLike, ft: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
         overwrite: bool = False, dry_run: bool = False, max_shard_bytes: int = 5 * 10**9,
         progress: bool = True) -> TransferReport:
    """Write the diff vector ft - base as its own checkpoint dir (+ ft's config/tokenizer, `ftjax_diff.json`).

    float32 (default): the main tensors hold fl32(ft - base); the rare elements where that is inexact keep
    their exact remainder in `ftjax_diff_lo.safetensors` (only tensors with a nonzero remainder), so that
    `apply(target, diff)` is bitwise equal to `transfer`. Other dtypes: one rounding, no remainder (lossy)."""
    t0 = time.perf_counter()
    b, f = HFCheckpoint(base), HFCheckpoint(ft)
    report = TransferReport("diff", str(out), {"base": str(b.path), "ft": str(f.path)}, dry_run=dry_run)
    out = _check_out(out, overwrite, [b.path, f.path])
    out_dt = _out_dtype(dtype, np.float32)
    # Planned as a transfer onto the base itself: same checks, the vocab rows of ft beyond the base padded.
    jobs = _plan(b, f, b, alpha=1.0, alpha_for=(), skip=(), vocab="pad", dtype=dtype, report=report)
    base_rows = {j.s: j.rows for j in jobs if j.mode == "kernel" and j.rows != j.out.shape[0]}
    report.vocab = {"base_rows": base_rows} if base_rows else {}
    if dry_run:
        return report
    exact = out_dt == np.float32
    lo_infos: list[TensorInfo] = []

    def kernel_inputs(job, r0, r1, bucket):
        return _read_rows(f, job.s, r0, r1, bucket), _read_rows(b, job.b, r0, r1, bucket)

    def kernel(job, fc, bc):
        return _diff_stack(fc, bc, out_dtype=jnp.float32 if exact else job.out.dtype)

    lo_state: dict[str, Any] = {"file": None, "start": 0, "nonzero": False}

    def write(job, arr):
        if arr.ndim == len(job.out.shape) + 1:  # stacked (hi, lo) from the kernel
            hi, lo = arr[0].astype(job.out.dtype), arr[1]
        else:
            hi, lo = arr, None
        w.write(job.name, hi)
        if exact and job.mode == "kernel":
            lf = lo_state["file"]
            if lo_state.get("name") != job.name:
                lo_state.update(name=job.name, start=lf.tell(), nonzero=False, rows=0)
            lo = np.zeros(hi.shape, np.float32) if lo is None else lo
            lf.write(np.ascontiguousarray(lo, np.float32).tobytes())
            lo_state["nonzero"] |= bool(np.any(lo != 0))
            lo_state["rows"] += hi.shape[0] if hi.shape else 1
            if lo_state["rows"] == (job.out.shape[0] if job.out.shape else 1):
                if lo_state["nonzero"]:
                    lo_infos.append((TensorInfo(job.name, np.dtype(np.float32), job.out.shape), lo_state["start"]))
                else:
                    lf.seek(lo_state["start"])
                    lf.truncate()

    meta = _provenance("diff", report, base=str(b.path), ft=str(f.path), dtype=str(out_dt), exact=exact,
                       lo_file=DIFF_LO, base_vocab_rows=base_rows, tied=_tied(f),
                       formula="ft - base; exact value = main tensor + lo remainder (float32)")
    with atomic_output_dir(out, overwrite=overwrite, inputs=[b.path, f.path]) as tmp:
        with open(tmp / ".lo.tmp", "w+b") as lf:
            lo_state["file"] = lf
            with HFCheckpointWriter(tmp, [j.out for j in jobs], max_shard_bytes) as w:
                _stream(jobs, report, progress, kernel_inputs=kernel_inputs, copy_input=_copy_reader(f),
                        extra_input=lambda job, r0, r1: _read_rows(f, job.s, r0, r1, None), kernel=kernel,
                        write=write)
            if lo_infos:
                lf.flush()
                mm = np.memmap(tmp / ".lo.tmp", dtype=np.float32, mode="r")
                with SafetensorsWriter(tmp / DIFF_LO, [i for i, _ in lo_infos]) as lw:
                    for info, start in lo_infos:
                        a = mm[start // 4: start // 4 + int(np.prod(info.shape))].reshape(info.shape)
                        for r0, r1 in _chunks(info.shape, 0, info.shape[0] if info.shape else 1):
                            lw.write(info.name, np.array(a[r0:r1]) if info.shape else np.array(a))
                del mm
        (tmp / ".lo.tmp").unlink()
        meta["lo_tensors"] = [i.name for i, _ in lo_infos]
        _finish_report(report, False, t0)
        _finish_dir(tmp, f.config, f.path, DIFF_META, {**meta, "report": report.to_dict()})
    return report


@jax.jit
def _diff_stack_f32(fc, bc):
    return jnp.stack(treeops.diff_exact(fc, bc))


def _diff_stack(fc, bc, *, out_dtype):
    if np.dtype(out_dtype) == np.float32:
        return _diff_stack_f32(fc, bc)
    return _diff_round(fc, bc, out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames="out_dtype")
def _diff_round(fc, bc, *, out_dtype):
    hi, lo = treeops.diff_exact(fc, bc)
    return treeops.round_sum3(jnp.zeros_like(hi), hi, lo, out_dtype)  # one rounding of the exact difference


class _DiffReader:
    """A diff directory as the source of `apply`: main tensors (hi) + optional exact remainders (lo)."""

    def __init__(self, path: str | os.PathLike):
        self.ck = HFCheckpoint(path)
        meta_path = self.ck.path / DIFF_META
        if not meta_path.is_file():
            raise FtjaxError(f"{self.ck.path}: no {DIFF_META}; not a diff written by `ftjax diff`")
        try:
            self.meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise FtjaxError(f"{meta_path}: not valid JSON ({e})") from None
        lo = self.ck.path / DIFF_LO
        self.lo = SafetensorsFile(lo) if lo.is_file() else None

    def lo_rows(self, name: str, r0: int, r1: int, bucket: int) -> np.ndarray:
        if self.lo is not None and name in self.lo:
            return _read_rows(self.lo, name, r0, r1, bucket)
        return np.zeros(bucket, np.float32)


def apply(target: str | os.PathLike, diff: str | os.PathLike, out: str | os.PathLike, *, alpha: float = 1.0,
          alpha_for: Sequence[tuple[str, float]] = (), skip: Sequence[str] = (), vocab: str = "pad",
          dtype: str = "auto", config_from: str = "target", tokenizer_from: str = "source-ft",
          overwrite: bool = False, dry_run: bool = False, strict: bool = False, max_shard_bytes: int = 5 * 10**9,
          progress: bool = True) -> TransferReport:
    """Write target + alpha * diff (a dir from `diff`); with a float32 diff, bitwise equal to `transfer`.
    config_from / tokenizer_from: target | source-ft (the diff dir carries the source-ft's files)."""
    t0 = time.perf_counter()
    t, d = HFCheckpoint(target), _DiffReader(diff)
    roles = {"target": t, "source-ft": d.ck, "diff": d.ck}
    for opt, val in (("config_from", config_from), ("tokenizer_from", tokenizer_from)):
        if val not in roles:
            raise FtjaxError(f"{opt} must be 'target' or 'source-ft', got {val!r}")
    report = TransferReport("apply", str(out), {"target": str(t.path), "diff": str(d.ck.path)}, dry_run=dry_run)
    out = _check_out(out, overwrite, [t.path, d.ck.path])
    jobs = _plan(t, d.ck, None, alpha=alpha, alpha_for=alpha_for, skip=skip, vocab=vocab, dtype=dtype,
                 report=report, base_rows=d.meta.get("base_vocab_rows", {}))
    cfg = _out_config(roles[config_from].config, t, jobs)
    if dry_run:
        return report

    def kernel_inputs(job, r0, r1, bucket):
        return (_read_rows(t, job.t, r0, r1, bucket), _read_rows(d.ck, job.s, r0, r1, bucket),
                d.lo_rows(job.s, r0, r1, bucket))

    def kernel(job, tc, hi, lo):
        return treeops.apply_kernel(tc, hi, lo, alpha=job.alpha, out_dtype=job.out.dtype)

    meta = _provenance("apply", report, alpha=float(alpha), alpha_for=[[p, float(a)] for p, a in alpha_for],
                       skip=list(skip), vocab=vocab, config_from=config_from, tokenizer_from=tokenizer_from,
                       dtype=dtype, diff_of=d.meta.get("inputs"),
                       formula="target + alpha * diff, exact, one rounding")
    with atomic_output_dir(out, overwrite=overwrite, inputs=[t.path, d.ck.path]) as tmp:
        with HFCheckpointWriter(tmp, [j.out for j in jobs], max_shard_bytes) as w:
            _stream(jobs, report, progress, kernel_inputs=kernel_inputs, copy_input=_copy_reader(t),
                    extra_input=lambda job, r0, r1: _read_rows(d.ck, job.s, r0, r1, None), kernel=kernel,
                    write=lambda job, arr: w.write(job.name, arr))
        _finish_report(report, strict, t0)
        _finish_dir(tmp, cfg, roles[tokenizer_from].path, PROVENANCE, {**meta, "report": report.to_dict()})
    return report


# --- in memory ----------------------------------------------------------------------------------------------------


def transfer_params(target: Any, source_ft: Any, source_base: Any, *, alpha: float = 1.0,
                    alpha_for: Sequence[tuple[str, float]] = (), skip: Sequence[str] = (), vocab: str = "pad",
                    donate: bool = False) -> Any:
    """In-memory transfer over loaded nested param pytrees (HF names, possibly sharded): same policies and the
    same bits as `transfer`. Jitted; the output has the target's dtypes and shardings (with `vocab='pad'` an
    embedding that grows takes the target leaf's sharding spec). donate=True donates the target's buffers."""
    from ftjax.params import flatten, nest

    if vocab not in ("pad", "truncate", "error"):
        raise FtjaxError(f"unknown vocab policy {vocab!r}; use pad, truncate or error")
    rules, skips = _rules(alpha_for, skip)
    t, f, b = flatten(target), flatten(source_ft), flatten(source_base)
    lm = {name: (LM_HEAD if LM_HEAD in tree else EMBED) for name, tree in (("f", f), ("b", b))}
    problems, alphas = [], {}
    for name, x in t.items():
        fn, bn = (lm["f"], lm["b"]) if name == LM_HEAD else (name, name)
        if fn not in f or bn not in b:
            problems.append(f"{name}: missing from source-ft or source-base")
            continue
        fs, bs = f[fn].shape, b[bn].shape
        if bs != x.shape or (fs != x.shape and not (_is_vocab(name) and fs[1:] == x.shape[1:])):
            problems.append(f"{name}: shapes target {list(x.shape)}, source-ft {list(fs)}, source-base {list(bs)}")
        elif fs[0:1] and fs[0] < x.shape[0]:
            problems.append(f"{name}: source-ft vocabulary ({fs[0]} rows) is smaller than the bases' ({x.shape[0]})")
        elif fs != x.shape and vocab == "error":
            problems.append(f"{name}: source-ft has {fs[0]} rows, the bases {x.shape[0]} (vocab='error')")
        skipped = any(r.search(name) for r in skips) or not treeops.is_float(x.dtype)
        alphas[name] = 0.0 if skipped else next((a for r, a in rules if r.search(name)), float(alpha))
    _fail(problems, "parameter trees do not match")
    names = list(t)

    def fn(t_l, f_l, b_l):
        out = []
        for name, x, y, z in zip(names, t_l, f_l, b_l):
            a = alphas[name]
            if a == 0:
                out.append(x)
                continue
            v = x.shape[0] if x.shape else None
            r = treeops.transfer_exact(x, y[:v] if v is not None else y, z, a, x.dtype)
            if vocab == "pad" and y.shape != x.shape:
                r = jnp.concatenate([r, y[v:].astype(x.dtype)])
            out.append(r)
        return out

    def sharding(name, x):
        s = getattr(x, "sharding", None)
        return s if s is not None and f[lm["f"] if name == LM_HEAD else name].shape == x.shape else None

    out_shardings = [sharding(n, t[n]) for n in names]
    if any(s is None for s in out_shardings):
        out_shardings = None
    jitted = jax.jit(fn, out_shardings=out_shardings, donate_argnums=(0,) if donate else ())
    res = jitted([t[n] for n in names], [f[lm["f"]] if n == LM_HEAD else f[n] for n in names],
                 [b[lm["b"]] if n == LM_HEAD else b[n] for n in names])
    return nest(dict(zip(names, res)))
