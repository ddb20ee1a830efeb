"""lm-evaluation-harness speed: the same tasks and model through ftjax's backend (`FtjaxLM`) and the harness's own
`hf` backend (HFLM, PyTorch), side by side in one run (issue 17).

    python benchmarks/lm_eval_bench.py                                    # CPU: small random Llama (~21M params)
    python benchmarks/lm_eval_bench.py --shape 1b --dtype bfloat16 --device cuda --batch-size 32   # GPU

Three local tasks over JSONL written here (nothing downloads): `bench_mc` (multiple choice: `loglikelihood`, acc and
acc_norm), `bench_ppl` (`loglikelihood_rolling`: word perplexity over texts longer than max_length) and `bench_gen`
(`generate_until`, greedy, exact match). Each task is run through `lm_eval.simple_evaluate` for each backend;
the backends alternate within every repeat (their order flips each repeat), so load on a shared machine hits both.
Times are wall seconds of the whole `simple_evaluate` call (the harness's own overhead included, the same for
both); ftjax's first repeat includes its compilations (counted from jax's compile events), later repeats are warm.
Scored tokens per second count every (context + continuation) token of every loglikelihood request (or every
text token, plus one prefix token per rolling window), without padding. On a GPU the table also gives the forward's
model FLOP utilisation: 2 x (matmul parameters) FLOPs per scored token against --peak-tflops (989: H100/H200
dense bf16). Random weights: speed does not depend on their values. The metrics of the two backends are compared
(equal within 1e-4 relative in float32; bf16 differs by rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHAPES = {
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),  # Llama-3.2-1B's shape
}
TASKS = ("bench_mc", "bench_ppl", "bench_gen")


def make_model(root: Path, shape: str, dtype: str) -> Path:
    """A random Llama of `shape` saved by transformers, with a word-level tokenizer over its whole vocabulary."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    spec = SHAPES[shape]
    config = transformers.LlamaConfig(**spec, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                      rope_theta=500000.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 1B init is slow on CPU
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
    model.to(getattr(torch, dtype)).save_pretrained(root)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, spec["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 4096}))
    return root


def write_tasks(root: Path, *, docs: int, ppl_docs: int, ppl_words: int, gen_docs: int, gen_toks: int,
                words: int = 2000, seed: int = 0) -> Path:
    """The three tasks' YAML files and JSONL data under `root` (words w3..w{words}, lengths drawn from a seed)."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(f"w{rng.randrange(3, words)}" for _ in range(n))

    data = {
        "mc": [{"question": text(rng.randint(20, 120)), "choices": [text(rng.randint(1, 4)) for _ in range(4)],
                "answer": rng.randrange(4)} for _ in range(docs)],
        "ppl": [{"text": text(ppl_words)} for _ in range(ppl_docs)],
        "gen": [{"question": text(rng.randint(10, 60)), "answer": text(1)} for _ in range(gen_docs)],
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in data.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = 'dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: "{}"\ntest_split: test\n'
    bodies = {
        "mc": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_target: answer\n'
              'doc_to_choice: "{{choices}}"\ntarget_delimiter: " "\nmetric_list:\n'
              "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
              "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
        "ppl": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
               "  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n",
        "gen": 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
               f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {gen_toks}\n  do_sample: false\n'
               "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
    }
    for name, body in bodies.items():
        (root / f"{name}.yaml").write_text(f"task: bench_{name}\n" + head.format(root / f"{name}.jsonl") + body
                                           + "metadata:\n  version: 1.0\n")
    return root


def scored_tokens(task_dir: Path, max_length: int) -> dict[str, int]:
    """Tokens the loglikelihood tasks score (no padding): (context + ' ' + choice) per choice, truncated to
    max_length + 1 as both backends do; the rolling task's text tokens plus one prefix token per window."""
    def n_words(s: str) -> int:
        return len(s.split())

    mc = [json.loads(line) for line in (task_dir / "mc.jsonl").read_text().splitlines()]
    ppl = [json.loads(line) for line in (task_dir / "ppl.jsonl").read_text().splitlines()]
    mc_tokens = sum(min(1 + n_words(r["question"]) + n_words(c), max_length + 1) for r in mc for c in r["choices"])
    ppl_tokens = sum(n_words(r["text"]) + -(-n_words(r["text"]) // max_length) for r in ppl)
    return {"bench_mc": mc_tokens, "bench_ppl": ppl_tokens}


def matmul_params(spec: dict) -> int:
    """Parameters in matrix products per token: every layer's projections and the LM head."""
    h, f, L, v = spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"], spec["vocab_size"]
    kv = h // spec["num_attention_heads"] * spec["num_key_value_heads"]
    return L * (2 * h * h + 2 * h * kv + 3 * h * f) + h * v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cpu", help="the hf backend's torch device (cpu or cuda)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--docs", type=int, default=200, help="multiple-choice documents (4 requests each)")
    ap.add_argument("--ppl-docs", type=int, default=24)
    ap.add_argument("--ppl-words", type=int, default=600)
    ap.add_argument("--gen-docs", type=int, default=32)
    ap.add_argument("--gen-toks", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)

    import jax
    import jax.monitoring
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ftjax.lm_eval import FtjaxLM

    compiles = {"n": 0}
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _secs, **_: compiles.__setitem__("n", compiles["n"] + ("backend_compile" in event)))
    on_gpu = jax.default_backend() != "cpu"
    peak = args.peak_tflops or (989.0 if on_gpu else None)
    tmp = Path(tempfile.mkdtemp(prefix="ftjax_lmeval_bench_"))
    t0 = time.perf_counter()
    model_dir = make_model(tmp / "model", args.shape, args.dtype)
    task_dir = write_tasks(tmp / "tasks", docs=args.docs, ppl_docs=args.ppl_docs, ppl_words=args.ppl_words,
                           gen_docs=args.gen_docs, gen_toks=args.gen_toks)
    print(f"model and tasks written in {time.perf_counter() - t0:.1f} s under {tmp}", flush=True)
    manager = TaskManager(include_path=str(task_dir))
    tokens = scored_tokens(task_dir, args.max_length)
    requests = {"bench_mc": 4 * args.docs, "bench_ppl": args.ppl_docs, "bench_gen": args.gen_docs}

    loaders = {
        "ftjax": lambda: FtjaxLM(pretrained=str(model_dir), dtype=args.dtype, batch_size=args.batch_size,
                                 max_length=args.max_length),
        "hf": lambda: HFLM(pretrained=str(model_dir), backend="causal", dtype=args.dtype, device=args.device,
                           batch_size=args.batch_size, max_length=args.max_length),
    }
    models, load_s = {}, {}
    for name, load in loaders.items():
        start = time.perf_counter()
        models[name] = load()
        load_s[name] = time.perf_counter() - start

    rows, metrics = [], {}
    for r in range(args.repeats):
        order = ("ftjax", "hf") if r % 2 == 0 else ("hf", "ftjax")
        for task in TASKS:
            for name in order:
                before = compiles["n"]
                start = time.perf_counter()
                out = lm_eval.simple_evaluate(model=models[name], tasks=[task], task_manager=manager,
                                              log_samples=False, bootstrap_iters=0, verbosity="ERROR")
                if name == "hf" and args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                wall = time.perf_counter() - start
                values = {k: v for k, v in out["results"][task].items()
                          if isinstance(v, (int, float)) and "stderr" not in k}
                metrics[(name, task)] = values
                rows.append({"repeat": r, "task": task, "backend": name, "wall_s": wall,
                             "requests_per_s": requests[task] / wall,
                             "tokens_per_s": tokens[task] / wall if task in tokens else None,
                             "compiles": compiles["n"] - before if name == "ftjax" else None, "metrics": values})
                print(f"repeat {r} {task:10s} {name:5s} {wall:8.2f} s", flush=True)

    print(f"\nlm-eval bench: shape {args.shape} ({matmul_params(SHAPES[args.shape]) / 1e6:.1f}M matmul params), "
          f"{args.dtype}, batch {args.batch_size}, max_length {args.max_length}; jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}, hf backend on {args.device} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads), lm_eval {lm_eval.__version__}; load s: ftjax {load_s['ftjax']:.1f}, "
          f"hf {load_s['hf']:.1f}; load average {os.getloadavg()[0]:.1f}")
    head = "| task | requests | repeat | ftjax s | hf s | hf / ftjax | ftjax tokens/s | hf tokens/s | ftjax compiles |"
    if peak:
        head += " ftjax MFU |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    flops_per_token = 2 * matmul_params(SHAPES[args.shape])
    for r in range(args.repeats):
        for task in TASKS:
            f, h = (next(x for x in rows if x["repeat"] == r and x["task"] == task and x["backend"] == b)
                    for b in ("ftjax", "hf"))
            tps = (f"{f['tokens_per_s']:.0f} | {h['tokens_per_s']:.0f}" if f["tokens_per_s"] else "– | –")
            line = (f"| {task} | {requests[task]} | {r} | {f['wall_s']:.2f} | {h['wall_s']:.2f} | "
                    f"{h['wall_s'] / f['wall_s']:.2f}x | {tps} | {f['compiles']} |")
            if peak:
                mfu = f["tokens_per_s"] * flops_per_token / (peak * 1e12) if f["tokens_per_s"] else None
                line += f" {100 * mfu:.1f}% |" if mfu else " – |"
            print(line)
    worst = 0.0
    for task in TASKS:
        for key, value in metrics[("hf", task)].items():
            got = metrics[("ftjax", task)].get(key)
            worst = max(worst, abs(got - value) / max(abs(value), 1e-12) if got is not None else float("inf"))
    print(f"\nlargest relative metric difference ftjax vs hf: {worst:.2e} "
          f"({'equal within 1e-4' if worst <= 1e-4 else 'differs'}); machine: {platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_s": load_s, "rows": rows,
                                               "largest_metric_rel_diff": worst}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
