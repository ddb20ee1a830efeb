"""plots: PNG and PDF files come out of real scan / plane / stats results (pixels are not compared); what the scan
figure draws; no library warnings on any result."""

import json
import warnings

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


def scan_result(lam, loss, **extra):
    return {"path": "lerp", "labels": ["A", "B"], "lambda": lam, "loss": loss, **lmc.barriers(lam, loss), **extra}


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_scan_figure_baseline_between_the_models_and_barriers_only_where_they_are():
    lam = [-0.5, 0.0, 0.5, 1.0, 1.5]
    falling = plots.scan_figure(scan_result(lam, [6.0, 5.2, 3.9, 2.6, 1.0]))
    ax = falling.axes[0]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_xdata()) == [0, 1]  # never extrapolated past the two models
    assert list(dashed[0].get_ydata()) == [5.2, 2.6]
    assert not [t for t in ax.texts if t.arrow_patch is not None]  # no barrier, so no arrow
    texts = " ".join(legend_texts(ax)).replace("\n", " ")
    assert "no linear barrier" in texts and "no mean barrier" in texts and "(λ = 0)" in texts

    bump = plots.scan_figure(scan_result(lam, [9.0, 1.0, 2.5, 2.0, 9.0]))
    arrows = [t for t in bump.axes[0].texts if t.arrow_patch is not None]
    # linear: 2.5 - 1.5 = 1.0 at λ = 0.5; mean: 2.5 - (1.0 + 2.0)/2 = 1.0 at λ = 0.5
    assert [(t.xy, t.xyann) for t in arrows] == [((0.5, 2.5), (0.5, 1.5)), ((0.5, 2.5), (0.5, 1.5))]
    texts = legend_texts(bump.axes[0])
    assert "linear barrier = 1 nats at λ = 0.5" in texts and "mean barrier = 1 nats at λ = 0.5" in texts
    dotted = [line for line in bump.axes[0].get_lines() if line.get_linestyle() == ":"]
    assert len(dotted) == 1 and list(dotted[0].get_xdata()) == [0, 1]


def test_every_plot_without_library_warnings(setup, tmp_path):
    nan = float("nan")
    lam5 = [0.0, 0.25, 0.5, 0.75, 1.0]
    scans = {
        "falling": scan_result(lam5, [5.2, 4.4, 3.8, 3.2, 2.6]),  # all-zero barriers, with notes
        "bump": scan_result(lam5, [1.0, 2.5, 2.9, 3.2, 3.0], acc=[0.5, None, 0.25, 0.0, 0.5]),
        "single_curve_endpoints_only": scan_result([0.0, 1.0], [2.0, 1.0]),
        "nan_inside": scan_result(lam5, [1.0, nan, 2.0, nan, 1.0], acc=[nan] * 5, exact_match=[1.0] * 5),
        "nan_endpoint": scan_result(lam5, [nan, 1.0, 2.0, 1.5, 1.0]),
        "all_nan": scan_result([0.0, 0.5, 1.0], [nan, nan, nan]),
        "no_barrier_keys": {"lambda": [0.0, 0.5, 1.0], "loss": [1.0, 2.0, 1.0]},
    }
    scans["json"] = json.loads(json.dumps(lmc.finite_or_none(scans["nan_endpoint"])))
    geometry = {"u": [0.0, 0.5, 1.0], "v": [0.0, 1.0], "norm_ab": 2.0, "norm_ac": 1.0, "cos_ab_ac": 0.5}
    planes = {"plain": [[1.0, 2.0, 3.0], [2.0, 2.5, 9.0]], "constant": [[1.0] * 3] * 2,
              "nan": [[1.0, None, 3.0], [nan, 2.5, 9.0]], "all_nan": [[None] * 3] * 2}
    dirs = setup[0]
    stats = {"real": diff_stats(*dirs, dirs[2]), "no_values": {"layers": [{"layer": 0}, {"layer": 1}]},
             "zeros": {"layers": [{"layer": 0, "rel_delta": 0.0}, {"layer": 1, "rel_delta": 0.0}]},
             "nan": {"layers": [{"layer": 0, "rel_delta": nan, "cos_delta": nan}, {"layer": 1, "rel_delta": 0.1}]},
             "no_layers": {"layers": []}}
    curves = {"runs": {"M1*": {"step": [1, 2], "loss": [3.0, None], "eval_step": [2], "eval_loss": [2.9]}},
              "empty_run": {"M1*": {"step": [], "loss": [], "eval_step": [], "eval_loss": []}}, "none": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, result in scans.items():
            assert_figures(plots.plot_scan(result, tmp_path / f"scan_{name}"))
        for name, loss in planes.items():
            plots.plot_plane({**geometry, "loss": loss}, tmp_path / f"plane_{name}")
        axis = [0.0, 0.25, 0.5, 0.75, 1.0]  # 24 of 25 equal: the 95% quantile is the minimum
        mostly_constant = [[1.0] * 5] * 4 + [[1.0] * 4 + [3.0]]
        plots.plot_plane({**geometry, "u": axis, "v": axis, "loss": mostly_constant}, tmp_path / "plane_flat")
        for name, result in stats.items():
            plots.plot_stats(result, tmp_path / f"stats_{name}")
        for name, runs in curves.items():
            plots.plot_curves(runs, tmp_path / f"curves_{name}")


def layers_result(**series):
    """A stats result with one decoder layer per value of each series (rel_delta, rel_delta_target, ...)."""
    n = len(next(iter(series.values())))
    return {"layers": [{"layer": i, "group": "layer", **{k: v[i] for k, v in series.items()}} for i in range(n)],
            "total": {}}


def visible_labels(fig):
    """(text, bbox) of the non-empty y tick labels of the first axes that lie inside its view, as drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ax, renderer = fig.axes[0], canvas.get_renderer()
    lo, hi = ax.get_ylim()
    return [(t.get_text(), t.get_window_extent(renderer))
            for t in ax.yaxis.get_majorticklabels() + ax.yaxis.get_minorticklabels()
            if t.get_visible() and t.get_text() and lo <= t.get_position()[1] <= hi]


@pytest.mark.parametrize("values", [[8e-4, 2e-3, 6e-3, 2e-2], [2e-4, 1e-3, 9e-3, 6e-2], [1.1e-3, 1.3e-3, 1.9e-3],
                                    [1.001e-3, 1.002e-3, 1.0015e-3], [3e-5, 4e-5, 3.5e-5],
                                    list(np.logspace(-14, 0, 8)), [5e-7, 1e-1]])
def test_stats_tick_labels_readable_across_the_range(values):
    """At least three distinct labelled ticks in view, none overlapping, whatever decades the norms span."""
    labels = visible_labels(plots.stats_figure(layers_result(rel_delta=values)))
    texts = [t for t, _ in labels]
    assert 3 <= len(texts) <= 10 and len(set(texts)) == len(texts), texts
    assert not any(a.overlaps(b) for i, (_, a) in enumerate(labels) for _, b in labels[i + 1:]), texts


def test_stats_series_zero_everywhere_is_named_not_drawn_on_the_log_axis():
    fig = plots.stats_figure(layers_result(rel_delta=[1e-3, 2e-3, 4e-3], rel_delta_target=[0.0, 0.0, 0.0],
                                           cos_delta=[None, None, None]))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == "‖Δ‖ / ‖θ‖  (source diff)"
    assert legend[1].startswith("‖Δt‖ / ‖θt‖  (target diff)") and "0 at every layer (not drawn" in legend[1]
    drawn = {line.get_label(): len(line.get_ydata()) for line in ax.get_lines()}
    assert drawn[legend[0]] == 3 and drawn[legend[1]] == 0
    # all zero: a linear axis, where zeros are drawn as they are
    fig = plots.stats_figure(layers_result(rel_delta=[0.0, 0.0], rel_delta_target=[0.0, 0.0]))
    assert fig.axes[0].get_yscale() == "linear" and all(len(line.get_ydata()) == 2 for line in fig.axes[0].get_lines())
