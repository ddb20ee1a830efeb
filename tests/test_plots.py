"""plots: PNG and PDF files come out of real scan / plane / stats results (pixels are not compared)."""

import json

import numpy as np
import pytest

from ftjax import lmc, plots
from ftjax.data import examples_from_rows
from ftjax.params import load_params
from ftjax.stats import diff_stats
from hf_models import make_hf_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    dirs = [make_hf_model(root / k, seed=i) for i, k in enumerate("abc")]
    loaded = [load_params(d) for d in dirs]
    rows = [{"input_ids": list(range(1, 12))}, {"input_ids": list(range(20, 30))}]
    return dirs, loaded[0][0], [p for _, p in loaded], examples_from_rows(rows)


def assert_figures(paths):
    png, pdf = paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000


def test_scan_plot_from_real_result_and_from_json(setup, tmp_path):
    _, cfg, (a, b, _), ex = setup
    result = lmc.scan(a, b, cfg, ex, lmc.grid(4, -0.5, 1.5), labels=("Llama-3.0", "Llama-3.1"))
    assert_figures(plots.plot_scan(result, tmp_path / "scan"))
    reread = json.loads(json.dumps(lmc.finite_or_none({**result, "loss": result["loss"][:-1] + [float("nan")]})))
    assert reread["loss"][-1] is None
    assert_figures(plots.plot_scan(reread, tmp_path / "sub" / "scan2"))


def test_scan_plot_with_accuracy_panel(tmp_path):
    result = {"path": "diff", "labels": ["T", "T + Δ"], "lambda": [0, 0.5, 1], "loss": [2.0, 2.5, 1.5],
              "acc": [0.25, 0.5, 0.75], **lmc.barriers([0, 0.5, 1], [2.0, 2.5, 1.5])}
    assert_figures(plots.plot_scan(result, tmp_path / "acc"))


def test_plane_plot(setup, tmp_path):
    _, cfg, (a, b, c), ex = setup
    result = lmc.plane(a, b, c, cfg, ex, [0.0, 0.5, 1.0], [0.0, 1.0])
    assert_figures(plots.plot_plane(result, tmp_path / "plane"))
    x, y, corners = plots.plane_coordinates(result)
    assert corners[1] == pytest.approx((result["norm_ab"], 0.0)) and x.shape == y.shape == (2, 3)
    assert np.hypot(*corners[2]) == pytest.approx(result["norm_ac"])


def test_stats_plot(setup, tmp_path):
    dirs = setup[0]
    assert_figures(plots.plot_stats(diff_stats(dirs[0], dirs[1]), tmp_path / "stats"))
    assert_figures(plots.plot_stats(diff_stats(*dirs, dirs[2]), tmp_path / "stats3"))


def test_curves_plot(tmp_path):
    runs = {"M1*": {"step": [1, 2, 3], "loss": [3.0, 2.5, None], "eval_step": [0, 3], "eval_loss": [3.1, 2.4]},
            "M2*": {"step": [], "loss": [], "eval_step": [0], "eval_loss": [3.0]}}
    assert_figures(plots.plot_curves(runs, tmp_path / "curves", title="recycling"))
