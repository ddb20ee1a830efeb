"""The experiment driver: train tiny versions, fine-tune them, transfer diffs, scan connectivity, recycle.

One seed of the study (`run_seed`), oldest step first:
    pretrain    one run, two stages; versions M0 (near init), M1..M3 (stage 1), M4, M5 (stage 2); control C = the
                same recipe from another init and data order
    fine-tune   FT(Mi) and FT(C) with one recipe; Δi = FT(Mi) − Mi
    grid        every Mi + Δj (the paper's Table 3), Mi + ΔC, C + Δj; with the latent-skill probe and LM loss
    α sweep     task EM / NLL along Mi + α·Δj for every ordered pair, α in [0, 2]; the barrier on [0, 1]
    LMC         LM-loss scans between all versions (and C) with barriers; ‖Mi − Mj‖, cos(Δi, Δj)
    tft         FT(Mi + Δj) curves against FT(Mi) (Figures 2–3); steps to reach FT(Mi)'s final score
    recycle     plain FT(Mi), direct FT(Mi + Δi−1) and iterative Mi* = FT(Mi + (M*i−1 − Mi−1)) (Algorithm 1)
Every version, FT(Mi) and the kept transfers are written as Hugging Face directories (float32, with tokenizer).
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import lmc, treeops
from ftjax.config import ModelConfig
from ftjax.data import examples_from_rows
from ftjax.errors import FtjaxError
from ftjax.model import init_params
from ftjax.params import save_params
from ftjax.rows import make_rows, training_examples
from ftjax.train import TrainConfig

from ftjax.demo import engine, world
from ftjax.demo.progress import SILENT, Progress

CORE = ("M1", "M2", "M3", "M4", "M5")

# The stage boundary: name -> (stage-2 peak learning rate, stage-2 data mix as WorldConfig fields). Stage 1 is the
# same in both (cosine from a 3e-3 peak); stage 2 always restarts AdamW, re-warms and decays linearly to 0.
#   gentle  the first world: stage 2 re-warms to 1e-3 (a third of stage 1's peak) on a 70 % arithmetic mix. Its
#           LM barriers are ~0 everywhere, so the boundary cannot be fallen off.
#   rewarm  OLMo 2's stage 2 as the paper describes it (an annealing mid-training on a different, STEM-heavy mix):
#           its own warm-up to twice stage 1's peak (6e-3), then linear decay to 0, on a 90 % arithmetic mix
#           (5 % arithmetic Q/A, 5 % of the broad stage-1 mixture). Chosen from that setup, not tuned to results.
STAGE2: dict[str, tuple[float, dict[str, float]]] = {
    "gentle": (1e-3, {"stage2_arith": 0.7}),
    "rewarm": (6e-3, {"stage2_arith": 0.9}),
}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Sizes of one study. `quick()` is the default (minutes on 2 cores), `full()` the multi-seed run, `tiny()`
    the CI configuration (structure only: too small for any phenomenon)."""

    world: world.WorldConfig = world.WorldConfig()
    width: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 192
    batch: int = 32
    stage1_steps: int = 400
    stage2_steps: int = 300
    lr1: float = 3e-3
    lr2: float = 1e-3
    chunk: int = 10  # optimizer steps per compiled call; every version step is a multiple of it
    control: bool = True
    ft_steps: int = 100
    ft_lr: float = 3e-4
    ft_batch: int = 16
    ft_every: int = 10  # task evaluation period during fine-tuning (curves)
    tft: str = "adjacent"  # "adjacent": FT(Mi + Δi±1) only; "all": every ordered pair
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    lambdas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    lm_docs: int = 96  # held-out documents per stage for the LM loss
    seeds: tuple[int, ...] = (0,)
    stage2: str = "gentle"  # the stage boundary, a key of STAGE2 (`with_stage2`)

    @staticmethod
    def quick(seed: int = 0) -> "StudyConfig":
        """The default: 3 seeds with shorter pretraining (300 + 200 steps); run concurrently (`run_demo`'s
        workers) all three fit in 5 minutes on 2 CPU cores."""
        return StudyConfig(stage1_steps=300, stage2_steps=200, seeds=(seed, seed + 1, seed + 2))

    @staticmethod
    def full(seeds: tuple[int, ...] = (0, 1, 2)) -> "StudyConfig":
        """Longer pretraining (400 + 300 steps), every transfer-then-finetune pair, more LM documents."""
        return StudyConfig(tft="all", lm_docs=128, seeds=tuple(seeds))

    @staticmethod
    def tiny(seed: int = 0) -> "StudyConfig":
        w = world.WorldConfig(operand_max=9, n_names=20, ft_pairs=40, eval_pairs=24)
        return StudyConfig(world=w, width=32, layers=1, heads=2, ffn=64, batch=8, stage1_steps=30, stage2_steps=20,
                           chunk=5, ft_steps=10, ft_batch=8, ft_every=5, alphas=(0.0, 0.5, 1.0, 2.0),
                           lambdas=(0.0, 0.5, 1.0), lm_docs=16, seeds=(seed,))

    def with_stage2(self, name: str) -> "StudyConfig":
        """This configuration with the stage boundary `name` (a key of STAGE2): its stage-2 peak learning rate and
        stage-2 data mix; every size (steps, widths, corpus sizes) stays."""
        if name not in STAGE2:
            raise FtjaxError(f"unknown demo world {name!r}; use one of {', '.join(STAGE2)}")
        lr2, mix = STAGE2[name]
        return dataclasses.replace(self, stage2=name, lr2=lr2, world=dataclasses.replace(self.world, **mix))

    def version_steps(self) -> dict[str, int]:
        s1, s2, k = self.stage1_steps, self.stage2_steps, self.chunk
        snap = lambda x: max(k, int(round(x / k)) * k)  # noqa: E731
        return {"M0": k, "M1": snap(s1 / 3), "M2": snap(2 * s1 / 3), "M3": s1, "M4": s1 + snap(s2 / 2),
                "M5": s1 + s2}


# ---------------------------------------------------------------------------------------------------------- setup
@dataclasses.dataclass
class Setup:
    cfg: ModelConfig
    hf: dict
    tok_dir: Path
    rows: dict[str, Any]  # JSONL rows by name
    sets: dict[str, engine.EvalSet]  # task, probe, lm1, lm2
    lm_examples: list
    lm_stage: dict[int, list]  # stage (1, 2) -> that stage's held-out LM examples (lm_examples = both, in order)
    task_examples: list
    ft_rows: Any


def setup(sc: StudyConfig, seed: int, out: Path) -> tuple[Setup, world.Writer]:
    """Tokenizer, JSONL data files under out/data, and the device-resident evaluation sets."""
    writer = world.Writer(sc.world, seed)
    tok_dir = world.write_tokenizer(out / "tokenizer")
    tokenizer = world.make_tokenizer()
    rows = world.task_rows(writer, seed)
    rows["heldout_stage1"] = world.heldout_text(writer, 1, sc.lm_docs, seed)
    rows["heldout_stage2"] = world.heldout_text(writer, 2, sc.lm_docs, seed)
    for name, r in rows.items():
        world.write_jsonl(r, out / "data" / f"{name}.jsonl")
    ex = {name: examples_from_rows(r, tokenizer, source=name) for name, r in rows.items()}
    task_len = max(len(e.tokens_t) for e in ex["train"] + ex["eval"])
    sets = {name: engine.eval_set(name, ex[key], 128) for name, key in
            (("task", "eval"), ("probe", "probe"), ("lm1", "heldout_stage1"), ("lm2", "heldout_stage2"))}
    hf = engine.hf_config(sc.width, sc.layers, sc.heads, sc.ffn)
    ft_rows = make_rows(training_examples(ex["train"], task_len), task_len)
    return Setup(ModelConfig.from_hf(hf), hf, tok_dir, rows, sets, ex["heldout_stage1"] + ex["heldout_stage2"],
                 {1: ex["heldout_stage1"], 2: ex["heldout_stage2"]}, ex["eval"], ft_rows), writer


def measure(params: Any, s: Setup) -> dict[str, float]:
    """Task EM and NLL, probe EM (latent skill), held-out LM loss on stage-1 / stage-2 text and their mean."""
    task, probe = engine.score(params, s.cfg, s.sets["task"]), engine.score(params, s.cfg, s.sets["probe"])
    lm1, lm2 = engine.score(params, s.cfg, s.sets["lm1"])["loss"], engine.score(params, s.cfg, s.sets["lm2"])["loss"]
    return {"task": 100 * task["em"], "task_nll": task["loss"], "probe": 100 * probe["em"], "lm1": lm1, "lm2": lm2,
            "lm": (lm1 + lm2) / 2}


# ---------------------------------------------------------------------------------------------------------- training
def pretrain_configs(sc: StudyConfig, seed: int) -> tuple[TrainConfig, TrainConfig]:
    common = dict(batch_size=sc.batch, max_len=sc.world.row_len, weight_decay=0.1, dtype="float32", b2=0.95,
                  seed=seed)
    return (TrainConfig(steps=sc.stage1_steps, lr=sc.lr1, schedule="cosine", warmup=min(50, sc.stage1_steps // 5),
                        **common),
            TrainConfig(steps=sc.stage2_steps, lr=sc.lr2, schedule="linear", warmup=min(25, sc.stage2_steps // 5),
                        **common))


def ft_config(sc: StudyConfig, seed: int) -> TrainConfig:
    return TrainConfig(steps=sc.ft_steps, lr=sc.ft_lr, schedule="linear", warmup=min(10, sc.ft_steps // 5),
                       batch_size=sc.ft_batch, max_len=64, weight_decay=0.0, dtype="float32", b2=0.95, seed=seed)


def _no_tick(n: int) -> None:
    pass


def pretrain(sc: StudyConfig, s: Setup, corpora: tuple, init_seed: int, data_seed: int,
             capture: dict[str, int], tick: Callable[[int], None] = _no_tick) -> dict[str, Any]:
    """One two-stage run; returns the params at each captured global step. Stage 2 starts a fresh AdamW state
    (the re-warmed, linearly decayed schedule of a mid-training stage). tick(n): called after every n steps."""
    tc1, tc2 = pretrain_configs(sc, 0)  # one compilation for the main run and the control
    params = init_params(s.cfg, jax.random.key(init_seed), jnp.float32)
    out, step = {}, 0
    for stage, (tc, rows) in enumerate(((tc1, corpora[0]), (tc2, corpora[1])), start=1):
        state = engine.init_state(params, tc)
        for _ in range(tc.steps // sc.chunk):
            state, _ = engine.run_steps(state, rows, s.cfg, tc, sc.chunk, data_seed=data_seed)
            step += sc.chunk
            tick(sc.chunk)
            for name, at in capture.items():
                if at == step:
                    out[name] = jax.tree.map(jnp.copy, state["params"])
        params = state["params"]
    return out


def finetune(params: Any, s: Setup, tc: TrainConfig, every: int,
             tick: Callable[[int], None] = _no_tick) -> tuple[Any, list[list[float]]]:
    """FT with the study's recipe; returns the fine-tuned params and the curve [[step, task EM %, task NLL]].
    tick(n): called after every n steps."""
    state = engine.init_state(jax.tree.map(jnp.copy, params), tc)
    first = engine.score(params, s.cfg, s.sets["task"])
    curve = [[0, 100 * first["em"], first["loss"]]]
    for k in range(tc.steps // every):
        state, _ = engine.run_steps(state, s.ft_rows, s.cfg, tc, every)
        r = engine.score(state["params"], s.cfg, s.sets["task"])
        curve.append([(k + 1) * every, 100 * r["em"], r["loss"]])
        tick(every)
    return state["params"], curve


_transfer = jax.jit(lambda t, f, b: treeops.tree_transfer(t, f, b, 1.0))
_diff = jax.jit(lambda f, b: treeops.tree_diff(f, b))


@jax.jit
def _geometry(a, b):
    return treeops.tree_norm(treeops.tree_diff(a, b))


@jax.jit
def _cos(fa, ba, fb, bb):
    return treeops.tree_cosine(treeops.tree_diff(fa, ba), treeops.tree_diff(fb, bb))


def steps_to(curve: list[list[float]], target: float) -> int | None:
    """First logged step whose task EM reaches `target` (None: never)."""
    return next((int(st) for st, em, _ in curve if em >= target - 1e-9), None)


def sensitivity_of_m5_d4(models: dict, ft: dict, s: Setup, tc: TrainConfig, every: int) -> dict[str, float]:
    """Task EM % of M5 + Δ4 as the study measures it ("float32": float32 weights, the study's linearly decaying
    fine-tuning schedule) and under two cheap changes: scored with bfloat16 weights ("eval_bfloat16"), and with Δ4
    from a constant-learning-rate fine-tuning of M4 ("ft_schedule_constant", same steps, lr and warm-up)."""
    m5_d4 = _transfer(models["M5"], ft["M4"], models["M4"])
    ft4_constant, _ = finetune(models["M4"], s, dataclasses.replace(tc, schedule="constant"), every)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), m5_d4)
    return {"float32": 100 * engine.score(m5_d4, s.cfg, s.sets["task"])["em"],
            "eval_bfloat16": 100 * engine.score(bf16, s.cfg, s.sets["task"])["em"],
            "ft_schedule_constant": 100 * engine.score(_transfer(models["M5"], ft4_constant, models["M4"]), s.cfg,
                                                       s.sets["task"])["em"]}


# ---------------------------------------------------------------------------------------------------------- one seed
def _barrier(r: dict[str, Any]) -> dict[str, Any]:
    """The linear-path barrier of an lmc scan (Entezari et al. 2022), its λ (None: no barrier) and lmc's note."""
    return {"barrier": r["barrier_linear"], "barrier_lambda": r["barrier_linear_lambda"],
            "barrier_note": r["barrier_linear_note"]}


def connectivity_record(lambdas: list[float], per_stage: dict[int, tuple[list[float], int]]) -> dict[str, Any]:
    """The version-interpolation record of one pair from the LM loss along (1−λ)·Mi + λ·Mj on each stage's own
    held-out text: per_stage = {stage: (loss per λ in nats/token, scored tokens)}.

    Returns the mixed-text path ("lambda", "loss": the token-weighted mean of the stages' losses, i.e. the loss on
    stage-1 + stage-2 text together, its `_barrier` keys and "mid_excess" = L(½) − (L(0) + L(1))/2, signed), one
    entry per stage ("stage1", "stage2": "loss", "tokens", barrier keys, "mid_excess") and "barrier_own": the larger
    of the stages' barriers (nats), with "barrier_own_stage", the stage it comes from (the smaller stage on ties).
    A path that dips below its chord on one stage's text can hide a bump on the other's in the mixed loss; the
    own-text barrier cannot be hidden that way.
    """
    lam = np.asarray(lambdas, np.float64)
    mid = int(np.argmin(np.abs(lam - 0.5)))

    def path(loss: np.ndarray) -> dict[str, Any]:
        return {"loss": [float(x) for x in loss], **_barrier(lmc.barriers(lambdas, loss)),
                # signed: negative when the path dips below the chord at λ = ½
                "mid_excess": float(loss[mid] - (loss[0] + loss[-1]) / 2)}

    losses = {st: np.asarray(loss, np.float64) for st, (loss, _) in per_stage.items()}
    tokens = {st: int(t) for st, (_, t) in per_stage.items()}
    mixed = sum(losses[st] * tokens[st] for st in losses) / sum(tokens.values())
    out: dict[str, Any] = {"lambda": [float(x) for x in lambdas], **path(mixed)}
    for st in sorted(losses):
        out[f"stage{st}"] = {**path(losses[st]), "tokens": tokens[st]}
    own = max(sorted(losses), key=lambda st: out[f"stage{st}"]["barrier"])
    out["barrier_own"], out["barrier_own_stage"] = out[f"stage{own}"]["barrier"], own
    return out


def run_seed(sc: StudyConfig, seed: int, out: Path, log=print, progress: Progress = SILENT) -> dict[str, Any]:
    """The whole study for one seed; checkpoints under out/ (models/, ft/, transfers/). Returns JSON-able results.
    progress: one bar per stage (`progress.Progress`)."""
    t0, timing = time.perf_counter(), {}

    def lap(name):
        timing[name] = round(time.perf_counter() - t0 - sum(timing.values()), 2)
        log(f"  [{seed}] {name}: {timing[name]:.1f} s")

    def stage(desc, total, unit="it"):
        return progress.stage(f"seed {seed}: {desc}", total, unit)

    s, writer = setup(sc, seed, out)
    rng = random.Random(f"corpus-{seed}")
    corpora = (world.corpus(writer, 1, sc.stage1_steps * sc.batch, rng),
               world.corpus(writer, 2, sc.stage2_steps * sc.batch, rng))
    lap("data")
    steps = sc.version_steps()
    runs = 2 if sc.control else 1
    run_steps = sc.stage1_steps // sc.chunk * sc.chunk + sc.stage2_steps // sc.chunk * sc.chunk
    with stage("pretraining" + (" (main run, then control)" if sc.control else ""), runs * run_steps, "step") as tick:
        models = pretrain(sc, s, corpora, init_seed=seed, data_seed=seed, capture=steps, tick=tick)
        if sc.control:
            models["C"] = pretrain(sc, s, corpora, init_seed=seed + 10_000, data_seed=seed + 10_000,
                                   capture={"C": steps["M5"]}, tick=tick)["C"]
    names = list(models)
    lap("pretrain")
    save = lambda p, where: save_params(p, out / where, config=s.hf, aux_from=s.tok_dir, overwrite=True)  # noqa: E731
    for n in names:
        save(models[n], f"models/{n}")

    tc = ft_config(sc, seed)
    ft_steps = tc.steps // sc.ft_every * sc.ft_every  # the steps finetune() runs
    ft, curves = {}, {}
    with stage(f"fine-tuning {', '.join(names)}", len(names) * ft_steps, "step") as tick:
        for n in names:
            ft[n], curves[f"FT({n})"] = finetune(models[n], s, tc, sc.ft_every, tick)
            save(ft[n], f"ft/{n}")
    lap("finetune")

    ordered = [(i, j) for i in names for j in names if i != j]
    with stage("transfer grid Mi + Δj (scoring)", 2 * len(names) + len(ordered), "model") as tick:
        base, tuned = {}, {}
        for n in names:
            base[n], tuned[n] = measure(models[n], s), measure(ft[n], s)
            tick(2)
        grid: dict[str, dict[str, Any]] = {}
        for i, j in ordered:
            grid[f"{i}+D{j}"] = measure(_transfer(models[i], ft[j], models[j]), s)
            tick(1)
    identity = {n: float(max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
        jax.tree.leaves(_transfer(models[n], ft[n], models[n])), jax.tree.leaves(ft[n])))) for n in names}
    sensitivity = sensitivity_of_m5_d4(models, ft, s, tc, sc.ft_every)
    kept = [("M5", "M4"), ("M4", "M5"), ("M5", "M1")]
    for i, j in kept:
        if i in models and j in models:
            save(_transfer(models[i], ft[j], models[j]), f"transfers/{i}+D{j}")
    lap("grid")

    # α sweep (and the task-NLL barrier along Mi + λΔj) for every ordered pair, through ftjax.lmc.
    sweep = {}
    with stage("α sweeps Mi + α·Δj", len(ordered), "path") as tick:
        for i, j in ordered:
            r = lmc.scan_along_diff(models[i], ft[j], models[j], s.cfg, s.task_examples, list(sc.alphas),
                                    batch_size=64, labels=(i, f"{i}+D{j}"))
            sweep[f"{i}+D{j}"] = {"alpha": r["lambda"], "task": [100 * x for x in r["exact_match"]],
                                  "task_nll": r["loss"], **_barrier(r)}
            tick(1)
    lap("alpha sweep")

    scans, dist, cos = {}, {}, {}
    pairs_lm = [(a, b) for k, a in enumerate(names) for b in names[k + 1:]]
    with stage("connectivity scans (1−λ)·Mi + λ·Mj", len(pairs_lm), "path") as tick:
        for a, b in pairs_lm:
            # one scan per stage's own held-out text; the mixed-text loss is their token-weighted mean
            per_stage = {st: lmc.scan(models[a], models[b], s.cfg, s.lm_stage[st], list(sc.lambdas),
                                      labels=(a, b), batch_size=64) for st in (1, 2)}
            scans[f"{a}-{b}"] = connectivity_record(
                list(sc.lambdas), {st: (r["loss"], r["tokens"]) for st, r in per_stage.items()})
            dist[f"{a}-{b}"] = float(_geometry(models[a], models[b]))
            cos[f"{a}-{b}"] = float(_cos(ft[a], models[a], ft[b], models[b]))
            tick(1)
    delta_norm = {n: float(_geometry(ft[n], models[n])) for n in names}
    lap("connectivity")

    pairs = [(i, j) for i in CORE for j in CORE if i != j]
    if sc.tft == "adjacent":
        pairs = [(i, j) for i, j in pairs if abs(int(i[1]) - int(j[1])) == 1]
    tft = {}
    with stage(f"transfer-then-finetune ({len(pairs)} runs)", len(pairs) * ft_steps, "step") as tick:
        for i, j in pairs:
            start = _transfer(models[i], ft[j], models[j])
            _, curve = finetune(start, s, tc, sc.ft_every, tick)
            curves[f"FT({i}+D{j})"] = curve
            tft[f"{i}+D{j}"] = {"final": curve[-1][1], "start": curve[0][1],
                                "steps_to_ft": steps_to(curve, curves[f"FT({i})"][-1][1])}
    for i in CORE:
        tft[f"FT({i})"] = {"final": curves[f"FT({i})"][-1][1], "start": curves[f"FT({i})"][0][1],
                           "steps_to_ft": steps_to(curves[f"FT({i})"], curves[f"FT({i})"][-1][1])}
    lap("transfer-then-finetune")

    # Algorithm 1. M1* = FT(M1); M2* = FT(M2 + Δ1) is the direct run; later versions carry M*(i-1) − M(i-1).
    star = {"M1": ft["M1"]}
    recycle = {"plain": {}, "direct": {}, "iterative": {}}
    missing = sum(f"FT(M{k}+DM{k - 1})" not in curves for k in range(2, 6))
    with stage("recycling (Algorithm 1)", (4 + missing) * ft_steps, "step") as tick:
        for k in range(2, 6):
            i, prev = f"M{k}", f"M{k - 1}"
            direct = curves.get(f"FT({i}+D{prev})")
            if direct is None:
                _, direct = finetune(_transfer(models[i], ft[prev], models[prev]), s, tc, sc.ft_every, tick)
                curves[f"FT({i}+D{prev})"] = direct
            if k == 2:
                star[i], it = finetune(_transfer(models[i], ft[prev], models[prev]), s, tc, sc.ft_every, tick)
            else:
                star[i], it = finetune(_transfer(models[i], star[prev], models[prev]), s, tc, sc.ft_every, tick)
            curves[f"iter({i})"] = it
            target = curves[f"FT({i})"][-1][1]
            for mode, c in (("plain", curves[f"FT({i})"]), ("direct", direct), ("iterative", it)):
                recycle[mode][i] = {"final": c[-1][1], "start": c[0][1], "steps_to_ft": steps_to(c, target)}
    save(star["M5"], "recycle/M5_star")
    lap("recycling")

    return {"seed": seed, "versions": steps, "names": names, "base": base, "ft": tuned, "grid": grid,
            "identity_max_abs": identity, "sweep": sweep, "scans": scans, "distance": dist, "cos": cos,
            "delta_norm": delta_norm, "sensitivity": sensitivity, "tft": tft, "recycle": recycle, "curves": curves,
            "timing": timing,
            "params": int(sum(x.size for x in jax.tree.leaves(models["M0"])))}
