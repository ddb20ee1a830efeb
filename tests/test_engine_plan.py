"""The input checks every plan shares (`ftjax.engine.plan.check_keysets` / `check_tensor`): transfer, diff, apply
and merge refuse the same mismatches with the same one-line error naming the model and the tensor."""

from __future__ import annotations

import typing

import numpy as np
import pytest
from hf_models import make_hf_model, write_yaml

from ftjax.engine import plan as P
from ftjax.errors import FtjaxError
from ftjax.layout import Layout
from ftjax.merge import merge, merge_params
from ftjax.params import nest
from ftjax.transfer import transfer_params

EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def _flat(seed: int, rows: int = 16, **extra: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {EMBED: rng.normal(size=(rows, 8)).astype(np.float32), NORM: rng.normal(size=(8,)).astype(np.float32),
            HEAD: rng.normal(size=(rows, 8)).astype(np.float32), **extra}


def test_check_tensor_lets_only_the_vocab_keys_differ_in_vocabulary_rows():
    layouts = {"b": Layout.of_tree(_flat(0)), "m": Layout.of_tree(_flat(1, rows=20)), "s": Layout.of_tree(_flat(2))}
    labels = {"b": "the base", "m": "model M", "s": "delta base S"}
    problems: list[str] = []
    c = P.check_tensor(EMBED, "b", ["m", "s"], layouts, labels, problems, vocab_keys=("m",))
    assert problems == [] and c is not None and c.rows == 16 and c.refs == (("m", EMBED), ("s", EMBED))
    assert dict(c.shapes) == {"b": (16, 8), "m": (20, 8), "s": (16, 8)}
    assert P.check_tensor(EMBED, "b", ["m", "s"], layouts, labels, problems, vocab_keys=("s",)) is None
    assert problems == [f"{EMBED}: shapes differ: [16, 8] in the base, [20, 8] in model M, [16, 8] in delta base S"]


def test_transfer_and_merge_refuse_an_integer_input_tensor_with_the_same_error():
    base, ft = _flat(0), _flat(1, **{})
    ft[NORM] = ft[NORM].astype(np.int32)
    message = f"{NORM}: dtype int32 in"
    with pytest.raises(FtjaxError, match=f"{message} the source-ft, float float32 in the target"):
        transfer_params(nest(base), nest(ft), nest(base))
    with pytest.raises(FtjaxError, match=f"{message} m0, float float32 in base_model"):
        merge_params("task_arithmetic", nest(base), [nest(ft)], weight=1.0)


def test_merge_refuses_a_model_with_tensors_the_base_lacks_naming_both():
    base, ft = _flat(0), _flat(1, **{"model.extra.weight": np.ones((4,), np.float32)})
    with pytest.raises(FtjaxError, match=r"1 tensor\(s\) in m0 not in base_model: model\.extra\.weight"):
        merge_params("task_arithmetic", nest(base), [nest(ft)], weight=1.0)


def test_merge_warns_when_the_inputs_tie_their_embeddings_differently(tmp_path):
    base = make_hf_model(tmp_path / "base", dtype="bfloat16", seed=0, tie_word_embeddings=True)
    untied = make_hf_model(tmp_path / "untied", dtype="bfloat16", seed=1)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(untied), "parameters": {"weight": 0.5}}]}
    rep = merge(write_yaml(tmp_path, cfg), tmp_path / "out", dry_run=True, progress=False)
    assert any("embedding tying differs" in w for w in rep.warnings), rep.warnings
    assert any(f"the separate lm_head of {untied} is not used" in w for w in rep.warnings), rep.warnings


def _types(t: object) -> list[object]:
    """t and every type inside it (the arguments of generics, the fields of TypedDicts)."""
    inner = list(typing.get_args(t))
    if typing.is_typeddict(t):
        inner += list(typing.get_type_hints(t).values())
    return [t] + [x for i in inner for x in _types(i)]


def test_every_command_shares_one_typed_report():
    hints = typing.get_type_hints(P.Report)
    assert all(t is not typing.Any for h in hints.values() for t in _types(h)), hints
    assert set(typing.get_args(hints["kind"])) >= {"transfer", "diff", "apply", "merge"}
    assert P.TransferReport is P.Report
    rep = P.Report("diff", "out", {"base": "b", "ft": "f"}, vocab=P.VocabReport(base_rows={EMBED: 16}))
    assert list(rep.to_dict()) == ["kind", "out", "inputs", "tensors", "transferred", "bytes_read", "bytes_written",
                                   "seconds", "skipped", "copied_non_float", "alphas", "vocab", "warnings",
                                   "nonfinite", "matched", "dry_run", "gb_per_s"]
    assert rep.to_dict()["vocab"] == {"base_rows": {EMBED: 16}}
