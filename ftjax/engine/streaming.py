"""Streaming engine behind transfer / diff / apply: read row blocks -> jitted kernel -> write, in bounded memory.

The work is memory traffic, not arithmetic, so the engine is shaped around not touching memory twice:
- reads are `os.preadv` from the safetensors files straight into a small pool of preallocated, 64-byte aligned
  buffers reused for the whole run: no mmap page faults, no fresh allocations (every first touch of a page is a
  fault), and RSS is bounded by the pool, never by the model;
- consecutive tensors (and row blocks of big ones) that share a kernel are packed into one flat buffer, so almost
  every kernel call has the same shape (one or two compiles per run) and a small tensor costs no extra dispatch;
- three threads overlap the stages: a reader fills buffer sets (preadv releases the GIL), the calling thread runs
  the kernel on them (XLA:CPU aliases aligned numpy arguments instead of copying them; a set is reused only once
  its kernel has finished), a writer takes the results with `np.asarray` (zero-copy) and writes them straight to
  the output shards;
- `WriteBehind` starts the disk writeback of the output every 16 MB, so the disk works while the CPU computes
  and the final fsync has little left to do (otherwise nearly the whole output would still be dirty at the end);
- the NaN/Inf check reads the bits of each result once, in the writer thread (tensors are named only when it
  fires): XLA:CPU would fuse the whole kernel into a reduction a second time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import dtypes
from ftjax.buckets import pow2_bucket
from ftjax.errors import FtjaxError
from ftjax.io.safetensors import TensorInfo

if TYPE_CHECKING:  # the report type only; engine.plan does not import the engine
    from ftjax.engine.plan import Report

MIN_BUCKET = 1 << 12
POOL = 4  # buffer sets: being read, waiting, in the kernel, being written
_ALIGN = 64  # XLA:CPU aliases host buffers with this alignment instead of copying them


class Reader(Protocol):
    """What the engine reads from: HFCheckpoint (a model directory) and SafetensorsFile (one file). A reader may
    instead compute its tensors: then it has `rows(name, r0, r1) -> (array of those rows, bytes read from disk)`,
    which the engine calls instead of reading a file view (`get` is then only for whole-tensor use)."""

    def info(self, name: str) -> TensorInfo: ...
    def get(self, name: str) -> np.ndarray: ...  # a read-only view on the file's mmap
    def file_of(self, name: str) -> os.PathLike: ...


@dataclasses.dataclass(frozen=True)
class Source:
    """Tensor `name` of `reader`; `ZEROS` (no reader) stands for float32 zeros of the job's shape."""

    reader: Reader | None
    name: str | None


ZEROS = Source(None, None)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A per-tensor operation: `fn(*inputs, *args, [index_hi, index_lo,] *static)` on flat chunks of the job's
    inputs, a pure jax function returning one flat array or a tuple (the first is the output tensor's). `static` is
    part of the compiled code (hashable: an alpha, an output dtype); a job's `args` are traced (scalars that change
    per tensor: thresholds, coefficients). A `positional` kernel also gets the chunk's first element index (uint32
    words): its batches hold one tensor's consecutive elements, so an element's result may depend on its index."""

    fn: Callable
    static: tuple = ()
    positional: bool = False
    width: int = 0  # > 0: the kernel reduces over rows of `width` elements, so its batches hold one tensor's whole
    #                 rows from a row start, the kernel length is a multiple of `width`, and an output of a
    #                 `width`-th of that length holds one value per row (on_block gets the block's rows of it)


@dataclasses.dataclass(frozen=True)
class Job:
    """One output tensor (or, in a statistics pass, one tensor to reduce over).

    Rows [0, rows) are computed by `kernel` from `inputs` (all of the output's row width); rows [rows, out rows)
    are copied from `rest` (vocab rows only one input has). Without a kernel the whole tensor is `inputs[0]`, cast
    to the output dtype."""

    out: TensorInfo
    inputs: tuple[Source, ...]
    kernel: Kernel | None = None
    args: tuple = ()  # traced arguments of the kernel: numpy scalars or small arrays of a fixed dtype
    rows: int = 0
    rest: Source | None = None

    @property
    def name(self) -> str:
        return self.out.name


class WriteBehind:
    """Wraps an HFCheckpointWriter: `write(name, array)` as usual, and every `every` bytes asks the kernel to start
    writing the current shard back to disk (POSIX_FADV_DONTNEED: async writeback, then drops the clean pages, so
    the output does not fill the page cache either). Purely an optimisation: errors are ignored."""

    def __init__(self, w: Any, every: int = 16 << 20):
        self.w, self.every, self.pending = w, every, 0
        self.file_of = {info.name: w.dir / fn for fn, shard in zip(w.filenames, w.shards) for info in shard}

    def write(self, name: str, array: np.ndarray) -> None:
        self.w.write(name, array)
        self.pending += array.nbytes
        if self.pending >= self.every and hasattr(os, "posix_fadvise"):
            self.pending = 0
            try:
                fd = os.open(self.file_of[name], os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except OSError:
                pass


def rows_of(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def row_elems(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def row_chunks(shape: tuple[int, ...], r0: int, r1: int, max_elems: int) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges covering [r0, r1), each at most max_elems elements (at least one row)."""
    step = max(1, max_elems // max(row_elems(shape), 1))
    for a in range(r0, r1, step):
        yield a, min(a + step, r1)


@functools.partial(jax.jit, static_argnames=("fn", "static"))
def _kernel(*xs: jax.Array, fn: Callable, static: tuple) -> tuple[jax.Array, ...]:
    outs = fn(*xs, *static)
    return outs if isinstance(outs, tuple) else (outs,)


_INF_BITS = {np.dtype(jnp.bfloat16): 0x7F80, np.dtype(np.float16): 0x7C00, np.dtype(np.float32): 0x7F800000}


def _has_nonfinite(a: np.ndarray) -> bool:
    """Any NaN/Inf in float array `a`. For bf16/f16/f32, on the bits with two SIMD max reductions and no
    temporaries: +Inf/NaN are the largest signed values (>= +Inf's bits), -Inf/NaN the largest unsigned ones."""
    inf = _INF_BITS.get(a.dtype)
    if inf is None:
        return not np.all(np.isfinite(a))
    if a.size == 0:
        return False
    n = a.dtype.itemsize
    u = a.reshape(-1).view(f"u{n}")
    sign = 1 << (8 * n - 1)
    return int(u.max()) >= sign | inf or int(u.view(f"i{n}").max()) >= inf


class _Stopped(Exception):
    pass


class Files:
    """Reads row blocks of tensors with pread into caller buffers; one fd per file, offsets found once."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.where: dict[tuple[int, str], tuple[int, int] | None] = {}

    def _locate(self, reader: Reader, name: str) -> tuple[int, int] | None:
        key = (id(reader), name)
        if key not in self.where:
            view = reader.get(name)
            base = view
            while isinstance(base, np.ndarray):
                base = base.base
            loc = None
            if base is not None and view.size:  # a view on the file's mmap: its offset in the file
                offset = view.ctypes.data - np.frombuffer(base, np.uint8, count=1).ctypes.data
                path = str(reader.file_of(name))
                if path not in self.fds:
                    self.fds[path] = os.open(path, os.O_RDONLY)
                loc = (self.fds[path], offset)
            self.where[key] = loc
        return self.where[key]

    def read(self, src: Source, r0: int, r1: int, dst: np.ndarray) -> int:
        """Rows [r0, r1) of src into the flat array dst (its size fixes the element count); returns the bytes read
        from the file (0 for the zeros source)."""
        reader, name = src.reader, src.name
        if reader is None:
            dst[:] = 0
            return 0
        rows = getattr(reader, "rows", None)  # a computed tensor (e.g. a LoRA delta): rows on demand, no file view
        if rows is not None:
            block, nbytes = rows(name, r0, r1)
            np.copyto(dst, block.reshape(-1), casting="unsafe")
            return nbytes
        info = reader.info(name)
        loc = self._locate(reader, name)
        nbytes = (r1 - r0) * row_elems(info.shape) * info.dtype.itemsize
        if loc is None or dst.dtype != info.dtype:
            np.copyto(dst, reader.get(name).reshape(-1)[r0 * row_elems(info.shape): r1 * row_elems(info.shape)],
                      casting="unsafe")
            return nbytes
        fd, offset = loc
        out = dst.view(np.uint8)
        pos, start = 0, offset + r0 * row_elems(info.shape) * info.dtype.itemsize
        while pos < out.size:
            got = os.preadv(fd, [out[pos:]], start + pos)
            if got <= 0:
                raise FtjaxError(f"{reader.file_of(name)}: tensor {name!r} ends early; the file was truncated while "
                                 "reading")
            pos += got
        return nbytes

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def aligned(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    a = -raw.ctypes.data % _ALIGN
    return raw[a: a + nbytes]


def _bucket(n: int, cap: int, cap_compiled: bool) -> int:
    """Kernel length for n elements: a power of two (few compiles for small models), or the full buffer when that
    shape is compiled already (a model's last, partial batch then costs no compile, only padding)."""
    return cap if cap_compiled else pow2_bucket(n, MIN_BUCKET, cap)


@dataclasses.dataclass(frozen=True)
class _Segment:
    """Rows [r0, r1) of `job`, at element `offset` of the batch's flat buffers."""

    job: Job
    r0: int
    r1: int
    offset: int


@dataclasses.dataclass(frozen=True)
class _KernelBatch:
    """Segments of jobs that share a kernel, input dtypes and args, packed into `filled` elements."""

    kernel: Kernel
    dtypes: tuple[np.dtype, ...]
    args: tuple
    segments: tuple[_Segment, ...]
    filled: int


@dataclasses.dataclass(frozen=True)
class _CopyBatch:
    """Rows [r0, r1) of `job` copied from `src`."""

    job: Job
    src: Source
    r0: int
    r1: int


def _dtype_of(src: Source) -> np.dtype:
    return np.dtype(np.float32) if src.reader is None else src.reader.info(src.name).dtype


def _plan_batches(jobs: Sequence[Job], cap: int) -> Iterator[_KernelBatch | _CopyBatch]:
    """Kernel batches packing consecutive jobs with the same kernel, input dtypes and args into `cap` elements
    (a positional kernel's batch holds one job), and copy batches of row blocks; in output order."""
    key, segs, filled = None, [], 0

    def flush():
        return _KernelBatch(key[0], key[1], segs[0].job.args, tuple(segs), filled)

    for job in jobs:
        shape, row = job.out.shape, row_elems(job.out.shape)
        if job.kernel is not None and job.rows:
            alone = job.kernel.positional or job.kernel.width
            k = (job.kernel, tuple(_dtype_of(s) for s in job.inputs), _args_key(job.args), job.name if alone else None)
            r = 0
            while r < job.rows:
                if k != key or filled + row > cap:
                    if segs:
                        yield flush()
                    key, segs, filled = k, [], 0
                take = min(job.rows - r, (cap - filled) // row)
                segs.append(_Segment(job, r, r + take, filled))
                filled, r = filled + take * row, r + take
        src, start = (job.rest, job.rows) if job.kernel is not None else (job.inputs[0], 0)
        if start < rows_of(shape):
            if segs:
                yield flush()
            key, segs, filled = None, [], 0
            for r0, r1 in row_chunks(shape, start, rows_of(shape), cap):
                yield _CopyBatch(job, src, r0, r1)
    if segs:
        yield flush()


def _args_key(args: tuple) -> tuple:
    """A hashable, comparable form of a job's traced arguments (numpy scalars or arrays)."""
    return tuple((a.dtype.str, a.shape, a.tobytes()) for a in map(np.asarray, args))


def _index_words(segments: tuple[_Segment, ...]) -> tuple[np.uint32, np.uint32]:
    """The first element index of a positional batch (one job's consecutive rows) as uint32 (hi, lo)."""
    first = segments[0].r0 * row_elems(segments[0].job.out.shape)
    return np.uint32(first >> 32), np.uint32(first & 0xFFFFFFFF)


def stream(jobs: Sequence[Job], on_block: Callable[[Job, tuple[np.ndarray, ...]], None], report: Report,
           progress: bool, *, chunk_elems: int, desc: str = "ftjax") -> None:
    """Run every job through read -> kernel -> `on_block(job, outs)` (outs: a tuple of consecutive row blocks, the
    first is the output tensor's), in job order. `chunk_elems`: elements per kernel call (rows are never split; a
    bigger row gets a bigger buffer). Errors from any thread are re-raised here; report.bytes_read, bytes_written
    and nonfinite are filled in."""
    cap = max([chunk_elems] + [row_elems(j.out.shape) for j in jobs])
    slots = max([len(j.inputs) for j in jobs if j.kernel is not None and j.rows] + [1])
    width = max([j.kernel.width for j in jobs if j.kernel is not None] + [0])
    free: queue.Queue = queue.Queue()
    for _ in range(POOL):  # 8: widest dtype; pages are touched only as used; + width: rounding up to whole rows
        free.put([aligned((cap + width) * 8) for _ in range(slots)])
    todo: queue.Queue = queue.Queue()
    filled_q: queue.Queue = queue.Queue()
    stop, errors, files = threading.Event(), [], Files()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(j.out.nbytes for j in jobs), unit="B", unit_scale=True, desc=desc, leave=False,
                   postfix={"tensors": len(jobs)})

    def emit(job: Job, outs: tuple[np.ndarray, ...]) -> None:
        on_block(job, outs)
        report.bytes_written += outs[0].nbytes
        if bar is not None:
            bar.update(outs[0].nbytes)

    def check(job: Job, a: np.ndarray) -> None:
        if dtypes.is_float(a.dtype) and job.name not in report.nonfinite and _has_nonfinite(a):
            report.nonfinite.append(job.name)

    def writer() -> None:
        try:
            while (item := todo.get()) is not None:
                bufs, batch, outs, n = item
                if isinstance(batch, _KernelBatch):
                    outs = tuple(np.asarray(o) for o in outs)  # waits for the kernel; zero-copy
                    free.put(bufs)  # the kernel is done with its inputs
                    bad = _has_nonfinite(outs[0][:batch.filled])
                    w = batch.kernel.width
                    for seg in batch.segments:
                        shape = seg.job.out.shape
                        rshape = (seg.r1 - seg.r0,) + shape[1:] if shape else ()
                        m = math.prod(rshape)
                        blocks = tuple(o[seg.offset // w: (seg.offset + m) // w] if w and o.shape[0] * w == n
                                       else o[seg.offset: seg.offset + m].reshape(rshape) for o in outs)
                        if bad:
                            check(seg.job, blocks[0])
                        emit(seg.job, blocks)
                else:
                    check(batch.job, outs[0])
                    emit(batch.job, outs)
                    free.put(bufs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            stop.set()
            while todo.get() is not None:  # unblock the producer
                pass

    def wait(q: queue.Queue) -> Any:
        while not stop.is_set():
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                pass
        raise _Stopped

    def reader() -> None:  # fills buffer sets from the files, in output order
        full = set()  # kernels already run at length cap
        try:
            for batch in _plan_batches(jobs, cap):
                bufs = wait(free)
                if isinstance(batch, _KernelBatch):
                    compiled = (batch.kernel, batch.dtypes)
                    n = _bucket(batch.filled, cap, compiled in full)
                    if n == cap:
                        full.add(compiled)
                    if batch.kernel.width:
                        n = -(-n // batch.kernel.width) * batch.kernel.width
                    xs = [b.view(dt)[:n] for b, dt in zip(bufs, batch.dtypes)]
                    for seg in batch.segments:
                        m = (seg.r1 - seg.r0) * row_elems(seg.job.out.shape)
                        for x, src in zip(xs, seg.job.inputs):
                            report.bytes_read += files.read(src, seg.r0, seg.r1, x[seg.offset: seg.offset + m])
                    filled_q.put((bufs, batch, xs))
                else:
                    dt, shape = _dtype_of(batch.src), batch.job.out.shape
                    rshape = (batch.r1 - batch.r0,) + shape[1:] if shape else ()
                    a = bufs[0].view(dt)[: math.prod(rshape)]
                    report.bytes_read += files.read(batch.src, batch.r0, batch.r1, a)
                    a = a.reshape(rshape)
                    filled_q.put((bufs, batch, (a.astype(batch.job.out.dtype) if dt != batch.job.out.dtype else a,)))
            filled_q.put(None)
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
    for th in threads:
        th.start()
    try:  # this thread runs the kernels (XLA:CPU runs a call in the calling thread)
        while (item := wait(filled_q)) is not None:
            bufs, batch, xs = item
            n = xs[0].shape[0]  # the kernel length (a per-row output of a width kernel is a width-th of it)
            if isinstance(batch, _KernelBatch):
                extra = _index_words(batch.segments) if batch.kernel.positional else ()
                xs = _kernel(*xs, *batch.args, *extra, fn=batch.kernel.fn, static=batch.kernel.static)
            todo.put((bufs, batch, xs, n))  # aligned numpy args: aliased, not copied
    except _Stopped:
        pass
    except BaseException:
        stop.set()
        raise
    finally:
        todo.put(None)
        for th in threads:
            th.join()
        files.close()
        if bar is not None:
            bar.close()
    if errors:
        raise errors[0]
