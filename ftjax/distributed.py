"""Multi-process runs on JAX's own distributed runtime: start-up, process-0 file writes, host copies of arrays.

One ftjax process per host (or per GPU); `initialize` connects them through `jax.distributed`, after which
`jax.devices()` lists every process's devices, `ftjax.params.make_mesh` builds one mesh over all of them and
`jit` runs one SPMD program across processes. Every process runs the same command on the same inputs; each
process reads only the checkpoint slices its own devices hold (`ftjax.params.load_params`); small files are written
by process 0 (`is_main`, `main_only`); the streaming transfer / diff / apply split the output shards across
processes, each writing its own into one shared temp dir that process 0 completes and renames (`write_output`),
so in a multi-process run they are collectives: call them on every process, not under `main_only`.
Settings come from flags or the environment:

    --coordinator HOST:PORT   JAX_COORDINATOR_ADDRESS   process 0's address (it listens there)
    --num-processes N         JAX_NUM_PROCESSES
    --process-id I            JAX_PROCESS_ID            0 .. N-1

On CPU the cross-process collectives are gloo's (`jax_cpu_collectives_implementation`); on GPU NCCL and on TPU
the ICI/DCN runtime, both JAX's defaults. Nothing here opens a socket itself.
"""

from __future__ import annotations

import functools
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import jax
import numpy as np

from ftjax.errors import FtjaxError

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
_STATE = {"initialized": False}
F = TypeVar("F", bound=Callable[..., Any])


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> dict[str, Any] | None:
    """The distributed settings from arguments, else the environment; None for a single-process run.

    FtjaxError when they are incomplete or inconsistent (e.g. a process id without a coordinator)."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for key, var in ENV.items():
        if given[key] is None and os.environ.get(var):
            given[key] = os.environ[var]
    if all(v is None for v in given.values()):
        return None
    missing = [f"--{k.replace('_', '-')} ({ENV[k]})" for k, v in given.items() if v is None]
    if missing:
        raise FtjaxError(f"a multi-process run needs {', '.join(missing)} as well")
    try:
        n, i = int(given["num_processes"]), int(given["process_id"])
    except ValueError:
        raise FtjaxError(f"--num-processes and --process-id must be integers, got {given['num_processes']!r} and "
                         f"{given['process_id']!r}") from None
    if n < 1 or not 0 <= i < n:
        raise FtjaxError(f"--process-id must be in [0, {n}) with --num-processes {n}, got {i}")
    if ":" not in str(given["coordinator"]):
        raise FtjaxError(f"--coordinator must be HOST:PORT, got {given['coordinator']!r}")
    return {"coordinator": str(given["coordinator"]), "num_processes": n, "process_id": i}


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int = 300) -> bool:
    """Join the distributed runtime (`jax.distributed.initialize`) when settings are given or in the environment.

    Must run before anything touches a JAX backend. Returns True when this is a multi-process run. A second call
    is a no-op. On CPU selects gloo collectives so cross-process all-reduces and all-gathers work.
    """
    config = settings(coordinator, num_processes, process_id)
    if config is None or _STATE["initialized"]:
        return _STATE["initialized"]
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if "cpu" in platforms.split(",") or not platforms:
        # Harmless when the backend turns out to be GPU/TPU: it only affects CPU devices.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(config["coordinator"], config["num_processes"], config["process_id"],
                                   initialization_timeout=timeout_s)
    except (RuntimeError, ValueError) as e:
        where = f"{config['coordinator']} as process {config['process_id']} of {config['num_processes']}"
        raise FtjaxError(f"joining the distributed run at {where} failed: {str(e).splitlines()[0]}") from None
    _STATE["initialized"] = True
    return True


def process_info() -> tuple[int, int]:
    """(this process's index, number of processes); (0, 1) without touching a backend when JAX's distributed
    runtime was never initialized (by ftjax or by the caller)."""
    if not (_STATE["initialized"] or jax.distributed.is_initialized()):
        return 0, 1
    return jax.process_index(), jax.process_count()


def allgather_ints(values: Sequence[int]) -> np.ndarray:
    """[processes, len(values)]: every process's `values` (int32 range), on every process (a collective; every
    process must call it with the same length). No collective with one process."""
    if process_info()[1] == 1:
        return np.asarray([list(values)], np.int64)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32))).reshape(-1, len(values))


def write_output(out: str | os.PathLike, *, overwrite: bool, inputs: Sequence[Any], work: Callable[[Path, int, int],
                 None], finalize: Callable[[Path, int], None]) -> None:
    """Build output directory `out` atomically, from one process or all of them.

    `work(tmp, process, processes)` runs on every process into the same temp dir (on a filesystem every process
    shares), each writing its own files; once all of them succeeded, `finalize(tmp, processes)` runs on process 0 (index,
    config, provenance) and the dir is renamed to `out`. Any failure anywhere leaves nothing at `out` and raises on
    every process (the failing one with its own error). A collective: every process calls it with the same `out`.
    Exactly three collectives on every path that returns or raises normally, so no process waits for one that
    gave up (a process killed outright, or interrupted between two of them, leaves the others to the runtime's
    heartbeat timeout)."""
    from ftjax.io import checkpoint as ck

    me, n = process_info()
    if n == 1:
        with ck.atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
            work(tmp, 0, 1)
            finalize(tmp, 1)
        return
    out = Path(os.path.abspath(out))
    error: BaseException | None = None
    if me == 0:
        try:
            out, _ = ck.prepare_output_dir(out, overwrite=overwrite, inputs=inputs)
        except BaseException as e:  # noqa: BLE001 - shared below, re-raised
            error = e
    key = zlib.crc32(str(out).encode()) & 0x7FFFFFFF
    got = allgather_ints([os.getpid() if error is None else -1, key])  # 1: the temp dir exists
    pid0 = int(got[0, 0])
    if pid0 < 0:
        if error is not None:
            raise error
        raise FtjaxError(f"process 0 could not create the output {out} (see its error)")
    tmp = ck.temp_sibling(out, pid0)
    if (got[:, 1] != got[0, 1]).any():
        if me == 0:
            ck.discard_output_dir(tmp)
        raise FtjaxError(f"the processes were given different outputs ({out} on process {me}); give every process "
                         f"the same absolute path, on a filesystem they all share")
    try:
        if not tmp.is_dir():
            raise FtjaxError(f"process {me} cannot see {tmp}, made by process 0: the output must be on a "
                             f"filesystem every process shares")
        work(tmp, me, n)
    except BaseException as e:  # noqa: BLE001
        error = ck.os_error(e, tmp) if isinstance(e, OSError) else e
    failed = [i for i, ok in enumerate(allgather_ints([error is None])[:, 0]) if not ok]  # 2: all parts written
    if not failed and me == 0:
        try:
            finalize(tmp, n)
            ck.finish_output_dir(tmp, out)
        except BaseException as e:  # noqa: BLE001
            error = ck.os_error(e, tmp) if isinstance(e, OSError) else e
    finished = bool(allgather_ints([error is None])[0, 0])  # 3: process 0 renamed the dir
    if me == 0 and (failed or not finished):
        ck.discard_output_dir(tmp)
    if error is not None:
        raise error
    if failed:
        raise FtjaxError(f"process{'es' if len(failed) > 1 else ''} {', '.join(map(str, failed))} failed (see "
                         f"{'their' if len(failed) > 1 else 'its'} error); nothing was written at {out}")
    if not finished:
        raise FtjaxError(f"process 0 could not finish {out} (see its error); nothing was written there")


def is_main() -> bool:
    """True on process 0 (and in single-process runs): the process that writes files and prints."""
    return jax.process_index() == 0


def main_only(fn: F) -> F:
    """Decorate a function that writes files: it runs on process 0 only (returns None elsewhere)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs) if is_main() else None

    return wrapped  # type: ignore[return-value]


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (no-op with one process): e.g. after process 0 wrote a file."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
    """numpy copies of every array in `tree`, on every process.

    Process-local and fully replicated arrays are copied directly; arrays sharded across processes are gathered
    with `multihost_utils.process_allgather` (a collective: every process must call this with the same tree).
    """

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def put_global(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global jax.Array from a host array every process holds in full (the same values): each process copies
    only the slices its own devices hold. Works unchanged with one process."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def local_device() -> jax.Device:
    """This process's first device (jax.devices()[0] may belong to another process)."""
    return jax.local_devices()[0]
