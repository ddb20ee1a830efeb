"""ftjax.dtypes: one rule for "is this a float tensor" (ml_dtypes' types included), used by every command."""

import json

import ml_dtypes
import numpy as np
import pytest

from ftjax import dtypes
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import save_hf

FLOATS = [ml_dtypes.bfloat16, np.float16, np.float32, np.float64, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]
INTS = [np.int8, np.int32, np.int64, np.uint8, np.bool_]


@pytest.mark.parametrize("dtype", FLOATS)
def test_every_float_dtype_is_a_float(dtype):
    assert dtypes.is_float(dtype) and dtypes.is_float(np.dtype(dtype)) and dtypes.is_float(np.zeros(2, dtype).dtype)


@pytest.mark.parametrize("dtype", INTS)
def test_integer_and_bool_dtypes_are_not(dtype):
    assert not dtypes.is_float(dtype)
    dtypes.check_computable(dtype, "tensor x")  # carried verbatim: never refused


def test_computable_floats():
    assert [np.dtype(d) for d in FLOATS if dtypes.is_computable(d)] == list(dtypes.COMPUTE)
    for dtype in (np.float64, ml_dtypes.float8_e4m3fn):
        with pytest.raises(FtjaxError, match=f"tensor w is {np.dtype(dtype)}; ftjax computes with bfloat16"):
            dtypes.check_computable(dtype, "tensor w")


def tiny(path, dtype, seed=0):
    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((8, 4)).astype(dtype),
               "model.norm.weight": np.ones(4, dtype)}
    config = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
              "num_hidden_layers": 0, "num_attention_heads": 1, "tie_word_embeddings": True}
    return save_hf(path, tensors, config=config)


def test_commands_refuse_float8_checkpoints_with_the_tensor_named(tmp_path):
    from ftjax import transfer
    from ftjax.params import load_params

    f8 = [tiny(tmp_path / f"m{i}", ml_dtypes.float8_e4m3fn, seed=i) for i in range(2)]
    with pytest.raises(FtjaxError, match="model.embed_tokens.weight: float8_e4m3fn in the target"):
        transfer.transfer(f8[0], f8[1], f8[0], tmp_path / "out", progress=False)
    with pytest.raises(FtjaxError, match="tensor model.embed_tokens.weight is float8_e4m3fn"):
        load_params(f8[0])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, ml_dtypes.float8_e4m3fn])
def test_stats_count_every_float_dtype(dtype, tmp_path, capsys):
    from ftjax.cli import main
    from ftjax.stats import diff_stats

    a, b = tiny(tmp_path / "a", dtype, 0), tiny(tmp_path / "b", dtype, 1)
    result = diff_stats(a, b)
    assert result["total"]["numel"] == 36 and result["total"]["delta_norm"] > 0
    assert main(["stats", "--source-base", str(a), "--source-ft", str(b), "--out", str(tmp_path / "s"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["numel"] == 36


def test_stats_without_float_tensors_is_an_error(tmp_path):
    from ftjax.stats import diff_stats

    ints = [save_hf(tmp_path / n, {"x": np.arange(4, dtype=np.int32)}, config={"model_type": "llama"}) for n in "ab"]
    with pytest.raises(FtjaxError, match="no floating-point tensors"):
        diff_stats(*ints)
