"""Fine-tuning transfer: out = target_base + alpha * (source_ft - source_base), tensor by tensor.

Streaming engine over HF safetensors directories (`transfer`, `diff`, `apply`) and an in-memory version over
loaded pytrees (`transfer_params`). Arithmetic: `treeops` (exact, one rounding; see its docstring).

Pipeline: `ftjax.engine.plan` decides what happens to each output tensor (every input mismatch in one error);
this module turns that into `ftjax.engine.streaming` jobs with one of three per-tensor operations (transfer, diff, apply)
and `ftjax.engine.outputs` writes them with config and provenance, in memory bounded by the engine's buffer pool.

Multi-process runs (jax.distributed): `transfer`, `diff` and `apply` are collectives; every process calls them with
the same arguments and writes its share of the output shards (`distributed.write_output`).

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

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import dtypes, treeops
from ftjax.engine import plan as P
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, DIFF_MARKER, HFCheckpoint, check_output
from ftjax.io.safetensors import SafetensorsFile, SafetensorsWriter, TensorInfo
from ftjax.layout import EMBED, LM_HEAD, Layout  # noqa: F401 - EMBED, LM_HEAD: public names of this module
from ftjax.engine.outputs import CHUNK_ELEMS, Finish, Output, provenance, write_checkpoint
from ftjax.engine.streaming import ZEROS, Job, Kernel, Source, row_chunks, rows_of
from ftjax.engine.plan import Report, TensorPlan, TransferReport  # noqa: F401 - TransferReport: public name

PROVENANCE, DIFF_META, DIFF_LO = "ftjax_transfer.json", DIFF_MARKER, "ftjax_diff_lo.safetensors"
_OWN_FILES = (PROVENANCE, DIFF_META, DIFF_LO)


def _roles(target: HFCheckpoint, source_ft: HFCheckpoint, config_from: str, tokenizer_from: str) -> dict:
    roles = {"target": target, "source-ft": source_ft}
    for opt, val in (("config_from", config_from), ("tokenizer_from", tokenizer_from)):
        if val not in roles:
            raise FtjaxError(f"{opt} must be 'target' or 'source-ft', got {val!r}")
    return roles


# --- the three per-tensor operations (flat float32-exact kernels, see treeops) -----------------------------------


def _transfer_op(t, f, b, alpha, out_dtype):
    return treeops.transfer_exact(t, f, b, alpha, out_dtype)


def _diff_op(f, b):
    return treeops.diff_exact(f, b)  # (hi, lo): hi is written, lo kept when inexact


def _diff_round_op(f, b, out_dtype):
    hi, lo = treeops.diff_exact(f, b)
    return treeops.round_sum3(jnp.zeros_like(hi), hi, lo, out_dtype)  # one rounding of the exact difference


def _apply_op(t, hi, lo, alpha, out_dtype):
    return treeops.axpy_exact(t, hi.astype(jnp.float32), lo.astype(jnp.float32), alpha, out_dtype)


def _jobs(plans: Sequence[TensorPlan], target: HFCheckpoint, kernel_inputs: Callable[[TensorPlan], tuple[Source, ...]],
          kernel: Callable[[TensorPlan], Kernel], rest: Callable[[TensorPlan], Source]) -> list[Job]:
    """Engine jobs: kernel tensors from `kernel_inputs`, the rest copied from the target."""
    return [Job(p.out, kernel_inputs(p), kernel(p), rows=p.rows, rest=rest(p)) if p.action == "kernel"
            else Job(p.out, (Source(target, p.name),)) for p in plans]


def _output(out: Path, inputs: Sequence[HFCheckpoint], *, overwrite: bool, max_shard_bytes: int, progress: bool,
            strict: bool) -> Output:
    return Output(out, tuple(c.path for c in inputs), overwrite, max_shard_bytes, progress, strict)


def transfer(source_base: str | os.PathLike, source_ft: str | os.PathLike, target_base: str | os.PathLike,
             out: str | os.PathLike, *, alpha: float = 1.0, alpha_for: Sequence[tuple[str, float]] = (),
             skip: Sequence[str] = (), vocab: str = "pad", dtype: str = "auto", config_from: str = "target",
             tokenizer_from: str = "source-ft", overwrite: bool = False, dry_run: bool = False, strict: bool = False,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Report:
    """Write target_base + alpha * (source_ft - source_base) as a HF checkpoint at `out` (streaming, atomic).

    alpha_for: (regex, alpha) pairs, first re.search match wins; skip: regexes of tensors kept from the target;
    vocab: pad | truncate | error; dtype: auto (the target's) | bfloat16 | float16 | float32;
    config_from: target | source-ft; tokenizer_from: source-ft | target. Exact: see `treeops`."""
    t0 = time.perf_counter()
    b, f, t = HFCheckpoint(source_base), HFCheckpoint(source_ft), HFCheckpoint(target_base)
    roles = _roles(t, f, config_from, tokenizer_from)
    report = Report("transfer", str(out), {"source_base": str(b.path), "source_ft": str(f.path),
                                                   "target_base": str(t.path)}, dry_run=dry_run)
    out = check_output(out, overwrite=overwrite, inputs=[b.path, f.path, t.path])
    lt = Layout.of_checkpoint(t)
    plans = P.plan(lt, Layout.of_checkpoint(f), Layout.of_checkpoint(b), alpha=alpha, alpha_for=alpha_for,
                   skip=skip, vocab=vocab, dtype=dtype, report=report,
                   configs={"target": t.config, "source-ft": f.config, "source-base": b.config})
    report.warnings += P.transfer_warnings(b, f, t, [p.name for p in plans if p.action == "kernel"])
    cfg = P.out_config(roles[config_from].config, lt, [p.out for p in plans])
    if dry_run:
        return report
    jobs = _jobs(plans, t, lambda p: (Source(t, p.name), Source(f, p.source), Source(b, p.base)),
                 lambda p: Kernel(_transfer_op, (p.alpha, p.out.dtype)), lambda p: Source(f, p.source))
    record = provenance("transfer", report.inputs, cfg, alpha=float(alpha),
                        alpha_for=[[p, float(a)] for p, a in alpha_for], skip=list(skip), vocab=vocab,
                        config_from=config_from, tokenizer_from=tokenizer_from, dtype=dtype,
                        out_dtypes=sorted({str(j.out.dtype) for j in jobs}),
                        formula="target_base + alpha * (source_ft - source_base), exact, one rounding")
    write_checkpoint(_output(out, [b, f, t], overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress,
                             strict=strict), jobs, report,
                     Finish(cfg, roles[tokenizer_from].path, PROVENANCE, record, _OWN_FILES), t0=t0)
    return report


class _DiffExtras:
    """What `diff` keeps beside the main tensors, per process, merged by process 0 (`outputs.Extras`): the L2 norm
    of every diff tensor (float64 sums of squares of what is written) and, for an exact float32 diff, the exact
    remainders (lo), appended to a scratch file per tensor (dropped when all zero) and then copied into
    `ftjax_diff_lo.safetensors` (only the tensors that have a nonzero remainder)."""

    def __init__(self, exact: bool):
        self.exact = exact

    def open(self, path: Path) -> None:
        self.path, self.f = path, open(path, "w+b")
        self.starts: list[tuple[str, int]] = []  # (tensor, byte offset in the scratch file)
        self.sumsq: dict[str, float] = {}
        self.name, self.start, self.nonzero, self.rows = None, 0, False, 0

    def add(self, job: Job, outs: tuple[np.ndarray, ...]) -> None:
        """Record a written row block: outs[0] the diff rows, outs[1] (exact kernel rows) their remainders."""
        hi = outs[0].reshape(-1)
        if dtypes.is_float(hi.dtype):
            h = hi.astype(np.float32, copy=False)
            self.sumsq[job.name] = self.sumsq.get(job.name, 0.0) + float(np.dot(h, h))
        if self.exact and job.kernel is not None:  # a diff tensor (the others are copies)
            self._write_lo(job, outs[1] if len(outs) > 1 else None, rows_of(outs[0].shape))

    def _write_lo(self, job: Job, lo: np.ndarray | None, rows: int) -> None:
        if self.name != job.name:
            self.name, self.start, self.nonzero, self.rows = job.name, self.f.tell(), False, 0
        lo = np.zeros(job.out.shape[:1] and (rows,) + job.out.shape[1:], np.float32) if lo is None else lo
        self.f.write(np.ascontiguousarray(lo, np.float32).reshape(-1).view(np.uint8).data)
        self.nonzero |= bool(np.any(lo != 0))
        self.rows += rows
        if self.rows == rows_of(job.out.shape):
            if self.nonzero:
                self.starts.append((job.name, self.start))
            else:
                self.f.seek(self.start)
                self.f.truncate()

    def close(self) -> dict:
        """Close the scratch file (process 0 reads it next, then deletes it); returns what this process holds."""
        self.f.close()
        return {"lo": self.starts, "sumsq": self.sumsq}

    def finish(self, tmp: Path, record: dict, parts: list[tuple[Path, dict]], outs: dict[str, TensorInfo],
               order: dict[str, int]) -> None:
        """Merge every process's part (scratch path, `close()` result) into DIFF_LO and record["norms"]."""
        sumsq = {name: ss for _, part in parts for name, ss in part["sumsq"].items()}
        record["norms"] = {"total": math.sqrt(math.fsum(sumsq.values())),
                           "tensors": {n: math.sqrt(sumsq[n]) for n in sorted(sumsq, key=order.__getitem__)}}
        found = sorted(((name, start, path) for path, part in parts for name, start in part["lo"]),
                       key=lambda x: order[x[0]])
        infos = [TensorInfo(name, np.dtype(np.float32), outs[name].shape) for name, _, _ in found]
        if infos:
            maps = {path: np.memmap(path, dtype=np.float32, mode="r") for path, _ in parts if path.stat().st_size}
            with SafetensorsWriter(tmp / DIFF_LO, infos) as lw:
                for info, (_, start, path) in zip(infos, found):
                    a = maps[path][start // 4: start // 4 + math.prod(info.shape)].reshape(info.shape)
                    for r0, r1 in row_chunks(info.shape, 0, rows_of(info.shape), CHUNK_ELEMS):
                        lw.write(info.name, np.array(a[r0:r1]) if info.shape else np.array(a))
            del maps
        for path, _ in parts:
            path.unlink()
        if self.exact:
            record["lo_tensors"] = [i.name for i in infos]


def diff(base: str | os.PathLike, ft: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
         overwrite: bool = False, dry_run: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
         progress: bool = True) -> Report:
    """Write the diff vector ft - base as its own checkpoint dir (+ ft's config/tokenizer, `ftjax_diff.json`).

    float32 (default): the main tensors hold fl32(ft - base); the rare elements where that is inexact keep
    their exact remainder in `ftjax_diff_lo.safetensors` (only tensors with a nonzero remainder), so that
    `apply(target, diff)` is bitwise equal to `transfer`. Other dtypes: one rounding, no remainder (lossy)."""
    t0 = time.perf_counter()
    b, f = HFCheckpoint(base), HFCheckpoint(ft)
    report = Report("diff", str(out), {"base": str(b.path), "ft": str(f.path)}, dry_run=dry_run)
    out = check_output(out, overwrite=overwrite, inputs=[b.path, f.path])
    exact = P.out_dtype(dtype, np.float32) == np.float32
    # Planned as a transfer onto the base itself: same checks, the vocab rows of ft beyond the base padded.
    lb, lf = Layout.of_checkpoint(b), Layout.of_checkpoint(f)
    plans = P.plan(lb, lf, lb, alpha=1.0, alpha_for=(), skip=(), vocab="pad", dtype=dtype, report=report,
                   labels={"target": "base", "source": "ft", "base": "base"},
                   configs={"base": b.config, "ft": f.config})
    report.warnings += P.swapped_base_warnings(b, f, "--base", "--ft")
    base_rows = {p.source: p.rows for p in plans if p.action == "kernel" and p.rows != rows_of(p.out.shape)}
    report.vocab = P.VocabReport(base_rows=base_rows) if base_rows else P.VocabReport()
    if dry_run:
        return report
    kernel = Kernel(_diff_op) if exact else None
    jobs = [Job(p.out, (Source(f, p.source), Source(b, p.base)),
                kernel or Kernel(_diff_round_op, (p.out.dtype,)), rows=p.rows, rest=Source(f, p.source))
            if p.action == "kernel" else Job(p.out, (Source(f, lb.source_of(p.name, lf)),)) for p in plans]
    record = provenance("diff", report.inputs, f.config, base=str(b.path), ft=str(f.path),
                        dtype=str(P.out_dtype(dtype, np.float32)), exact=exact, lo_file=DIFF_LO,
                        base_vocab_rows=base_rows, tied=lf.tied,
                        formula="ft - base; exact value = main tensor + lo remainder (float32)")
    write_checkpoint(_output(out, [b, f], overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress,
                             strict=False), jobs, report, Finish(f.config, f.path, DIFF_META, record, _OWN_FILES),
                     t0=t0, extras=_DiffExtras(exact))
    return report


class _DiffReader:
    """A diff directory as the source of `apply`: main tensors (hi) + optional exact remainders (lo)."""

    def __init__(self, path: str | os.PathLike):
        self.ck = HFCheckpoint(path, allow_diff=True)
        meta_path = self.ck.path / DIFF_META
        if not meta_path.is_file():
            raise FtjaxError(f"{self.ck.path}: no {DIFF_META}; not a diff written by `ftjax diff`")
        try:
            self.meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise FtjaxError(f"{meta_path}: not valid JSON ({e})") from None
        lo = self.ck.path / DIFF_LO
        self.lo = SafetensorsFile(lo) if lo.is_file() else None

    def lo_source(self, name: str) -> Source:
        return Source(self.lo, name) if self.lo is not None and name in self.lo else ZEROS


def apply(target: str | os.PathLike, diff: str | os.PathLike, out: str | os.PathLike, *, alpha: float = 1.0,
          alpha_for: Sequence[tuple[str, float]] = (), skip: Sequence[str] = (), vocab: str = "pad",
          dtype: str = "auto", config_from: str = "target", tokenizer_from: str = "source-ft",
          overwrite: bool = False, dry_run: bool = False, strict: bool = False,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Report:
    """Write target + alpha * diff (a dir from `diff`); with a float32 diff, bitwise equal to `transfer`.
    config_from / tokenizer_from: target | source-ft (the diff dir carries the source-ft's files).
    A PEFT LoRA adapter as the diff: `ftjax.lora.transfer_lora` with the target as the adapter's base."""
    from ftjax import lora

    if lora.is_adapter(diff):
        if vocab != "pad" or config_from != "target":
            raise FtjaxError("--vocab and --config-from do not apply to a LoRA adapter (the output keeps the target's)")
        return lora.transfer_lora(diff, target, out, alpha=alpha, alpha_for=alpha_for, skip=skip, dtype=dtype,
                                  tokenizer_from=tokenizer_from, target_is_base=True, overwrite=overwrite,
                                  dry_run=dry_run, strict=strict, max_shard_bytes=max_shard_bytes, progress=progress)
    t0 = time.perf_counter()
    t, d = HFCheckpoint(target), _DiffReader(diff)
    roles = _roles(t, d.ck, config_from, tokenizer_from)
    report = Report("apply", str(out), {"target": str(t.path), "diff": str(d.ck.path)}, dry_run=dry_run)
    out = check_output(out, overwrite=overwrite, inputs=[t.path, d.ck.path])
    lt = Layout.of_checkpoint(t)
    plans = P.plan(lt, Layout.of_checkpoint(d.ck), None, alpha=alpha, alpha_for=alpha_for, skip=skip, vocab=vocab,
                   dtype=dtype, report=report, base_rows=d.meta.get("base_vocab_rows", {}),
                   configs={"target": t.config, "diff": d.ck.config})
    cfg = P.out_config(roles[config_from].config, lt, [p.out for p in plans])
    if dry_run:
        return report
    jobs = _jobs(plans, t, lambda p: (Source(t, p.name), Source(d.ck, p.source), d.lo_source(p.source)),
                 lambda p: Kernel(_apply_op, (p.alpha, p.out.dtype)), lambda p: Source(d.ck, p.source))
    record = provenance("apply", report.inputs, cfg, alpha=float(alpha),
                        alpha_for=[[p, float(a)] for p, a in alpha_for], skip=list(skip), vocab=vocab,
                        config_from=config_from, tokenizer_from=tokenizer_from, dtype=dtype,
                        diff_of=d.meta.get("inputs"), formula="target + alpha * diff, exact, one rounding")
    write_checkpoint(_output(out, [t, d.ck], overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                             progress=progress, strict=strict), jobs, report,
                     Finish(cfg, roles[tokenizer_from].path, PROVENANCE, record, _OWN_FILES), t0=t0)
    return report


# --- in memory ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _transfer_fn(specs: tuple[tuple[float, bool] | None, ...], out_shardings: tuple | None, donate: bool) -> Callable:
    """The jitted in-memory transfer for one plan ((alpha, pad the vocab rows) per tensor, None: keep the
    target's): built once, so repeated calls do not recompile."""

    def fn(t_l, f_l, b_l):
        out = []
        for spec, x, y, z in zip(specs, t_l, f_l, b_l):
            if spec is None:
                out.append(x)
                continue
            (a, pad), v = spec, x.shape[0] if x.shape else None
            r = treeops.transfer_exact(x, y[:v] if v is not None else y, z, a, x.dtype)
            out.append(jnp.concatenate([r, y[v:].astype(x.dtype)]) if pad else r)
        return out

    return jax.jit(fn, out_shardings=None if out_shardings is None else list(out_shardings),
                   donate_argnums=(0,) if donate else ())


def transfer_params(target: Any, source_ft: Any, source_base: Any, *, alpha: float = 1.0,
                    alpha_for: Sequence[tuple[str, float]] = (), skip: Sequence[str] = (), vocab: str = "pad",
                    donate: bool = False) -> Any:
    """In-memory transfer over loaded nested param pytrees (HF names, possibly sharded): the same plan, policies and
    bits as `transfer`. Jitted; the output has the target's dtypes and shardings (with `vocab='pad'` an embedding
    that grows takes the target leaf's sharding spec). donate=True donates the target's buffers."""
    from ftjax.params import flatten, nest

    t, f, b = flatten(target), flatten(source_ft), flatten(source_base)
    lt, lf, lb = Layout.of_tree(t), Layout.of_tree(f), Layout.of_tree(b)
    report = Report("transfer_params", None, {})
    plans = P.plan(lt, lf, lb, alpha=alpha, alpha_for=alpha_for, skip=skip, vocab=vocab, dtype="auto", report=report)
    names = [p.name for p in plans]
    sources = {p.name: (p.source or lt.source_of(p.name, lf), p.base or lt.source_of(p.name, lb)) for p in plans}

    def sharding(p: TensorPlan):
        s = getattr(t[p.name], "sharding", None)
        return s if s is not None and p.out.shape == t[p.name].shape else None

    out_shardings = [sharding(p) for p in plans]
    if any(s is None for s in out_shardings):
        out_shardings = None

    def place(y, x):  # sources committed to other devices (e.g. loaded unsharded) go where the target leaf is
        xs, ys = getattr(x, "sharding", None), getattr(y, "sharding", None)
        if xs is None or ys is None or ys.device_set == xs.device_set:
            return y
        if y.shape == x.shape:
            return jax.device_put(y, xs)
        mesh = getattr(xs, "mesh", None)
        return jax.device_put(y, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh else xs)

    jitted = _transfer_fn(tuple((p.alpha, p.out.shape != t[p.name].shape) if p.action == "kernel" and p.alpha != 0
                                else None for p in plans),
                          None if out_shardings is None else tuple(out_shardings), donate)
    res = jitted([t[n] for n in names], [place(f[sources[n][0]], t[n]) for n in names],
                 [place(b[sources[n][1]], t[n]) for n in names])
    return nest(dict(zip(names, res)))
