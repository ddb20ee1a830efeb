"""The demo's synthetic world: a character-level tokenizer, a two-stage pretraining corpus and an arithmetic task.

Everything is a deterministic function of (WorldConfig, seed). Text is lowercase ASCII; one character is one
token, so the tokenizer written for the checkpoints (`tokenizer.json`, built with the `tokenizers` library) and
the fast numpy encoder used for pretraining rows (`encode`) give the same ids.

Documents ("web text"):
    grammar      "the red cat sees the boat."
    facts        "kavo lives in rome." / "kavo works as a baker."
    entity QA    "Q: where does kavo live? A: rome"          (the question/answer *format*, never arithmetic)
    reversal     "abc reversed is cba."
    counting     "7 8 9 10 11."
    arithmetic   "23 plus 14 is 37."  (stage 2 adds "the sum of 23 and 14 is 37.", "adding 23 and 14 gives 37.")
    arith QA     "Q: add 23 and 14. A: 37"   (stage 2 only, a small share: "instruction-like" mid-training data)
    task QA      "Q: what is 23 plus 14? A: 37"   (the task's own format: 1 % of stage 1, 3 % of stage 2)
Stage 1 is the broad mixture with a small arithmetic share; stage 2 shifts most of the mass to arithmetic, as
OLMo 2's mid-training shifts toward math. The fine-tuning task is `Q: what is 23 plus 14? A:` -> ` 37</s>`:
the bases know the Q/A format and (once learned) the sums, and saw the task's phrasing rarely, so their zero-shot
score is low but not zero (otherwise "transfer made it worse than the base" could not be observed). Held-out
task pairs occur in pretraining prose (the latent skill) but never in the fine-tuning set.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np

from ftjax.rows import Rows

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
CHARS = "abcdefghijklmnopqrstuvwxyzQA0123456789 .,?:+=\n"
VOCAB_SIZE = 64  # len(SPECIALS) + len(CHARS) = 51, padded to a multiple of 16
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

_CITIES = ["rome", "paris", "oslo", "lima", "cairo", "delhi", "tokyo", "quito", "dakar", "perth"]
_JOBS = ["baker", "pilot", "nurse", "judge", "miner", "tailor", "farmer", "singer", "potter", "doctor"]
_ADJ = ["red", "big", "old", "shy", "new", "tall", "soft", "dark"]
_NOUNS = ["cat", "dog", "boat", "tree", "bird", "car", "lamp", "fish", "horse", "cup"]
_VERBS = ["sees", "likes", "finds", "moves", "hides", "takes"]


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """The synthetic world. Shares are fractions of documents."""

    operand_max: int = 19  # operands 0..operand_max
    n_names: int = 150
    stage1_arith: float = 0.3  # arithmetic prose share in stage 1
    stage2_arith: float = 0.7  # arithmetic prose share in stage 2 (three templates)
    stage2_arith_qa: float = 0.05  # "Q: add a and b. A: c" share in stage 2
    stage1_task_qa: float = 0.01  # the task's own format, "Q: what is a plus b? A: c", in stage 1 ...
    stage2_task_qa: float = 0.03  # ... and in stage 2: the bases' partial familiarity with the task
    entity_qa: float = 0.12  # entity Q/A share of the broad mixture
    ft_pairs: int = 150
    eval_pairs: int = 150
    row_len: int = 64  # pretraining row length (tokens)


# ---------------------------------------------------------------------------------------------------------- tokenizer
def vocab() -> dict[str, int]:
    return {**{s: i for i, s in enumerate(SPECIALS)}, **{c: len(SPECIALS) + i for i, c in enumerate(CHARS)}}


_TABLE = np.full(256, SPECIALS.index(UNK), np.int32)
for _c, _i in vocab().items():
    if len(_c) == 1:
        _TABLE[ord(_c)] = _i
_TABLE[0], _TABLE[1], _TABLE[2] = PAD_ID, BOS_ID, EOS_ID  # "\x00", "\x01", "\x02" stand for PAD, BOS, EOS in packing


def encode(text: str) -> np.ndarray:
    """Character ids (no BOS/EOS), identical to the tokenizer.json ids."""
    return _TABLE[np.frombuffer(text.encode("ascii"), np.uint8)]


def make_tokenizer():
    """A `tokenizers.Tokenizer`: one token per character, `<s>` prepended, `</s>` written out in completions."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab(), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, BOS_ID)])
    return tok


def write_tokenizer(out: Path) -> Path:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json (transformers' fast-tokenizer layout)."""
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer().save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128, "add_bos_token": True,
         **special}, indent=1) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------- documents
def _names(n: int, rng: np.random.Generator) -> list[str]:
    cons, vows = "bdfgklmnprstvz", "aeiou"
    out: set[str] = set()
    while len(out) < n:
        k = int(rng.integers(2, 4))
        out.add("".join(cons[rng.integers(len(cons))] + vows[rng.integers(len(vows))] for _ in range(k)))
    return sorted(out)


class Writer:
    """Document generators over one world (entity facts fixed by the world seed). `rng` is a `random.Random`
    (scalar draws from Python's generator are ~10x cheaper than numpy's, and pretraining needs ~10^5 documents)."""

    def __init__(self, cfg: WorldConfig, seed: int):
        self.cfg = cfg
        rng = np.random.default_rng([seed, 1])
        self.names = _names(cfg.n_names, rng)
        self.city = {n: _CITIES[rng.integers(len(_CITIES))] for n in self.names}
        self.job = {n: _JOBS[rng.integers(len(_JOBS))] for n in self.names}

    def pair(self, rng: random.Random) -> tuple[int, int]:
        return rng.randint(0, self.cfg.operand_max), rng.randint(0, self.cfg.operand_max)

    def broad(self, rng: random.Random) -> str:
        name = rng.choice(self.names)
        if rng.random() < self.cfg.entity_qa:
            if rng.random() < 0.5:
                return f"Q: where does {name} live? A: {self.city[name]}"
            return f"Q: what does {name} do? A: {self.job[name]}"
        u = rng.random()
        if u < 0.3:
            return f"the {rng.choice(_ADJ)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}."
        if u < 0.6:
            if rng.random() < 0.5:
                return f"{name} lives in {self.city[name]}."
            return f"{name} works as a {self.job[name]}."
        if u < 0.8:
            w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))
            return f"{w} reversed is {w[::-1]}."
        start = rng.randint(0, 29)
        return " ".join(str(start + i) for i in range(rng.randint(3, 6))) + "."

    def arithmetic(self, rng: random.Random, templates: int) -> str:
        a, b = self.pair(rng)
        t = rng.randrange(templates)
        return (f"{a} plus {b} is {a + b}.", f"the sum of {a} and {b} is {a + b}.",
                f"adding {a} and {b} gives {a + b}.")[t]

    def document(self, stage: int, rng: random.Random) -> str:
        u = rng.random()
        if u < (self.cfg.stage1_task_qa if stage == 1 else self.cfg.stage2_task_qa):
            a, b = self.pair(rng)
            return f"{task_prompt(a, b)} {a + b}"
        u = rng.random()
        if stage == 1:
            return self.arithmetic(rng, 1) if u < self.cfg.stage1_arith else self.broad(rng)
        if u < self.cfg.stage2_arith_qa:
            a, b = self.pair(rng)
            return f"Q: add {a} and {b}. A: {a + b}"
        if u < self.cfg.stage2_arith_qa + self.cfg.stage2_arith:
            return self.arithmetic(rng, 3)
        return self.broad(rng)


def pack(docs: list[str], row_len: int) -> Rows:
    """Greedy in-order packing of `<s> doc </s>` sequences into rows, one segment per document (docs must fit)."""
    rows, current = [], ""
    for d in docs:
        doc = "\x01" + d + "\x02"
        if len(current) + len(doc) > row_len:
            rows.append(current)
            current = ""
        current += doc
    rows.append(current)
    tokens_nt = encode("".join(r.ljust(row_len, "\x00") for r in rows)).reshape(len(rows), row_len)
    bos_nt = tokens_nt == BOS_ID
    real_nt = tokens_nt != PAD_ID
    segments_nt = np.where(real_nt, np.cumsum(bos_nt, axis=1), 0).astype(np.int32)
    idx_nt = np.broadcast_to(np.arange(row_len), tokens_nt.shape)
    start_nt = np.maximum.accumulate(np.where(bos_nt, idx_nt, 0), axis=1)
    positions_nt = np.where(real_nt, idx_nt - start_nt, 0).astype(np.int32)
    weights_nt = (real_nt & ~bos_nt).astype(np.float32)
    return Rows(tokens_nt, segments_nt, positions_nt, weights_nt)


def corpus(writer: Writer, stage: int, n_rows: int, rng: random.Random) -> Rows:
    """Exactly `n_rows` packed rows of stage-`stage` text."""
    docs, tokens = [], 0
    need = n_rows * writer.cfg.row_len
    while tokens < need:  # packing wastes a few % per row, so this overshoots less than it needs; top up below
        d = writer.document(stage, rng)
        docs.append(d)
        tokens += len(d) + 2
    rows = pack(docs, writer.cfg.row_len)
    while rows.tokens_nt.shape[0] < n_rows:
        extra = pack([writer.document(stage, rng) for _ in range(max(64, n_rows // 8))], writer.cfg.row_len)
        rows = Rows(*(np.concatenate([a, b]) for a, b in zip(dataclasses.astuple(rows), dataclasses.astuple(extra))))
    return Rows(*(a[:n_rows] for a in dataclasses.astuple(rows)))


# ---------------------------------------------------------------------------------------------------------- the task
def task_prompt(a: int, b: int) -> str:
    return f"Q: what is {a} plus {b}? A:"


def task_rows(writer: Writer, seed: int) -> dict[str, list[dict]]:
    """JSONL rows: `train` (ft_pairs) and `eval` (eval_pairs, disjoint) prompt/completion pairs, and `probe`: the
    eval pairs in pretraining format ("23 plus 14 is" -> " 37"), which measures the latent skill."""
    cfg = writer.cfg
    n = cfg.operand_max + 1
    rng = np.random.default_rng([seed, 2])
    order = rng.permutation(n * n)[:cfg.ft_pairs + cfg.eval_pairs]
    pairs = [(int(k // n), int(k % n)) for k in order]
    train, held = pairs[:cfg.ft_pairs], pairs[cfg.ft_pairs:]
    qa = lambda ps: [{"prompt": task_prompt(a, b), "completion": f" {a + b}{EOS}"} for a, b in ps]  # noqa: E731
    return {"train": qa(train), "eval": qa(held),
            "probe": [{"prompt": f"{a} plus {b} is", "completion": f" {a + b}"} for a, b in held]}


def heldout_text(writer: Writer, stage: int, n_docs: int, seed: int) -> list[dict]:
    """JSONL text rows of held-out stage-`stage` documents (LM loss)."""
    rng = random.Random(f"heldout-{seed}-{stage}")
    return [{"text": writer.document(stage, rng)} for _ in range(n_docs)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
