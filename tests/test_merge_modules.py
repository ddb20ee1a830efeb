"""mergekit's `modules:` form: `modules: {default: {models | slices, parameters}}` is the plain form with the module's
parameters ranked between a slice's and the top-level ones (mergekit's ConfigReader.parameter order)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hf_models import checkpoint_tensors, make_hf_model, write_yaml
from reference import bits

from ftjax.errors import FtjaxError
from ftjax.merge import merge
from ftjax.merge.config import parse, value

UP, Q = "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"


def test_module_parameters_rank_between_slice_and_top_level():
    cfg = parse({"merge_method": "linear", "parameters": {"weight": 0.25, "normalize": False}, "modules": {"default": {
        "models": [{"model": "A", "parameters": {"weight": [{"filter": "k_proj", "value": 3.0}]}}, {"model": "B"}],
        "parameters": {"weight": [{"filter": "mlp", "value": 0.5}], "normalize": True}}}})
    a, b = cfg.models
    assert value(cfg, "weight", UP, 0.0, a) == 0.5  # A's filter misses: the module's matches
    assert value(cfg, "weight", "model.layers.0.self_attn.k_proj.weight", 0.0, a) == 3.0  # the model's own wins
    assert value(cfg, "weight", Q, 0.0, b) == 0.25  # the module's filter misses: the top level's
    assert value(cfg, "normalize", Q, 0.0) is True  # the module's scalar over the top level's
    sliced = parse({"merge_method": "linear", "parameters": {"weight": 1.0}, "modules": {"default": {
        "slices": [{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 2]}],
                    "parameters": {"weight": [{"filter": "q_proj", "value": 2.0}]}}],
        "parameters": {"weight": 0.75}}}})
    s = dataclasses.replace(sliced, slice_parameters=sliced.slices[0].parameters)  # as the planner views a slice
    assert value(s, "weight", Q, 0.0, s.models[0]) == 2.0 and value(s, "weight", UP, 0.0, s.models[0]) == 0.75


@pytest.mark.parametrize("data, message", [
    ({"modules": {"vision_tower": {"models": [{"model": "A"}]}}}, "'vision_tower': ftjax merges decoder-only"),
    ({"models": [{"model": "A"}], "modules": {"default": {"models": [{"model": "A"}]}}},
     "exactly one of 'models', 'slices' and 'modules'"),
    ({"modules": {"default": {"models": [{"model": "A"}], "slices": []}}},
     r"modules.default: give exactly one of 'models' and 'slices'"),
    ({"modules": {"default": {"modls": [{"model": "A"}]}}}, "unknown key 'modls'; did you mean 'models'"),
    ({"modules": {"default": {"models": [{"model": "A"}], "parameters": {"wieght": 1}}}},
     r"modules.default.parameters: linear has no parameter 'wieght'"),
])
def test_bad_modules_are_one_line_errors(data, message):
    with pytest.raises(FtjaxError, match=message) as e:
        parse({"merge_method": "linear", "parameters": {"weight": 1.0}, **data}, source="m.yml")
    assert "\n" not in str(e.value)


def test_modules_form_merges_like_the_plain_form(tmp_path):
    a = make_hf_model(tmp_path / "a", dtype="bfloat16", seed=1)
    b = make_hf_model(tmp_path / "b", dtype="bfloat16", seed=2)
    models = [{"model": str(a), "parameters": {"weight": 0.75}}, {"model": str(b), "parameters": {"weight": 0.25}}]
    plain = {"merge_method": "linear", "models": models, "parameters": {"normalize": False}}
    modular = {"merge_method": "linear", "modules": {"default": {"models": models,
                                                                 "parameters": {"normalize": False}}}}
    merge(write_yaml(tmp_path, plain, "plain.yml"), tmp_path / "plain", progress=False)
    merge(write_yaml(tmp_path, modular, "modular.yml"), tmp_path / "modular", progress=False)
    want, got = checkpoint_tensors(tmp_path / "plain"), checkpoint_tensors(tmp_path / "modular")
    assert got.keys() == want.keys()
    for n in want:
        np.testing.assert_array_equal(bits(got[n]), bits(want[n]), err_msg=n)
