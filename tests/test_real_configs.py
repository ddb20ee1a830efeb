"""Published config.json files (tests/data/real_configs, provenance in SOURCES.md): each one, shrunk to a tiny size
with every other key kept, builds a model in transformers from that exact file, and ftjax's float32 logits equal
transformers' (through load_params + forward and through `ftjax eval`)."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ftjax.cli import main
from ftjax.config import read_config
from ftjax.errors import FtjaxError
from ftjax.model import forward
from ftjax.params import load_params

DATA = Path(__file__).parent / "data" / "real_configs"
REFUSED = ("QUANTIZED__", "MOE__", "MULTIMODAL__")  # file-name prefixes of configs ftjax's forward refuses by name
CONFIGS = sorted(p.name for p in DATA.glob("*.json") if not p.name.startswith(REFUSED))
QUANTIZED = sorted(p.name for p in DATA.glob("QUANTIZED__*.json"))
OTHER_REFUSED = sorted(p.name for p in DATA.glob("*.json") if p.name.startswith(REFUSED[1:]))
PER_LAYER = ("layer_types", "no_rope_layers")
TOKENS_BT = np.random.default_rng(0).integers(3, 200, (2, 24))


def shrink(config: dict) -> dict:
    """The same config with tiny sizes (hidden 64, 2 layers, or 4 where layers differ by type, 4 query heads, vocab
    256) and every other key as it was: attention kind (MHA / GQA / MQA), an explicit head_dim that differs from
    hidden/heads, per-layer types and NoPE layers (their first layers)."""
    c = json.loads(json.dumps(config))
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    layers = 4 if c.get("model_type") in ("olmo3", "smollm3", "gemma2", "gemma3_text") else 2
    c.update(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
             vocab_size=max(256, (c.get("pad_token_id") or 0) + 1))
    if c.get("num_key_value_heads") is not None:
        c["num_key_value_heads"] = 4 if kv == heads else 1 if kv == 1 else 2
    if c.get("head_dim") is not None:
        c["head_dim"] = 16 if c["head_dim"] * heads == config["hidden_size"] else 24
    for key in PER_LAYER:
        if c.get(key) is not None:
            c[key] = c[key][:layers]
    return c


def build(config: dict, path: Path, seed: int = 0) -> transformers.PreTrainedModel:
    """A random float32 transformers model built from `config` exactly, saved at `path` with that config.json."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config, indent=2))
    hf_config = transformers.AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(config, indent=2))  # the exact file, not transformers' rewrite
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_real_config_logits_match_transformers(name, tmp_path, capsys):
    config = shrink(json.loads((DATA / name).read_text()))
    model = build(config, tmp_path / "m")
    with torch.no_grad():
        want = model(torch.tensor(TOKENS_BT)).logits.numpy()
    cfg, params = load_params(tmp_path / "m")
    got = np.asarray(forward(params, jnp.asarray(TOKENS_BT), cfg))
    assert np.max(np.abs(got - want)) <= 1e-4

    logp = torch.log_softmax(torch.tensor(want[:, :-1], dtype=torch.float64), -1)
    nll = -logp.gather(-1, torch.tensor(TOKENS_BT[:, 1:, None])).squeeze(-1)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"input_ids": row.tolist()}) + "\n" for row in TOKENS_BT))
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == nll.numel()
    assert abs(result["loss"] - float(nll.mean())) <= 1e-4


def test_enough_real_configs_of_every_family():
    families = [json.loads((DATA / n).read_text()).get("model_type") for n in CONFIGS]
    assert len(CONFIGS) >= 20
    assert {"llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3", "smollm3", "gemma2", "gemma3_text",
            "phi3"} <= set(families)
    listed = (DATA / "SOURCES.md").read_text()
    assert all(name in listed for name in CONFIGS + QUANTIZED + OTHER_REFUSED), "every file's provenance is listed"


@pytest.mark.parametrize("name", [n for n in QUANTIZED
                                  if "quantization_config" in json.loads((DATA / n).read_text())])
def test_quantized_configs_are_refused(name):
    with pytest.raises(FtjaxError, match="quantized checkpoint"):
        read_config(json.loads((DATA / name).read_text()), source=name)


@pytest.mark.parametrize("name", OTHER_REFUSED)
def test_mixture_of_experts_and_multimodal_configs_are_refused_by_name(name):
    config = json.loads((DATA / name).read_text())
    with pytest.raises(FtjaxError, match="mixture of experts" if name.startswith("MOE__") else "multimodal"):
        read_config(config, source=name)


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_every_command_on_a_real_config(tmp_path, capsys):
    """SmolLM2-135M-Instruct's published config (is_llama_config, rope_interleaved, transformers.js_config), shrunk:
    inspect, eval, generate --chat, convert, transfer, scan and finetune all run, and the inert keys are listed."""
    from hf_models import make_tokenizer

    config = shrink(json.loads((DATA / "finetune__SmolLM2-135M-Instruct-merged-transformers-v5.json").read_text()))
    inert = {"is_llama_config", "rope_interleaved", "transformers.js_config"}
    assert inert <= set(config)
    dirs = {}
    for seed, name in enumerate(("base", "ft")):
        build(config, tmp_path / name, seed=seed)
        make_tokenizer(tmp_path / name, vocab_size=config["vocab_size"], chat_template=CHATML)
        dirs[name] = str(tmp_path / name)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the answer is two", "one plus one equals two",
                                                                      "four minus one is three"] * 2))

    def run(*argv: str) -> str:
        capsys.readouterr()
        assert main(list(argv)) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    info = json.loads(run("inspect", dirs["base"], "--json"))
    assert inert <= set(info["ignored_config_keys"]) and info["family"] == "llama"
    assert "is_llama_config" in run("inspect", dirs["base"])
    assert json.loads(run("eval", "--model", dirs["base"], "--data", str(data), "--json"))["tokens"] > 0
    generated = json.loads(run("generate", "--model", dirs["base"], "--chat", "--prompt", "what is one plus one",
                               "--max-new-tokens", "4", "--json"))
    assert generated["prompt"] == "what is one plus one" and isinstance(generated["generation"], str)
    assert 1 <= generated["tokens"] <= 4 and generated["finish_reason"] in ("stop", "length")
    run("convert", dirs["base"], str(tmp_path / "orbax"), "--to", "orbax")
    run("convert", str(tmp_path / "orbax"), str(tmp_path / "back"), "--to", "hf")
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (tmp_path / "base" / "model.safetensors"
                                                                       ).read_bytes()
    run("transfer", "--source-base", dirs["base"], "--source-ft", dirs["ft"], "--target-base", dirs["base"],
        "--out", str(tmp_path / "out"), "--quiet")
    provenance = json.loads((tmp_path / "out" / "ftjax_transfer.json").read_text())
    assert inert <= set(provenance["config"]["ignored_keys"])
    scan = tmp_path / "scan"
    run("scan", "--a", dirs["base"], "--b", dirs["ft"], "--data", str(data), "--points", "3", "--out", str(scan))
    assert len(json.loads((scan / "scan.json").read_text())["loss"]) == 3
    run("finetune", "--init", dirs["base"], "--data", str(data), "--steps", "2", "--batch-size", "2",
        "--max-len", "16", "--out", str(tmp_path / "run"), "--quiet")
    assert (tmp_path / "run" / "final" / "config.json").is_file()
