"""convert (HF <-> Orbax, bit-exact, sharded restore) and inspect."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.cli import main
from ftjax.convert import convert, inspect_checkpoint
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import HFCheckpoint
from ftjax.io.orbax import restore_orbax
from ftjax.layout import partition_spec
from ftjax.params import make_mesh
from hf_models import make_hf_model, make_tokenizer


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
def test_hf_orbax_hf_is_bit_exact(tmp_path, dtype):
    src = make_tokenizer(make_hf_model(tmp_path / "src", dtype=dtype))
    convert(src, tmp_path / "orbax", to="orbax")
    assert (tmp_path / "orbax" / "tokenizer.json").is_file()
    back = convert(tmp_path / "orbax", tmp_path / "back", to="hf")
    a, b = HFCheckpoint(src), HFCheckpoint(back)
    assert a.names() and set(a.names()) == set(b.names())
    for name in a.names():
        assert a.info(name) == b.info(name)
        assert a.get(name).tobytes() == b.get(name).tobytes(), name
    for aux in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (back / aux).read_bytes() == (src / aux).read_bytes()


def test_orbax_restore_with_sharding_and_dtype(tmp_path):
    src = make_hf_model(tmp_path / "src", dtype="bfloat16", hidden_size=64, intermediate_size=128)
    convert(src, tmp_path / "orbax", to="orbax")
    mesh = make_mesh("data=2,fsdp=4")
    config, flat = restore_orbax(
        tmp_path / "orbax", dtype=jnp.float32,
        sharding_for=lambda n, s: jax.sharding.NamedSharding(mesh, partition_spec(n, s, mesh)))
    q = flat["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == jnp.float32 and len(q.addressable_shards) == 8
    assert q.sharding.spec == partition_spec("model.layers.0.self_attn.q_proj.weight", q.shape, mesh)
    np.testing.assert_array_equal(np.asarray(q), HFCheckpoint(src).get("model.layers.0.self_attn.q_proj.weight").astype(np.float32))


def test_convert_cli_and_errors(tmp_path, capsys):
    src = make_hf_model(tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "o"), "--to", "orbax"]) == 0
    assert main(["convert", str(src), str(tmp_path / "o"), "--to", "orbax"]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "o"), "--to", "orbax", "--overwrite"]) == 0
    assert main(["convert", str(src), str(tmp_path / "h"), "--to", "hf"]) == 2  # src is not Orbax
    err = capsys.readouterr().err
    assert err.startswith("ftjax: error:") and err.count("\n") == 1 and "Orbax" in err


def test_inspect(tmp_path, capsys):
    src = make_hf_model(tmp_path / "src", dtype="bfloat16", tie_word_embeddings=True)
    info = inspect_checkpoint(src)
    assert info["family"] == "llama" and info["tied_embeddings"] is True and not info["lm_head_in_file"]
    assert info["dtypes"] == {"bfloat16": info["parameters"]} and info["bytes"] == 2 * info["parameters"]
    assert info["files"] == ["model.safetensors"]
    n = sum(np.prod(HFCheckpoint(src).info(k).shape) for k in HFCheckpoint(src).names())
    assert info["parameters"] == n
    assert main(["inspect", str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == n
    assert main(["inspect", str(src)]) == 0
    assert "bfloat16" in capsys.readouterr().out
    convert(src, tmp_path / "orbax", to="orbax")
    assert inspect_checkpoint(tmp_path / "orbax")["parameters"] == n


def test_inspect_missing(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(FtjaxError):
        inspect_checkpoint(tmp_path / "nope")
