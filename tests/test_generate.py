"""ftjax.generate: token-for-token greedy parity with transformers' generate, the KV cache, sampling, stopping,
sharded parameters, generation-based evaluation and the `ftjax generate` / `ftjax eval` command lines."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import make_hf_model, make_tokenizer

from ftjax import generate as gen
from ftjax.cli import main
from ftjax.errors import FtjaxError
from ftjax.model import forward, forward_cached, init_cache
from ftjax.params import load_params, make_mesh

FAMILIES = {  # windows of 8 tokens, so 100 new tokens run far past them
    "llama": {},
    "mistral": dict(sliding_window=8),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "olmo2": {},
}
LENGTHS = (5, 11, 17)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (model dir, cfg, params), built on first use; no EOS so generation runs the full length."""
    cache = {}

    def get(family):
        if family not in cache:
            path = make_hf_model(tmp_path_factory.mktemp(family), family, eos_token_id=None, **FAMILIES[family])
            cache[family] = (path, *load_params(path))
        return cache[family]

    return get


def prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 128, n).tolist() for n in LENGTHS]


def hf_generate(path, prompt_ids, max_new_tokens, eos=None):
    """transformers' greedy generate on the left-padded batch; the new tokens of each row, cut after its EOS."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t = max(map(len, prompt_ids))
    ids, mask = np.zeros((len(prompt_ids), t), np.int64), np.zeros((len(prompt_ids), t), np.int64)
    for r, p in enumerate(prompt_ids):
        ids[r, t - len(p):], mask[r, t - len(p):] = p, 1
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=0)
    rows = []
    for row in out[:, t:].tolist():
        stop = next((k for k, tok in enumerate(row) if eos is not None and tok == eos), None)
        rows.append(row if stop is None else row[:stop + 1])
    return rows


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers(family, models):
    path, cfg, params = models(family)
    got = gen.generate_ids(params, cfg, prompts(), max_new_tokens=100, batch_size=3)
    expected = hf_generate(path, prompts(), 100)
    for completion, row in zip(got, expected):
        assert len(row) == 100 and completion.finish_reason == "length"
        assert completion.tokens == row


def test_cached_forward_matches_forward(models):
    _, cfg, params = models("mistral")
    tokens_bt = np.array([prompts()[2] + prompts(1)[2][:7]], np.int32)  # 24 tokens, window 8
    full = np.asarray(forward(params, tokens_bt, cfg))
    cache = init_cache(cfg, 1, 32, jnp.float32)
    mask_bs = jnp.ones((1, 32), jnp.int32)
    step = jax.jit(forward_cached, static_argnames=("cfg",))
    logits, cache = step(params, tokens_bt[:, :20], cache, 0, cfg, attention_mask_bs=mask_bs,
                                   positions_bt=jnp.arange(20)[None])
    steps = [np.asarray(logits)]
    for i in range(20, 24):
        logits, cache = step(params, tokens_bt[:, i:i + 1], cache, i, cfg, attention_mask_bs=mask_bs,
                                       positions_bt=jnp.array([[i]]))
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_eos_stops_rows_like_transformers(models):
    path, cfg, params = models("llama")
    free = gen.generate_ids(params, cfg, prompts(), max_new_tokens=100, batch_size=3)
    eos = free[1].tokens[6]  # a token row 1 emits early; other rows may stop at it too, or run on
    got = gen.generate_ids(params, cfg, prompts(), max_new_tokens=100, eos_ids=[eos], batch_size=3)
    assert [c.tokens for c in got] == hf_generate(path, prompts(), 100, eos=eos)
    assert got[1].finish_reason == "stop" and got[1].tokens[-1] == eos and len(got[1].tokens) <= 7


def test_one_compile_per_batch_and_cache_length(models, count_calls):
    _, cfg, params = models("llama")
    jax.clear_caches()  # earlier tests compiled these shapes: start from none
    traced = count_calls(gen, "forward_cached")  # called (twice: prefill, decode step) only while tracing
    gen.generate_ids(params, cfg, prompts(), max_new_tokens=100, batch_size=3)
    first = traced["n"]
    assert first == 2  # one compilation: the prefill and the decode step traced once each
    gen.generate_ids(params, cfg, prompts(), max_new_tokens=120, batch_size=3)  # same 128-token bucket
    gen.generate_ids(params, cfg, prompts(1)[::-1], max_new_tokens=97, batch_size=3)
    assert traced["n"] == first


def test_batch_companions_do_not_change_greedy_output(models):
    _, cfg, params = models("llama")
    first = gen.generate_ids(params, cfg, prompts(), max_new_tokens=100, batch_size=3)
    other = gen.generate_ids(params, cfg, [prompts()[0], list(range(3, 23)), list(range(40, 70))],
                             max_new_tokens=100, batch_size=3)
    assert other[0] == first[0]


def test_sharded_params_generate_the_same(models):
    path, cfg, params = models("llama")
    _, sharded = load_params(path, mesh=make_mesh())  # every weight split over 8 devices
    assert len(sharded["model"]["embed_tokens"]["weight"].sharding.device_set) == 8
    expected = gen.generate_ids(params, cfg, prompts(), max_new_tokens=100, batch_size=3)
    assert gen.generate_ids(sharded, cfg, prompts(), max_new_tokens=100, batch_size=3) == expected


def nucleus_probs(logits_v, temperature, top_p):
    """Reference in numpy float64: softmax(logits / T), then the smallest most-likely set whose mass reaches
    top_p, renormalized; zero elsewhere."""
    z = np.asarray(logits_v, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]  # mass of the strictly more likely tokens
    keep = np.zeros(p.shape, bool)
    keep[order[before < top_p]] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5), (0.3, 0.999), (2.0, 1e-6)])
def test_sampling_distribution_matches_numpy_softmax_with_nucleus(temperature, top_p):
    logits_bv = np.random.default_rng(0).normal(0, 2, (4, 50)).astype(np.float32)
    got = np.asarray(jax.nn.softmax(gen.sampling_logits(jnp.asarray(logits_bv), temperature, top_p), axis=-1))
    for row, logits_v in zip(got, logits_bv):
        want = nucleus_probs(logits_v, temperature, top_p)
        np.testing.assert_array_equal(row == 0, want == 0)  # the same tokens filtered out
        np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-7)


def test_samples_follow_the_filtered_distribution():
    """20000 draws of one row: frequencies within 4 standard errors of the numpy reference, none outside it."""
    logits_v = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2], np.float32)
    want = nucleus_probs(logits_v, 0.8, 0.85)
    keys = jax.random.split(jax.random.key(0), 20000)
    draw = jax.vmap(lambda k: gen._sample(jnp.asarray(logits_v)[None], k, jnp.float32(0.8), jnp.float32(0.85),
                                          False)[0])
    counts = np.bincount(np.asarray(draw(keys)), minlength=logits_v.size)
    assert np.all(counts[want == 0] == 0)
    freq = counts / counts.sum()
    assert np.all(np.abs(freq - want) <= 4 * np.sqrt(want * (1 - want) / counts.sum()) + 1e-12), (freq, want)


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(models):
    _, cfg, params = models("llama")
    kw = dict(max_new_tokens=100, batch_size=3, temperature=1.5)
    a = gen.generate_ids(params, cfg, prompts(), seed=1, **kw)
    assert a == gen.generate_ids(params, cfg, prompts(), seed=1, **kw)
    assert a != gen.generate_ids(params, cfg, prompts(), seed=2, **kw)
    assert all(0 <= t < cfg.vocab_size for c in a for t in c.tokens)
    greedy = gen.generate_ids(params, cfg, prompts(), max_new_tokens=100, batch_size=3)
    assert gen.generate_ids(params, cfg, prompts(), seed=3, top_p=1e-6, **kw) == greedy


def test_context_window_limits_generation_and_long_prompts_are_refused(models):
    _, cfg, params = models("llama")
    small = cfg.replace(max_position_embeddings=20)
    got = gen.generate_ids(params, small, prompts(), max_new_tokens=10, batch_size=3)
    assert [len(c.tokens) for c in got] == [10, 9, 3]
    assert [c.finish_reason for c in got] == ["length", "context", "context"]
    with pytest.raises(FtjaxError, match="prompt 1 has 20 tokens, but the context window is 20"):
        gen.generate_ids(params, small, [list(range(3, 23))], max_new_tokens=4)
    with pytest.raises(FtjaxError, match="max-new-tokens must be positive"):
        gen.generate_ids(params, cfg, prompts(), max_new_tokens=0)


def test_extract_and_normalize():
    assert gen.extract_answer("so 3 + 4 = 7\n#### 1,234", "gsm8k") == "1,234"
    assert gen.extract_answer("first 3 then 4.5 done.", "last-number") == "4.5"
    assert gen.extract_answer("no digits", "last-number") is None
    assert gen.extract_answer("Answer: (B) yes", r"\(([A-D])\)") == "B"
    assert gen.normalize_answer(" The  Answer. ") == "the answer"
    assert gen.normalize_answer("1,234") == gen.normalize_answer("1234.0") == gen.normalize_answer("$1234") == "1234"
    assert gen.normalize_answer("-0.50") == "-0.5"


# ---------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(models):
    path, _, _ = models("llama")
    make_tokenizer(path)  # word-level vocab of 128, BOS "<s>" = 1, EOS "</s>" = 2
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    return path


def run_cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_generate_json_and_text(model_dir, tmp_path, capsys):
    status, out, err = run_cli(capsys, "generate", "--model", model_dir, "--prompt", "one plus two equals",
                               "--max-new-tokens", "12", "--json")
    assert status == 0, err
    record = json.loads(out)
    assert record["prompt"] == "one plus two equals" and record["finish_reason"] in ("stop", "length")
    # the same prompt through the API: BOS from the tokenizer, EOS ids from generation_config.json
    from ftjax.data import load_tokenizer
    tok = load_tokenizer(model_dir)
    cfg, params = load_params(model_dir)
    [completion] = gen.generate_ids(params, cfg, [tok.encode("one plus two equals").ids], max_new_tokens=12,
                                    eos_ids=(2, 5))
    assert record["generation"] == gen.decode(tok, completion, (2, 5)) and record["tokens"] == len(completion.tokens)

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the answer is", "one", "a b c d"]))
    status, out, err = run_cli(capsys, "generate", "--model", model_dir, "--prompts", prompts_file,
                               "--max-new-tokens", "5", "--batch-size", "2", "--temperature", "0.7", "--seed", "3",
                               "--json")
    assert status == 0, err
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["the answer is", "one", "a b c d"]
    status, out, err = run_cli(capsys, "generate", "--model", model_dir, "--prompt", "the", "--max-new-tokens", "3")
    assert status == 0 and out.strip()


def test_cli_generate_chat(model_dir, tmp_path, capsys):
    chat_dir = tmp_path / "chat"
    chat_dir.mkdir()
    for f in model_dir.iterdir():
        (chat_dir / f.name).write_bytes(f.read_bytes())
    (chat_dir / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
        "{% if add_generation_prompt %}answer :{% endif %}")
    status, out, err = run_cli(capsys, "generate", "--model", chat_dir, "--chat", "--system", "be brief",
                               "--prompt", "one plus one", "--max-new-tokens", "4", "--json")
    assert status == 0, err
    assert json.loads(out)["prompt"] == "one plus one"


@pytest.mark.parametrize("argv, message", [
    (["--chat", "--prompt", "hi"], "has no chat template"),
    (["--prompt", "the " * 1100], "context window is 1024"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--prompt", "hi", "--system", "x"], "needs --chat"),
])
def test_cli_generate_bad_input_is_one_line(model_dir, capsys, monkeypatch, argv, message):
    monkeypatch.setattr("ftjax.params.load_params", lambda *a, **k: pytest.fail("loaded weights before checking"))
    status, out, err = run_cli(capsys, "generate", "--model", model_dir, *argv)
    assert status == 2 and message in err and err.count("\n") == 1 and err.startswith("ftjax: error:")


def test_cli_eval_by_generation(model_dir, tmp_path, capsys):
    from ftjax.data import load_tokenizer
    tok = load_tokenizer(model_dir)
    cfg, params = load_params(model_dir)
    questions = ["one plus two", "the answer is", "four minus one"]
    said = [gen.decode(tok, c, (2, 5)) for c in gen.generate_ids(
        params, cfg, [tok.encode(q).ids for q in questions], max_new_tokens=6, eos_ids=(2, 5))]
    rows = [{"prompt": questions[0], "answer": said[0].upper() + " ."},  # right after normalization
            {"prompt": questions[1], "answer": said[1] + " extra"},  # wrong
            {"prompt": questions[2], "answer": "#### 7"}]  # wrong (no digits in a word-level vocab)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    status, out, err = run_cli(capsys, "eval", "--model", model_dir, "--data", data, "--max-new-tokens", "6",
                               "--out", tmp_path / "run", "--json")
    assert status == 0, err
    result = json.loads(out)
    assert result["exact_match"] == pytest.approx(1 / 3) and result["rows"] == 3
    lines = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in lines] == said and [r["correct"] for r in lines] == [True, False, False]
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["exact_match"] == result["exact_match"]
    status, out, err = run_cli(capsys, "eval", "--model", model_dir, "--data", data, "--max-new-tokens", "6",
                               "--extract", "gsm8k")
    assert status == 0 and "exact_match" in out
