"""`slices:` configs as mergekit plans them: passthrough stacking of layer ranges (frankenmerges) and merges over
matching ranges, layer by layer, with gradients over each slice's own layers; tiny Llama models from transformers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import merge_reference as R
import ml_dtypes
import numpy as np
import pytest
from hf_models import checkpoint_tensors, make_hf_model, make_tokenizer, write_yaml
from reference import bits, round_f64

from ftjax.cli import main
from ftjax.errors import FtjaxError
from ftjax.merge import merge

BF16 = ml_dtypes.bfloat16
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Two unrelated bf16 Llamas of different depths (4 and 3 layers) and two tied ones (4 layers)."""
    d = tmp_path_factory.mktemp("slices")
    return {"a": make_hf_model(d / "a", dtype="bfloat16", seed=1, num_hidden_layers=4),
            "b": make_hf_model(d / "b", dtype="bfloat16", seed=2, num_hidden_layers=3),
            "ta": make_hf_model(d / "ta", dtype="bfloat16", seed=3, num_hidden_layers=4, tie_word_embeddings=True),
            "tb": make_hf_model(d / "tb", dtype="bfloat16", seed=4, num_hidden_layers=4, tie_word_embeddings=True)}




def _layer(tensors: dict, i: int) -> dict[str, np.ndarray]:
    """Layer i's tensors by their name inside the layer."""
    return {m.group(2): x for n, x in tensors.items() if (m := LAYER.match(n)) and int(m.group(1)) == i}


def _load_hf(path: Path):
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def _passthrough(ranges: list[tuple[Path, int, int]]) -> dict:
    return {"merge_method": "passthrough", "dtype": "bfloat16",
            "slices": [{"sources": [{"model": str(m), "layer_range": [a, b]}]} for m, a, b in ranges]}


def test_passthrough_frankenmerge_loads_with_renumbered_source_layers(deep, tmp_path):
    a, b = deep["a"], deep["b"]
    ranges = [(a, 0, 3), (b, 1, 3), (a, 3, 4)]
    merge(write_yaml(tmp_path, _passthrough(ranges)), tmp_path / "out", progress=False)
    out, ta, tb = checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(a), checkpoint_tensors(b)
    want_layers = [(ta, 0), (ta, 1), (ta, 2), (tb, 1), (tb, 2), (ta, 3)]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == len(want_layers) == 6
    model = _load_hf(tmp_path / "out")
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    assert sorted(out) == sorted({n for n in ta if not LAYER.match(n)}
                                 | {f"model.layers.{i}.{k}" for i in range(6) for k in _layer(ta, 0)})
    for i, (src, j) in enumerate(want_layers):
        got, want = _layer(out, i), _layer(src, j)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(bits(got[k]), bits(want[k]), err_msg=f"layer {i}.{k}")
    # mergekit: embeddings from the first slice's source, final norm and head from the last slice's
    for n, src in [("model.embed_tokens.weight", ta), ("model.norm.weight", ta), ("lm_head.weight", ta)]:
        np.testing.assert_array_equal(bits(out[n]), bits(src[n]), err_msg=n)
    merge(write_yaml(tmp_path, _passthrough(ranges[:2]), "two.yml"), tmp_path / "two", progress=False)
    two = checkpoint_tensors(tmp_path / "two")
    for n in ("model.norm.weight", "lm_head.weight"):
        np.testing.assert_array_equal(bits(two[n]), bits(tb[n]), err_msg=n)
    # transformers put the renumbered tensors where they belong: its layer 4 is b's layer 2
    import torch

    up = model.model.layers[4].mlp.up_proj.weight.detach().to(torch.float32).numpy().astype(BF16)
    np.testing.assert_array_equal(bits(up), bits(tb["model.layers.2.mlp.up_proj.weight"]))


def test_tied_frankenmerge_stays_tied_and_loads(deep, tmp_path):
    ta, tb = deep["ta"], deep["tb"]
    merge(write_yaml(tmp_path, _passthrough([(ta, 0, 2), (tb, 2, 4), (ta, 2, 3)])), tmp_path / "out", progress=False)
    out, a = checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(ta)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["num_hidden_layers"] == 5 and "lm_head.weight" not in out
    np.testing.assert_array_equal(bits(out["model.embed_tokens.weight"]), bits(a["model.embed_tokens.weight"]))
    model = _load_hf(tmp_path / "out")
    assert len(model.model.layers) == 5
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_per_layer_config_lists_follow_the_layers(tmp_path):
    """layer_types (here Qwen2's sliding layers from max_window_layers) are taken from the sliced layers."""
    kw = dict(dtype="bfloat16", num_hidden_layers=4, use_sliding_window=True, sliding_window=16)
    a = make_hf_model(tmp_path / "a", "qwen2", seed=5, max_window_layers=1, **kw)
    b = make_hf_model(tmp_path / "b", "qwen2", seed=6, max_window_layers=3, **kw)
    types = {p: json.loads((p / "config.json").read_text())["layer_types"] for p in (a, b)}
    assert types[a] != types[b]
    merge(write_yaml(tmp_path, _passthrough([(a, 0, 2), (b, 2, 4), (a, 1, 2)])), tmp_path / "out", progress=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5
    assert cfg["layer_types"] == types[a][0:2] + types[b][2:4] + types[a][1:2]
    assert _load_hf(tmp_path / "out").config.layer_types == cfg["layer_types"]


# --- merges over matching ranges ----------------------------------------------------------------------------------


def _gradient(values, t: float) -> float:
    """A gradient's value at t as mergekit interpolates it: piecewise linear over evenly spaced anchors."""
    values = [values] if np.isscalar(values) else values
    return float(np.interp(t, np.linspace(0, 1, len(values)), values))


def _slice_t(i: int, n: int) -> float:
    return i / (n - 1) if n > 1 else 1.0


def test_linear_slices_equal_the_per_layer_reference(deep, tmp_path):
    """Two slices, each merging layer i of one range with layer i of the other; per-source weight gradients run over
    each slice's own layers; normalize: false from the slice's parameters (dyadic weights: float64 is exact)."""
    a, b = deep["a"], deep["ta"]  # same shapes; b's tied head is its embedding
    spec = [([(a, 0, 3, [1.0, 0.5]), (b, 1, 4, [0.0, 0.5])], {"normalize": False}),
            ([(a, 3, 4, [0.25, 0.75]), (b, 0, 1, 0.5)], {"normalize": False})]
    cfg = {"merge_method": "linear", "slices": [
        {"sources": [{"model": str(m), "layer_range": [s, e], "parameters": {"weight": w}} for m, s, e, w in srcs],
         "parameters": params} for srcs, params in spec]}
    merge(write_yaml(tmp_path, cfg), tmp_path / "out", progress=False)
    out, tens = checkpoint_tensors(tmp_path / "out"), {a: checkpoint_tensors(a), b: checkpoint_tensors(b)}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4
    layer = 0
    for srcs, _ in spec:
        n = srcs[0][2] - srcs[0][1]
        for i in range(n):
            t = _slice_t(i, n)
            w = [_gradient(g, t) for *_, g in srcs]
            got = _layer(out, layer)
            for k, x in got.items():
                want = R.linear([_layer(tens[m], s + i)[k] for m, s, _, _ in srcs], w, normalize=False)
                np.testing.assert_array_equal(bits(x), bits(round_f64(want, BF16)), err_msg=f"layer {layer}.{k}")
            layer += 1
    # outside the layers t = 0: the embedding from the first slice's sources, the head from the last slice's
    first, last = spec[0][0], spec[-1][0]
    for n, srcs in [("model.embed_tokens.weight", first), ("model.norm.weight", last), ("lm_head.weight", last)]:
        ins = [tens[m].get(n, tens[m]["model.embed_tokens.weight"]) for m, *_ in srcs]
        want = R.linear(ins, [_gradient(g, 0.0) for *_, g in srcs], normalize=False)
        np.testing.assert_array_equal(bits(out[n]), bits(round_f64(want, BF16)), err_msg=n)


def test_slerp_slices_with_a_t_gradient_equal_the_per_layer_reference(deep, tmp_path):
    """slerp over [0, 3) of A and [1, 4) of B with a top-level t gradient (t at the slice's layer i of n: the gradient
    at i / (n - 1)), then one layer with the slice's own t; ftjax's stated bound: |out - ref| <= half an ulp +
    2^-20 * (|A| + |B|) elementwise."""
    a, b = deep["a"], deep["ta"]
    grad = [0.1, 0.9, 0.4]
    cfg = {"merge_method": "slerp", "base_model": str(a), "parameters": {"t": grad}, "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}, {"model": str(b), "layer_range": [1, 4]}]},
        {"sources": [{"model": str(b), "layer_range": [0, 1]}, {"model": str(a), "layer_range": [3, 4]}],
         "parameters": {"t": [{"filter": "mlp", "value": 0.7}]}}]}
    merge(write_yaml(tmp_path, cfg), tmp_path / "out", progress=False)
    out, ta, tb = checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(a), checkpoint_tensors(b)
    f = lambda x: np.asarray(x, np.float64)

    def check(got, x, y, t, what):
        want = R.slerp(x, y, t)
        g = f(got)
        half_ulp = np.maximum(*(np.abs(np.nextafter(got, np.asarray(s, got.dtype)).astype(np.float64) - g)
                                for s in (np.inf, -np.inf))) / 2
        bound = half_ulp * (1 + 2.0**-20) + 2.0**-20 * (np.abs(f(x)) + np.abs(f(y)))
        assert (np.abs(g - want) <= bound).all(), (what, t, float(np.max(np.abs(g - want) - bound)))

    for i in range(3):
        t = _gradient(grad, _slice_t(i, 3))
        for k, x in _layer(out, i).items():
            check(x, _layer(ta, i)[k], _layer(tb, i + 1)[k], t, f"layer {i}.{k}")
    for k, x in _layer(out, 3).items():  # one layer: t coordinate 1; the slice's filter wins for mlp tensors
        check(x, _layer(ta, 3)[k], _layer(tb, 0)[k], 0.7 if "mlp" in k else grad[-1], f"layer 3.{k}")
    emb = "model.embed_tokens.weight"
    check(out[emb], ta[emb], tb[emb], grad[0], emb)
    check(out["lm_head.weight"], ta["lm_head.weight"], tb[emb], grad[0], "lm_head")


# --- a base model per slice, residual_weight ------------------------------------------------------------------------


def _per_slice_bases(a: Path, ta: Path, **slice1) -> dict:
    """task_arithmetic over two slices, no top-level base: slice 0 (TA listed first) merged against A, slice 1
    against TA; `slice1`: more keys of slice 1 (residual_weight)."""
    return {"merge_method": "task_arithmetic", "slices": [
        {"base_model": str(a), "sources": [{"model": str(ta), "layer_range": [1, 3], "parameters": {"weight": 0.75}},
                                           {"model": str(a), "layer_range": [0, 2]}]},
        {"base_model": str(ta), **slice1, "sources": [
            {"model": str(a), "layer_range": [2, 4], "parameters": {"weight": [0.5, -0.25]}},
            {"model": str(ta), "layer_range": [0, 2]}]}]}


def test_a_base_model_per_slice_is_the_base_of_its_layers_as_in_mergekit(deep, tmp_path):
    """mergekit's rule: slice i's layers are merged against slice i's base_model, the embeddings against slices[0]'s,
    the final norm and head against slices[-1]'s; the output takes the first slice's base's config, names (A:
    untied, with its own lm_head) and tokenizer, though TA is that slice's first source. Dyadic weights: float64 is
    exact, so the output is the reference rounded once, bit for bit."""
    a, ta = tmp_path / "A", tmp_path / "TA"
    for src, dst in ((deep["a"], a), (deep["ta"], ta)):  # copies with tokenizers that tell them apart
        shutil.copytree(src, dst)
        make_tokenizer(dst, chat_template=f"{dst.name}: {{{{ messages }}}}")
    merge(write_yaml(tmp_path, _per_slice_bases(a, ta)), tmp_path / "out", progress=False)
    out, xa, xt = checkpoint_tensors(tmp_path / "out"), checkpoint_tensors(a), checkpoint_tensors(ta)
    assert sorted(out) == sorted(xa)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and not cfg.get("tie_word_embeddings")
    tok = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tok["chat_template"].startswith("A: "), tok["chat_template"]
    emb = "model.embed_tokens.weight"
    want = {}
    for i in range(2):  # slice 0: base A, TA's layer 1 + i with weight 0.75
        for k, x in _layer(xa, i).items():
            want[f"model.layers.{i}.{k}"] = R.task_arithmetic(x, [_layer(xt, 1 + i)[k]], [0.75])
    for i, w in enumerate([0.5, -0.25]):  # slice 1: base TA, A's layer 2 + i, the weight gradient over 2 layers
        for k, x in _layer(xt, i).items():
            want[f"model.layers.{2 + i}.{k}"] = R.task_arithmetic(x, [_layer(xa, 2 + i)[k]], [w])
    want[emb] = R.task_arithmetic(xa[emb], [xt[emb]], [0.75])  # slices[0]'s base and weight at t = 0
    want["model.norm.weight"] = R.task_arithmetic(xt["model.norm.weight"], [xa["model.norm.weight"]], [0.5])
    want["lm_head.weight"] = R.task_arithmetic(xt[emb], [xa["lm_head.weight"]], [0.5])  # TA's tied head: its embedding
    assert sorted(want) == sorted(out)
    for n, x in out.items():
        np.testing.assert_array_equal(bits(x), bits(round_f64(want[n], BF16)), err_msg=n)


def test_residual_weight_is_accepted_warned_about_and_changes_nothing(deep, tmp_path, capsys):
    """mergekit declares residual_weight on a slice and never reads it: the output is bit-identical to the config
    without it, and the merge's report says so in one warning line."""
    a, ta = deep["a"], deep["ta"]
    merge(write_yaml(tmp_path, _per_slice_bases(a, ta), "plain.yml"), tmp_path / "plain", progress=False)
    cfg = write_yaml(tmp_path, _per_slice_bases(a, ta, residual_weight=0.3), "rw.yml")
    capsys.readouterr()
    assert main(["merge", str(cfg), "--out", str(tmp_path / "rw")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("warning: ")
             and "residual_weight" in ln]
    assert len(lines) == 1 and "slices[1]: residual_weight 0.3 ignored" in lines[0], lines
    assert "never applies" in lines[0] and "ignores it" in lines[0], lines
    want, got = checkpoint_tensors(tmp_path / "plain"), checkpoint_tensors(tmp_path / "rw")
    assert sorted(got) == sorted(want)
    for n, x in want.items():
        np.testing.assert_array_equal(bits(got[n]), bits(x), err_msg=n)


def test_merge_params_takes_a_base_model_per_slice(deep, tmp_path):
    """merge_params with slices naming their base by model index (and a residual_weight, warned about with a Python
    UserWarning) gives the streamed command's tensors bit for bit."""
    from ftjax.merge import merge_params
    from ftjax.params import flatten, load_params

    a, ta = deep["a"], deep["ta"]
    merge(write_yaml(tmp_path, _per_slice_bases(a, ta)), tmp_path / "out", progress=False)
    want = checkpoint_tensors(tmp_path / "out")
    index = {str(a): 0, str(ta): 1}
    slices = [{**sl, "base_model": index[sl["base_model"]],
               "sources": [{**src, "model": index[src["model"]]} for src in sl["sources"]]}
              for sl in _per_slice_bases(a, ta, residual_weight=0.3)["slices"]]
    with pytest.warns(UserWarning, match=r"slices\[1\]: residual_weight 0.3 ignored"):  # as the command prints it
        got = flatten(merge_params("task_arithmetic", None, [load_params(p)[1] for p in (a, ta)], slices=slices))
    assert sorted(got) == sorted(want)
    for n, x in want.items():
        np.testing.assert_array_equal(bits(np.asarray(got[n])), bits(x), err_msg=n)


# --- bad configs --------------------------------------------------------------------------------------------------

BAD = [
    ("merge_method: linear\nslices:\n  - sources:\n    - {model: A, layer_range: [0, 2], parameters: {weight: 1}}\n"
     "    - {model: B, layer_range: [0, 3], parameters: {weight: 1}}\n",
     r"slices\[0\]: the layer_ranges of one slice must have one length, got \[0, 2\] \(2\) of .*, \[0, 3\] \(3\)"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: A, layer_range: [0, 2]}]\n"
     "  - sources: [{model: B, layer_range: [1, 4]}]\n", r"slices\[1\]: layer_range \[1, 4\] of .*b is past its 3 layers"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: A, layer_range: [-1, 2]}]\n",
     r"slices\[0\]\.sources\[0\]: layer_range \[-1, 2\] of .* is empty or negative"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: A, layer_range: [2, 2]}]\n",
     r"layer_range \[2, 2\] of .* is empty or negative"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: A, layer_range: [2]}]\n", r"must be \[start, end\]"),
    ("merge_method: passthrough\nmodels: [{model: A}]\nslices:\n  - sources: [{model: A, layer_range: [0, 2]}]\n",
     "give exactly one of 'models' and 'slices'"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: A, layer_range: [0, 2]}, "
     "{model: B, layer_range: [0, 2]}]\n", r"slices\[0\]: passthrough merges exactly 1 model"),
    ("merge_method: slerp\nbase_model: A\nparameters: {t: 0.5}\nslices:\n  - sources: [{model: A, layer_range: [0, 2]},"
     " {model: B, layer_range: [0, 2]}]\n  - sources: [{model: B, layer_range: [2, 3]}]\n",
     r"slices\[1\]: base_model .* is not one of its sources"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: A}]\n", "needs a model and a layer_range"),
    ("merge_method: passthrough\nslices: []\n", "slices must be a non-empty list"),
    ("merge_method: task_arithmetic\nbase_model: A\nslices:\n  - sources: [{model: A, layer_range: [0, 2]}, "
     "{model: B, layer_range: [0, 2], delta_base: A, parameters: {weight: 1}}]\n", "delta_base is not supported in slices"),
    ("merge_method: task_arithmetic\nslices:\n  - base_model: A\n    sources: [{model: A, layer_range: [0, 2]}]\n"
     "  - base_model: B\n    sources: [{model: A, layer_range: [2, 4], parameters: {weight: 1}}]\n",
     r"slices\[1\]: its base_model .*b is not one of its sources; list it with its layer_range"),
    ("merge_method: passthrough\nslices:\n  - base_model: A\n    sources: [{model: A, layer_range: [0, 2]}]\n",
     r"slices\[0\]: passthrough takes no base_model"),
    ("merge_method: passthrough\nslices:\n  - residual_weight: half\n    sources: [{model: A, layer_range: [0, 2]}]\n",
     r"slices\[0\]: residual_weight must be a number, got 'half'"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_slices_are_one_line_errors_and_write_nothing(deep, tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yml"
    for key, name in (("A", "a"), ("B", "b")):
        text = re.sub(rf"(model|base_model|delta_base): {key}\b", rf"\1: {deep[name]}", text)
    cfg.write_text(text)
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ftjax: error:"), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yml"]


def test_merge_params_slices_equal_the_streamed_merge(deep, tmp_path):
    """`merge_params(..., slices=...)` on loaded trees gives the streamed command's tensors bit for bit: a linear
    merge over ranges with gradients, and a passthrough frankenmerge of two depths."""
    from ftjax.merge import merge_params
    from ftjax.params import flatten, load_params

    a, b, ta = deep["a"], deep["b"], deep["ta"]
    trees = [load_params(p)[1] for p in (a, ta, b)]
    cases = {
        "linear": ({"merge_method": "linear", "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 3], "parameters": {"weight": [1.0, 0.5]}},
                         {"model": str(ta), "layer_range": [1, 4], "parameters": {"weight": 0.5}}],
             "parameters": {"normalize": False}}]},
            [{"sources": [{"model": 0, "layer_range": [0, 3], "parameters": {"weight": [1.0, 0.5]}},
                          {"model": 1, "layer_range": [1, 4], "parameters": {"weight": 0.5}}],
              "parameters": {"normalize": False}}]),
        "passthrough": ({**_passthrough([(a, 0, 2), (b, 1, 3)]), "dtype": None},
                        [{"sources": [{"model": 0, "layer_range": [0, 2]}]},
                         {"sources": [{"model": 2, "layer_range": [1, 3]}]}]),
    }
    for name, (cfg, slices) in cases.items():
        cfg = {k: v for k, v in cfg.items() if v is not None}
        merge(write_yaml(tmp_path, cfg, f"{name}.yml"), tmp_path / name, progress=False)
        want = checkpoint_tensors(tmp_path / name)
        got = flatten(merge_params(cfg["merge_method"], None, trees, slices=slices))
        assert sorted(got) == sorted(want), name
        for n, x in want.items():
            np.testing.assert_array_equal(bits(np.asarray(got[n])), bits(x), err_msg=f"{name}: {n}")
    with pytest.raises(FtjaxError, match=r"slices\[0\]\.sources\[0\]: model must be an index"):
        merge_params("passthrough", None, trees, slices=[{"sources": [{"model": 7, "layer_range": [0, 1]}]}])
