"""`ftjax` command line: argument parsing, progress and exit codes over the public API; nothing else.

Exit status: 0 success, 2 bad input (one line on stderr: `ftjax: error: ...`), 1 any other error (one line naming
its type and, where known, the file; the traceback with `--debug` or FTJAX_DEBUG=1), 130 interrupted (SIGINT, Ctrl-C),
143 terminated (SIGTERM, e.g. a scheduler's time limit). Both signals become exceptions in the main thread, so every
output being written is removed on the way out (`io.checkpoint.atomic_output_dir`); SIGKILL cannot be caught, and
its leftover temp directory is removed by the next run into the same output.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from ftjax.cli_args import build_parser, parse_args  # noqa: F401 - build_parser: public
from ftjax.errors import FtjaxError, describe
from ftjax.results import absolute_paths, dumps, write_json


def _print_report(report, args) -> None:
    if args.json:
        print(json.dumps(report.to_dict(), indent=None))
    elif not args.quiet:
        print(report.summary())


def _cmd_transfer(args) -> None:
    from ftjax import lora, transfer

    if (args.source_ft is None) == (args.source_lora is None):
        raise FtjaxError("give one of --source-ft (a fine-tuned model) and --source-lora (a PEFT LoRA adapter)")
    if args.source_lora is not None:
        if args.vocab != "pad" or args.config_from != "target":
            raise FtjaxError("--vocab and --config-from do not apply to --source-lora (the output keeps the target's)")
        report = lora.transfer_lora(
            args.source_lora, args.target_base, args.out, source_base=args.source_base, alpha=args.alpha,
            alpha_for=args.alpha_for, skip=args.skip, dtype=args.dtype, tokenizer_from=args.tokenizer_from,
            overwrite=args.overwrite, dry_run=args.dry_run, strict=args.strict, max_shard_bytes=args.max_shard_size,
            progress=not (args.quiet or args.json))
        return _print_report(report, args)
    if args.source_base is None:
        raise FtjaxError("--source-ft needs --source-base (the model it was fine-tuned from)")
    report = transfer.transfer(
        args.source_base, args.source_ft, args.target_base, args.out,
        alpha=args.alpha, alpha_for=args.alpha_for, skip=args.skip, vocab=args.vocab, dtype=args.dtype,
        config_from=args.config_from, tokenizer_from=args.tokenizer_from, overwrite=args.overwrite,
        dry_run=args.dry_run, strict=args.strict, max_shard_bytes=args.max_shard_size,
        progress=not (args.quiet or args.json),
    )
    _print_report(report, args)


def _cmd_fit_alpha(args) -> None:
    from ftjax import fit_alpha

    result = fit_alpha.fit_to_dir(
        args.target, args.source_ft, args.source_base, args.data, args.out, eval_data=args.eval,
        overwrite=args.overwrite, progress=not (args.quiet or args.json), groups=args.groups, steps=args.steps,
        lr=args.lr, init=args.init, bounds=args.bounds, seed=args.seed, batch_size=args.batch_size,
        max_len=args.max_len, objective=args.objective, save_every=args.save_every, mesh=_mesh(args),
        remat=args.remat)
    if args.json:
        print(dumps(result))
    elif not args.quiet:
        s = result["scores"]
        held = f", held-out {s['eval']['init']:.4f} -> {s['eval']['fit']:.4f}" if "eval" in s else ""
        print(f"fit {len(result['groups'])} alpha(s) x {len(args.source_ft)} diff(s) in {args.steps} steps: "
              f"calibration loss {s['calibration']['init']:.4f} -> {s['calibration']['fit']:.4f}{held}; wrote "
              f"{args.out}/alpha.json and {args.out}/model")


def _cmd_merge(args) -> None:
    from ftjax import merge

    report = merge.merge(args.config, args.out, seed=args.seed, overwrite=args.overwrite, dry_run=args.dry_run,
                         max_shard_bytes=args.max_shard_size, progress=not (args.quiet or args.json))
    _print_report(report, args)


def _cmd_diff(args) -> None:
    from ftjax import transfer

    report = transfer.diff(args.base, args.ft, args.out, dtype=args.dtype, overwrite=args.overwrite,
                           max_shard_bytes=args.max_shard_size, progress=not (args.quiet or args.json))
    _print_report(report, args)


def _cmd_apply(args) -> None:
    from ftjax import transfer

    report = transfer.apply(
        args.target, args.diff, args.out, alpha=args.alpha, alpha_for=args.alpha_for, skip=args.skip,
        vocab=args.vocab, dtype=args.dtype, overwrite=args.overwrite, dry_run=args.dry_run, strict=args.strict,
        max_shard_bytes=args.max_shard_size, progress=not (args.quiet or args.json),
    )
    _print_report(report, args)


def _cmd_extract_lora(args) -> None:
    from ftjax.lora_extract import extract_lora

    report = extract_lora(args.base, args.ft, args.out, rank=args.rank, energy=args.energy,
                          target_modules=args.target_modules, skip=args.skip, diff=args.diff,
                          overwrite=args.overwrite, plot=args.plot, progress=not (args.quiet or args.json))
    _print_report(report, args)


def _cmd_convert(args) -> None:
    from ftjax.convert import convert

    out = convert(args.src, args.dst, to=args.to, overwrite=args.overwrite)
    print(f"wrote {out}")


def _cmd_inspect(args) -> None:
    from ftjax.convert import inspect_checkpoint

    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "none"
        print(f"{key:<{width}}  {value}")


def _examples(args, *model_dirs: Path):
    """The data file's rows encoded (`data.encode_file`; text and chat rows with the first of model_dirs that has a
    tokenizer)."""
    from ftjax.data import encode_file

    return encode_file(args.data, model_dirs)


def _mesh(args):
    import jax

    from ftjax.params import make_mesh

    # A multi-process run always needs a mesh over every process's devices (default: all on fsdp).
    return make_mesh(args.mesh) if args.mesh or jax.process_count() > 1 else None


def _is_main() -> bool:
    from ftjax.distributed import is_main

    return is_main()


def _cmd_generate(args) -> None:
    from ftjax import generate as gen
    from ftjax.data import read_jsonl
    from ftjax.io.checkpoint import resolve_model_path
    from ftjax.params import load_params

    model_dir = resolve_model_path(args.model)
    setup = gen.TextSetup.load(model_dir, chat=args.chat)
    prompts = [args.prompt] if args.prompt is not None else gen.prompts_from_rows(read_jsonl(args.prompts),
                                                                                   source=str(args.prompts))
    ids = setup.encode(prompts, system=args.system)
    gen.check_generation_args(setup.cfg, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              batch_size=args.batch_size)
    cfg, params = load_params(model_dir, dtype=None if args.dtype == "auto" else args.dtype, mesh=_mesh(args))
    completions = gen.generate_ids(params, cfg, ids, max_new_tokens=args.max_new_tokens, eos_ids=setup.eos_ids,
                                   temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                   batch_size=args.batch_size)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        text = gen.decode(setup.tokenizer, completion, setup.eos_ids)
        if args.json:
            print(json.dumps({"prompt": prompt, "generation": text, "tokens": len(completion.tokens),
                              "finish_reason": completion.finish_reason}, ensure_ascii=False))
        else:
            print(text if len(prompts) == 1 else f"--- {i + 1} ---\n{text}")


def _harness_options(args, command: str) -> tuple[Any, list[str], dict[str, Any]]:
    """(ftjax.lm_eval, task names, evaluate_tasks' keywords) from the harness flags; errors before any loading."""
    try:
        from ftjax import lm_eval as harness
    except ImportError as e:
        raise FtjaxError(f"{command} needs lm-evaluation-harness ({e.name} is missing); "
                         "install it with: pip install 'ftjax[eval]'") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
    if limit is not None and limit <= 0:
        raise FtjaxError(f"--limit must be positive, got {args.limit}")
    harness.check_chat_options(args.apply_chat_template, args.fewshot_as_multiturn)
    manager = harness.task_manager(tasks, args.include_path)
    options = dict(include_path=args.include_path, manager=manager, limit=limit, num_fewshot=args.num_fewshot,
                   seed=getattr(args, "seed", 0), apply_chat_template=args.apply_chat_template,
                   system_instruction=args.system_instruction, fewshot_as_multiturn=args.fewshot_as_multiturn)
    return harness, tasks, options


def _cmd_lm_eval(args) -> None:
    from ftjax.io.checkpoint import resolve_model_path

    if args.batch_size == "auto":
        raise FtjaxError("--batch-size auto is not supported by the ftjax backend (requests are bucketed to fixed "
                         "shapes, so a batch size is only a memory bound): give a number, e.g. --batch-size 8")
    harness, tasks, options = _harness_options(args, "lm-eval")
    model_dir = resolve_model_path(args.model)
    lm = harness.FtjaxLM(pretrained=model_dir, dtype=args.dtype, batch_size=args.batch_size, max_length=args.max_length)
    results = harness.evaluate_tasks(lm, tasks, **options)
    text = harness.results_json(results)
    if _is_main():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, args.out)
    print(harness.results_table(results))
    print(f"wrote {args.out}")


def _eval_by_generation(args, model_dir: Path) -> bool:
    """Score {"prompt", "answer"} rows by generating; False (nothing done) when the rows are for loss scoring."""
    from ftjax import generate as gen
    from ftjax.data import read_jsonl

    rows = read_jsonl(args.data)
    if not gen.generation_rows(rows):
        return False
    metrics, records = gen.evaluate_generation_dir(
        model_dir, rows, chat=args.chat, system=args.system, max_new_tokens=args.max_new_tokens,
        extract=args.extract, batch_size=args.batch_size, dtype=args.dtype, mesh=_mesh(args))
    if args.out is not None:
        write_json(args.out / "eval.json", metrics)
        if _is_main():
            (args.out / "generations.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    if args.json:
        print(dumps(metrics))
    else:
        print(f"exact_match {metrics['exact_match']:.4f}  ({metrics['correct']}/{metrics['rows']} rows, "
              f"{metrics['generated_tokens']} tokens generated, {metrics['tokens_per_s']:.0f} tokens/s)"
              + (f"; wrote {args.out / 'eval.json'}, generations.jsonl" if args.out is not None else ""))
    return True


def _metrics_line(result: dict) -> str:
    extra = "".join(f"  {k} {result[k]:.4f}" for k in ("exact_match", "acc", "acc_norm") if k in result)
    return f"loss {result['loss']:.6f} nats  ppl {result['ppl']:.4f}  tokens {result['tokens']}{extra}"


def _cmd_eval(args) -> None:
    from ftjax.data import check_vocab
    from ftjax.evaluate import evaluate_loss
    from ftjax.io.checkpoint import resolve_model_path
    from ftjax.params import load_params

    _check_out_dir(args.out, "eval.json", "generations.jsonl")
    model_dir = resolve_model_path(args.model)
    if _eval_by_generation(args, model_dir):
        return
    encoded = _examples(args, model_dir)
    mesh = _mesh(args)
    cfg, params = load_params(model_dir, mesh=mesh)
    check_vocab(encoded.examples, cfg.vocab_size, source=str(args.data))
    result = evaluate_loss(params, cfg, encoded.examples, batch_size=args.batch_size, max_len=args.max_len,
                           dtype=args.dtype, mesh=mesh)
    result.update(rows=len({e.row for e in encoded.examples}) + len(encoded.skipped),
                  skipped_rows=len(encoded.skipped), dtype=args.dtype)
    if args.out is not None:
        write_json(args.out / "eval.json", result)
    if args.json:
        print(dumps(result))
    else:
        covers = ", ".join(f"{metric} on {result[key]}" for metric, key in (
            ("loss", "loss_rows"), ("exact_match", "completion_rows"), ("acc", "choice_rows")) if key in result)
        skipped = f", {result['skipped_rows']} skipped with nothing to score" if result["skipped_rows"] else ""
        cut = f", {result['cut_rows']} skipped as --max-len cuts what they score" if result["cut_rows"] else ""
        print(f"{_metrics_line(result)}  ({result['rows']} rows: {covers}{skipped}{cut}; {args.dtype}; "
              f"{result['tokens_per_s']:.0f} tokens/s)")


def _check_out_dir(out: Path | None, *names: str) -> None:
    """A command's --out directory, before any compute: new, or holding only these files (see io.checkpoint)."""
    from ftjax.io.checkpoint import check_files_dir

    if out is not None:
        check_files_dir(out, names)


def _labels(*models: str) -> list[str]:
    """Directory names (or repo ids) as plot labels; generic names if they collide."""
    names = [Path(str(m)).name or str(m) for m in models]
    return names if len(set(names)) == len(names) else [f"Model {chr(65 + i)}" for i in range(len(models))]


def _cmd_scan(args) -> None:
    from ftjax import lmc, plots
    from ftjax.data import check_vocab
    from ftjax.io.checkpoint import resolve_model_path

    _check_out_dir(args.out, "scan.json", "scan.png", "scan.pdf")
    if args.along_diff:
        need = {"--target": args.target, "--source-ft": args.source_ft, "--source-base": args.source_base}
        if args.a or args.b:
            raise FtjaxError("--along-diff takes --target, --source-ft and --source-base, not --a/--b")
    else:
        need = {"--a": args.a, "--b": args.b}
    missing = [k for k, v in need.items() if v is None]
    if missing:
        raise FtjaxError(f"scan needs {', '.join(missing)}")
    lambdas = lmc.grid(args.points, *lmc.parse_range(args.range))
    harness = _harness_options(args, "scan --tasks") if args.tasks is not None else None
    dirs = {k: resolve_model_path(v) for k, v in need.items()}
    examples = _examples(args, *dirs.values()).examples
    mesh = _mesh(args)
    cfg, thetas = lmc.load_models({k.lstrip("-"): v for k, v in dirs.items()}, mesh=mesh)
    check_vocab(examples, cfg.vocab_size, source=str(args.data))
    common = dict(batch_size=args.batch_size, max_len=args.max_len, dtype=args.dtype, mesh=mesh)
    if args.along_diff:
        label = _labels(args.target)[0]
        result = lmc.scan_along_diff(*thetas, cfg, examples, lambdas, labels=(label, f"{label} + Δ"), **common)
    else:
        result = lmc.scan(*thetas, cfg, examples, lambdas, labels=_labels(args.a, args.b), **common)
    if harness is not None:
        module, tasks, options = harness
        points = module.evaluate_path(result["path"], thetas, [[lam] for lam in lambdas], cfg,
                                      next(iter(dirs.values())), tasks, dtype=args.dtype,
                                      batch_size=args.batch_size, max_length=args.max_len, **options)
        result["tasks"] = module.metric_curves(points)
    result["models"] = {k.lstrip("-"): str(v) for k, v in dirs.items()}
    result["models_absolute"] = absolute_paths(result["models"])
    write_json(args.out / "scan.json", result)
    if _is_main():
        plots.plot_scan(result, args.out / "scan")
    if args.json:
        print(dumps(result))
        return
    curves = [(f"{task} {key}", values) for task, metrics in result.get("tasks", {}).items()
              for key, values in metrics.items()]
    for i, lam in enumerate(result["lambda"]):
        print(f"λ {lam:+.3f}  loss {result['loss'][i]:.6f}" +
              "".join(f"  {k} {result[k][i]:.4f}" for k in ("exact_match", "acc", "acc_norm") if k in result) +
              "".join(f"  {name} {values[i]:.4f}" if values[i] is not None else f"  {name} n/a"
                      for name, values in curves))
    for name in ("barrier_linear", "barrier_mean"):
        value, lam, note = result[name], result[f"{name}_lambda"], result[f"{name}_note"]
        if lam is not None:
            print(f"{name} {value:.6f} nats (λ {lam:.3f})")
        else:  # no barrier (0) or undefined (NaN); the note says which and why
            print(f"{name} {value:g} ({'no barrier: ' if value == 0 else ''}{note})")
    print(f"wrote {args.out / 'scan.json'}, scan.png, scan.pdf")


def _cmd_plane(args) -> None:
    from ftjax import lmc, plots
    from ftjax.data import check_vocab
    from ftjax.io.checkpoint import resolve_model_path

    _check_out_dir(args.out, "plane.json", "plane.png", "plane.pdf")
    axis = lmc.grid(args.points, *lmc.parse_range(args.range))
    dirs = {k: resolve_model_path(getattr(args, k)) for k in ("a", "b", "c")}
    examples = _examples(args, *dirs.values()).examples
    mesh = _mesh(args)
    cfg, thetas = lmc.load_models(dirs, mesh=mesh)
    check_vocab(examples, cfg.vocab_size, source=str(args.data))
    result = lmc.plane(*thetas, cfg, examples, axis, axis, labels=_labels(args.a, args.b, args.c),
                       batch_size=args.batch_size, max_len=args.max_len, dtype=args.dtype, mesh=mesh)
    result["models"] = {k: str(v) for k, v in dirs.items()}
    result["models_absolute"] = absolute_paths(result["models"])
    write_json(args.out / "plane.json", result)
    if _is_main():
        plots.plot_plane(result, args.out / "plane")
    if args.json:
        print(dumps(result))
    else:
        print(f"{len(axis)}x{len(axis)} points; wrote {args.out / 'plane.json'}, plane.png, plane.pdf")


def _cmd_stats(args) -> None:
    from ftjax import plots
    from ftjax.stats import diff_stats, format_table

    _check_out_dir(args.out, "stats.json", "stats.png", "stats.pdf")
    result = diff_stats(args.source_base, args.source_ft, args.target_base, args.target_ft)
    write_json(args.out / "stats.json", result)
    if _is_main():
        plots.plot_stats(result, args.out / "stats")
    if args.json:
        print(dumps(result["total"]))
    else:
        print(format_table(result))
        print(f"wrote {args.out / 'stats.json'}, stats.png, stats.pdf")


def _cmd_demo(args) -> None:
    from ftjax.demo import run_demo

    run_demo(args.out, seed=args.seed, overwrite=args.overwrite, mode=args.mode, seeds=args.seeds, quiet=args.quiet,
             world=args.world)


def _train_config(args):
    from ftjax.train import TrainConfig

    return TrainConfig(steps=args.steps, lr=args.lr, schedule=args.schedule, warmup=args.warmup,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, max_len=args.max_len,
                       weight_decay=args.weight_decay, clip=args.clip, seed=args.seed, dtype=args.dtype,
                       remat=args.remat, pack=args.pack)


def _train_kwargs(args) -> dict:
    return dict(config=_train_config(args), eval_data=args.eval_data, eval_every=args.eval_every,
                save_every=args.save_every, keep=args.keep, eval_dtype=args.eval_dtype, save_dtype=args.save_dtype,
                mesh=_mesh(args),
                progress=not (args.quiet or args.json))


def _cmd_finetune(args) -> None:
    from ftjax.train import finetune

    if args.steps < 1:
        raise FtjaxError(f"--steps must be positive, got {args.steps}")
    result = finetune(args.init, args.data, args.out, **_train_kwargs(args))
    if args.json:
        print(dumps(result))
    elif not args.quiet:
        ev, rate = result.get("eval", {}), result.get("nonpad_tokens_per_s")
        print(f"finetune: {result['steps']} steps, final train loss {result.get('loss', float('nan')):.4f}"
              + (f", eval loss {ev['loss']:.4f}" if "loss" in ev else "")
              + (f" ({ev['dtype']} compute)" if "dtype" in ev else "")
              + (f", {rate:.0f} tokens/s (non-pad)" if rate is not None else "") + f"; wrote {result['final']}")


def _cmd_recycle(args) -> None:
    from ftjax.recycle import format_table, recycle

    summary = recycle(args.versions, args.data, args.out, mode=args.mode, **_train_kwargs(args))
    if args.json:
        print(dumps(summary))
    elif not args.quiet:
        print(format_table(summary))
        print(f"wrote {args.out / 'summary.json'}, summary.md" + (", curves.png" if args.steps else ""))


def _cmd_plot_curves(args) -> None:
    from ftjax import plots
    from ftjax.train import read_curves

    _check_out_dir(args.out, "curves.png", "curves.pdf")
    labels = args.labels or _labels(*map(str, args.runs))
    if len(labels) != len(args.runs):
        raise FtjaxError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    paths = plots.plot_curves({label: read_curves(run) for label, run in zip(labels, args.runs)},
                              args.out / "curves", title=args.title)
    print("wrote " + ", ".join(map(str, paths)))


COMMANDS = {
    "finetune": _cmd_finetune, "recycle": _cmd_recycle, "plot-curves": _cmd_plot_curves,
    "transfer": _cmd_transfer, "merge": _cmd_merge, "diff": _cmd_diff, "apply": _cmd_apply, "convert": _cmd_convert,
    "extract-lora": _cmd_extract_lora, "fit-alpha": _cmd_fit_alpha,
    "inspect": _cmd_inspect, "eval": _cmd_eval, "scan": _cmd_scan, "plane": _cmd_plane,
    "stats": _cmd_stats, "demo": _cmd_demo, "generate": _cmd_generate, "lm-eval": _cmd_lm_eval,
}


# Commands that have fsynced and renamed everything they write when they return: `run` then ends the process at
# once, skipping the interpreter's teardown of JAX (a measurable share of a short transfer: benchmarks/RESULTS.md).
_FAST_EXIT = {"transfer", "merge", "diff", "apply"}
_DONE = {"fast_exit": False, "debug": False}


class _Signalled(BaseException):
    """SIGINT or SIGTERM arrived: unwinds the main thread like KeyboardInterrupt, so outputs are cleaned up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not interrupt the clean-up
        signal.signal(sig, signal.SIG_IGN)
    raise _Signalled(signum)


def _catch_signals() -> dict:
    """Install `_on_signal` for SIGINT and SIGTERM (main thread only); returns the handlers to restore."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}


def _debug(args) -> bool:
    """--debug, or the environment variable FTJAX_DEBUG set to anything but "", "0", "false" or "no"."""
    env = os.environ.get("FTJAX_DEBUG", "").strip().lower()
    return bool(getattr(args, "debug", False)) or env not in ("", "0", "false", "no")


def _traceback_if_debug(e: BaseException, args) -> None:
    """Under --debug / FTJAX_DEBUG: the full traceback on stderr, with the third-party error an FtjaxError was
    raised from (`raise ... from None` hides it otherwise)."""
    if not _debug(args):
        return
    import traceback

    e.__suppress_context__ = False
    traceback.print_exception(e, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = parse_args(argv)
    _DONE["fast_exit"], _DONE["debug"] = False, _debug(args)
    if _DONE["debug"]:
        sys.unraisablehook = sys.__unraisablehook__
        logging.getLogger("asyncio").setLevel(logging.NOTSET)
    gc_was_on = gc.isenabled()
    if args.command in _FAST_EXIT:
        gc.disable()  # a short run with few Python objects: cyclic GC passes only slow it (JAX's import most)
    previous = _catch_signals()
    try:
        from ftjax.distributed import initialize

        multi = initialize(args.coordinator, args.num_processes, args.process_id)
        if multi and not _is_main():
            sys.stdout = open(os.devnull, "w")  # reports come from process 0; errors still reach stderr
        COMMANDS[args.command](args)
        _DONE["fast_exit"] = args.command in _FAST_EXIT and not multi  # multi: jax.distributed shuts down at exit
    except FtjaxError as e:
        _traceback_if_debug(e, args)
        print(f"ftjax: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a third-party library (Orbax, tokenizers, the filesystem ...) or a bug: one line
        _traceback_if_debug(e, args)
        hint = "" if _debug(args) else " (rerun with --debug for the traceback)"
        print(f"ftjax: error: {describe(e)}{hint}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Signalled) as e:
        term = isinstance(e, _Signalled) and e.signum == signal.SIGTERM
        print(f"ftjax: {'terminated (SIGTERM)' if term else 'interrupted (SIGINT)'}", file=sys.stderr)
        return 143 if term else 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if gc_was_on:
            gc.enable()
    return 0


def _quiet_unraisable(unraisable) -> None:
    """Exceptions Python could not raise (a coroutine or future of a failed third-party read collected later):
    already reported as the command's one-line error, so not printed again outside --debug."""


def run(argv: Sequence[str] | None = None) -> None:
    """The console entry point (`ftjax ...`, `python -m ftjax.cli`, scripts/transfer.py): `main`, then exit."""
    sys.unraisablehook = _quiet_unraisable  # main restores Python's own under --debug
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    code = main(argv)
    # After an error the one-line message is all the user should see: a failed third-party read can leave futures
    # and coroutines whose garbage collection at interpreter teardown prints pages of tracebacks (Orbax's
    # TensorStore reads do), so the process ends without that teardown unless --debug asked for everything.
    if _DONE["fast_exit"] or (code != 0 and not _DONE["debug"]):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
