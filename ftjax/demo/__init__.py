"""The embedded default: a miniature, controlled reproduction of Lin et al.'s version-transfer study.

`ftjax demo --out DIR` (= `python scripts/transfer.py --demo`) builds a synthetic world from a seed, trains a
family of tiny Llama "versions" with ftjax's own training step, fine-tunes each, and measures transfer
(the paper's Table 3 grid), α sweeps, linear-mode connectivity, transferring-then-finetuning and recycling.
It writes DIR/report.md, DIR/results.json, the PNGs, and real Hugging Face checkpoints under DIR/seed<k>/.

Modules: `world` (tokenizer, corpora, task), `engine` (in-memory training and scoring on ftjax.train's step),
`study` (the experiment), `progress` (a bar per stage), `verdicts` (claims (a)–(f) decided from the numbers),
`claims` (their text), `report` (results.json, report.md, tables), `figures` (PNGs).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from ftjax.errors import FtjaxError, describe
from ftjax.io.checkpoint import RECORD_KEY, check_replaceable

RECORD = "ftjax_demo.json"  # what the demo wrote, so that --overwrite replaces nothing else


def _record(out: Path, entries: Sequence[str]) -> None:
    (out / RECORD).write_text(json.dumps({"written_by": "ftjax demo", RECORD_KEY: sorted({*entries, RECORD})}) + "\n")


def resolve_seeds(seeds: int | Sequence[int] | None, seed: int) -> tuple[int, ...] | None:
    """--seeds as seeds: a count N -> (seed, ..., seed + N − 1); a sequence -> itself; None stays None (the mode's
    default)."""
    if seeds is None:
        return None
    if isinstance(seeds, int):
        if seeds < 1:
            raise FtjaxError(f"--seeds {seeds}: the count of seeds must be at least 1")
        return tuple(range(seed, seed + seeds))
    return tuple(int(s) for s in seeds)


def _cores() -> int:
    """CPU cores this process may run on (its affinity mask under taskset or a container's cpuset, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(n_seeds: int) -> int:
    """Seeds run at once by default: one per seed, up to one more than the CPU cores. A quick seed keeps about 3/4
    of one core busy (124 s user over 168 s wall on 2 cores, benchmarks/RESULTS.md), so one process per core
    would leave cores idle."""
    return max(1, min(n_seeds, _cores() + 1))


def _seed_in_worker(config: Any, seed: int, out: Path, quiet: bool) -> dict[str, Any]:
    """`study.run_seed` in a worker process: the log on stdout unless quiet, no progress bars (they would
    interleave)."""
    from ftjax.demo import study

    log = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))
    return study.run_seed(config, seed, out, log=log)


def run_seeds_concurrently(config: Any, out: Path, workers: int, quiet: bool = True) -> list[dict[str, Any]]:
    """`study.run_seed` for every seed of `config` (checkpoints under out/seed<k>), `workers` fresh processes
    ("spawn": each with its own JAX runtime) at a time; the results in the order of config.seeds, equal to those of
    running the seeds one after another."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(_seed_in_worker, config, s, out / f"seed{s}", quiet) for s in config.seeds]
        try:
            return [f.result() for f in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # seeds not started yet are dropped
            raise


def _config(mode: str, seeds: tuple[int, ...] | None, seed: int, config: Any, world: str | None) -> Any:
    """The StudyConfig a run uses: `config`, else the mode's (with `seeds` if given), then the stage boundary
    `world` if given; FtjaxError for an unknown mode or world."""
    from ftjax.demo import study

    if config is None:
        if mode == "full":
            config = study.StudyConfig.full(tuple(seeds) if seeds else (seed, seed + 1, seed + 2))
        elif mode == "tiny":
            config = study.StudyConfig.tiny(seed)
        elif mode == "quick":
            config = study.StudyConfig.quick(seed)
        else:
            raise FtjaxError(f"unknown demo mode {mode!r}; use quick, full or tiny")
        if seeds and mode != "full":
            config = dataclasses.replace(config, seeds=tuple(seeds))
    return config if world is None else config.with_stage2(world)


def run_demo(out: str | Path, *, seed: int = 0, overwrite: bool = False, mode: str = "quick",
             seeds: int | Sequence[int] | None = None, quiet: bool = False, config: Any = None,
             world: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """Run the study and write the report. mode: "quick" (the default: 3 seeds from `seed`, about 5 minutes on 2
    CPU cores), "full" (>= 3 seeds, longer training, every transfer-then-finetune pair) or "tiny" (CI: structure
    only, one seed). `seeds` chooses the seeds in any mode: a count from `seed` or the seeds themselves
    (`resolve_seeds`). `config` (a `study.StudyConfig`) overrides the mode. `world`: the stage boundary, a key of
    `study.STAGE2` (default: the configuration's own). `workers`: seeds run at once, each in its own process
    (default `default_workers`; 1: one after another in this process, with progress bars); a seed's results do not
    depend on it. Progress bars (stderr, only on a terminal) and the log (stdout) are off with quiet. Returns the
    aggregated summary (also in out/results.json)."""
    from ftjax.demo import report, study
    from ftjax.demo.progress import Progress

    out = Path(out)
    config = _config(mode, resolve_seeds(seeds, seed), seed, config, world)  # every refusal before out is touched
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FtjaxError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
        check_replaceable(out)  # only an earlier demo's files (its record lists them) or an empty directory
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))
    # before anything else, everything the run may write: a run that fails anywhere can be replaced by --overwrite
    _record(out, [*(f"seed{s}" for s in config.seeds), *report.OUTPUTS])
    t0 = time.perf_counter()
    results, doing = [], "starting"
    try:
        workers = default_workers(len(config.seeds)) if workers is None else max(1, min(workers, len(config.seeds)))
        if workers == 1:
            for s in config.seeds:
                doing = f"running seed {s}"
                log(f"ftjax demo: seed {s} -> {out / f'seed{s}'}")
                results.append(study.run_seed(config, s, out / f"seed{s}", log=log,
                                              progress=Progress(enabled=not quiet)))
        else:
            doing = f"running seeds {', '.join(map(str, config.seeds))} in {workers} processes"
            log(f"ftjax demo: seeds {', '.join(map(str, config.seeds))} -> {out}/seed<k>, {workers} at a time "
                "(one process each; per-stage times below, no progress bars)")
            results = run_seeds_concurrently(config, out, workers, quiet)
        doing = "writing the report"
        summary = report.write(out, config, results, seconds=time.perf_counter() - t0)
    except Exception as e:
        raise FtjaxError(f"ftjax demo failed while {doing} ({describe(e)}); {out} holds a partial run, which "
                         f"`ftjax demo --out {out} --overwrite` replaces") from e
    log(report.main_table(summary))
    log(f"ftjax demo: {time.perf_counter() - t0:.0f} s; wrote {out / 'report.md'}, {out / 'results.json'} and "
        f"checkpoints under {out}/seed{config.seeds[0]}/ (try `ftjax inspect {out}/seed{config.seeds[0]}/models/M5`)")
    return summary


def load_results(out: str | Path) -> dict[str, Any]:
    """The summary a demo run wrote (out/results.json)."""
    return json.loads((Path(out) / "results.json").read_text())
