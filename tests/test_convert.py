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
    assert not (back / "ftjax_orbax.json").exists()  # the Orbax manifest is not carried into a model directory
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


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """A finished 4-step finetune run of a bfloat16 model (checkpoints 2 and 4 kept; final/ in float32)."""
    from ftjax.train import TrainConfig, finetune
    from hf_models import lm_rows, write_jsonl

    root = tmp_path_factory.mktemp("train_run")
    model = make_hf_model(root / "init", dtype="bfloat16")
    make_tokenizer(model)
    data = write_jsonl(root / "train.jsonl", lm_rows(16, 0))
    tcfg = TrainConfig(steps=4, lr=1e-3, warmup=0, batch_size=2, max_len=32)
    finetune(model, data, root / "run", config=tcfg, save_every=2, keep=3, save_dtype="float32", progress=False)
    return root, model, data


def test_convert_training_checkpoint_to_hf_loads_in_transformers(train_run, capsys):
    """RUN/checkpoints/4 -> HF: the float32 master weights (= final/ saved in float32, bit for bit), the init's
    config and tokenizer; transformers loads it and computes the same logits as from final/."""
    import torch
    import transformers

    from ftjax.io.safetensors import SafetensorsFile

    root, model, _ = train_run
    out = root / "exported"
    assert main(["convert", str(root / "run" / "checkpoints" / "4"), str(out), "--to", "hf"]) == 0
    assert (out / "tokenizer.json").is_file() and json.loads((out / "config.json").read_text())["dtype"] == "float32"
    final = root / "run" / "final" / "model.safetensors"
    with SafetensorsFile(out / "model.safetensors") as a, SafetensorsFile(final) as b:
        assert sorted(a.names()) == sorted(b.names())
        for name in a.names():
            assert np.asarray(a.get(name)).tobytes() == np.asarray(b.get(name)).tobytes(), name
            assert a.info(name).dtype == np.float32
    ours = transformers.AutoModelForCausalLM.from_pretrained(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(root / "run" / "final")
    assert ours.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    earlier = root / "exported2"
    assert main(["convert", str(root / "run" / "checkpoints" / "2"), str(earlier), "--to", "hf"]) == 0
    with SafetensorsFile(earlier / "model.safetensors") as a, SafetensorsFile(out / "model.safetensors") as b:
        assert np.asarray(a.get("model.norm.weight")).tobytes() != np.asarray(b.get("model.norm.weight")).tobytes()


@pytest.mark.parametrize("where", ["run", "checkpoints", "checkpoints/2", "orbax"])
def test_run_directory_or_orbax_checkpoint_given_as_a_model_names_what_to_use(train_run, tmp_path, capsys, where):
    """eval / transfer / finetune / inspect with a run directory or an Orbax checkpoint as the model: one line that
    names RUN/final or `ftjax convert`, not a missing tokenizer.json or config.json."""
    root, model, data = train_run
    if where == "orbax":
        path = convert(model, tmp_path / "orbax", to="orbax")
    else:
        path = root / "run" / where if where != "run" else root / "run"
    commands = [["eval", "--model", str(path), "--data", str(data)],
                ["transfer", "--source-base", str(model), "--source-ft", str(model), "--target-base", str(path),
                 "--out", str(tmp_path / "t")],
                ["finetune", "--init", str(path), "--data", str(data), "--steps", "1", "--out", str(tmp_path / "f")]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("ftjax: error:") and err.count("\n") == 1, err
        assert str(path) in err and "ftjax convert" in err and "tokenizer.json" not in err, err
        if where != "orbax":
            assert str(root / "run" / "final") in err, err
    assert not (tmp_path / "t").exists() and not (tmp_path / "f").exists()


def test_convert_refuses_a_training_checkpoint_that_does_not_verify(train_run, tmp_path, capsys):
    """A training checkpoint with a truncated file is refused in one line naming it; nothing is written."""
    import shutil

    root, _, _ = train_run
    step = tmp_path / "run" / "checkpoints" / "2"
    shutil.copytree(root / "run" / "checkpoints" / "2", step)
    (tmp_path / "run" / "run.json").write_bytes((root / "run" / "run.json").read_bytes())
    victim = max((p for p in (step / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-3])
    assert main(["convert", str(step), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(step) in err and "not a whole checkpoint" in err
    assert not (tmp_path / "out").exists()
