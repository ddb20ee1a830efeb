"""Learned transfer coefficients (issue 18): groups, gradient, bounds, reproducibility, the written checkpoint."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import fit_alpha as F
from ftjax.data import examples_from_rows
from ftjax.errors import FtjaxError
from ftjax.model import forward
from ftjax.params import flatten, load_params
from hf_models import lm_rows, make_hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Untied target / source-base / source-ft (three random tiny Llamas) and a tied trio, on disk."""
    root = tmp_path_factory.mktemp("fit_alpha")
    out = {}
    for tie in (False, True):
        for role, seed in (("base", 0), ("ft", 1), ("target", 2)):
            out[role, tie] = make_hf_model(root / f"{role}-{tie}", seed=seed, tie_word_embeddings=tie)
    return out


def _load(models, tie=False):
    cfg, t = load_params(models["target", tie])
    _, b = load_params(models["base", tie])
    _, f = load_params(models["ft", tie])
    return cfg, t, b, f


def _examples(n=12, seed=0):
    return examples_from_rows(lm_rows(n, seed))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("grouping", F.GROUPINGS)
def test_groups_cover_every_tensor_exactly_once(models, tie, grouping):
    cfg, t, b, f = _load(models, tie)
    names = list(flatten(t))
    groups = F.assign_groups(names, grouping, cfg.layout)
    covered = [n for ns in groups.values() for n in ns]
    assert sorted(covered) == sorted(names) and len(covered) == len(set(covered))
    if grouping == "layer":
        expected = {"embed", "norm", "layers.0", "layers.1"} | (set() if tie else {"lm_head"})
        assert set(groups) == expected
    if grouping == "layer-module":
        assert "model.layers.0.input_layernorm.weight" in groups["layers.0.attention"]
        assert "model.layers.0.post_attention_layernorm.weight" in groups["layers.0.mlp"]


def test_post_layout_norms_go_with_their_sublayer():
    assert F.group_of("model.layers.3.post_attention_layernorm.weight", "layer-module", "post") == "layers.3.attention"
    assert F.group_of("model.layers.3.post_feedforward_layernorm.weight", "layer-module", "post") == "layers.3.mlp"
    assert F.group_of("model.layers.3.self_attn.q_norm.weight", "layer-module", "pre") == "layers.3.attention"
    with pytest.raises(FtjaxError, match="--groups"):
        F.group_of("model.layers.0.foo", "nope")


def test_vocab_padding_rows_are_appended_as_in_transfer(tmp_path, models):
    cfg, t, b, _ = _load(models)
    _, f = load_params(make_hf_model(tmp_path / "ft136", seed=1, vocab_size=136))
    problem = F.prepare(t, [(b, f)], cfg, pairs=True)
    assert problem.cfg.vocab_size == 136
    merged = flatten(problem.merged(jnp.ones(problem.shape, jnp.float32)))
    assert merged["model.embed_tokens.weight"].shape == (136, 32)
    np.testing.assert_array_equal(merged["lm_head.weight"][128:], flatten(f)["lm_head.weight"][128:])
    assert sorted(n for ns in problem.groups.values() for n in ns) == sorted(flatten(t))


@pytest.mark.parametrize("objective", F.OBJECTIVES)
def test_gradient_matches_central_finite_differences(models, objective):
    """float32 loss; eps = 1e-2: the central difference's truncation error is O(eps^2) and its rounding error
    about 1e-7 * loss / eps ~ 1e-4, so gradients agree to 2e-3 absolute + 2 % relative."""
    cfg, t, b, f = _load(models)
    problem = F.prepare(t, [(b, f)], cfg, pairs=True)
    rows = F._calibration_rows(_examples(), 64)
    batch = tuple(jnp.asarray(a) for a in (rows.tokens_nt, rows.segments_nt, rows.positions_nt, rows.weights_nt))
    loss = jax.jit(functools.partial(F.loss_fn(problem, objective), target=problem.target, deltas=problem.deltas,
                                     extras=problem.extras, batch=batch))
    alpha = jnp.asarray(np.random.default_rng(0).uniform(0.2, 0.8, problem.shape), jnp.float32)
    g = np.asarray(jax.grad(loss)(alpha))
    eps, fd = 1e-2, np.zeros(problem.shape)
    for i in np.ndindex(*problem.shape):
        e = jnp.zeros(problem.shape, jnp.float32).at[i].set(eps)
        fd[i] = (float(loss(alpha + e)) - float(loss(alpha - e))) / (2 * eps)
    assert np.abs(g).max() > 1e-2  # not a vacuous comparison
    np.testing.assert_allclose(g, fd, rtol=2e-2, atol=2e-3)


def test_bounds_are_respected(models):
    cfg, t, b, f = _load(models)
    out = F.fit_alpha(t, (b, f), _examples(), cfg=cfg, steps=6, lr=0.5, init=1.0, bounds="0.9:1.1")
    a = np.asarray(out["alpha"], np.float32)  # alpha is float32: the bounds are the float32 nearest 0.9 and 1.1
    assert a.shape == (1, 5) and np.all(a >= np.float32(0.9)) and np.all(a <= np.float32(1.1))
    assert np.any((a == np.float32(0.9)) | (a == np.float32(1.1)))  # the projection was needed
    with pytest.raises(FtjaxError, match="outside --bounds"):
        F.fit_alpha(t, (b, f), _examples(), cfg=cfg, steps=1, init=3.0, bounds=(-0.5, 2.0))


def test_one_seed_gives_one_table(models):
    cfg, t, b, f = _load(models)
    run = functools.partial(F.fit_alpha, t, (b, f), _examples(), cfg=cfg, steps=4, lr=0.1, batch_size=4)
    one, two, other = run(seed=3), run(seed=3), run(seed=4)
    assert one["table"] == two["table"] and one["curve"] == two["curve"]
    assert one["curve"] != other["curve"]  # the seed picks the batches


def _greedy_rows(params, cfg, n=16, length=16, seed=0):
    """Rows the model itself continues greedily from 2 random tokens: data whose best alpha is known."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, length), np.int32)
    tokens[:, :2] = rng.integers(3, cfg.vocab_size, (n, 2))
    for i in range(2, length):
        tokens[:, i] = np.asarray(jnp.argmax(forward(params, jnp.asarray(tokens), cfg)[:, i - 1], -1))
    return [{"input_ids": r.tolist()} for r in tokens]


def test_fit_moves_toward_the_known_alpha(models):
    """Target = source-base, data from source-ft: theta(1) = source-ft fits the data best; from init 0 the
    calibration loss falls and alpha rises toward 1, and held-out data generated the same way agrees."""
    cfg, _, b, f = _load(models)
    calib, dev = (examples_from_rows(_greedy_rows(f, cfg, seed=s)) for s in (0, 1))
    out = F.fit_alpha(b, (b, f), calib, cfg=cfg, steps=30, lr=0.1, init=0.0, bounds="-0.5:2", eval_data=dev)
    s = out["scores"]
    assert s["calibration"]["fit"] < s["calibration"]["init"] - 0.5
    assert s["eval"]["fit"] < s["eval"]["init"] - 0.5
    assert out["curve"][-1] < out["curve"][0]
    assert np.mean(out["alpha"]) > 0.5


def test_several_diffs_get_one_alpha_per_group_each(models):
    cfg, t, b, f = _load(models)
    d = jax.tree.map(lambda x, y: x - y, f, b)
    out = F.fit_alpha(t, [d, jax.tree.map(lambda x: 0.5 * x, d)], _examples(), cfg=cfg, steps=2, groups="tensor")
    assert np.asarray(out["alpha"]).shape == (2, len(flatten(t)))
    with pytest.raises(FtjaxError, match="as a list"):
        F.fit_alpha(t, (d, d, d), _examples(), cfg=cfg, steps=1)


def test_package_exposes_the_module_under_its_name(models):
    import ftjax

    cfg, t, b, f = _load(models)
    assert ftjax.fit_alpha is F  # the module keeps its name, as ftjax.transfer and ftjax.merge do
    out = ftjax.fit_alpha.fit_alpha(t, (b, f), _examples(4), cfg=cfg, steps=0)
    assert out["table"] == [{g: 1.0 for g in out["groups"]}] and out["curve"] == []
    assert out["scores"]["calibration"]["init"] == out["scores"]["calibration"]["fit"]


def _tensors(path):
    from safetensors.numpy import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def _cli(models, out, *extra, data):
    from ftjax.cli import main

    return main(["fit-alpha", "--target", str(models["target", False]), "--source-ft", str(models["ft", False]),
                 "--source-base", str(models["base", False]), "--data", str(data), "--out", str(out), "--quiet",
                 *extra])


def test_zero_steps_writes_bitwise_the_transfer_at_alpha_one(tmp_path, models):
    from ftjax import transfer
    from hf_models import write_jsonl

    data = write_jsonl(tmp_path / "calib.jsonl", lm_rows(8))
    assert _cli(models, tmp_path / "fit", "--steps", "0", "--init", "1.0", data=data) == 0
    transfer.transfer(models["base", False], models["ft", False], models["target", False], tmp_path / "ref",
                      alpha=1.0, progress=False)
    got, ref = _tensors(tmp_path / "fit" / "model"), _tensors(tmp_path / "ref")
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].tobytes() == ref[k].tobytes(), k


def test_written_model_is_reproducible_from_the_table_by_transfer(tmp_path, models):
    import json

    from ftjax.cli import main
    from hf_models import write_jsonl

    data, dev = (write_jsonl(tmp_path / f"{n}.jsonl", lm_rows(8, s)) for n, s in (("calib", 0), ("dev", 1)))
    assert _cli(models, tmp_path / "fit", "--steps", "3", "--lr", "0.1", "--bounds", "-0.5:2.0", "--eval", str(dev),
                data=data) == 0
    record = json.loads((tmp_path / "fit" / "alpha.json").read_text())
    assert set(record["scores"]) == {"calibration", "eval"} and len(record["curve"]) == 3
    assert (tmp_path / "fit" / "alpha.png").stat().st_size > 0 and (tmp_path / "fit" / "alpha.pdf").exists()
    assert any(a != 1.0 for a in record["table"][0].values())
    rules = [f"{r}={a!r}" for r, a in record["alpha_for"]]
    args = ["transfer", "--target-base", str(models["target", False]), "--source-ft", str(models["ft", False]),
            "--source-base", str(models["base", False]), "--out", str(tmp_path / "ref"), "--quiet"]
    assert main(args + [x for r in rules for x in ("--alpha-for", r)]) == 0
    got, ref = _tensors(tmp_path / "fit" / "model"), _tensors(tmp_path / "ref")
    assert all(got[k].tobytes() == ref[k].tobytes() for k in ref) and got.keys() == ref.keys()


def test_cli_refuses_before_fitting(tmp_path, models, capsys):
    from hf_models import write_jsonl

    data = write_jsonl(tmp_path / "calib.jsonl", lm_rows(4))
    assert _cli(models, tmp_path / "a", "--init", "3", "--bounds", "-0.5:2.0", data=data) == 2
    assert "outside --bounds" in capsys.readouterr().err and not (tmp_path / "a" / "model").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "other.txt").write_text("x")
    assert _cli(models, tmp_path / "b", data=data) == 2
    assert "other.txt" in capsys.readouterr().err
    assert _cli(models, tmp_path / "c", "--bounds", "2:1", data=tmp_path / "missing.jsonl") == 2  # before any read
    err = capsys.readouterr().err
    assert "--bounds 2:1" in err and err.count("\n") == 1


def test_entropy_objective_lowers_the_prediction_entropy(models):
    cfg, t, b, f = _load(models)
    examples = _examples()
    out = F.fit_alpha(t, (b, f), examples, cfg=cfg, steps=15, lr=0.1, objective="entropy", bounds="-0.5:2.0")
    assert out["settings"]["objective"] == "entropy" and out["curve"][-1] < out["curve"][0] - 1e-3
    rows = F._calibration_rows(examples, 1024)
    batch = tuple(jnp.asarray(a) for a in (rows.tokens_nt, rows.segments_nt, rows.positions_nt, rows.weights_nt))
    problem = F.prepare(t, [(b, f)], cfg, pairs=True)
    entropy = F.loss_fn(problem, "entropy")
    at = {k: float(entropy(jnp.asarray(a, jnp.float32), problem.target, problem.deltas, problem.extras, batch))
          for k, a in (("init", np.ones(problem.shape)), ("fit", out["alpha"]))}
    assert at["fit"] < at["init"]
    with pytest.raises(FtjaxError, match="--objective"):
        F.fit_alpha(t, (b, f), examples, cfg=cfg, steps=1, objective="nope")


@pytest.mark.parametrize("groups", F.GROUPINGS)
def test_alpha_plot_for_every_grouping_and_several_diffs(tmp_path, models, groups):
    from ftjax import plots

    cfg, t, b, f = _load(models)
    d = jax.tree.map(lambda x, y: x - y, f, b)
    out = F.fit_alpha(t, [d, d], _examples(4), cfg=cfg, steps=2, groups=groups)
    paths = plots.plot_alpha(out, tmp_path / "alpha")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)


def test_two_diffs_from_the_cli_equal_the_api_and_ftjax_merge_rewrites_the_model(tmp_path, models):
    """Repeated --source-ft/--source-base pairs: one alpha per group per diff, the API's table; the model written
    is T + sum_d alpha_d * (F_d - B_d) and `ftjax merge OUT/merge.yaml` writes it again bit for bit."""
    import json

    from ftjax.cli import main
    from ftjax.rows import load_examples
    from hf_models import write_jsonl

    ft2 = make_hf_model(tmp_path / "ft2", seed=3)
    data = write_jsonl(tmp_path / "calib.jsonl", lm_rows(8))
    flags = ["--steps", "3", "--lr", "0.1", "--bounds", "-0.5:2.0", "--batch-size", "4", "--seed", "1"]
    assert _cli(models, tmp_path / "fit", "--source-ft", str(ft2), "--source-base", str(models["target", False]),
                *flags, data=data) == 0
    record = json.loads((tmp_path / "fit" / "alpha.json").read_text())
    cfg, t, b, f = _load(models)
    _, f2 = load_params(ft2)
    api = F.fit_alpha(t, [(b, f), (t, f2)], load_examples(data, models["target", False], cfg), cfg=cfg, steps=3,
                      lr=0.1, bounds="-0.5:2.0", batch_size=4, seed=1)
    assert record["table"] == api["table"] and record["curve"] == api["curve"] and len(record["table"]) == 2
    assert all(a != 1.0 for a in record["table"][1].values())
    got = _tensors(tmp_path / "fit" / "model")
    problem = F.prepare(t, [(b, f), (t, f2)], cfg, pairs=True)
    fitted = flatten(problem.merged(jnp.asarray(api["alpha"], jnp.float32)))
    assert got.keys() == fitted.keys()
    for k in got:  # float32 theta(alpha) of the fit, up to the writer's single rounding
        np.testing.assert_allclose(got[k], fitted[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert main(["merge", str(tmp_path / "fit" / "merge.yaml"), "--out", str(tmp_path / "ref"), "--quiet"]) == 0
    ref = _tensors(tmp_path / "ref")
    assert got.keys() == ref.keys() and all(got[k].tobytes() == ref[k].tobytes() for k in ref)


def test_cli_refuses_unpaired_diffs(tmp_path, models, capsys):
    from hf_models import write_jsonl

    data = write_jsonl(tmp_path / "calib.jsonl", lm_rows(4))
    assert _cli(models, tmp_path / "a", "--source-ft", str(models["ft", False]), data=data) == 2
    err = capsys.readouterr().err
    assert "one --source-base per --source-ft" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()


def test_interrupted_fit_resumes_bit_identically(tmp_path, models, monkeypatch, capsys):
    """--save-every 2: a fit killed in step 5 of 6 and run again resumes from step 4 (alpha, adam state, curve) and
    writes the alpha.json values and model of an uninterrupted fit; a resume with other settings is refused."""
    import json

    from hf_models import write_jsonl

    data = write_jsonl(tmp_path / "calib.jsonl", lm_rows(8))
    flags = ["--steps", "6", "--lr", "0.1", "--batch-size", "3", "--seed", "2", "--save-every", "2"]
    assert _cli(models, tmp_path / "whole", *flags, data=data) == 0
    assert not (tmp_path / "whole" / "checkpoints").exists()

    class Killed(Exception):
        pass

    real = F.step_batch

    def dies_in_step_5(rows, i, *args):
        if i == 4:
            raise Killed
        return real(rows, i, *args)

    monkeypatch.setattr(F, "step_batch", dies_in_step_5)
    with pytest.raises(Killed):
        F.fit_to_dir(models["target", False], models["ft", False], models["base", False], data, tmp_path / "cut",
                     save_every=2, steps=6, lr=0.1, batch_size=3, seed=2, progress=False)
    monkeypatch.setattr(F, "step_batch", real)
    saved = tmp_path / "cut" / "checkpoints"
    assert sorted(p.name for p in saved.iterdir()) == ["2", "4"] and (saved / "4" / "ftjax_complete.json").is_file()
    assert not (tmp_path / "cut" / "model").exists() and not (tmp_path / "cut" / "alpha.json").exists()
    assert _cli(models, tmp_path / "cut", *flags[:-1], "3", "--lr", "0.2", data=data) == 2  # --save-every 3, lr 0.2
    assert "other settings" in capsys.readouterr().err
    assert _cli(models, tmp_path / "cut", *flags, data=data) == 0
    whole, cut = (json.loads((tmp_path / d / "alpha.json").read_text()) for d in ("whole", "cut"))
    assert cut["resumed_from"] == 4 and whole["resumed_from"] is None
    for key in ("alpha", "table", "curve", "scores"):
        assert cut[key] == whole[key], key
    got, ref = _tensors(tmp_path / "cut" / "model"), _tensors(tmp_path / "whole" / "model")
    assert got.keys() == ref.keys() and all(got[k].tobytes() == ref[k].tobytes() for k in ref)


def test_a_second_fit_on_the_same_out_is_refused_naming_the_first(tmp_path, models, capsys):
    """fit-alpha holds the output directory's lock like finetune: while another process holds it, the command exits
    2 with one line naming that process; the lock file never counts as a foreign file of the directory."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "fit"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from ftjax.runlog import run_dir_lock\n"
                               "with run_dir_lock(Path(sys.argv[1]), 'fit-alpha'):\n"
                               "    print('locked', flush=True); time.sleep(120)", str(out)],
                              cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _cli(models, out, "--steps", "0", data=tmp_path / "unread.jsonl") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"process {holder.pid}" in err and "fit-alpha" in err, err
    finally:
        holder.kill()
        holder.wait()


# --- sharded fits (the 8 fake CPU devices of conftest.py) -----------------------------------------------------------
def _close(a, b, rtol=1e-5, atol=1e-6):
    for key in ("alpha", "curve"):
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=rtol, atol=atol, err_msg=key)
    for part in a["scores"]:
        for k in ("init", "fit"):
            np.testing.assert_allclose(a["scores"][part][k], b["scores"][part][k], rtol=rtol, err_msg=(part, k))


@pytest.mark.parametrize("spec", ["data=2,fsdp=4", "fsdp=8"])
@pytest.mark.parametrize("batch_size", [None, 8])
def test_sharded_fit_equals_the_unsharded_fit(models, spec, batch_size):
    """T and Delta sharded like fine-tuning's params, rows over the data axes: the same alpha table, curve and
    scores as on one device, up to float32 reassociation."""
    from ftjax.params import make_mesh

    cfg, t, b, f = _load(models)
    run = functools.partial(F.fit_alpha, t, (b, f), _examples(), cfg=cfg, steps=5, lr=0.1, batch_size=batch_size,
                            bounds="-0.5:2.0", eval_data=_examples(4, seed=1), groups="layer-module")
    one, sharded = run(), run(mesh=make_mesh(spec))
    _close(sharded, one)
    assert any(a != 1.0 for a in sharded["table"][0].values())  # the fit moved: not a vacuous comparison
    assert sharded["settings"]["mesh"] == dict(make_mesh(spec).shape) and one["settings"]["mesh"] is None


def test_frozen_arrays_keep_fine_tunings_shardings_and_are_never_updated(models):
    """`place` shards T and every Delta as `load_params(mesh=...)` shards the params (fsdp); after several steps
    they hold the same shardings and bits (read, never donated or written) and alpha and adam state are
    replicated."""
    from jax.sharding import PartitionSpec

    from ftjax.params import make_mesh

    mesh = make_mesh("data=2,fsdp=4")
    cfg, t, b, f = _load(models)
    problem = F.place(F.prepare(t, [(b, f)], cfg, pairs=True), mesh)
    _, sharded_t = load_params(models["target", False], mesh=mesh)
    for tree in (problem.target, *problem.deltas):
        for n, x in tree.items():
            assert x.sharding == flatten(sharded_t)[n].sharding, n
    assert any(not x.sharding.is_fully_replicated for x in problem.deltas[0].values())  # fsdp does split them
    frozen = [problem.target, *problem.deltas]
    before = [{n: (x.sharding, np.asarray(x)) for n, x in tree.items()} for tree in frozen]
    step, opt = F._step(F._static(problem), "loss", 0.1, -0.5, 2.0, mesh)
    rows = F._calibration_rows(_examples(8), 64)
    batch_sh = F.batch_sharding(mesh, 8)
    assert batch_sh.spec == PartitionSpec(("data", "fsdp"), None)
    batch = tuple(jax.device_put(a, batch_sh)
                  for a in (rows.tokens_nt, rows.segments_nt, rows.positions_nt, rows.weights_nt))
    alpha = jnp.ones(problem.shape, jnp.float32)
    state = opt.init(alpha)
    for _ in range(3):
        alpha, state, loss = step(alpha, state, problem.target, problem.deltas, problem.extras, batch)
    assert float(jnp.abs(alpha - 1).max()) > 0
    for x in (alpha, loss, *jax.tree.leaves(state)):
        assert x.sharding.is_fully_replicated and x.sharding.mesh == mesh
    for tree, old in zip(frozen, before):
        for n, x in tree.items():
            assert not x.is_deleted() and x.sharding == old[n][0], n
            np.testing.assert_array_equal(np.asarray(x), old[n][1], err_msg=n)


def test_remat_gives_the_same_fit_and_checkpoints_the_forward(models):
    from ftjax.params import make_mesh

    cfg, t, b, f = _load(models)
    run = functools.partial(F.fit_alpha, t, (b, f), _examples(), cfg=cfg, steps=4, lr=0.1, batch_size=4)
    plain = run()
    _close(run(remat=True), plain)
    _close(run(remat=True, mesh=make_mesh("fsdp=8")), plain)
    problem = F.prepare(t, [(b, f)], cfg, pairs=True)
    rows = F._calibration_rows(_examples(4), 32)
    batch = tuple(jnp.asarray(a) for a in (rows.tokens_nt, rows.segments_nt, rows.positions_nt, rows.weights_nt))
    args = (jnp.ones(problem.shape, jnp.float32), problem.target, problem.deltas, problem.extras, batch)
    policies = {r: [e.params["policy"] for e in jax.make_jaxpr(F.loss_fn(problem, "loss", remat=r))(*args).eqns
                    if "policy" in e.params] for r in (False, True)}  # jax.checkpoint's equation holds its policy
    assert policies == {False: [], True: [jax.checkpoint_policies.dots_with_no_batch_dims_saveable]}


@pytest.mark.parametrize("spec,remat", [(None, False), ("data=2,fsdp=4", False), ("data=2,fsdp=4", True)])
def test_fit_compiles_once_for_several_fits(models, spec, remat):
    """One compilation of the step per (groups, config, objective, lr, bounds, mesh, remat), the first step's
    included: further steps, and fits with other seeds, inits or step counts, compile nothing (counted by XLA
    backend compilations, which a change of an input's placement between steps would also trigger)."""
    from ftjax.params import make_mesh

    cfg, t, b, f = _load(models)
    mesh = None if spec is None else make_mesh(spec)
    run = functools.partial(F.fit_alpha, t, (b, f), _examples(), cfg=cfg, lr=0.0123 + remat + (spec is None),
                            bounds="-0.5:2.0", batch_size=8, mesh=mesh, remat=remat)
    run(steps=1)
    compiles = []

    def listen(event, seconds, **kwargs):
        compiles.extend([event] if event == "/jax/core/compile/backend_compile_duration" else [])

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        run(steps=3)
        run(steps=2, seed=1, init=0.5)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []


def test_cli_mesh_and_remat_flags_reach_the_fit(tmp_path, models):
    import json

    from ftjax.rows import load_examples
    from hf_models import write_jsonl

    data = write_jsonl(tmp_path / "calib.jsonl", lm_rows(8))
    flags = ["--steps", "3", "--lr", "0.1", "--bounds", "-0.5:2.0", "--batch-size", "4"]
    assert _cli(models, tmp_path / "fit", *flags, "--mesh", "data=2,fsdp=4", "--remat", data=data) == 0
    record = json.loads((tmp_path / "fit" / "alpha.json").read_text())
    assert record["settings"]["mesh"] == {"data": 2, "fsdp": 4} and record["settings"]["remat"] is True
    cfg, t, b, f = _load(models)
    api = F.fit_alpha(t, (b, f), load_examples(data, models["target", False], cfg), cfg=cfg, steps=3, lr=0.1,
                      bounds="-0.5:2.0", batch_size=4)
    _close(record, api)
