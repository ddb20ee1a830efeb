"""ftjax.merge.config: mergekit's schema read strictly, and parameter values per tensor as mergekit evaluates them."""

import pytest

from ftjax.errors import FtjaxError
from ftjax.merge import config as C

TIES = """
models:
  - model: a
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: b
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: c
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_mergekit_example_config_reads_and_evaluates_per_tensor():
    cfg, _ = C.load(TIES)
    assert cfg.method.name == "ties" and cfg.base_model == "base" and cfg.output_dtype == "float16"
    a, b, c = cfg.models
    mlp, attn = "model.layers.{}.mlp.up_proj.weight", "model.layers.{}.self_attn.q_proj.weight"
    L = 5  # layers 0..4: t = i / 4
    # a gradient over layers: piecewise linear in t = i / (L - 1)
    assert C.value(cfg, "density", mlp.format(0), C.layer_t(mlp.format(0), L), a) == 1.0
    assert C.value(cfg, "density", mlp.format(2), C.layer_t(mlp.format(2), L), a) == pytest.approx(0.7)
    assert C.value(cfg, "density", mlp.format(3), C.layer_t(mlp.format(3), L), a) == pytest.approx(0.4)
    assert C.value(cfg, "weight", mlp.format(4), C.layer_t(mlp.format(4), L), b) == 1.0
    assert C.value(cfg, "weight", mlp.format(2), C.layer_t(mlp.format(2), L), b) == pytest.approx(0.5)
    # filters: the first whose filter is in the name; outside the layers t = 0
    assert C.value(cfg, "weight", mlp.format(1), 0.25, c) == 0.5
    assert C.value(cfg, "weight", attn.format(1), 0.25, c) == 0
    assert C.layer_t("model.embed_tokens.weight", L) == 0.0 and C.layer_t(mlp.format(0), 1) == 1.0
    # globals: the config's, else the method's default
    assert C.value(cfg, "normalize", mlp.format(0), 0.0) is True
    assert C.value(cfg, "lambda", mlp.format(0), 0.0) == 1.0
    assert C.value(cfg, "sign_election", mlp.format(0), 0.0) == "weighted"  # mergekit's behaviour by default


def test_model_setting_wins_over_top_level_and_steps_for_non_numbers():
    cfg, _ = C.load("merge_method: task_arithmetic\nbase_model: b\nparameters: {weight: 0.2}\n"
                    "models:\n  - model: x\n    parameters: {weight: 0.9}\n  - model: y\n")
    x, y = cfg.models
    assert C.value(cfg, "weight", "n", 0.0, x) == 0.9 and C.value(cfg, "weight", "n", 0.0, y) == 0.2
    assert C.evaluate([True, False], "n", 0.4) is True and C.evaluate([True, False], "n", 1.0) is False


def test_delta_base_slices_and_dict_refs():
    cfg, _ = C.load("merge_method: task_arithmetic\nbase_model: t\nmodels:\n"
                    "  - model: f1\n    delta_base: s1\n    parameters: {weight: 1}\n"
                    "  - model: {model: f2}\n    delta_base: s2\n    parameters: {weight: 0.5}\n")
    assert [(e.model, e.delta_base) for e in cfg.models] == [("f1", "s1"), ("f2", "s2")]
    cfg, _ = C.load("slices:\n  - sources:\n      - {model: a, layer_range: [0, 40]}\n      - {model: b, layer_range: "
                    "[0, 40]}\nmerge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\n")
    assert [e.model for e in cfg.models] == ["a", "b"]


@pytest.mark.parametrize("text,message", [
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: b}]\nparameters: {t: 0.5}\nslices: []\n",
     "exactly one of 'models' and 'slices'"),
    ("slices:\n  - sources: [{model: a}]\n  - sources: [{model: b}]\nmerge_method: passthrough\n",
     "needs a model and a layer_range"),
    ("merge_method: linear\nmodels:\n  - model: a\n    delta_base: b\n    parameters: {weight: 1}\n",
     "delta_base .* is for task-arithmetic"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]\n", "needs a base_model"),
    ("merge_method: ties\nbase_model: b\nmodels:\n  - {model: a, parameters: {weight: [{filter: 3, value: 1}]}}\n",
     "'filter' must be a string"),
    ("merge_method: ties\nbase_model: b\ntokenizer: {source: base, tokens: {x: 1}}\nmodels: [{model: a}]\n",
     "tokens"),
    ("- just\n- a list\n", "a YAML mapping"),
])
def test_config_errors_are_one_line(text, message):
    import re

    with pytest.raises(FtjaxError) as e:
        C.load(text)
    assert re.search(message, str(e.value)) and "\n" not in str(e.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FtjaxError, match="does not exist"):
        C.load(tmp_path / "nope.yml")
