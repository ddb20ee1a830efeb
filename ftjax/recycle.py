"""Iterative recycling-then-finetuning (the paper's Algorithm 1), the direct baseline and plain fine-tuning.

Given base versions M1..Mn and one fine-tuning recipe FT (`ftjax.train.finetune`):
    iterative   M1* = FT(M1);  Mi* = FT(Mi + (M(i-1)* - M(i-1)))      the diff carried forward includes all earlier FT
    direct      M1* = FT(M1);  Mi* = FT(Mi + (FT(M(i-1)) - M(i-1)))   the diff of a plain FT of the previous version
    plain       Mi* = FT(Mi)
The transfer is the streaming engine (`ftjax.transfer.transfer`, exact, one rounding). With two versions iterative
and direct are the same computation; with zero steps FT is the identity, so Mi* is the transferred model.

Output directory:
    out/recycle.json            versions, mode and TrainConfig (checked when the same command is re-run)
    out/M<i>_star/              the fine-tuning run of version i (log.jsonl, checkpoints/, final/ = Mi*)
    out/M<i>_plain/             direct mode: the plain FT of version i (i >= 2) whose diff is carried forward
    out/M<i>_init/              Mi + Δ, the starting point of Mi* (i >= 2)
    out/delta_<i>/              Δ carried from version i to i+1, an `ftjax diff` directory (float32)
    out/summary.json, summary.md, curves.png/pdf
Every step writes atomically and is skipped when its output is complete, so an interrupted command resumes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from ftjax.errors import FtjaxError
from ftjax.runlog import LOCK_FILE, locks_out
from ftjax.train import FINAL_DIR, TrainConfig, finetune, read_curves

MODES = ("iterative", "direct", "plain")
RECORD = "recycle.json"


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file()


def _check_record(out: Path, record: dict) -> None:
    file = out / RECORD
    if file.is_file():
        old = json.loads(file.read_text())
        if old != record:
            differ = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            raise FtjaxError(f"{out} holds a recycle run with different {', '.join(differ)}; re-run with the same "
                             "options or choose another --out")
    elif out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise FtjaxError(f"{out} exists and is not an ftjax recycle directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(record, indent=1) + "\n")


@locks_out("recycle")
def recycle(versions: Sequence[str | Path], data: str | Path, out: str | Path, *, config: TrainConfig,
            mode: str = "iterative", eval_data: str | Path | None = None, eval_every: int = 0, save_every: int = 0,
            keep: int = 2, eval_dtype: str = "float32", save_dtype: str | None = None, mesh: Any = None,
            progress: bool = True) -> dict[str, Any]:
    """Run Algorithm 1 (mode="iterative"), the direct baseline or plain FT over base versions M1..Mn (oldest first).

    Every fine-tuning run uses the same TrainConfig, data and seed; eval_data, eval_every, save_every, keep,
    eval_dtype and save_dtype are passed to each (`ftjax.train.finetune`). Returns the summary (also written to
    out/summary.json): one entry per version with its base, init, run directory, Mi* and the first/last losses.
    `out` is locked while the command runs: a second process on it stops with an error naming the first.
    """
    from ftjax import transfer as engine
    from ftjax.io.checkpoint import resolve_model_path

    if mode not in MODES:
        raise FtjaxError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if len(versions) < 1:
        raise FtjaxError("recycle needs at least one version (--versions M1 M2 ...)")
    config.check()
    bases = [resolve_model_path(v) for v in versions]
    out = Path(out)
    record = {"format": "ftjax-recycle", "mode": mode, "versions": [str(b.resolve()) for b in bases],
              "data": str(Path(data).resolve()), "train": dataclasses.asdict(config)}
    _check_record(out, record)
    train = dict(config=config, eval_data=eval_data, eval_every=eval_every, save_every=save_every, keep=keep,
                 eval_dtype=eval_dtype, save_dtype=save_dtype, mesh=mesh, progress=progress)

    def ft(init: Path, run: Path) -> Path:
        if not _complete(run / FINAL_DIR):
            if progress:
                print(f"ftjax recycle: fine-tuning {init} -> {run}")
            finetune(init, data, run, **train)
        return run / FINAL_DIR

    def carry(base: Path, tuned: Path, target: Path, i: int) -> tuple[Path, Path]:
        """Δ_i = tuned - base (kept), and M(i+1) + Δ_i."""
        delta, init = out / f"delta_{i}", out / f"M{i + 1}_init"
        if not _complete(delta):
            engine.diff(base, tuned, delta, progress=False)
        if not _complete(init):
            engine.transfer(base, tuned, target, init, progress=False)
        return delta, init

    entries = []
    star = ft(bases[0], out / "M1_star")
    entries.append({"version": 1, "base": str(bases[0]), "init": str(bases[0]), "delta_in": None,
                    "run": str(out / "M1_star"), "final": str(star)})
    for i in range(2, len(bases) + 1):
        base, prev = bases[i - 1], bases[i - 2]
        if mode == "plain":
            init, delta = base, None
        elif mode == "iterative":
            delta, init = carry(prev, Path(entries[-1]["final"]), base, i - 1)
        else:  # direct: the plain FT of the previous version (for version 1 that is M1* itself)
            tuned = Path(entries[0]["final"]) if i == 2 else ft(prev, out / f"M{i - 1}_plain")
            delta, init = carry(prev, tuned, base, i - 1)
        run = out / f"M{i}_star"
        entries.append({"version": i, "base": str(base), "init": str(init), "delta_in": delta and str(delta),
                        "run": str(run), "final": str(ft(init, run))})
    for entry in entries:
        curves = read_curves(entry["run"])
        entry["first_loss"] = curves["loss"][0] if curves["loss"] else None
        entry["final_loss"] = curves["loss"][-1] if curves["loss"] else None
        entry["start_eval_loss"] = curves["eval_loss"][0] if curves["eval_loss"] else None
        entry["final_eval_loss"] = curves["eval_loss"][-1] if curves["eval_loss"] else None
    summary = {"mode": mode, "steps": config.steps, "versions": entries}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(format_table(summary) + "\n")
    if config.steps > 0:
        from ftjax import plots

        plots.plot_curves({f"M{e['version']}*": read_curves(e["run"]) for e in entries}, out / "curves",
                          title=f"recycling ({mode}): fine-tuning curves")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table: per version, where it started and the train/eval loss (nats/token) at start and end."""
    def fmt(x):
        return "–" if x is None else f"{x:.4f}"

    lines = [f"mode: {summary['mode']}, {summary['steps']} steps per version", "",
             "| version | init | first train loss | final train loss | eval loss at start | final eval loss |",
             "|---|---|---|---|---|---|"]
    for e in summary["versions"]:
        start = "M{0}".format(e["version"]) + (" + Δ" if e["delta_in"] else "")
        lines.append(f"| M{e['version']}* | {start} | {fmt(e['first_loss'])} | {fmt(e['final_loss'])} | "
                     f"{fmt(e['start_eval_loss'])} | {fmt(e['final_eval_loss'])} |")
    return "\n".join(lines)
