"""`ftjax` command line: argument parsing, progress and exit codes over the public API; nothing else.

Exit status: 0 success, 2 bad input (one line on stderr: `ftjax: error: ...`), 130 interrupted (SIGINT, Ctrl-C),
143 terminated (SIGTERM, e.g. a scheduler's time limit). Both signals become exceptions in the main thread, so every
output being written is removed on the way out (`io.checkpoint.atomic_output_dir`); SIGKILL cannot be caught, and
its leftover temp directory is removed by the next run into the same output.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import signal
import sys
from decimal import Decimal
from pathlib import Path
from typing import Sequence

from ftjax.errors import FtjaxError


def _alpha_rule(text: str) -> tuple[str, float]:
    pattern, sep, value = text.rpartition("=")
    try:
        if not sep:
            raise ValueError
        re.compile(pattern)
        return pattern, float(value)
    except (ValueError, re.error):
        raise argparse.ArgumentTypeError(f"expected REGEX=ALPHA with a valid regex, got {text!r}") from None


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"bad regex {text!r}: {e}") from None
    return text


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    size = int(Decimal(m.group(1)) * scale)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    p.add_argument("--max-shard-size", type=_size, default="5GB", metavar="SIZE",
                   help="largest output safetensors file, e.g. 5GB (as transformers) or 500MB")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _add_transfer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=float, default=1.0, help="scale of the diff")
    p.add_argument("--alpha-for", type=_alpha_rule, action="append", default=[], metavar="REGEX=A",
                   help="per-tensor alpha for names matching REGEX (first match wins; repeatable)")
    p.add_argument("--skip", type=_regex, action="append", default=[], metavar="REGEX",
                   help="keep tensors matching REGEX from the target (repeatable), e.g. 'embed_tokens|lm_head'")
    p.add_argument("--vocab", choices=["pad", "truncate", "error"], default="pad",
                   help="source-ft with more vocab rows: pad (copy new rows, the paper's policy), truncate, error")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="output dtype (auto = the target's)")
    p.add_argument("--dry-run", action="store_true", help="validate and report; write nothing")
    p.add_argument("--strict", action="store_true", help="NaN or Inf in an output tensor is an error")
    _add_output_flags(p)


def _allow_negative_values(p: argparse.ArgumentParser) -> None:
    """Let `--range -0.5:1.5` parse: argparse (< 3.13) only takes plain negative numbers as values, so widen its
    private matcher to what Python 3.13 uses (anything starting with -digit or -.digit)."""
    p._negative_number_matcher = re.compile(r"^-\.?\d")


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path,
                   help="JSONL rows: {\"text\"}, {\"prompt\", \"completion\"}, {\"input_ids\"} or "
                        "{\"question\", \"choices\", \"answer\"}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=None, help="truncate longer sequences (default: the context length)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--mesh", default=None, metavar="SPEC", help="shard parameters over devices, e.g. data=2,fsdp=4")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


class _Formatter(argparse.HelpFormatter):
    """Help that shows every option's default (flags and options without one excepted)."""

    def _format_action(self, action: argparse.Action) -> str:
        d = action.default
        if action.option_strings and not any(d is v for v in (None, False, argparse.SUPPRESS)) and d != [] \
                and "%(default)" not in (action.help or "") and action.help is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: %(default)s)".strip()
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from ftjax import __version__

    parser = _Parser(prog="ftjax", description="Fine-tuning transfer between LLM versions, in JAX.")
    parser.add_argument("--version", action="version", version=f"ftjax {__version__}")
    dist = parser.add_argument_group("multi-process runs (jax.distributed; give all three, before COMMAND)")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (env JAX_COORDINATOR_ADDRESS)")
    dist.add_argument("--num-processes", type=int, metavar="N", help="number of processes (env JAX_NUM_PROCESSES)")
    dist.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (env JAX_PROCESS_ID)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("transfer", help="out = target_base + alpha * (source_ft - source_base), streamed from disk")
    p.add_argument("--source-base", required=True, metavar="DIR|REPO", help="the source version's base model")
    p.add_argument("--source-ft", required=True, metavar="DIR|REPO", help="the source version's fine-tuned model")
    p.add_argument("--target-base", required=True, metavar="DIR|REPO", help="the target version's base model")
    p.add_argument("--out", required=True, type=Path, help="output directory (a Hugging Face checkpoint)")
    p.add_argument("--config-from", choices=["target", "source-ft"], default="target",
                   help="where config.json comes from (the target: RoPE scaling and context belong to it)")
    p.add_argument("--tokenizer-from", choices=["source-ft", "target"], default="source-ft",
                   help="where tokenizer, chat template and generation_config.json come from")
    _add_transfer_flags(p)

    p = sub.add_parser("diff", help="write the diff vector ft - base as its own checkpoint directory")
    p.add_argument("--base", required=True, metavar="DIR|REPO")
    p.add_argument("--ft", required=True, metavar="DIR|REPO")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    _add_output_flags(p)

    p = sub.add_parser("apply", help="out = target + alpha * diff, with a diff written by `ftjax diff`")
    p.add_argument("--target", required=True, metavar="DIR|REPO")
    p.add_argument("--diff", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    _add_transfer_flags(p)

    p = sub.add_parser("convert", help="Hugging Face directory <-> Orbax checkpoint, bit-exact")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--to", choices=["orbax", "hf"], required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("inspect", help="family, parameter count, dtypes, bytes, tying and shard files of a checkpoint")
    p.add_argument("path", metavar="DIR|REPO")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("eval", help="loss, perplexity, exact match and multiple-choice accuracy on a JSONL file")
    p.add_argument("--model", required=True, metavar="DIR|REPO")
    _add_eval_flags(p)
    g = p.add_argument_group("generation-scored rows {\"prompt\", \"answer\"}")
    g.add_argument("--chat", action="store_true", help="render prompts with the model's chat template")
    g.add_argument("--system", help="system message (with --chat)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per row")
    g.add_argument("--extract", type=_extract, metavar="REGEX|gsm8k|last-number",
                   help="score the last match (group 1 if any) instead of the whole generation")
    g.add_argument("--out", type=Path, help="directory for eval.json and generations.jsonl")

    p = sub.add_parser("generate", help="generate text from a checkpoint (greedy by default; KV cache)")
    p.add_argument("--model", required=True, metavar="DIR|REPO")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", type=Path, metavar="FILE.jsonl",
                     help="rows {\"prompt\"} (or {\"messages\"} with --chat)")
    p.add_argument("--chat", action="store_true", help="render prompts with the model's chat template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype (auto = the checkpoint's)")
    p.add_argument("--mesh", default=None, metavar="SPEC", help="shard parameters over devices, e.g. fsdp=8")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")

    p = sub.add_parser("scan", help="loss along (1-λ)·A + λ·B (or T + λ·(F − S) with --along-diff); scan.json + plots")
    p.add_argument("--a", metavar="DIR|REPO", help="model at λ = 0")
    p.add_argument("--b", metavar="DIR|REPO", help="model at λ = 1")
    p.add_argument("--along-diff", action="store_true",
                   help="scan T + λ·(F − S) instead, with --target, --source-ft and --source-base")
    p.add_argument("--target", metavar="DIR|REPO", help="with --along-diff: T, the model at λ = 0")
    p.add_argument("--source-ft", metavar="DIR|REPO", help="with --along-diff: F")
    p.add_argument("--source-base", metavar="DIR|REPO", help="with --along-diff: S")
    p.add_argument("--points", type=int, default=11, help="grid points (0 and 1 are always added)")
    p.add_argument("--range", default="0:1", metavar="LO:HI", help="λ range, e.g. -0.5:1.5")
    _allow_negative_values(p)
    p.add_argument("--out", required=True, type=Path, help="directory for scan.json, scan.png, scan.pdf")
    _add_eval_flags(p)

    p = sub.add_parser("plane", help="loss over the plane A + u(B-A) + v(C-A) through three models; contour plot")
    p.add_argument("--a", required=True, metavar="DIR|REPO", help="origin, e.g. the source base")
    p.add_argument("--b", required=True, metavar="DIR|REPO", help="e.g. the target base")
    p.add_argument("--c", required=True, metavar="DIR|REPO", help="e.g. the transferred model target + Δ")
    p.add_argument("--points", type=int, default=7, help="grid points per axis (0 and 1 are always added)")
    p.add_argument("--range", default="-0.25:1.25", metavar="LO:HI", help="range of u and v")
    _allow_negative_values(p)
    p.add_argument("--out", required=True, type=Path, help="directory for plane.json, plane.png, plane.pdf")
    _add_eval_flags(p)

    p = sub.add_parser("stats", help="per-tensor / per-layer diff norms, base distance and diff cosine, streamed")
    p.add_argument("--source-base", required=True, metavar="DIR|REPO", help="S")
    p.add_argument("--source-ft", required=True, metavar="DIR|REPO", help="F (Δs = F − S)")
    p.add_argument("--target-base", metavar="DIR|REPO", help="T (base distance ‖T − S‖)")
    p.add_argument("--target-ft", metavar="DIR|REPO", help="G (Δt = G − T, cos(Δs, Δt))")
    p.add_argument("--out", required=True, type=Path, help="directory for stats.json, stats.png, stats.pdf")
    p.add_argument("--json", action="store_true", help="print the totals as one JSON object")

    p = sub.add_parser("demo", help="the embedded default: a miniature of the paper's study on tiny versions "
                                    "ftjax trains itself (report.md, results.json, plots, HF checkpoints)")
    p.add_argument("--out", type=Path, default=Path("ftjax_demo"), help="output directory")
    p.add_argument("--seed", type=int, default=0, help="world, init and data seed (quick mode)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="one seed, minutes on 2 CPU cores (the default)")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="3 seeds (or --seeds), longer training, every transfer-then-finetune pair; mean ± sd")
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help="a structure-only configuration for tests (seconds; too small for any phenomenon)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S", help="seeds to run (default: --seed; --full: 3)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo output in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log")
    p.set_defaults(mode="quick")

    p = sub.add_parser("finetune", help="fine-tune a model (optax AdamW), resumable; exports DIR/final as HF")
    p.add_argument("--init", required=True, metavar="DIR|REPO", help="the model to start from, e.g. Mi + Δ")
    _add_train_flags(p)

    p = sub.add_parser("recycle", help="Algorithm 1: Mi* = FT(Mi + (M(i-1)* - M(i-1))) over versions M1..Mn")
    p.add_argument("--versions", required=True, nargs="+", metavar="DIR|REPO", help="base versions, oldest first")
    p.add_argument("--mode", choices=["iterative", "direct", "plain"], default="iterative",
                   help="iterative (Alg. 1), direct (diff of a plain FT of the previous version) or plain FT")
    _add_train_flags(p, recycle=True)

    p = sub.add_parser("plot-curves", help="overlay the loss curves of several finetune runs (curves.png/pdf)")
    p.add_argument("runs", nargs="+", type=Path, metavar="DIR", help="`ftjax finetune` output directories")
    p.add_argument("--labels", nargs="+", help="one label per run (default: directory names)")
    p.add_argument("--out", type=Path, default=Path("curves"), help="directory for curves.png and curves.pdf")
    p.add_argument("--title")
    return parser


def _warmup(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction (0.03) or a step count (100), got {text!r}") from None
    return value


def _add_train_flags(p: argparse.ArgumentParser, recycle: bool = False) -> None:
    p.add_argument("--data", required=True, type=Path,
                   help="training JSONL: the row forms of `ftjax eval`, or chat rows {\"messages\": [{\"role\", "
                        "\"content\"}, ...]} (rendered with the model's chat template, loss on assistant turns)")
    p.add_argument("--eval-data", type=Path, help="JSONL evaluated at step 0, every --eval-every steps and at the end")
    p.add_argument("--eval-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of those evaluations (as `ftjax eval`; independent of --dtype)")
    p.add_argument("--steps", required=True, type=int, help="optimizer steps" + (" per version (0: transfer only)"
                                                                                 if recycle else ""))
    p.add_argument("--out", required=True, type=Path, help="run directory (re-run the same command to resume)")
    p.add_argument("--lr", type=float, default=5e-6, help="peak learning rate (the paper's)")
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--warmup", type=_warmup, default=0.03,
                   help="fraction of steps (< 1, rounded up) or steps; step 1 trains at lr/warmup")
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per row; longer examples keep their start")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--seed", type=int, default=0, help="data order")
    p.add_argument("--eval-every", type=int, default=0, metavar="STEPS")
    p.add_argument("--save-every", type=int, default=0, metavar="STEPS", help="checkpoint period (0: at the end)")
    p.add_argument("--keep", type=int, default=2, metavar="N",
                   help="checkpoints kept, the newest N (0: delete them once DIR/final is written)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="compute dtype (master weights and optimizer state are float32 either way)")
    p.add_argument("--remat", action="store_true", help="gradient checkpointing (recompute all but weight matmuls)")
    p.add_argument("--pack", action="store_true", help="pack several documents per row (segment ids)")
    p.add_argument("--mesh", default=None, metavar="SPEC", help="shard over devices, e.g. data=2,fsdp=4")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _print_report(report, args) -> None:
    if args.json:
        print(json.dumps(report.to_dict(), indent=None))
    elif not args.quiet:
        print(report.summary())


def _cmd_transfer(args) -> None:
    from ftjax import transfer

    report = transfer.transfer(
        args.source_base, args.source_ft, args.target_base, args.out,
        alpha=args.alpha, alpha_for=args.alpha_for, skip=args.skip, vocab=args.vocab, dtype=args.dtype,
        config_from=args.config_from, tokenizer_from=args.tokenizer_from, overwrite=args.overwrite,
        dry_run=args.dry_run, strict=args.strict, max_shard_bytes=args.max_shard_size,
        progress=not (args.quiet or args.json),
    )
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


def _extract(text: str) -> str:
    from ftjax.generate import EXTRACT_PRESETS

    return text if text in EXTRACT_PRESETS else _regex(text)


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


def _eval_by_generation(args, model_dir: Path) -> bool:
    """Score {"prompt", "answer"} rows by generating; False (nothing done) when the rows are for loss scoring."""
    from ftjax import generate as gen
    from ftjax.data import read_jsonl, where
    from ftjax.lmc import finite_or_none
    from ftjax.params import load_params

    rows = read_jsonl(args.data)
    kinds = [gen.is_generation_row(r) for r in rows]
    if not any(kinds):
        return False
    if not all(kinds):
        raise FtjaxError(f"{where(rows, kinds.index(False), str(args.data))}: not a {{\"prompt\", \"answer\"}} row "
                         "but others are; put generation-scored rows in a file of their own")
    setup = gen.TextSetup.load(model_dir, chat=args.chat)
    if args.max_new_tokens < 1:
        raise FtjaxError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    mesh = _mesh(args)
    cfg, params = load_params(model_dir, dtype=args.dtype, mesh=mesh)
    metrics, records = gen.evaluate_generation(
        params, cfg, rows, setup.tokenizer, eos_ids=setup.eos_ids, template=setup.template, special=setup.special,
        system=args.system, max_new_tokens=args.max_new_tokens, extract=args.extract, batch_size=args.batch_size,
        source=str(args.data))
    if args.out is not None:
        _write_json(args.out / "eval.json", metrics)
        (args.out / "generations.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    if args.json:
        print(json.dumps(finite_or_none(metrics)))
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
    from ftjax.lmc import finite_or_none
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
    result.update(rows=len({e.row for e in encoded.examples}), skipped_rows=len(encoded.skipped), dtype=args.dtype)
    if args.out is not None:
        _write_json(args.out / "eval.json", result)
    if args.json:
        print(json.dumps(finite_or_none(result)))
    else:
        skipped = f", {result['skipped_rows']} skipped" if result["skipped_rows"] else ""
        print(f"{_metrics_line(result)}  ({result['rows']} rows{skipped}; {args.dtype}; "
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


def _write_json(path: Path, result: dict) -> None:
    from ftjax.distributed import is_main
    from ftjax.lmc import finite_or_none

    if not is_main():  # multi-process: one writer
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite_or_none(result), indent=1) + "\n")


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
    result["models"] = {k.lstrip("-"): str(v) for k, v in dirs.items()}
    _write_json(args.out / "scan.json", result)
    if _is_main():
        plots.plot_scan(result, args.out / "scan")
    if args.json:
        print(json.dumps(lmc.finite_or_none(result)))
        return
    for i, lam in enumerate(result["lambda"]):
        print(f"λ {lam:+.3f}  loss {result['loss'][i]:.6f}" +
              "".join(f"  {k} {result[k][i]:.4f}" for k in ("exact_match", "acc", "acc_norm") if k in result))
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
    _write_json(args.out / "plane.json", result)
    if _is_main():
        plots.plot_plane(result, args.out / "plane")
    if args.json:
        print(json.dumps(lmc.finite_or_none(result)))
    else:
        print(f"{len(axis)}x{len(axis)} points; wrote {args.out / 'plane.json'}, plane.png, plane.pdf")


def _cmd_stats(args) -> None:
    from ftjax import plots
    from ftjax.lmc import finite_or_none
    from ftjax.stats import diff_stats, format_table

    _check_out_dir(args.out, "stats.json", "stats.png", "stats.pdf")
    result = diff_stats(args.source_base, args.source_ft, args.target_base, args.target_ft)
    _write_json(args.out / "stats.json", result)
    if _is_main():
        plots.plot_stats(result, args.out / "stats")
    if args.json:
        print(json.dumps(finite_or_none(result["total"])))
    else:
        print(format_table(result))
        print(f"wrote {args.out / 'stats.json'}, stats.png, stats.pdf")


def _cmd_demo(args) -> None:
    from ftjax.demo import run_demo

    run_demo(args.out, seed=args.seed, overwrite=args.overwrite, mode=args.mode, seeds=args.seeds, quiet=args.quiet)


def _train_config(args):
    from ftjax.train import TrainConfig

    return TrainConfig(steps=args.steps, lr=args.lr, schedule=args.schedule, warmup=args.warmup,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, max_len=args.max_len,
                       weight_decay=args.weight_decay, clip=args.clip, seed=args.seed, dtype=args.dtype,
                       remat=args.remat, pack=args.pack)


def _train_kwargs(args) -> dict:
    return dict(config=_train_config(args), eval_data=args.eval_data, eval_every=args.eval_every,
                save_every=args.save_every, keep=args.keep, eval_dtype=args.eval_dtype, mesh=_mesh(args),
                progress=not (args.quiet or args.json))


def _cmd_finetune(args) -> None:
    from ftjax.lmc import finite_or_none
    from ftjax.train import finetune

    if args.steps < 1:
        raise FtjaxError(f"--steps must be positive, got {args.steps}")
    result = finetune(args.init, args.data, args.out, **_train_kwargs(args))
    if args.json:
        print(json.dumps(finite_or_none(result)))
    elif not args.quiet:
        ev, rate = result.get("eval", {}), result.get("nonpad_tokens_per_s")
        print(f"finetune: {result['steps']} steps, final train loss {result.get('loss', float('nan')):.4f}"
              + (f", eval loss {ev['loss']:.4f}" if "loss" in ev else "")
              + (f" ({ev['dtype']} compute)" if "dtype" in ev else "")
              + (f", {rate:.0f} tokens/s (non-pad)" if rate is not None else "") + f"; wrote {result['final']}")


def _cmd_recycle(args) -> None:
    from ftjax.lmc import finite_or_none
    from ftjax.recycle import format_table, recycle

    summary = recycle(args.versions, args.data, args.out, mode=args.mode, **_train_kwargs(args))
    if args.json:
        print(json.dumps(finite_or_none(summary)))
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
    "transfer": _cmd_transfer, "diff": _cmd_diff, "apply": _cmd_apply, "convert": _cmd_convert,
    "inspect": _cmd_inspect, "eval": _cmd_eval, "scan": _cmd_scan, "plane": _cmd_plane,
    "stats": _cmd_stats, "demo": _cmd_demo, "generate": _cmd_generate,
}


# Commands that have fsynced and renamed everything they write when they return: `run` then ends the process at
# once, skipping the interpreter's teardown of JAX (~0.25 s, a twentieth of a 1B-parameter transfer here).
_FAST_EXIT = {"transfer", "diff", "apply"}
_DONE = {"fast_exit": False}


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    _DONE["fast_exit"] = False
    gc_was_on = gc.isenabled()
    if args.command in _FAST_EXIT:
        gc.disable()  # a short run with few Python objects: cyclic GC passes only slow it (10% of importing JAX)
    previous = _catch_signals()
    try:
        from ftjax.distributed import initialize

        multi = initialize(args.coordinator, args.num_processes, args.process_id)
        if multi and not _is_main():
            sys.stdout = open(os.devnull, "w")  # reports come from process 0; errors still reach stderr
        COMMANDS[args.command](args)
        _DONE["fast_exit"] = args.command in _FAST_EXIT and not multi  # multi: jax.distributed shuts down at exit
    except FtjaxError as e:
        print(f"ftjax: error: {e}", file=sys.stderr)
        return 2
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


def run(argv: Sequence[str] | None = None) -> None:
    """The console entry point (`ftjax ...`, `python -m ftjax.cli`, scripts/transfer.py): `main`, then exit."""
    code = main(argv)
    if _DONE["fast_exit"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
