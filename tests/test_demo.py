"""The training demo (torch_port/demo/, python -m torch_port demo): a smoke run, not a timed test.

One loss, one epoch: the files are written and the table is well formed; two runs with one seed give
the same table; the metrics agree with closed forms; the IDX reader reads back files written here
byte by byte; bad options are refused with a clear message before anything is written. Every entry
of the loss table builds a head that trains and carries its settings; the package keeps the names the
single module had, and its modules import neither each other's private names nor each other in a cycle.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import inspect
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_port import demo
from torch_port.__main__ import main
from torch_port.demo import cli as demo_cli
from torch_port.demo import run as demo_run

COLUMNS = [key for key, _ in demo.TABLE_COLUMNS]
TITLES = [title for _, title in demo.TABLE_COLUMNS]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def read_markdown_table(path):
    """The header and rows of the one pipe table in a Markdown file."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, rule, rows = cells[0], cells[1], cells[2:]
    assert all(set(cell) <= set("-:") and "-" in cell for cell in rule), rule
    return header, rows


def check_row(row: dict[str, str]) -> None:
    assert 0.0 <= float(row["accuracy"]) <= 100.0
    for key in ("open_auc", "open_tar", "open_eer"):  # one rotation by default: one number
        assert 0.0 <= float(row[key]) <= 100.0
    assert 0.0 <= float(row["intra_class_angle_deg"]) <= 180.0
    assert 0.0 <= float(row["min_center_angle_deg"]) <= 180.0
    assert float(row["train_time_s"]) >= 0.0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One loss for one epoch through the command line, as a user would run it."""
    out = tmp_path_factory.mktemp("demo")
    args = ["demo", "--loss", "arcface", "--epochs", "1", "--seed", "3", "--out", str(out), "--no-progress"]
    return out, main(args)


def test_smoke_run_writes_figures_and_tables(smoke_run):
    out, status = smoke_run
    assert status == 0
    for name in ("arcface.png", "grid.png", "roc.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name

    fields, rows = read_csv(out / "table.csv")
    assert fields == COLUMNS
    assert len(rows) == 1
    assert rows[0]["loss"] == "ArcFace"
    assert rows[0]["settings"] == demo.describe_settings("arcface")
    check_row(rows[0])

    header, md_rows = read_markdown_table(out / "table.md")
    assert header == TITLES
    assert md_rows == [[rows[0][key] for key in COLUMNS]]


def test_smoke_run_prints_the_table(tmp_path, capsys):
    status = main(["demo", "--loss", "softmax", "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    assert status == 0
    printed = capsys.readouterr().out
    table_lines = [line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("|")]
    assert "\n".join(table_lines) in printed


def test_same_seed_same_table(smoke_run, tmp_path):
    out, _ = smoke_run
    demo.run_demo("arcface", epochs=1, seed=3, out=tmp_path, progress=False)
    _, first = read_csv(out / "table.csv")
    _, second = read_csv(tmp_path / "table.csv")
    drop_time = [{k: v for k, v in row.items() if k != "train_time_s"} for row in first + second]
    assert drop_time[0] == drop_time[1]


def test_same_seed_same_features_other_seed_differs():
    """Bitwise repeatable for one seed (what makes the table repeatable), and the seed matters."""
    data = demo.load_digits(seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(demo.NUM_THREADS)
    try:
        runs = [
            demo.train_one("center", data, dim=2, epochs=1, seed=seed, device=torch.device("cpu"), progress=False)
            for seed in (0, 0, 1)
        ]
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(runs[0].features, runs[1].features)
    assert not np.array_equal(runs[0].features, runs[2].features)


def test_three_dimensional_run(tmp_path):
    run = demo.run_demo(["sphereface"], epochs=1, dim=3, out=tmp_path, progress=False)
    assert run.results[0].features.shape == (run.results[0].labels.shape[0], 3)
    assert (tmp_path / "sphereface.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "grid.png").read_bytes()[:8] == PNG_MAGIC


def test_digits_split_is_stratified_and_disjoint():
    data = demo.load_digits(seed=0)
    assert data.num_classes == 10
    assert data.train_x.shape[0] + data.test_x.shape[0] == 1797
    assert data.train_x.shape[1] == 64 and 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0
    # stratified: each class's share of the held-out set is within one image of its share overall
    overall = np.bincount(np.concatenate([data.train_y.numpy(), data.test_y.numpy()]), minlength=10)
    held_out = np.bincount(data.test_y.numpy(), minlength=10)
    assert np.all(np.abs(held_out - overall * data.test_x.shape[0] / 1797) <= 1.0)


# ------------------------------------------------------------------------------------------------
# Metrics against closed forms
# ------------------------------------------------------------------------------------------------


def at_angles(degrees, radii=None):
    radians = np.radians(np.asarray(degrees, dtype=np.float64))
    radii = np.ones_like(radians) if radii is None else np.asarray(radii, dtype=np.float64)
    return np.stack([radii * np.cos(radians), radii * np.sin(radians)], axis=1)


def test_class_geometry_closed_form():
    # class 0 straddles 0 deg, class 1 straddles 90 deg, class 2 straddles 180 deg, symmetric about each,
    # so the mean directions are exactly 0, 90 and 180 deg; norms differ on purpose (they must not count)
    features = at_angles([10, -10, 80, 100, 176, 184], radii=[1, 7, 0.1, 3, 2, 2])
    labels = np.array([0, 0, 1, 1, 2, 2])
    geometry = demo.class_geometry(features, labels)
    assert geometry.intra_class_angle_deg == pytest.approx((10 + 10 + 10 + 10 + 4 + 4) / 6, rel=1e-12)
    assert geometry.min_center_angle_deg == pytest.approx(90.0, rel=1e-12)
    np.testing.assert_allclose(geometry.centers, at_angles([0, 90, 180]), atol=1e-12)


def test_angle_is_accurate_for_nearly_parallel_vectors():
    tiny = 1e-7  # degrees: arccos of the dot product would give exactly 0 here in float64
    assert demo.angle_degrees(at_angles([0.0]), at_angles([tiny]))[0] == pytest.approx(tiny, rel=1e-6)
    assert demo.angle_degrees(at_angles([0.0]), at_angles([180.0]))[0] == pytest.approx(180.0, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# The IDX reader, on files written here byte by byte
# ------------------------------------------------------------------------------------------------


def write_idx(path, array: np.ndarray, type_code: int, big_endian_dtype: str, compress=False) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    payload = header + array.astype(big_endian_dtype).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def tiny_mnist(rng, count, classes=10, side=4):
    labels = np.arange(count) % classes
    images = rng.integers(0, 256, size=(count, side, side), dtype=np.uint8)
    images[:, 0, 0] = labels * 25  # a pixel that tells the classes apart, so a split is learnable
    return images, labels.astype(np.uint8)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    images, labels = tiny_mnist(rng, 12)
    write_idx(tmp_path / "images", images, 0x08, ">u1", compress)
    write_idx(tmp_path / "labels", labels, 0x08, ">u1", compress)
    floats = rng.standard_normal((3, 5)).astype(np.float32)
    write_idx(tmp_path / "floats", floats, 0x0D, ">f4", compress)
    np.testing.assert_array_equal(demo.read_idx(tmp_path / "images"), images)
    np.testing.assert_array_equal(demo.read_idx(tmp_path / "labels"), labels)
    np.testing.assert_array_equal(demo.read_idx(tmp_path / "floats"), floats)


def test_read_idx_refuses_bad_files(tmp_path):
    (tmp_path / "text").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="is not an IDX file"):
        demo.read_idx(tmp_path / "text")
    write_idx(tmp_path / "short", np.zeros((4, 3), dtype=np.uint8), 0x08, ">u1")
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        demo.read_idx(tmp_path / "short")


def test_mnist_directory_splits(tmp_path):
    rng = np.random.default_rng(1)
    train_images, train_labels = tiny_mnist(rng, 40)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_images, 0x08, ">u1", compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_labels, 0x08, ">u1", compress=True)
    # only the training pair: a stratified quarter is held out
    data = demo.load_mnist_idx(tmp_path, seed=0)
    assert (data.train_x.shape, data.test_x.shape, data.num_classes) == ((30, 16), (10, 16), 10)
    assert sorted(data.test_y.tolist()) == list(range(10))
    assert float(data.train_x.max()) <= 1.0
    # with the t10k pair, that is the held-out set
    test_images, test_labels = tiny_mnist(rng, 20)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images, 0x08, ">u1")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_labels, 0x08, ">u1")
    data = demo.load_mnist_idx(tmp_path, seed=0)
    assert (data.train_x.shape[0], data.test_x.shape[0]) == (40, 20)
    np.testing.assert_allclose(data.test_x.numpy(), test_images.reshape(20, 16) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.test_y.numpy(), test_labels)


def test_run_on_idx_data(tmp_path):
    rng = np.random.default_rng(2)
    images, labels = tiny_mnist(rng, 40)
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    write_idx(data_dir / "train-images-idx3-ubyte", images, 0x08, ">u1")
    write_idx(data_dir / "train-labels-idx1-ubyte", labels, 0x08, ">u1")
    out = tmp_path / "out"
    status = main(
        ["demo", "--loss", "cosface", "--epochs", "1", "--data", str(data_dir), "--out", str(out), "--no-progress"]
    )
    assert status == 0
    fields, rows = read_csv(out / "table.csv")
    assert fields == COLUMNS and [row["loss"] for row in rows] == ["CosFace"]
    check_row(rows[0])


# ------------------------------------------------------------------------------------------------
# Bad options: a clear message, and nothing written
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loss", "bogus"], "argument --loss: invalid choice: 'bogus'"),
        (["--dim", "4"], "argument --dim: invalid choice: 4"),
        (["--epochs", "two"], "argument --epochs: invalid int value"),
    ],
)
def test_command_line_refuses_bad_options(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args, "--out", str(out)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"losses": ["softmax", "bogus"]}, ValueError, r"loss must be one of softmax, normface, .* got 'bogus'"),
        ({"losses": []}, ValueError, "choose at least one loss"),
        ({"dim": 4}, ValueError, r"dim must be 2 or 3"),
        ({"dim": 1}, ValueError, r"dim must be 2 or 3"),
        ({"epochs": 0}, ValueError, r"epochs must be an integer >= 1"),
        ({"seed": -1}, ValueError, r"seed must be an integer >= 0"),
        ({"epochs": 1.5}, ValueError, r"epochs must be an integer >= 1"),
        ({"device": "no-such-device"}, ValueError, r"device must be 'auto' or a torch device"),
        ({"device": "meta"}, ValueError, r"device 'meta' holds no data"),
        ({"data": "/no/such/directory"}, ValueError, r"data must be a directory"),
    ],
)
def test_run_demo_refuses_bad_arguments(tmp_path, kwargs, error, message):
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        demo.run_demo(**{"epochs": 1, "progress": False, "out": out, **kwargs})
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is absent")
def test_cuda_asked_for_without_cuda(tmp_path, capsys):
    assert main(["demo", "--loss", "softmax", "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the message given where MPS is absent")
def test_mps_asked_for_without_mps(tmp_path, capsys):
    """A clean message (exit status 2), not a traceback from the first tensor moved there."""
    assert main(["demo", "--loss", "softmax", "--device", "mps", "--out", str(tmp_path / "out")]) == 2
    assert "MPS (Apple GPU) is not available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_device_auto_is_the_default_and_picks_cuda_when_present():
    parser = argparse.ArgumentParser()
    demo_cli.add_arguments(parser)
    assert parser.parse_args([]).device == "auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert inspect.signature(demo.run_demo).parameters["device"].default == "auto"
    assert demo_run.check_device("auto").type == expected


def test_progress_off_a_terminal_is_one_line_per_loss(tmp_path, capsys):
    """Under pytest stderr is captured (not a terminal): no bar frames, one line for each loss."""
    demo.run_demo(["softmax", "arcface"], epochs=2, out=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    pattern = r"\s*Softmax: 2 epochs, loss \d+\.\d{3}, \d+\.\d s; open set: 1 rotation, \d+\.\d s"
    assert re.fullmatch(pattern, lines[0]), lines[0]


def test_every_loss_has_settings_a_title_and_a_head():
    assert set(demo.DEMO_SETTINGS) == set(demo.LOSS_TITLES) == set(demo.HEAD_BUILDERS) == set(demo.LOSSES)
    for loss in demo.LOSSES:
        head = demo.build_head(loss, num_classes=10, dim=2)
        x, y = torch.randn(5, 2), torch.arange(5)
        assert torch.isfinite(head(x, y))
        assert head.logits(x).shape == (5, 10)
        rows, width = head.weight.shape  # sub-centres: k rows per class
        assert rows % 10 == 0 and width == 2


# ------------------------------------------------------------------------------------------------
# The loss table: one entry per loss, and the views under the old names
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", demo.LOSSES)
def test_table_entry_builds_a_head_that_trains(loss):
    """A scalar, finite loss whose gradient reaches the features and the head's parameters."""
    torch.manual_seed(0)
    head = demo.DEMO_LOSSES[loss].build(num_classes=10, dim=2)
    x = torch.randn(8, 2, requires_grad=True)
    y = torch.arange(8) % 10
    value = head(x, y)
    assert value.shape == () and torch.isfinite(value)
    value.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    # the old route (a builder called with the settings dict) builds the same kind of head
    assert type(demo.HEAD_BUILDERS[loss](10, 2, **demo.DEMO_SETTINGS[loss])) is type(head)


@pytest.mark.parametrize("loss", demo.LOSSES)
def test_table_settings_reach_the_head(loss):
    head = demo.build_head(loss, num_classes=10, dim=2)
    for name, value in demo.DEMO_SETTINGS[loss].items():
        if name == "schedule":
            for field, expected in value.items():
                assert getattr(head.schedule, field) == expected, (name, field)
        else:
            owner = head if hasattr(head, name) else head.center
            assert getattr(owner, name) == value, name


def test_settings_lines():
    assert demo.describe_settings("softmax") == "-"
    assert demo.describe_settings("cosface") == "s=16, m=0.2"
    assert demo.describe_settings("center") == "alpha=0.5, loss_weight=0.05"
    assert demo.describe_settings("sphereface") == "m=4, lambda=max(5, 1000(1+0.12t)^-1)"
    assert demo.describe_settings("lsoftmax") == "m=4, beta=max(0, 1000(1+0.00015t)^-35)"


def test_old_names_are_views_of_the_table():
    table = demo.DEMO_LOSSES
    assert demo.LOSSES == tuple(table) == tuple(entry.name for entry in table.values())
    assert list(demo.DEMO_SETTINGS) == list(demo.LOSS_TITLES) == list(demo.HEAD_BUILDERS) == list(demo.LOSSES)
    for name, entry in table.items():
        assert demo.DEMO_SETTINGS[name] is entry.settings  # the same dict, so the two cannot drift apart
        assert demo.LOSS_TITLES[name] == entry.title
        assert isinstance(demo.DEMO_SETTINGS[name], dict)


def test_loss_table_refuses_a_repeated_name():
    from torch_port.demo.settings import index_losses

    entry = demo.DEMO_LOSSES["softmax"]
    with pytest.raises(ValueError, match="'softmax' twice"):
        index_losses((entry, demo.DEMO_LOSSES["cosface"], entry))


# ------------------------------------------------------------------------------------------------
# The package: the old module's names, lazy optional imports, and its modules' imports
# ------------------------------------------------------------------------------------------------

# every public name torch_port/demo.py had before it became a package
OLD_MODULE_NAMES = """
    DEMO_SETTINGS LOSS_TITLES LOSSES HEAD_BUILDERS DEFAULT_EPOCHS BATCH_SIZE LEARNING_RATE WEIGHT_DECAY
    HIDDEN_SIZES HELD_OUT_FRACTION NUM_THREADS TABLE_COLUMNS DemoData load_digits read_idx load_mnist_idx
    EmbeddingNet SoftmaxHead SoftmaxCenterHead build_head describe_settings angle_degrees Geometry
    class_geometry LossResult train_one save_loss_figure save_grid training_note markdown_table write_csv
    DemoRun run_demo add_arguments run_from_args
""".split()

DEMO_DIR = Path(demo.__file__).parent


def test_package_keeps_the_old_module_names():
    missing = [name for name in OLD_MODULE_NAMES if not hasattr(demo, name)]
    assert not missing
    assert set(OLD_MODULE_NAMES) <= set(demo.__all__)
    assert all(hasattr(demo, name) for name in demo.__all__)


def test_import_loads_no_optional_dependency_and_no_reference():
    """The parser needs the package; the demo extra is imported only when a run starts."""
    unwanted = ("sklearn", "matplotlib", "refimpl", "autograd")
    code = f"import sys, torch_port.demo\nprint([m for m in sys.modules if m.split('.')[0] in {unwanted!r}])"
    root = DEMO_DIR.parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert done.stdout.strip() == "[]"
