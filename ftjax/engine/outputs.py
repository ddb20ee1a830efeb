"""Writing a streamed checkpoint: the jobs of `ftjax.engine.streaming` into an atomic Hugging Face directory, with its
config, the tokenizer files of one input and an ftjax provenance record; one or several processes.

With several processes (jax.distributed) every process plans the same shards and process i streams shards i, i+N,
... into one shared temp dir, recording what it did in a small part file; process 0 then merges the parts into the
report, writes the index and the small files, and renames. The bytes equal a 1-process run's.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

import ftjax
from ftjax import distributed
from ftjax.config import read_config
from ftjax.errors import FtjaxError
from ftjax.results import absolute_paths
from ftjax.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, RECORD_KEY, HFCheckpointWriter, copy_aux_files, write_json
from ftjax.io.safetensors import TensorInfo
from ftjax.engine.streaming import Job, WriteBehind, stream

if TYPE_CHECKING:  # the report type only; engine.plan does not import the engine
    from ftjax.engine.plan import Report

CHUNK_ELEMS = 1 << 20  # elements per kernel call: a 2 MB bf16 input buffer, cache-sized (RESULTS.md has the A/B)


@dataclasses.dataclass(frozen=True)
class Output:
    """Where and how a command writes: the directory, the inputs it must not overlap, and the write options."""

    path: Path
    inputs: tuple[Path, ...]
    overwrite: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    progress: bool = True
    strict: bool = False  # NaN/Inf in an output tensor is an error (nothing written)


@dataclasses.dataclass(frozen=True)
class Finish:
    """The small files: config.json, the non-weight files of `aux_from` (tokenizer, chat template ...) and the
    provenance record `record_name` (`record` plus the report and the list of files written)."""

    config: dict
    aux_from: Path
    record_name: str
    record: dict
    own_files: tuple[str, ...] = ()  # files of aux_from never copied (an input's own ftjax records)
    edit: Callable[[Path], None] | None = None  # changes the copied small files in the temp dir (e.g. a chat template)


class Extras(Protocol):
    """Per-process state a command keeps beside the tensors (e.g. `diff`'s exact remainders and norms)."""

    def open(self, path: Path) -> None: ...
    def add(self, job: Job, outs: tuple[np.ndarray, ...]) -> None: ...
    def close(self) -> dict: ...
    def finish(self, tmp: Path, record: dict, parts: list[tuple[Path, dict]], outs: dict[str, TensorInfo],
               order: dict[str, int]) -> None: ...


def provenance(kind: str, inputs: dict[str, str], config: dict, **fields: Any) -> dict:
    """The provenance record of an output whose config.json is `config` (its inert keys listed, see ftjax.config):
    `inputs` (role -> path, as given) and the same paths made absolute ("inputs_absolute")."""
    try:
        parsed = read_config(config)
        config_keys = {"ignored_keys": list(parsed.ignored), "notes": list(parsed.notes)}
    except FtjaxError:  # a family ftjax does not model: the tensor arithmetic does not depend on it
        config_keys = {}
    return {"ftjax_version": ftjax.__version__, "kind": kind, "inputs": inputs,
            "inputs_absolute": absolute_paths(inputs),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": config_keys, **fields}


def write_checkpoint(output: Output, jobs: Sequence[Job], report: Report, finish: Finish, *, t0: float,
                     extras: Extras | None = None) -> None:
    """Stream `jobs` into an atomic temp dir as a HF checkpoint (each row block cast to its job's output dtype), then
    the small files of `finish`; `report` gets the byte counts (bytes_read adds to what it holds), NaN/Inf tensors and
    seconds. Multi-process: a collective (see the module docstring)."""

    def work(tmp: Path, me: int, n: int) -> None:
        with HFCheckpointWriter(tmp, [j.out for j in jobs], output.max_shard_bytes, part=(me, n)) as w:
            mine = set(w.tensors())
            part = type(report)(report.kind, report.out, report.inputs)
            if extras is not None:
                extras.open(tmp / f".ftjax-extras-{me}.tmp")
            wb = WriteBehind(w)

            def on_block(job: Job, outs: tuple[np.ndarray, ...]) -> None:
                wb.write(job.name, outs[0].astype(job.out.dtype, copy=False))
                if extras is not None:
                    extras.add(job, outs)

            stream([j for j in jobs if j.name in mine], on_block, part, output.progress and me == 0,
                   chunk_elems=CHUNK_ELEMS, desc=f"ftjax {report.kind}")
        write_json(tmp / f".ftjax-part-{me}.json", {"bytes_read": part.bytes_read, "nonfinite": part.nonfinite,
                                                     "bytes_written": part.bytes_written,
                                                     "extras": extras.close() if extras is not None else {}})

    def done(tmp: Path, n: int) -> None:
        order = {j.name: k for k, j in enumerate(jobs)}
        parts = []
        for i in range(n):
            path = tmp / f".ftjax-part-{i}.json"
            try:
                parts.append(json.loads(path.read_text()))
            except (OSError, ValueError) as e:
                raise FtjaxError(f"{path}: process {i}'s part report is missing or unreadable ({e})") from None
            path.unlink()
        report.bytes_read += sum(p["bytes_read"] for p in parts)  # after any reads before the write (statistics)
        report.bytes_written = sum(p["bytes_written"] for p in parts)
        report.nonfinite = sorted((t for p in parts for t in p["nonfinite"]), key=order.__getitem__)
        record = dict(finish.record)
        if extras is not None:
            extras.finish(tmp, record, [(tmp / f".ftjax-extras-{i}.tmp", p["extras"]) for i, p in enumerate(parts)],
                          {j.name: j.out for j in jobs}, order)
        report.seconds = time.perf_counter() - t0
        if report.nonfinite and output.strict:
            raise FtjaxError(f"NaN/Inf in {len(report.nonfinite)} output tensor(s): "
                             f"{', '.join(report.nonfinite[:8])} (--strict); nothing was written")
        copy_aux_files(finish.aux_from, tmp, skip=(*finish.own_files, finish.record_name, "config.json"))
        write_json(tmp / "config.json", finish.config)
        if finish.edit is not None:
            finish.edit(tmp)
        files = sorted({p.name for p in tmp.iterdir()} | {finish.record_name})  # what --overwrite may replace
        write_json(tmp / finish.record_name, {**record, "report": report.to_dict(), RECORD_KEY: files})

    distributed.write_output(output.path, overwrite=output.overwrite, inputs=list(output.inputs), work=work,
                             finalize=done)
