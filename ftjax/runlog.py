"""An `ftjax finetune` run directory's record and log: run.json (what the run is, checked on resume) and log.jsonl
(one JSON line per step and per evaluation), the console lines that go with them, and the curves read back."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ftjax import distributed
from ftjax.config import ModelConfig
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import RUN_RECORD
from ftjax.results import dumps

T = TypeVar("T")
RUN_FILE, LOG_FILE = RUN_RECORD, "log.jsonl"
LOCK_FILE = ".ftjax.lock"  # flock'ed by the process writing into a run directory; holds its pid


@contextlib.contextmanager
def run_dir_lock(out: Path, command: str) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on out/LOCK_FILE while `command` writes into the directory `out` (created if
    missing); the kernel releases it when the process ends, however it ends. FtjaxError naming the process that
    holds it when another process does. Only process 0 of a multi-process run locks. The lock file is removed at the
    end when this call created it, and so is the directory when this call created it and it is empty."""
    import fcntl

    if not distributed.is_main():
        yield
        return
    created, lock = not out.exists(), out / LOCK_FILE
    ours = not lock.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise FtjaxError(f"{out}: cannot create the run directory's lock file: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, _, cmd = os.pread(fd, 64, 0).decode(errors="replace").strip().partition(" ")
        os.close(fd)  # not ours to remove: the holder created it
        raise FtjaxError(f"{out} is in use by process {pid or '(unknown pid)'} (`ftjax {cmd or '...'}`, lock "
                         f"{out / LOCK_FILE}); wait for it to end or choose another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        yield
    finally:
        if ours:  # leave no trace in a directory the command refused or left empty
            lock.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        os.close(fd)  # releases the lock


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_record(init: Path, cfg: ModelConfig, train: dict, data: Path) -> dict:
    """run.json: the init model, its ModelConfig, the TrainConfig (as a dict) and the data file's path and hash."""
    model = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    return {"format": "ftjax-finetune", "init": str(init.resolve()), "model": model,
            "train": train, "data": {"path": str(data), "sha256": _sha256(data)}}


def locks_out(command: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: the function (its output directory is its argument named `out`, given by keyword or position)
    runs holding `run_dir_lock(out, command)`."""
    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> T:
            with run_dir_lock(Path(signature.bind(*args, **kwargs).arguments["out"]), command):
                return fn(*args, **kwargs)
        return locked
    return decorate


def check_resume(out: Path, record: dict) -> bool:
    """True when `out` holds an earlier run of the same configuration; FtjaxError when it holds something else."""
    file = out / RUN_FILE
    if not file.is_file():
        if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
            raise FtjaxError(f"{out} exists and is not an ftjax finetune directory; choose another --out")
        return False
    try:
        old = json.loads(file.read_text())
    except ValueError:
        raise FtjaxError(f"{file}: unreadable run record; remove {out} or choose another --out") from None
    differ = [f"init ({old.get('init')} vs {record['init']})"] if old.get("init") != record["init"] else []
    differ += ["model config"] if old.get("model") != record["model"] else []
    old_train = old.get("train", {})
    differ += [f"{k} ({old_train.get(k)!r} vs {v!r})" for k, v in record["train"].items() if old_train.get(k) != v]
    differ += ["data file contents"] if old.get("data", {}).get("sha256") != record["data"]["sha256"] else []
    if differ:
        raise FtjaxError(f"{out} holds a run with a different configuration ({'; '.join(differ)}); resume with the "
                         "same options or choose another --out")
    return True


def read_log(out: Path, upto: int) -> list[dict]:
    """The log entries up to step `upto` (lines cut short by a kill are skipped)."""
    try:
        lines = (out / LOG_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if entry.get("step", 0) <= upto:
            entries.append(entry)
    return entries


def read_curves(run_dir: str | Path) -> dict[str, list]:
    """A run's curves from its log.jsonl: step/loss/lr/grad_norm of training steps, eval_step/eval_loss of evals."""
    if not (Path(run_dir) / LOG_FILE).is_file():
        raise FtjaxError(f"{run_dir} has no {LOG_FILE}; is it an `ftjax finetune` output directory?")
    entries = read_log(Path(run_dir), upto=sys.maxsize)
    train = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval_loss" in e]
    return {"step": [e["step"] for e in train], "loss": [e["loss"] for e in train], "lr": [e["lr"] for e in train],
            "grad_norm": [e["grad_norm"] for e in train], "eval_step": [e["step"] for e in evals],
            "eval_loss": [e["eval_loss"] for e in evals]}


class RunLog:
    """Appends JSON lines to out/log.jsonl (flushed each line); on stderr a one-line progress bar and a line per
    evaluation."""

    def __init__(self, out: Path, keep: list[dict], total: int, progress: bool):
        self.total, self.progress, self.file, self.shown = total, progress and distributed.is_main(), None, ""
        if not distributed.is_main():  # one writer in a multi-process run
            return
        tmp = out / (LOG_FILE + ".tmp")  # rewrite the kept entries atomically: a kill here must not lose the log
        tmp.write_text("".join(json.dumps(e) + "\n" for e in keep))
        os.replace(tmp, out / LOG_FILE)
        self.file = open(out / LOG_FILE, "a")

    def write(self, entry: dict) -> None:
        if self.file is None:
            return
        self.file.write(dumps(entry) + "\n")
        self.file.flush()

    def bar(self, entry: dict) -> None:
        if self.progress:
            done = int(30 * entry["step"] / max(self.total, 1))
            self.shown = (f"[{'#' * done}{'.' * (30 - done)}] step {entry['step']}/{self.total}  loss "
                          f"{entry['loss']:.4f}  lr {entry['lr']:.2e}  {entry['nonpad_tokens_per_s']:.0f} tokens/s "
                          "(non-pad)")
            print("\r" + self.shown, end="", file=sys.stderr, flush=True)

    def line(self, text: str) -> None:
        """A line of its own, printed above the progress bar (which is drawn again below it)."""
        if self.progress:
            print("\r" + text.ljust(len(self.shown)), file=sys.stderr)
            print(self.shown, end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress and self.shown:
            print(file=sys.stderr)
        if self.file is not None:
            self.file.close()


def eval_line(step: int, result: dict) -> str:
    """The console line of an evaluation during training: step, loss (nats/token), ppl, tokens, compute dtype and
    the weights evaluated ("float32 master" or "as saved, <dtype>")."""
    extra = "".join(f"  {k} {result[k]:.4f}" for k in ("exact_match", "acc", "acc_norm") if k in result)
    return (f"eval step {step}: loss {result['loss']:.6f} nats  ppl {result['ppl']:.4f}  tokens {result['tokens']}"
            f"{extra}  ({result['dtype']} compute)"
            + (f"  weights: {result['weights']}" if "weights" in result else ""))


def last_metrics(out: Path) -> dict:
    """The last step's loss and throughput and the last evaluation, from a run's log."""
    entries = read_log(out, upto=sys.maxsize)
    train = [e for e in entries if "loss" in e]
    evals = [{k.removeprefix("eval_"): v for k, v in e.items() if k.startswith("eval_")} for e in entries
             if "eval_loss" in e]
    last = {"loss": train[-1]["loss"], "nonpad_tokens_per_s": train[-1].get("nonpad_tokens_per_s")} if train else {}
    return {**last, **({"eval": evals[-1]} if evals else {})}
