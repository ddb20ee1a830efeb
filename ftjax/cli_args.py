"""The `ftjax` command line's arguments: every command, flag, default and help text (the commands themselves are in
`ftjax.cli`). Help shows each option's default."""

from __future__ import annotations

import argparse
import copy
import re
from decimal import Decimal
from pathlib import Path
from typing import Sequence

from ftjax.errors import FtjaxError, finite


def _finite(text: str) -> float:
    """A float flag's type: a finite number (NaN or Inf would compute a NaN result to the end)."""
    try:
        return finite("value", float(text))
    except (ValueError, FtjaxError):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}") from None


def _alpha_rule(text: str) -> tuple[str, float]:
    pattern, sep, value = text.rpartition("=")
    try:
        if not sep:
            raise ValueError
        re.compile(pattern)
        return pattern, finite("ALPHA", float(value))
    except (ValueError, re.error, FtjaxError):
        raise argparse.ArgumentTypeError(f"expected REGEX=ALPHA with a valid regex and a finite ALPHA, "
                                         f"got {text!r}") from None


def _seeds(text: str) -> int | tuple[int, ...]:
    """--seeds: a count N ("5": N seeds from --seed) or a comma-separated list ("0,1,2"; one seed: "7,")."""
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return n
        seeds = tuple(int(x) for x in text.split(",") if x.strip())
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise ValueError
        return seeds
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count N >= 1 (\"5\") or distinct seeds >= 0 separated by "
                                         f"commas (\"0,1,2\"; one seed: \"7,\"), got {text!r}") from None


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
    p.add_argument("--alpha", type=_finite, default=1.0, help="scale of the diff")
    p.add_argument("--alpha-for", type=_alpha_rule, action="append", default=[], metavar="REGEX=A",
                   help="per-tensor alpha for names matching REGEX (first match wins; repeatable; a REGEX that "
                        "matches no tensor is an error, --dry-run lists the matches)")
    p.add_argument("--skip", type=_regex, action="append", default=[], metavar="REGEX",
                   help="keep tensors matching REGEX from the target (repeatable), e.g. 'embed_tokens|lm_head'")
    p.add_argument("--vocab", choices=["pad", "truncate", "error"], default="pad",
                   help="source-ft with more vocab rows: pad (copy new rows, the paper's policy), truncate, error")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="output dtype (auto = the target's)")
    p.add_argument("--dry-run", action="store_true", help="validate and report; write nothing")
    p.add_argument("--strict", action="store_true", help="NaN or Inf in an output tensor is an error")
    _add_output_flags(p)


def _batch_size(text: str) -> int | str:
    """--batch-size of lm-eval: a positive integer, or "auto" (which the command refuses with what to give)."""
    if text.strip().lower().startswith("auto"):
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_harness_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    """lm-evaluation-harness task flags, named and passed as lm_eval's own CLI passes them."""
    p.add_argument("--tasks", required=required, metavar="T1,T2", help="harness task names, comma-separated")
    p.add_argument("--include-path", type=Path, metavar="DIR", help="directory of your own task YAML files")
    p.add_argument("--limit", type=_finite, metavar="N", help="at most N documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples (default: each task's own)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render each prompt with the model's chat template (as lm_eval --apply_chat_template)")
    p.add_argument("--system-instruction", metavar="TEXT", help="a system message before each prompt")
    p.add_argument("--fewshot-as-multiturn", type=_bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="few-shot examples as chat turns (default: on with --apply-chat-template; needs it)")


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path,
                   help="JSONL rows: {\"text\"}, {\"prompt\", \"completion\"}, {\"input_ids\"}, "
                        "{\"question\", \"choices\", \"answer\"} or {\"messages\": [{\"role\", \"content\"}, ...]} "
                        "(rendered with the model's chat template, loss on the assistant turns)")
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


DEBUG_HELP = "print the full traceback of an error (also: environment variable FTJAX_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    from ftjax import __version__

    parser = _Parser(prog="ftjax", description="Fine-tuning transfer between LLM versions, in JAX.")
    parser.add_argument("--version", action="version", version=f"ftjax {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    dist = parser.add_argument_group("multi-process runs (jax.distributed; give all three, before COMMAND)")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (env JAX_COORDINATOR_ADDRESS)")
    dist.add_argument("--num-processes", type=int, metavar="N", help="number of processes (env JAX_NUM_PROCESSES)")
    dist.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (env JAX_PROCESS_ID)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("transfer", help="out = target_base + alpha * (source_ft - source_base), streamed from disk")
    p.add_argument("--source-base", metavar="DIR|REPO",
                   help="the source version's base model (with --source-lora: only for its whole tensors; default "
                        "the adapter's base_model_name_or_path when found)")
    p.add_argument("--source-ft", metavar="DIR|REPO", help="the source version's fine-tuned model")
    p.add_argument("--source-lora", metavar="DIR|REPO",
                   help="instead of --source-ft: a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--target-base", required=True, metavar="DIR|REPO", help="the target version's base model")
    p.add_argument("--out", required=True, type=Path, help="output directory (a Hugging Face checkpoint)")
    p.add_argument("--config-from", choices=["target", "source-ft"], default="target",
                   help="where config.json comes from (the target: RoPE scaling and context belong to it)")
    p.add_argument("--tokenizer-from", choices=["source-ft", "target"], default="source-ft",
                   help="where tokenizer, chat template and generation_config.json come from")
    _add_transfer_flags(p)

    p = sub.add_parser("merge", help="merge models with a mergekit YAML config (ties, dare, slerp, ...), streamed")
    p.add_argument("config", type=Path, help="mergekit config: merge_method, base_model, models, parameters, ...")
    p.add_argument("--out", required=True, type=Path, help="output directory (a Hugging Face checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE / DELLA drop masks (recorded in ftjax_merge.json)")
    p.add_argument("--dry-run", action="store_true", help="read the config and check the inputs; write nothing")
    _add_output_flags(p)

    p = sub.add_parser("diff", help="write the diff vector ft - base as its own checkpoint directory")
    p.add_argument("--base", required=True, metavar="DIR|REPO")
    p.add_argument("--ft", required=True, metavar="DIR|REPO")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    _add_output_flags(p)

    p = sub.add_parser("apply", help="out = target + alpha * diff, with a diff written by `ftjax diff` or a LoRA adapter")
    p.add_argument("--target", required=True, metavar="DIR|REPO")
    p.add_argument("--diff", required=True, metavar="DIR|REPO",
                   help="a diff written by `ftjax diff`, or a PEFT LoRA adapter trained on the target")
    p.add_argument("--out", required=True, type=Path)
    _add_transfer_flags(p)

    p = sub.add_parser("fit-alpha", help="learn one alpha per layer (or module, or tensor) by gradient on calibration "
                                         "rows; writes alpha.json and the merged model (several diffs: also "
                                         "merge.yaml) (issue 18)")
    p.add_argument("--target", required=True, metavar="DIR|REPO", help="T: the model the diff is added to")
    p.add_argument("--source-ft", required=True, action="append", metavar="DIR|REPO",
                   help="F: the fine-tuned model; repeat for several diffs (one alpha per group per diff), each "
                        "paired in order with a --source-base")
    p.add_argument("--source-base", required=True, action="append", metavar="DIR|REPO",
                   help="B: the model F was fine-tuned from (one per --source-ft, in the same order)")
    p.add_argument("--data", required=True, type=Path, help="calibration JSONL (any row form of `ftjax eval`)")
    p.add_argument("--eval", type=Path, metavar="DEV.jsonl", help="held-out JSONL scored at alpha = init and the fit")
    p.add_argument("--out", required=True, type=Path, help="directory for alpha.json and model/")
    p.add_argument("--groups", choices=["layer", "layer-module", "tensor"], default="layer",
                   help="one alpha per decoder layer (+ embed, norm, lm_head), per layer x {attention, mlp}, or per "
                        "tensor")
    p.add_argument("--objective", choices=["loss", "entropy"], default="loss",
                   help="next-token loss of the rows, or AdaMerging's prediction entropy (labels unused)")
    p.add_argument("--steps", type=int, default=100, help="adam steps on alpha (0: write alpha = --init)")
    p.add_argument("--lr", type=_finite, default=0.05, help="adam learning rate of alpha")
    p.add_argument("--init", type=_finite, default=1.0, help="starting alpha of every group")
    p.add_argument("--bounds", default=None, metavar="LO:HI",
                   help="clip alpha into [LO, HI] after every step, e.g. -0.5:2.0 (default: unbounded)")
    p.add_argument("--seed", type=int, default=0, help="batch order (with --batch-size)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default: every calibration row)")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per row; longer examples keep their start")
    p.add_argument("--save-every", type=int, default=0, metavar="K",
                   help="save the fit's state to OUT/checkpoints every K steps; the same command after an "
                        "interruption resumes from it, bit-identically (0: no checkpoints)")
    p.add_argument("--mesh", default=None, metavar="SPEC",
                   help="shard T and the diffs over devices like finetune (e.g. data=2,fsdp=4; alpha replicated)")
    p.add_argument("--remat", action="store_true", help="gradient checkpointing (recompute all but weight matmuls)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT/model if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--json", action="store_true", help="print alpha.json's content as one JSON object")

    p = sub.add_parser("extract-lora", help="write ft - base as a PEFT LoRA adapter (truncated SVD per linear "
                                            "weight); report of rank, error and energy kept per module")
    p.add_argument("--base", metavar="DIR|REPO", help="the base model (the adapter's base_model_name_or_path)")
    p.add_argument("--ft", metavar="DIR|REPO", help="the fine-tuned model")
    p.add_argument("--diff", metavar="DIR", help="instead of --ft: a diff written by `ftjax diff`")
    p.add_argument("--out", required=True, type=Path, help="output directory (a PEFT adapter)")
    p.add_argument("--rank", type=int, metavar="R", help="LoRA rank of every module (capped at its smaller side)")
    p.add_argument("--energy", type=_finite, metavar="E",
                   help="instead of --rank: per module the smallest rank keeping this share of ||Δ||²_F, in (0, 1]")
    p.add_argument("--target-modules", type=lambda t: [m for m in t.split(",") if m], metavar="M1,M2",
                   help="modules to factorize, by name or suffix (PEFT's rule), e.g. q_proj,v_proj (default: every "
                        "2-D linear weight)")
    p.add_argument("--skip", type=_regex, action="append", default=[], metavar="REGEX",
                   help="leave tensors matching REGEX out (repeatable; reported), e.g. 'embed_tokens|lm_head|norm'; "
                        "otherwise changed embeddings, lm_head and norms are saved whole (modules_to_save)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists (only once the new one is complete)")
    p.add_argument("--plot", action="store_true",
                   help="also write rank_error.png/.pdf in OUT: relative error against rank for a few modules")
    p.add_argument("--quiet", action="store_true", help="no progress or summary")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")

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
    p.add_argument("--temperature", type=_finite, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=_finite, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype (auto = the checkpoint's)")
    p.add_argument("--mesh", default=None, metavar="SPEC", help="shard parameters over devices, e.g. fsdp=8")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")

    p = sub.add_parser("lm-eval", help="score a model on lm-evaluation-harness tasks (needs the eval extra); "
                                         "prints the harness's results table, writes its results JSON")
    p.add_argument("--model", required=True, metavar="DIR|REPO")
    _add_harness_flags(p, required=True)
    p.add_argument("--batch-size", type=_batch_size, default=8, help="requests per forward (auto is refused)")
    p.add_argument("--max-length", type=int, default=None, help="context in tokens (default: the model's)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="float32",
                   help="compute dtype (auto = the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="the harness's random seeds (few-shot sampling)")
    p.add_argument("--out", required=True, type=Path, metavar="OUT.json", help="the harness's results JSON")

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
    p.add_argument("--out", required=True, type=Path, help="directory for scan.json, scan.png, scan.pdf")
    _add_eval_flags(p)
    _add_harness_flags(p, required=False)  # --tasks: also score every point on harness tasks (the eval extra)

    p = sub.add_parser("plane", help="loss over the plane A + u(B-A) + v(C-A) through three models; contour plot")
    p.add_argument("--a", required=True, metavar="DIR|REPO", help="origin, e.g. the source base")
    p.add_argument("--b", required=True, metavar="DIR|REPO", help="e.g. the target base")
    p.add_argument("--c", required=True, metavar="DIR|REPO", help="e.g. the transferred model target + Δ")
    p.add_argument("--points", type=int, default=7, help="grid points per axis (0 and 1 are always added)")
    p.add_argument("--range", default="-0.25:1.25", metavar="LO:HI", help="range of u and v")
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
    p.add_argument("--seed", type=int, default=0, help="first world, init and data seed (quick: S, S+1, S+2)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="3 seeds, about 5 minutes on 2 CPU cores (the default)")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="3 seeds (or --seeds), longer training, every transfer-then-finetune pair; mean (min–max)")
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help="a structure-only configuration for tests (seconds; too small for any phenomenon)")
    p.add_argument("--seeds", type=_seeds, metavar="N|S,S,...",
                   help="how many seeds, counted from --seed (\"--seeds 5\": S..S+4), or which ones (\"--seeds 0,1,2\"; "
                        "one seed: \"--seeds 7,\"); default: 3 from --seed (--tiny: 1)")
    p.add_argument("--world", choices=("gentle", "rewarm"), default=None,
                   help="the stage boundary: rewarm = stage 2 re-warms to twice stage 1's peak lr on a 90 %% "
                        "arithmetic mix (OLMo 2's annealing mid-training); gentle = the first, milder boundary "
                        "(default: gentle)")
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
    for p in sub.choices.values():  # --debug after COMMAND too; SUPPRESS keeps a --debug given before it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _warmup(text: str) -> float:
    try:
        return finite("--warmup", float(text))
    except (ValueError, FtjaxError):
        raise argparse.ArgumentTypeError(f"expected a fraction (0.03) or a step count (100), got {text!r}") from None


def _add_train_flags(p: argparse.ArgumentParser, recycle: bool = False) -> None:
    p.add_argument("--data", required=True, type=Path,
                   help="training JSONL: the row forms of `ftjax eval`, or chat rows {\"messages\": [{\"role\", "
                        "\"content\"}, ...]} (rendered with the model's chat template, loss on assistant turns)")
    p.add_argument("--eval-data", type=Path, help="JSONL evaluated at step 0, every --eval-every steps and at the end")
    p.add_argument("--eval-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of those evaluations (as `ftjax eval`; independent of --dtype)")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of DIR/final's weights (default: the init's; the last evaluation scores them as saved)")
    p.add_argument("--steps", required=True, type=int, help="optimizer steps" + (" per version (0: transfer only)"
                                                                                 if recycle else ""))
    p.add_argument("--out", required=True, type=Path, help="run directory (re-run the same command to resume)")
    p.add_argument("--lr", type=_finite, default=5e-6, help="peak learning rate (the paper's)")
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--warmup", type=_warmup, default=0.03,
                   help="fraction of steps (< 1, rounded up) or steps; step 1 trains at lr/warmup")
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per row; longer examples keep their start")
    p.add_argument("--weight-decay", type=_finite, default=0.0)
    p.add_argument("--clip", type=_finite, default=1.0, help="global gradient-norm clip (0: off)")
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


def _extract(text: str) -> str:
    from ftjax.generate import EXTRACT_PRESETS

    return text if text in EXTRACT_PRESETS else _regex(text)




_VALUE_FLAGS = ("--range", "--bounds")  # take a LO:HI value that may start with "-"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`build_parser().parse_args`, letting `--range -0.5:1.5` through: argparse (before Python 3.13) takes a value
    starting with "-" for an option unless it is a plain negative number, so such values are joined to their flag."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    joined, i = [], 0
    while i < len(argv):
        if argv[i] in _VALUE_FLAGS and i + 1 < len(argv) and re.fullmatch(r"-[\d.][^\s]*", argv[i + 1]):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return build_parser().parse_args(joined)
