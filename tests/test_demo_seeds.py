"""The demo over several seeds (``--seeds``): parsing, the mean/range table, and the figures' labels.

- ``--seeds`` takes ranges and lists (``0-4``, ``0,2,5``, ``0-2,7``); a bad one is refused by the
  parser with a message that names the option, before anything is written.
- The multi-seed table's mean and range columns are the mean and range of the per-seed runs, which
  the test trains on its own, one ``seed=`` run each (what ``--seed`` does), and its ``runs.csv``
  rows are those runs' rows; the figures are the first seed's.
- The figures: every panel has axis labels and legible tick labels, the legend says what a spoke
  is, the accuracy is in the loss's caption (not in the directions panel's title), and the captions
  and legend do not overlap the panels.

Kept short: two losses, one epoch, two seeds.
"""

from __future__ import annotations

import csv
import io
import re
import statistics
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from torch_port import demo
from torch_port.__main__ import main
from torch_port.demo import figures
from torch_port.demo.report import RUN_COLUMNS, SUMMARY_COLUMNS
from torch_port.demo.seeds import MAX_SEEDS, METRICS, format_seeds, parse_seeds

LOSSES = ["softmax", "arcface"]
SEEDS = (3, 1)  # not ascending: the first seed given, not the smallest, is the figures'


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def markdown_rows(path):
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


# ------------------------------------------------------------------------------------------------
# Parsing --seeds
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0-4", (0, 1, 2, 3, 4)),
        ("0,2,5", (0, 2, 5)),
        ("0-2,7", (0, 1, 2, 7)),
        ("7, 0-2", (7, 0, 1, 2)),
        ("3", (3,)),
        ("5-5", (5,)),
        ("10-12,3", (10, 11, 12, 3)),
    ],
)
def test_parse_seeds(text, expected):
    assert parse_seeds(text) == expected


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=30, unique=True))
def test_seed_lists_round_trip(seeds):
    """A comma list reads back as written, and so does format_seeds' compact form (ranges of runs)."""
    assert parse_seeds(",".join(map(str, seeds))) == tuple(seeds)
    assert parse_seeds(format_seeds(seeds)) == tuple(seeds)


def test_format_seeds():
    assert format_seeds((0, 1, 2, 3, 4)) == "0-4"
    assert format_seeds((0, 2, 5)) == "0, 2, 5"
    assert format_seeds((0, 1, 2, 7, 8)) == "0-2, 7-8"
    assert format_seeds((3, 1)) == "3, 1"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("4-0", r"the range '4-0' is empty \(a range A-B needs A <= B; write 0-4\)"),
        ("-1", r"integers >= 0 separated by commas \(e.g. 0-4 or 0,2,5\), got '-1'"),
        ("1.5", r"got '1.5'"),
        ("a", r"got 'a'"),
        ("0,,1", r"got '' in '0,,1'"),
        ("0-", r"got '0-'"),
        ("", r"got ''"),
        ("0-3,2", r"seed 2 is given twice"),
        (f"0-{MAX_SEEDS}", rf"at most {MAX_SEEDS} seeds, the range '0-{MAX_SEEDS}' has {MAX_SEEDS + 1}"),
        (f"0-{MAX_SEEDS - 1},{MAX_SEEDS}", rf"at most {MAX_SEEDS} seeds, got {MAX_SEEDS + 1}"),
    ],
)
def test_command_line_refuses_bad_seeds(tmp_path, capsys, value, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--seeds", value, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seeds: " in err
    assert "argument --seeds: seeds: " not in err  # the option is named once
    assert len(re.findall(message, err)) == 1, err
    assert not out.exists()


def test_seed_and_seeds_together_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--seed", "1", "--seeds", "0-4", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "argument --seeds: not allowed with argument --seed" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"seed": 1, "seeds": "0-4"}, ValueError, r"give seed or seeds, not both"),
        ({"seeds": []}, ValueError, r"seeds: give at least one seed"),
        ({"seeds": [0, -1]}, ValueError, r"seeds\[1\] must be an integer >= 0, got -1"),
        ({"seeds": [0, 1.5]}, ValueError, r"seeds\[1\] must be an integer >= 0, got 1.5"),
        ({"seeds": [True]}, TypeError, r"seeds\[0\] must be an integer >= 0, got bool"),
        ({"seeds": [2, 2]}, ValueError, r"seeds: seed 2 is given twice"),
        ({"seeds": "0-x"}, ValueError, r"seeds must be seeds N and ranges A-B"),
        ({"seeds": -3}, ValueError, r"seeds must be an integer >= 0, got -3"),
    ],
)
def test_run_demo_refuses_bad_seeds(tmp_path, kwargs, error, message):
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        demo.run_demo("softmax", epochs=1, out=out, progress=False, **kwargs)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# The table over seeds against per-seed runs trained here
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory):
    """One run over SEEDS through the command line, and one run per seed with ``seed=``."""
    multi = tmp_path_factory.mktemp("multi")
    log = io.StringIO()
    with redirect_stderr(log):  # off a terminal: a line per seed, then a line per loss
        args = ["demo", "--loss", *LOSSES, "--epochs", "1", "--seeds", ",".join(map(str, SEEDS)), "--out", str(multi)]
        status = main(args)
    single = {}
    for seed in SEEDS:
        out = tmp_path_factory.mktemp(f"seed{seed}")
        single[seed] = (out, demo.run_demo(LOSSES, epochs=1, seed=seed, out=out, progress=False))
    return status, multi, log.getvalue(), single


def test_multi_seed_run_writes_the_summary_and_the_runs(seed_runs):
    status, multi, log, _ = seed_runs
    assert status == 0
    fields, rows = read_csv(multi / "table.csv")
    assert tuple(fields) == SUMMARY_COLUMNS
    assert [row["loss"] for row in rows] == [demo.LOSS_TITLES[loss] for loss in LOSSES]
    assert all(row["seeds"] == "3, 1" for row in rows)
    fields, _ = read_csv(multi / "runs.csv")
    assert tuple(fields) == RUN_COLUMNS
    lines = log.strip().splitlines()
    assert lines[0] == "seed 3 (1 of 2)" and lines[3] == "seed 1 (2 of 2)", log
    assert len(lines) == 2 * (1 + len(LOSSES)), log


def test_summary_is_the_mean_and_range_of_the_per_seed_runs(seed_runs):
    _, multi, _, single = seed_runs
    _, rows = read_csv(multi / "table.csv")
    md = markdown_rows(multi / "table.md")
    header, md_rows = md[0], md[2:]
    for position, loss in enumerate(LOSSES):
        per_seed = [next(r for r in single[seed][1].results if r.loss == loss) for seed in SEEDS]
        row, md_row = rows[position], md_rows[position]
        for metric in METRICS:
            values = [getattr(result, metric) for result in per_seed]
            mean, low, high = np.mean(values), np.min(values), np.max(values)
            assert row[f"{metric}_mean"] == f"{mean:.1f}", (loss, metric)
            assert row[f"{metric}_min"] == f"{low:.1f}", (loss, metric)
            assert row[f"{metric}_max"] == f"{high:.1f}", (loss, metric)
            column = next(i for i, title in enumerate(header) if title.startswith(dict(demo.TABLE_COLUMNS)[metric]))
            assert header[column].endswith("mean (min-max)")
            assert md_row[column] == f"{mean:.1f} ({low:.1f}-{high:.1f})", (loss, metric)


def test_summaries_hold_the_unrounded_mean_and_range(seed_runs):
    """summarize, before any rounding, against the per-seed runs (statistics.mean, min, max)."""
    _, _, _, single = seed_runs
    runs = {seed: single[seed][1].results for seed in SEEDS}
    for summary in demo.summarize(runs):
        for metric in METRICS:
            values = [getattr(next(r for r in runs[s] if r.loss == summary.loss), metric) for s in SEEDS]
            spread = getattr(summary, metric)
            assert spread.mean == pytest.approx(statistics.mean(values), rel=1e-12, abs=1e-12)
            assert (spread.low, spread.high) == (min(values), max(values))


def test_summarize_three_seeds_mean_is_not_the_median():
    """Three seeds with skewed values (the mean is not the median, as it is for two), no training."""
    runs = {
        seed: [fake_result("softmax", accuracy=acc, seed=seed), fake_result("cosface", accuracy=acc - 5, seed=seed)]
        for seed, acc in zip((4, 0, 9), (90.0, 91.0, 99.0))
    }
    summaries = demo.summarize(runs)
    assert [s.loss for s in summaries] == ["softmax", "cosface"]
    for summary, offset in zip(summaries, (0, 5)):
        assert summary.seeds == (4, 0, 9)
        assert summary.accuracy.mean == pytest.approx(np.mean([90.0, 91.0, 99.0]) - offset, rel=1e-12)
        assert (summary.accuracy.low, summary.accuracy.high) == (90.0 - offset, 99.0 - offset)
        angles = [runs[seed][offset // 5].min_center_angle_deg for seed in (4, 0, 9)]
        assert summary.min_center_angle_deg.mean == pytest.approx(np.mean(angles), rel=1e-12)
        assert summary.row()["seeds"] == "4, 0, 9"


def test_summarize_refuses_runs_of_different_losses():
    runs = {0: [fake_result("softmax")], 1: [fake_result("cosface")]}
    with pytest.raises(ValueError, match=r"runs: seed 1 trained \['cosface'\], the first seed \['softmax'\]"):
        demo.summarize(runs)


def test_runs_csv_rows_are_the_per_seed_tables(seed_runs):
    _, multi, _, single = seed_runs
    _, runs = read_csv(multi / "runs.csv")
    expected = []
    for seed in SEEDS:
        _, rows = read_csv(single[seed][0] / "table.csv")
        expected += [{"seed": str(seed), **row} for row in rows]
    assert [{k: v for k, v in row.items() if k != "train_time_s"} for row in runs] == [
        {k: v for k, v in row.items() if k != "train_time_s"} for row in expected
    ]


def test_figures_show_the_first_seed(seed_runs):
    """A loss's figure carries no seed in it: the multi-seed run's is the first seed's, byte for byte."""
    _, multi, _, single = seed_runs
    first, other = single[SEEDS[0]][0], single[SEEDS[1]][0]
    for loss in LOSSES:
        drawn = (multi / f"{loss}.png").read_bytes()
        assert drawn == (first / f"{loss}.png").read_bytes(), loss
        assert drawn != (other / f"{loss}.png").read_bytes(), loss
    assert f"the figures show seed {SEEDS[0]}" in (multi / "table.md").read_text(encoding="utf-8")


def test_one_seed_keeps_the_one_run_table(seed_runs):
    _, _, _, single = seed_runs
    out, run = single[SEEDS[0]]
    fields, _ = read_csv(out / "table.csv")
    assert fields == [key for key, _ in demo.TABLE_COLUMNS]
    assert run.seeds == (SEEDS[0],) and run.summaries == [] and not (out / "runs.csv").exists()


# ------------------------------------------------------------------------------------------------
# The figures
# ------------------------------------------------------------------------------------------------


def fake_result(loss="sphereface", accuracy=91.3, dim=2, seed=0):
    """A LossResult with features on ten rays, for drawing without training."""
    rng = np.random.default_rng(seed)
    labels = np.arange(200) % 10
    angles = labels * 2 * np.pi / 10
    directions = np.stack([np.cos(angles), np.sin(angles)] + [np.zeros(200)] * (dim - 2), axis=1)
    features = directions * rng.uniform(1, 40, size=(200, 1)) + rng.normal(size=(200, dim))
    geometry = demo.class_geometry(features, labels)
    entry = demo.DEMO_LOSSES[loss]
    return demo.LossResult(
        loss, entry.title, entry.describe(), accuracy, geometry.intra_class_angle_deg,
        geometry.min_center_angle_deg, 1.0, features, labels, geometry.centers,
    )  # fmt: skip


def panel_texts(fig):
    return [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]


@pytest.mark.parametrize("dim", [2, 3])
def test_every_panel_has_axis_labels_and_legible_ticks(dim):
    plt = figures._pyplot()
    fig = figures.grid_figure([fake_result(dim=dim), fake_result("softmax", dim=dim)], dim, "caption")
    try:
        assert len(fig.axes) == 4
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
            if dim == 3:
                assert ax.get_zlabel()
            for label in ax.get_xticklabels() + ax.get_yticklabels():
                assert label.get_fontsize() >= 8
        features, directions = fig.axes[0], fig.axes[1]
        assert features.get_xlabel() == "feature 1" and features.get_ylabel() == "feature 2"
        assert "/" in directions.get_xlabel() and "/" in directions.get_ylabel()  # the unit vector's components
    finally:
        plt.close(fig)


def test_accuracy_is_in_the_caption_not_in_the_directions_title():
    plt = figures._pyplot()
    results = [fake_result(accuracy=91.3), fake_result("cosface", accuracy=88.9)]
    fig = figures.grid_figure(results, 2, "caption")
    try:
        captions = [sub._suptitle.get_text() for sub in fig.subfigs]
        assert captions == [figures.pair_caption(result) for result in results]
        assert "held-out accuracy 91.3%" in captions[0] and "CosFace (s=16, m=0.2)" in captions[1]
        for ax in fig.axes:
            assert "acc" not in ax.get_title() and "%" not in ax.get_title()
        assert "intra-class" in fig.axes[1].get_title()
    finally:
        plt.close(fig)


def test_legend_names_the_spokes_and_every_class_has_one():
    plt = figures._pyplot()
    result = fake_result()
    fig = figures.loss_figure(result, 2)
    try:
        texts = [text.get_text() for legend in fig.legends for text in legend.get_texts()]
        assert texts == [str(k) for k in range(10)] + [figures.SPOKE_LABEL]
        assert "mean direction" in figures.SPOKE_LABEL
        directions = fig.axes[1]
        spokes = [line for line in directions.get_lines() if len(line.get_xdata()) == 2]
        assert len(spokes) == 10
        for line, center in zip(spokes, result.centers):
            np.testing.assert_allclose(np.c_[line.get_xdata(), line.get_ydata()], [[0, 0], center])
    finally:
        plt.close(fig)


@pytest.mark.parametrize("count", [1, 2])
def test_captions_and_legend_do_not_overlap_the_panels(count):
    """Constrained layout gives up when a title or the legend is wider than the figure; then the
    captions are drawn over the panels' titles and the legend over the axis labels."""
    plt = figures._pyplot()
    results = [fake_result(seed=k) for k in range(count)]
    long_caption = "scikit-learn digits (8x8): 1347 training / 450 held-out images, 2-D embedding, 100 epochs, " * 2
    for fig in (figures.loss_figure(results[0], 2), figures.grid_figure(results, 2, long_caption)):
        try:
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            legend_top = fig.legends[0].get_window_extent(renderer).y1
            holders = fig.subfigs or [fig]
            for holder, pair in zip(holders, np.reshape(fig.axes, (-1, 2))):
                caption_bottom = holder._suptitle.get_window_extent(renderer).y0
                for ax in pair:
                    assert ax.title.get_window_extent(renderer).y1 <= caption_bottom + 1
                    assert ax.xaxis.label.get_window_extent(renderer).y0 >= legend_top - 1
            if fig.subfigs:
                top = fig._suptitle.get_window_extent(renderer).y0
                assert all(sub._suptitle.get_window_extent(renderer).y1 <= top + 1 for sub in fig.subfigs)
        finally:
            plt.close(fig)


# ------------------------------------------------------------------------------------------------
# The committed run in docs/demo/ and the guide that quotes it
# ------------------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_guide_embeds_the_committed_table():
    """docs/demo.md shows docs/demo/table.md's table, line for line, so the two cannot drift apart."""
    generated = (DOCS / "demo" / "table.md").read_text(encoding="utf-8").splitlines()
    table = [line for line in generated if line.startswith("|")]
    guide = (DOCS / "demo.md").read_text(encoding="utf-8").splitlines()
    assert table[0].endswith("mean (min-max) | training time per seed (s), mean |")  # the multi-seed table
    start = guide.index(table[0])
    assert guide[start : start + len(table)] == table


def test_committed_summary_is_the_mean_and_range_of_the_committed_runs():
    """docs/demo/table.csv against docs/demo/runs.csv: min and max exactly, the mean to the rounding
    of runs.csv's one decimal (the mean of values each off by <= 0.05, then rounded: <= 0.1)."""
    _, summary = read_csv(DOCS / "demo" / "table.csv")
    _, runs = read_csv(DOCS / "demo" / "runs.csv")
    assert [row["loss"] for row in summary] == list(demo.LOSS_TITLES.values())
    for row in summary:
        mine = [run for run in runs if run["loss"] == row["loss"]]
        assert [run["seed"] for run in mine] == [str(seed) for seed in parse_seeds(row["seeds"])]
        for metric in METRICS:
            values = [float(run[metric]) for run in mine]
            assert row[f"{metric}_min"] == f"{min(values):.1f}" and row[f"{metric}_max"] == f"{max(values):.1f}"
            assert abs(float(row[f"{metric}_mean"]) - statistics.mean(values)) <= 0.1 + 1e-9, (row["loss"], metric)
