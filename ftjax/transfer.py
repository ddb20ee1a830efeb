"""Fine-tuning transfer: out = target_base + alpha * (source_ft - source_base), tensor by tensor.

Streaming engine over HF safetensors directories (`transfer`, `diff`, `apply`) and an in-memory version over
loaded pytrees (`transfer_params`). Arithmetic: `treeops` (exact, one rounding; see its docstring).

Pipeline: `ftjax.streaming` (preallocated buffers filled with pread, packed row blocks -> one jitted kernel per
batch -> writer thread; memory bounded by a small buffer pool, never by the model). This module plans (one job per
output tensor, every input mismatch in one error), applies the policies below and writes config + provenance.

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

import datetime
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

import ftjax
from ftjax import distributed, dtypes, treeops
from ftjax import transfer_plan as P
from ftjax.config import read_config
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import (DIFF_MARKER, RECORD_KEY, HFCheckpoint, HFCheckpointWriter, check_output, copy_aux_files,
                                 write_json)
from ftjax.io.safetensors import SafetensorsFile, SafetensorsWriter, TensorInfo
from ftjax.streaming import Job, Streams, WriteBehind, row_chunks, rows_of, stream
from ftjax.transfer_plan import EMBED, LM_HEAD, TransferReport  # noqa: F401 - public names of this module

CHUNK_ELEMS = 1 << 20  # elements per kernel call: 2 MB per bf16 input buffer (cache-sized; 4x fewer was slower)
PROVENANCE, DIFF_META, DIFF_LO = "ftjax_transfer.json", DIFF_MARKER, "ftjax_diff_lo.safetensors"
_OWN_FILES = (PROVENANCE, DIFF_META, "config.json")
Write = Callable[[WriteBehind, Job, tuple[np.ndarray, ...]], None]


def _roles(target: HFCheckpoint, source_ft: HFCheckpoint, config_from: str, tokenizer_from: str) -> dict:
    roles = {"target": target, "source-ft": source_ft}
    for opt, val in (("config_from", config_from), ("tokenizer_from", tokenizer_from)):
        if val not in roles:
            raise FtjaxError(f"{opt} must be 'target' or 'source-ft', got {val!r}")
    return roles


def _provenance(kind: str, report: TransferReport, config: dict, **fields) -> dict:
    """The provenance record of an output whose config.json is `config` (its inert keys listed, see ftjax.config)."""
    try:
        parsed = read_config(config)
        config_keys = {"ignored_keys": list(parsed.ignored), "notes": list(parsed.notes)}
    except FtjaxError:  # a family ftjax does not model: the tensor arithmetic does not depend on it
        config_keys = {}
    return {"ftjax_version": ftjax.__version__, "kind": kind, "inputs": report.inputs,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": config_keys, **fields}


def _write(out: Path, inputs: list[Path], jobs: list[Job], io: Streams, report: TransferReport, *, overwrite: bool,
           progress: bool, strict: bool, t0: float, max_shard_bytes: int, cfg: dict, aux_src: Path, meta_name: str,
           meta: dict, write: Write | None = None, extras: _DiffExtras | None = None) -> None:
    """Stream `jobs` into an atomic temp dir as a HF checkpoint, then config, aux files and provenance.

    With several processes (jax.distributed) every process plans the same shards and process i streams shards i,
    i+N, ... into one shared temp dir, recording what it did in a small part file; process 0 then merges the parts
    into the report, writes the index and the small files, and renames. The bytes equal a 1-process run's."""
    write = write or (lambda w, job, outs: w.write(job.name, outs[0]))

    def work(tmp: Path, me: int, n: int) -> None:
        with HFCheckpointWriter(tmp, [j.out for j in jobs], max_shard_bytes, part=(me, n)) as w:
            mine = set(w.tensors())
            part = TransferReport(report.kind, report.out, report.inputs)
            if extras is not None:
                extras.open(tmp / f".ftjax-lo-{me}.tmp")
            wb = WriteBehind(w)
            stream([j for j in jobs if j.name in mine], io, lambda job, outs: write(wb, job, outs), part,
                   progress and me == 0, chunk_elems=CHUNK_ELEMS)
        write_json(tmp / f".ftjax-part-{me}.json", {"bytes_read": part.bytes_read, "nonfinite": part.nonfinite,
                                                     "bytes_written": part.bytes_written,
                                                     "extras": extras.close() if extras is not None else {}})

    def finalize(tmp: Path, n: int) -> None:
        order = {j.name: k for k, j in enumerate(jobs)}
        parts = []
        for i in range(n):
            path = tmp / f".ftjax-part-{i}.json"
            try:
                parts.append(json.loads(path.read_text()))
            except (OSError, ValueError) as e:
                raise FtjaxError(f"{path}: process {i}'s part report is missing or unreadable ({e})") from None
            path.unlink()
        report.bytes_read = sum(p["bytes_read"] for p in parts)
        report.bytes_written = sum(p["bytes_written"] for p in parts)
        report.nonfinite = sorted((n for p in parts for n in p["nonfinite"]), key=order.__getitem__)
        if extras is not None:
            extras.finish(tmp, meta, [(tmp / f".ftjax-lo-{i}.tmp", p["extras"]) for i, p in enumerate(parts)],
                          {j.name: j.out for j in jobs}, order)
        report.seconds = time.perf_counter() - t0
        if report.nonfinite and strict:
            raise FtjaxError(f"NaN/Inf in {len(report.nonfinite)} output tensor(s): "
                             f"{', '.join(report.nonfinite[:8])} (--strict); nothing was written")
        copy_aux_files(aux_src, tmp, skip=(*_OWN_FILES, DIFF_LO))
        write_json(tmp / "config.json", cfg)
        files = sorted({p.name for p in tmp.iterdir()} | {meta_name})  # what --overwrite may later replace
        write_json(tmp / meta_name, {**meta, "report": report.to_dict(), RECORD_KEY: files})

    distributed.write_output(out, overwrite=overwrite, inputs=inputs, work=work, finalize=finalize)


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
    roles = _roles(t, f, config_from, tokenizer_from)
    report = TransferReport("transfer", str(out), {"source_base": str(b.path), "source_ft": str(f.path),
                                                   "target_base": str(t.path)}, dry_run=dry_run)
    out = check_output(out, overwrite=overwrite, inputs=[b.path, f.path, t.path])
    jobs = P.plan(t, f, b, alpha=alpha, alpha_for=alpha_for, skip=skip, vocab=vocab, dtype=dtype, report=report)
    report.warnings += P.transfer_warnings(b, f, t, [j.name for j in jobs if j.mode == "kernel"])
    cfg = P.out_config(roles[config_from].config, t, jobs)
    if dry_run:
        return report
    io = Streams(inputs=lambda job: ((t, job.t), (f, job.s), (b, job.b)),
                 kernel=lambda job: (treeops.transfer_exact, (job.alpha, job.out.dtype)),
                 copy=lambda job: (t, job.t), extra=lambda job: (f, job.s))
    meta = _provenance("transfer", report, cfg, alpha=float(alpha),
                       alpha_for=[[p, float(a)] for p, a in alpha_for],
                       skip=list(skip), vocab=vocab, config_from=config_from, tokenizer_from=tokenizer_from,
                       dtype=dtype, out_dtypes=sorted({str(j.out.dtype) for j in jobs}),
                       formula="target_base + alpha * (source_ft - source_base), exact, one rounding")
    _write(out, [b.path, f.path, t.path], jobs, io, report, overwrite=overwrite, progress=progress, strict=strict,
           t0=t0, max_shard_bytes=max_shard_bytes, cfg=cfg, aux_src=roles[tokenizer_from].path,
           meta_name=PROVENANCE, meta=meta)
    return report


def _diff_round_op(f, b, out_dtype):
    hi, lo = treeops.diff_exact(f, b)
    return treeops.round_sum3(jnp.zeros_like(hi), hi, lo, out_dtype)  # one rounding of the exact difference


class _DiffExtras:
    """What `diff` keeps beside the main tensors, per process, merged by process 0: the L2 norm of every diff
    tensor (float64 sums of squares of what is written) and, for an exact float32 diff, the exact remainders (lo),
    appended to a scratch file per tensor (dropped when all zero) and then copied into `ftjax_diff_lo.safetensors`
    (only the tensors that have a nonzero remainder)."""

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
        if self.exact and job.mode == "kernel":
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

    def finish(self, tmp: Path, meta: dict, parts: list[tuple[Path, dict]], outs: dict[str, TensorInfo],
               order: dict[str, int]) -> None:
        """Merge every process's part (`parts`: scratch path, `close()` result) into DIFF_LO and meta["norms"]."""
        sumsq = {name: ss for _, part in parts for name, ss in part["sumsq"].items()}
        meta["norms"] = {"total": math.sqrt(math.fsum(sumsq.values())),
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
            meta["lo_tensors"] = [i.name for i in infos]


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
    out = check_output(out, overwrite=overwrite, inputs=[b.path, f.path])
    exact = P.out_dtype(dtype, np.float32) == np.float32
    # Planned as a transfer onto the base itself: same checks, the vocab rows of ft beyond the base padded.
    jobs = P.plan(b, f, b, alpha=1.0, alpha_for=(), skip=(), vocab="pad", dtype=dtype, report=report)
    report.warnings += P.swapped_base_warnings(b, f, "--base", "--ft")
    base_rows = {j.s: j.rows for j in jobs if j.mode == "kernel" and j.rows != rows_of(j.out.shape)}
    report.vocab = {"base_rows": base_rows} if base_rows else {}
    if dry_run:
        return report
    extras = _DiffExtras(exact)

    def write(w, job, outs):
        w.write(job.name, outs[0].astype(job.out.dtype, copy=False))
        extras.add(job, outs)

    io = Streams(inputs=lambda job: ((f, job.s), (b, job.b)),
                 kernel=lambda job: (treeops.diff_exact, ()) if exact else (_diff_round_op, (job.out.dtype,)),
                 copy=lambda job: (f, job.t), extra=lambda job: (f, job.s))
    meta = _provenance("diff", report, f.config, base=str(b.path), ft=str(f.path),
                       dtype=str(P.out_dtype(dtype, np.float32)),
                       exact=exact, lo_file=DIFF_LO, base_vocab_rows=base_rows, tied=P.tied(f),
                       formula="ft - base; exact value = main tensor + lo remainder (float32)")
    _write(out, [b.path, f.path], jobs, io, report, overwrite=overwrite, progress=progress, strict=False, t0=t0,
           max_shard_bytes=max_shard_bytes, cfg=f.config, aux_src=f.path, meta_name=DIFF_META, meta=meta,
           write=write, extras=extras)
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

    def lo_source(self, name: str) -> tuple[Any, Any]:
        return (self.lo, name) if self.lo is not None and name in self.lo else (None, None)  # None: zeros


def _apply_op(t, hi, lo, alpha, out_dtype):
    return treeops.axpy_exact(t, hi.astype(jnp.float32), lo.astype(jnp.float32), alpha, out_dtype)


def apply(target: str | os.PathLike, diff: str | os.PathLike, out: str | os.PathLike, *, alpha: float = 1.0,
          alpha_for: Sequence[tuple[str, float]] = (), skip: Sequence[str] = (), vocab: str = "pad",
          dtype: str = "auto", config_from: str = "target", tokenizer_from: str = "source-ft",
          overwrite: bool = False, dry_run: bool = False, strict: bool = False, max_shard_bytes: int = 5 * 10**9,
          progress: bool = True) -> TransferReport:
    """Write target + alpha * diff (a dir from `diff`); with a float32 diff, bitwise equal to `transfer`.
    config_from / tokenizer_from: target | source-ft (the diff dir carries the source-ft's files)."""
    t0 = time.perf_counter()
    t, d = HFCheckpoint(target), _DiffReader(diff)
    roles = _roles(t, d.ck, config_from, tokenizer_from)
    report = TransferReport("apply", str(out), {"target": str(t.path), "diff": str(d.ck.path)}, dry_run=dry_run)
    out = check_output(out, overwrite=overwrite, inputs=[t.path, d.ck.path])
    jobs = P.plan(t, d.ck, None, alpha=alpha, alpha_for=alpha_for, skip=skip, vocab=vocab, dtype=dtype,
                 report=report, base_rows=d.meta.get("base_vocab_rows", {}))
    cfg = P.out_config(roles[config_from].config, t, jobs)
    if dry_run:
        return report
    io = Streams(inputs=lambda job: ((t, job.t), (d.ck, job.s), d.lo_source(job.s)),
                 kernel=lambda job: (_apply_op, (job.alpha, job.out.dtype)),
                 copy=lambda job: (t, job.t), extra=lambda job: (d.ck, job.s))
    meta = _provenance("apply", report, cfg, alpha=float(alpha),
                       alpha_for=[[p, float(a)] for p, a in alpha_for],
                       skip=list(skip), vocab=vocab, config_from=config_from, tokenizer_from=tokenizer_from,
                       dtype=dtype, diff_of=d.meta.get("inputs"),
                       formula="target + alpha * diff, exact, one rounding")
    _write(out, [t.path, d.ck.path], jobs, io, report, overwrite=overwrite, progress=progress, strict=strict,
           t0=t0, max_shard_bytes=max_shard_bytes, cfg=cfg, aux_src=roles[tokenizer_from].path,
           meta_name=PROVENANCE, meta=meta)
    return report


# --- in memory ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _transfer_fn(alphas: tuple[float, ...], vocab: str, out_shardings: tuple | None, donate: bool) -> Callable:
    """The jitted in-memory transfer for one alpha layout: built once, so repeated calls do not recompile."""

    def fn(t_l, f_l, b_l):
        out = []
        for a, x, y, z in zip(alphas, t_l, f_l, b_l):
            if a == 0:
                out.append(x)
                continue
            v = x.shape[0] if x.shape else None
            r = treeops.transfer_exact(x, y[:v] if v is not None else y, z, a, x.dtype)
            if vocab == "pad" and y.shape != x.shape:
                r = jnp.concatenate([r, y[v:].astype(x.dtype)])
            out.append(r)
        return out

    return jax.jit(fn, out_shardings=None if out_shardings is None else list(out_shardings),
                   donate_argnums=(0,) if donate else ())


def transfer_params(target: Any, source_ft: Any, source_base: Any, *, alpha: float = 1.0,
                    alpha_for: Sequence[tuple[str, float]] = (), skip: Sequence[str] = (), vocab: str = "pad",
                    donate: bool = False) -> Any:
    """In-memory transfer over loaded nested param pytrees (HF names, possibly sharded): same policies and the
    same bits as `transfer`. Jitted; the output has the target's dtypes and shardings (with `vocab='pad'` an
    embedding that grows takes the target leaf's sharding spec). donate=True donates the target's buffers."""
    from ftjax.params import flatten, nest

    if vocab not in ("pad", "truncate", "error"):
        raise FtjaxError(f"unknown vocab policy {vocab!r}; use pad, truncate or error")
    rules, skips = P.alpha_rules(alpha_for, skip)
    t, f, b = flatten(target), flatten(source_ft), flatten(source_base)
    lm = {name: (LM_HEAD if LM_HEAD in tree else EMBED) for name, tree in (("f", f), ("b", b))}
    problems, alphas = [], {}
    for name, x in t.items():
        fn, bn = (lm["f"], lm["b"]) if name == LM_HEAD else (name, name)
        if fn not in f or bn not in b:
            problems.append(f"{name}: missing from source-ft or source-base")
            continue
        fs, bs = f[fn].shape, b[bn].shape
        if bs != x.shape or (fs != x.shape and not (P.is_vocab(name) and fs[1:] == x.shape[1:])):
            problems.append(f"{name}: shapes target {list(x.shape)}, source-ft {list(fs)}, source-base {list(bs)}")
        elif fs[0:1] and fs[0] < x.shape[0]:
            problems.append(f"{name}: source-ft vocabulary ({fs[0]} rows) is smaller than the bases' ({x.shape[0]})")
        elif fs != x.shape and vocab == "error":
            problems.append(f"{name}: source-ft has {fs[0]} rows, the bases {x.shape[0]} (vocab='error')")
        skipped = any(r.search(name) for r in skips) or not dtypes.is_float(x.dtype)
        alphas[name] = 0.0 if skipped else next((a for r, a in rules if r.search(name)), float(alpha))
    P.fail(problems, "parameter trees do not match")
    names = list(t)

    def sharding(name, x):
        s = getattr(x, "sharding", None)
        return s if s is not None and f[lm["f"] if name == LM_HEAD else name].shape == x.shape else None

    out_shardings = [sharding(n, t[n]) for n in names]
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

    jitted = _transfer_fn(tuple(alphas[n] for n in names), vocab,
                          None if out_shardings is None else tuple(out_shardings), donate)
    res = jitted([t[n] for n in names], [place(f[lm["f"]] if n == LM_HEAD else f[n], t[n]) for n in names],
                 [place(b[lm["b"]] if n == LM_HEAD else b[n], t[n]) for n in names])
    return nest(dict(zip(names, res)))
