"""`ftjax` command line: argument parsing, progress and exit codes over the public API; nothing else.

Exit status: 0 success, 2 bad input (one line on stderr: `ftjax: error: ...`), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
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


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _add_transfer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=float, default=1.0, help="scale of the diff (default 1.0)")
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


def build_parser() -> argparse.ArgumentParser:
    from ftjax import __version__

    parser = argparse.ArgumentParser(prog="ftjax", description="Fine-tuning transfer between LLM versions, in JAX.")
    parser.add_argument("--version", action="version", version=f"ftjax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("transfer", help="out = target_base + alpha * (source_ft - source_base), streamed from disk")
    p.add_argument("--source-base", required=True, metavar="DIR|REPO", help="the source version's base model")
    p.add_argument("--source-ft", required=True, metavar="DIR|REPO", help="the source version's fine-tuned model")
    p.add_argument("--target-base", required=True, metavar="DIR|REPO", help="the target version's base model")
    p.add_argument("--out", required=True, type=Path, help="output directory (a Hugging Face checkpoint)")
    p.add_argument("--config-from", choices=["target", "source-ft"], default="target",
                   help="where config.json comes from (default target: RoPE scaling and context belong to it)")
    p.add_argument("--tokenizer-from", choices=["source-ft", "target"], default="source-ft",
                   help="where tokenizer, chat template and generation_config.json come from (default source-ft)")
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

    p = sub.add_parser("eval", help="token-weighted next-token loss of a model on a JSONL file")
    p.add_argument("--model", required=True, metavar="DIR|REPO")
    p.add_argument("--data", required=True, type=Path, help="JSONL rows of {\"input_ids\": [...]} or {\"text\": ...}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=None, help="truncate longer sequences (default: the context length)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="the embedded default: transfer between tiny generated model versions")
    p.add_argument("--out", type=Path, default=Path("ftjax_demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return parser


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
        dry_run=args.dry_run, strict=args.strict, progress=not (args.quiet or args.json),
    )
    _print_report(report, args)


def _cmd_diff(args) -> None:
    from ftjax import transfer

    report = transfer.diff(args.base, args.ft, args.out, dtype=args.dtype, overwrite=args.overwrite,
                           progress=not (args.quiet or args.json))
    _print_report(report, args)


def _cmd_apply(args) -> None:
    from ftjax import transfer

    report = transfer.apply(
        args.target, args.diff, args.out, alpha=args.alpha, alpha_for=args.alpha_for, skip=args.skip,
        vocab=args.vocab, dtype=args.dtype, overwrite=args.overwrite, dry_run=args.dry_run, strict=args.strict,
        progress=not (args.quiet or args.json),
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
            value = ", ".join(map(str, value))
        print(f"{key:<{width}}  {value}")


def _cmd_eval(args) -> None:
    from ftjax.data import examples_from_rows, load_tokenizer, read_jsonl
    from ftjax.evaluate import evaluate_loss
    from ftjax.io.checkpoint import resolve_model_path
    from ftjax.params import load_params

    rows = read_jsonl(args.data)
    model_dir = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_dir) if any("input_ids" not in r for r in rows) else None
    examples = examples_from_rows(rows, tokenizer, source=str(args.data))
    cfg, params = load_params(model_dir)
    if args.max_len is not None and args.max_len < 2:
        raise FtjaxError(f"--max-len must be at least 2, got {args.max_len}")
    result = evaluate_loss(params, cfg, examples, batch_size=args.batch_size, max_len=args.max_len, dtype=args.dtype)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.6f} nats  ppl {result['ppl']:.4f}  tokens {result['tokens']}  "
              f"({result['tokens_per_s']:.0f} tokens/s)")


def _cmd_demo(args) -> None:
    from ftjax.demo import run_demo

    run_demo(args.out, seed=args.seed, overwrite=args.overwrite)


COMMANDS = {
    "transfer": _cmd_transfer, "diff": _cmd_diff, "apply": _cmd_apply, "convert": _cmd_convert,
    "inspect": _cmd_inspect, "eval": _cmd_eval, "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (also the console entry point)."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except FtjaxError as e:
        print(f"ftjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ftjax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
