"""params: nest/flatten, sharded loads on 8 fake devices, export that transformers reloads with the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import HFCheckpoint
from ftjax.model import forward
from ftjax.layout import partition_spec
from ftjax.params import flatten, load_params, make_mesh, nest, save_params
from hf_models import make_hf_model


def test_nest_flatten_roundtrip():
    flat = {"model.layers.0.mlp.up_proj.weight": 1, "model.layers.10.mlp.up_proj.weight": 2, "lm_head.weight": 3}
    tree = nest(flat)
    assert tree["model"]["layers"]["10"]["mlp"]["up_proj"]["weight"] == 2
    assert flatten(tree) == flat


def test_nest_rejects_prefix_collision():
    with pytest.raises(FtjaxError, match="collides"):
        nest({"a.b": 1, "a.b.c": 2})


def test_load_matches_file_bits(tmp_path):
    d = make_hf_model(tmp_path / "m", dtype="bfloat16")
    cfg, params = load_params(d)
    ckpt = HFCheckpoint(d)
    flat = flatten(params)
    assert set(flat) == set(ckpt.names())
    for name, leaf in flat.items():
        assert leaf.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(leaf).view(np.uint16), ckpt.get(name).view(np.uint16))
    _, p32 = load_params(d, dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p32))


def test_mesh_spec_parsing():
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    assert dict(make_mesh("data=2,fsdp=4").shape) == {"data": 2, "fsdp": 4}
    assert dict(make_mesh("data=2,fsdp=-1").shape) == {"data": 2, "fsdp": 4}
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8}
    for bad in ("data=3,fsdp=4", "data=x", "data=-1,fsdp=-1"):
        with pytest.raises(FtjaxError):
            make_mesh(bad)


def test_sharded_load_on_8_devices(tmp_path):
    d = make_hf_model(tmp_path / "m", hidden_size=64, intermediate_size=128)
    mesh = make_mesh("data=2,fsdp=4")
    cfg, params = load_params(d, mesh=mesh)
    ckpt = HFCheckpoint(d)
    q = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"]
    assert q.sharding.spec == PartitionSpec("fsdp", None) or q.sharding.spec == PartitionSpec(None, "fsdp")
    assert len(q.addressable_shards) == 8
    # Each device holds exactly its slice of the file.
    for shard in q.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), ckpt.get("model.layers.0.self_attn.q_proj.weight")[shard.index])
    norm = params["model"]["norm"]["weight"]
    assert norm.sharding.spec == PartitionSpec()
    # Sharded params give the same logits as unsharded ones.
    _, single = load_params(d)
    tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % cfg.vocab_size
    np.testing.assert_allclose(np.asarray(forward(params, tokens, cfg)), np.asarray(forward(single, tokens, cfg)),
                               atol=1e-5)


def test_partition_rules_fall_back_to_replication():
    mesh = make_mesh("data=1,fsdp=8")
    assert partition_spec("model.layers.0.mlp.up_proj.weight", (64, 32), mesh) == PartitionSpec("fsdp", None)
    assert partition_spec("model.layers.0.mlp.up_proj.weight", (63, 32), mesh) == PartitionSpec(None, "fsdp")
    assert partition_spec("model.layers.0.mlp.up_proj.weight", (63, 33), mesh) == PartitionSpec()
    assert partition_spec("model.norm.weight", (64,), mesh) == PartitionSpec()


@pytest.mark.parametrize("tied", [False, True])
def test_export_reloads_in_transformers(tmp_path, tied):
    import torch
    from transformers import AutoModelForCausalLM

    d = make_hf_model(tmp_path / "m", tie_word_embeddings=tied)
    cfg, params = load_params(d)
    out = save_params(params, tmp_path / "out", config=HFCheckpoint(d).config, aux_from=d)
    assert ("lm_head.weight" in HFCheckpoint(out).names()) == (not tied)
    tokens = np.arange(40, dtype=np.int64).reshape(2, 20) % cfg.vocab_size
    ours = np.asarray(forward(params, jnp.asarray(tokens, jnp.int32), cfg))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_save_refuses_wrong_shapes(tmp_path):
    d = make_hf_model(tmp_path / "m")
    cfg, params = load_params(d)
    params["model"]["norm"]["weight"] = jnp.ones((3,))
    with pytest.raises(FtjaxError, match="model.norm.weight"):
        save_params(params, tmp_path / "out", config=HFCheckpoint(d).config)
    assert not (tmp_path / "out").exists()
