"""Tiny random Hugging Face models for tests, built with transformers (the reference implementation)."""

from __future__ import annotations

from pathlib import Path

LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0)


def make_hf_model(path: Path, family: str = "llama", *, dtype: str = "float32", seed: int = 0, std: float = 0.05,
                  **overrides) -> Path:
    """Save a random causal LM of model_type `family` (llama, mistral, qwen2, olmo2, gemma2, phi3, ...: the
    config and `...ForCausalLM` classes transformers maps it to) with non-trivial weights (norms and biases
    randomised too) to `path`."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = transformers.AutoConfig.for_model(family, **{**LLAMA, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path)
    return path


WORDS = ("the a an of to and in is was for on with as by at from it that this be are or not but"
         " one two three four five six seven eight nine ten plus minus equals answer question").split()


def make_tokenizer(path: Path, vocab_size: int = 128, chat_template: str | None = None) -> Path:
    """A word-level tokenizer.json (BOS added by its post-processor) plus tokenizer_config.json, in `path`."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 1024}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


QWEN2_VOCAB = 512  # model vocab_size for make_qwen2_tokenizer: its byte-level BPE needs more than 128 ids
QWEN2_EOT = QWEN2_VOCAB - 1  # "<|endoftext|>": end of text and padding; config.json's bos/eos id, as in real Qwen2


def make_qwen2_tokenizer(path: Path, vocab_size: int = QWEN2_VOCAB) -> Path:
    """A tokenizer laid out as real Qwen2 ones are, in `path`: a byte-level BPE tokenizer.json with Qwen2's
    pre-tokenizer (transformers' own `Qwen2Tokenizer` pipeline, which AutoTokenizer imposes on every qwen2
    checkpoint), no BOS (bos_token null, add_bos_token false), "<|endoftext|>" (id vocab_size - 1) as EOS and pad.

    The vocabulary: the 256 byte-level symbols, then merges spelling " " + word (one token) and word for each of
    WORDS, then fillers up to vocab_size - 1.
    """
    import json

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for word in ["\u0120" + w for w in WORDS] + list(WORDS):  # "\u0120" (Ġ): a space; " word" merges first
        for k in range(2, len(word) + 1):
            if word[:k] not in vocab:
                merges.append((word[:k - 1], word[k - 1]))
                vocab[word[:k]] = len(vocab)
    if len(vocab) >= vocab_size:
        raise ValueError(f"vocab_size {vocab_size} < {len(vocab) + 1} ids the tokenizer needs")
    for i in range(len(vocab), vocab_size - 1):
        vocab[f"<filler{i}>"] = i
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    assert tok.token_to_id("<|endoftext|>") == vocab_size - 1
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "add_bos_token": False,
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "add_prefix_space": False, "model_max_length": 1024}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def sparse_model(path: Path, rows: int, cols: int) -> Path:
    """A tied one-tensor bf16 checkpoint of rows x cols zeros, as a sparse file (instant to make, slow-ish to
    transfer: it is read three times and written once for real)."""
    import json
    import struct

    import ml_dtypes
    import numpy as np

    from ftjax.io.safetensors import TensorInfo, build_header

    path.mkdir()
    header = build_header([TensorInfo("model.embed_tokens.weight", np.dtype(ml_dtypes.bfloat16), (rows, cols))],
                          {"format": "pt"})
    with open(path / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + rows * cols * 2)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Rows as a JSONL file."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lm_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """n pre-tokenized rows of 6-29 random ids in [3, 128)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(3, 128, rng.integers(6, 30)).tolist()} for _ in range(n)]


def write_yaml(tmp: Path, data: dict, name: str = "merge.yml") -> Path:
    """`data` as a YAML file `tmp/name` (a mergekit config)."""
    import yaml

    p = tmp / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def checkpoint_tensors(path: Path) -> dict:
    """Every tensor of the checkpoint at `path`, by name (stored dtype)."""
    from ftjax.io.checkpoint import HFCheckpoint

    ck = HFCheckpoint(path)
    return {n: ck.get(n) for n in ck.names()}
