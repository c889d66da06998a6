"""The demo's open set (torch_port/demo/openset.py and its path through the run): rotations, data, table, figure.

- The rotations hold out every class exactly once, 2 or 3 at a time, as the seed permutes them.
- A rotation's training set has none of its held-out classes (relabelled 0 .. kept - 1), and its
  pairs are every image of the held-out classes, from both splits; its training has at least the
  closed-set run's optimiser steps.
- End to end, tiny (one loss, one epoch, every rotation): the table's open-set cells are the mean
  and range of the rotations' own numbers, openset.csv has a row per rotation, the ROC figure has
  one panel, a log FAR axis, axis labels and a legend entry per loss; with several seeds the
  summary pools every rotation of every seed; bad ``rotations`` are refused before anything is written.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_port import demo
from torch_port.__main__ import build_parser, main
from torch_port.demo import figures
from torch_port.demo.openset import (
    OPEN_METRICS,
    matching_epochs,
    open_set_split,
    open_values,
    rotation_groups,
    rotations_cell,
)
from torch_port.demo.report import OPEN_SET_COLUMNS
from torch_port.demo.verification import FAR_GRID

OPEN_KEYS = [key for key, _, _ in OPEN_METRICS]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


@pytest.mark.parametrize("num_classes", [4, 5, 7, 10, 11, 30])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_rotations_hold_out_every_class_once(num_classes, seed):
    groups = rotation_groups(num_classes, seed)
    assert sorted(k for group in groups for k in group) == list(range(num_classes))
    assert len(groups) == math.ceil(num_classes / 3)
    assert all(2 <= len(group) <= 3 for group in groups)
    assert all(num_classes - len(group) >= 2 for group in groups)
    assert rotation_groups(num_classes, seed) == groups


def test_digits_rotations_are_3_3_2_2_and_the_seed_permutes_them():
    assert [len(group) for group in rotation_groups(10, 0)] == [3, 3, 2, 2]
    assert len({rotation_groups(10, seed)[0] for seed in range(10)}) > 1


def test_too_few_classes_is_refused():
    with pytest.raises(ValueError, match="at least 4 classes"):
        rotation_groups(3, 0)


def test_open_set_split_keeps_the_held_out_classes_out_of_training():
    data = demo.load_digits(seed=0)
    held_out = (2, 5, 9)
    split = open_set_split(data, held_out, seed=0)
    kept = [k for k in range(10) if k not in held_out]
    assert split.kept == tuple(kept)
    # every training image of a kept class, under its new label
    original = data.train_y[~torch.isin(data.train_y, torch.tensor(held_out))]
    np.testing.assert_array_equal(np.asarray(kept)[split.train_y.numpy()], original.numpy())
    assert split.train_x.shape[0] == original.shape[0]
    # every image of a held-out class, from both splits, and nothing else
    counts = np.bincount(np.concatenate([data.train_y.numpy(), data.test_y.numpy()]), minlength=10)
    assert sorted(set(split.pair_y.tolist())) == list(held_out)
    assert split.pair_x.shape[0] == sum(counts[k] for k in held_out)


def test_open_set_split_subsamples_past_the_cap(monkeypatch):
    from torch_port.demo import openset

    monkeypatch.setattr(openset, "MAX_PAIR_IMAGES", 100)
    split = open_set_split(demo.load_digits(seed=0), (0, 1, 2), seed=0)
    assert split.pair_x.shape == (100, 64) and set(split.pair_y.tolist()) <= {0, 1, 2}


@pytest.mark.parametrize(("epochs", "full", "open_"), [(100, 1347, 943), (1, 1347, 1000), (3, 30, 21), (7, 64, 64)])
def test_matching_epochs_is_the_fewest_with_as_many_steps(epochs, full, open_):
    chosen = matching_epochs(epochs, full, open_, 64)
    steps = epochs * -(-full // 64)
    assert chosen * -(-open_ // 64) >= steps > (chosen - 1) * -(-open_ // 64)


def test_rotations_cell():
    assert rotations_cell([]) == "-"
    assert rotations_cell([91.26]) == "91.3"
    assert rotations_cell([90.0, 91.0, 99.0]) == "93.3 (90.0-99.0)"


# ------------------------------------------------------------------------------------------------
# End to end, tiny
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One loss, one epoch, every rotation (--full), through the command line."""
    out = tmp_path_factory.mktemp("open")
    status = main(["demo", "--loss", "cosface", "--epochs", "1", "--full", "--out", str(out), "--no-progress"])
    return status, out


def test_full_run_writes_every_rotation(full_run):
    status, out = full_run
    assert status == 0
    fields, rows = read_csv(out / "openset.csv")
    assert tuple(fields) == OPEN_SET_COLUMNS
    assert len(rows) == 4 and {row["loss"] for row in rows} == {"CosFace"}
    held_out = [tuple(int(k) for k in row["held_out"].split()) for row in rows]
    assert held_out == list(rotation_groups(10, 0))
    for row in rows:
        images = int(row["images"])
        assert int(row["genuine_pairs"]) + int(row["impostor_pairs"]) == images * (images - 1) // 2
        for key in ("auc", "tar_at_far", "eer"):
            assert 0.0 <= float(row[key]) <= 100.0


def test_table_cells_are_the_mean_and_range_of_the_rotations(full_run):
    _, out = full_run
    _, rotations = read_csv(out / "openset.csv")
    _, (row,) = read_csv(out / "table.csv")
    for key, column in zip(OPEN_KEYS, ("auc", "tar_at_far", "eer")):
        values = [float(r[column]) for r in rotations]  # two decimals there, one in the table
        mean, low, high = re.fullmatch(r"(\d+\.\d) \((\d+\.\d)-(\d+\.\d)\)", row[key]).groups()
        assert abs(float(mean) - statistics.mean(values)) <= 0.05 + 0.005 + 1e-9, key
        assert (float(low), float(high)) == pytest.approx((min(values), max(values)), abs=0.05 + 1e-9), key


def test_roc_figure_file(full_run):
    _, out = full_run
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "open set: 4 rotations" in (out / "table.md").read_text(encoding="utf-8")


def test_three_classes_need_rotations_zero(tmp_path):
    """IDX files of three classes: the open set is refused with a hint, before anything is written;
    rotations=0 trains the closed set alone."""
    data = tmp_path / "three"
    data.mkdir()
    labels = np.arange(24, dtype=np.uint8) % 3
    images = np.random.default_rng(0).integers(0, 256, size=(24, 4, 4), dtype=np.uint8)
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
        (data / name).write_bytes(header + array.tobytes())
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"at least 4 classes .* have 3; use rotations=0"):
        demo.run_demo("softmax", epochs=1, data=data, out=out, progress=False)
    assert not out.exists()
    run = demo.run_demo("softmax", epochs=1, data=data, rotations=0, out=out, progress=False)
    assert run.results[0].open_set == ()


def test_rotations_zero_is_the_closed_set_alone(tmp_path):
    run = demo.run_demo("softmax", epochs=1, rotations=0, out=tmp_path, progress=False)
    assert run.results[0].open_set == ()
    assert not (tmp_path / "roc.png").exists() and not (tmp_path / "openset.csv").exists()
    _, (row,) = read_csv(tmp_path / "table.csv")
    assert [row[key] for key in OPEN_KEYS] == ["-", "-", "-"]


def test_the_default_is_one_rotation_and_full_is_all():
    parser = build_parser()
    assert parser.parse_args(["demo"]).rotations == 1
    assert parser.parse_args(["demo", "--full"]).rotations == "all"
    assert parser.parse_args(["demo", "--rotations", "2"]).rotations == 2


def test_rotations_and_full_together_are_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--full", "--rotations", "2"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("rotations", "error", "message"),
    [
        (-1, ValueError, r"rotations must be an integer >= 0, got -1"),
        ("some", ValueError, r"rotations must be an integer >= 0 or 'all', got 'some'"),
        (5, ValueError, r"rotations must be at most 4 with 10 classes"),
        (1.5, ValueError, r"rotations must be an integer >= 0"),
    ],
)
def test_bad_rotations_are_refused_before_anything_is_written(tmp_path, rotations, error, message):
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        demo.run_demo("softmax", epochs=1, rotations=rotations, out=out, progress=False)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# Several seeds pool the rotations; the figure
# ------------------------------------------------------------------------------------------------


def test_several_seeds_pool_every_rotation(tmp_path):
    run = demo.run_demo(["softmax", "arcface"], epochs=1, seeds="2,5", rotations=2, out=tmp_path, progress=False)
    _, rows = read_csv(tmp_path / "openset.csv")
    assert len(rows) == 2 * 2 * 2
    for summary in run.summaries:
        for key in OPEN_KEYS:
            mine = [r for seed in (2, 5) for r in run.runs[seed] if r.loss == summary.loss]
            values = [value for result in mine for value in open_values(result.open_set, key)]
            assert len(values) == 4
            assert summary.open[key].mean == pytest.approx(statistics.mean(values), rel=1e-12)
            assert (summary.open[key].low, summary.open[key].high) == (min(values), max(values))
    _, summary_rows = read_csv(tmp_path / "table.csv")
    assert all(row["open_auc_mean"] != "-" for row in summary_rows)
    header = [cell.strip() for cell in (tmp_path / "table.md").read_text().splitlines()[2].strip("|").split("|")]
    assert "open-set EER (%): mean (min-max)" in header


def fake_open_result(loss, rotations=2, seed=0):
    """A LossResult with an open set of ``rotations`` rotations whose curves are TAR = FAR ** (1 / k)."""
    from torch_port.demo.openset import OpenSetResult
    from torch_port.demo.verification import Verification

    open_set = tuple(
        OpenSetResult((k,), 10, 1.0, 20, Verification(0.5 + 0.1 * k, 0.2, 0.3, 10, 40, FAR_GRID ** (1 / (k + 1))))
        for k in range(rotations)
    )
    entry = demo.DEMO_LOSSES[loss]
    empty = np.zeros((0, 2))
    return demo.LossResult(
        loss, entry.title, entry.describe(), 90.0, 3.0, 30.0, 1.0, empty, np.zeros(0), empty, open_set=open_set
    )


def test_roc_figure_is_one_labelled_panel_on_a_log_axis():
    plt = figures._pyplot()
    results = [fake_open_result("softmax"), fake_open_result("arcface", rotations=1)]
    fig = figures.roc_figure(results, "caption")
    try:
        (ax,) = fig.axes
        assert ax.get_xscale() == "log"
        assert ax.get_xlabel() == figures.ROC_FAR_LABEL and ax.get_ylabel() == figures.ROC_TAR_LABEL
        texts = [text.get_text() for text in fig.legends[0].get_texts()]
        # the legend's AUC is the mean over the rotations: (0.5 + 0.6) / 2 for softmax
        assert texts == ["Softmax (AUC 55.0%)", "ArcFace (AUC 50.0%)", "chance (TAR = FAR)"]
        softmax_line = ax.get_lines()[0]
        # vertical averaging: the mean of the two rotations' TAR at each FAR
        np.testing.assert_allclose(softmax_line.get_ydata(), (FAR_GRID + FAR_GRID**0.5) / 2, rtol=1e-12)
        np.testing.assert_array_equal(softmax_line.get_xdata(), FAR_GRID)
    finally:
        plt.close(fig)


def test_committed_open_set_summary_is_the_mean_and_range_of_the_committed_rotations():
    """docs/demo/table.csv's open-set columns against docs/demo/openset.csv (two decimals there, one here)."""
    docs = Path(__file__).resolve().parent.parent / "docs" / "demo"
    _, summary = read_csv(docs / "table.csv")
    _, rotations = read_csv(docs / "openset.csv")
    assert [row["loss"] for row in summary] == list(demo.LOSS_TITLES.values())
    for row in summary:
        mine = [r for r in rotations if r["loss"] == row["loss"]]
        assert sorted({r["seed"] for r in mine}) == sorted(str(seed) for seed in demo.parse_seeds(row["seeds"]))
        for key, column in zip(OPEN_KEYS, ("auc", "tar_at_far", "eer")):
            values = [float(r[column]) for r in mine]
            assert abs(float(row[f"{key}_min"]) - min(values)) <= 0.05 + 1e-9, (row["loss"], key)
            assert abs(float(row[f"{key}_max"]) - max(values)) <= 0.05 + 1e-9, (row["loss"], key)
            assert abs(float(row[f"{key}_mean"]) - statistics.mean(values)) <= 0.055 + 1e-9, (row["loss"], key)
