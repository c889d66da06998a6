"""The demo's table: its columns, as Markdown and as CSV, and the note on how every loss was trained.

One seed: one row per loss with that run's numbers (:data:`TABLE_COLUMNS`). Several seeds: one row
per loss with each metric's mean and range over the seeds (:data:`SUMMARY_COLUMNS`), and the
per-seed rows beside it (:data:`RUN_COLUMNS`). Every open-set rotation's numbers: :data:`OPEN_SET_COLUMNS`.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch_port.demo.openset import OPEN_METRICS
from torch_port.demo.seeds import METRICS, LossSummary
from torch_port.demo.settings import BATCH_SIZE, HIDDEN_SIZES, LEARNING_RATE, NUM_THREADS, WEIGHT_DECAY
from torch_port.demo.training import LossResult

# (key, title): the key is the CSV header and LossResult.row()'s key, the title the Markdown header
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"),
    ("settings", "settings"),
    ("accuracy", "held-out accuracy (%)"),
    ("intra_class_angle_deg", "mean intra-class angle (deg)"),
    ("min_center_angle_deg", "min angle between class centres (deg)"),
    *((key, title) for key, title, _ in OPEN_METRICS),
    ("train_time_s", "training time (s)"),
)
_TITLES = dict(TABLE_COLUMNS)
OPEN: tuple[str, ...] = tuple(key for key, _, _ in OPEN_METRICS)

# several seeds, as CSV: LossSummary.row()'s keys
SUMMARY_COLUMNS: tuple[str, ...] = (
    "loss",
    "settings",
    "seeds",
    *(f"{metric}_{part}" for metric in (*METRICS, *OPEN) for part in ("mean", "min", "max")),
    "train_time_s_mean",
)
# several seeds, one row per seed and loss: runs.csv
RUN_COLUMNS: tuple[str, ...] = ("seed", *(key for key, _ in TABLE_COLUMNS))
# one row per seed, loss and open-set rotation: openset.csv (OpenSetResult.row()'s keys after these)
OPEN_SET_COLUMNS: tuple[str, ...] = (
    "seed", "loss", "held_out", "images", "genuine_pairs", "impostor_pairs", "auc", "tar_at_far", "eer", "epochs",
    "train_time_s",
)  # fmt: skip


def training_note() -> str:
    """How every loss was trained, in one sentence, for the Markdown table."""
    layers = "-".join(str(n) for n in HIDDEN_SIZES)
    return (
        f"With a seed, each loss trains the same network (an MLP with hidden layers {layers} and ReLU, linear "
        f"output) from the same initialisation: AdamW, learning rate {LEARNING_RATE:g} on a one-cycle schedule, "
        f"weight decay {WEIGHT_DECAY:g} on the network (none on the head), batches of {BATCH_SIZE}, "
        f"{NUM_THREADS} CPU thread(s). Accuracy is the argmax of the margin-free logits; angles are those "
        "of the held-out features to their class's mean direction, and between class mean directions; "
        "t in a schedule counts training steps. The open-set columns train the same network on all classes but "
        "those a rotation holds out, for at least as many steps, and verify every pair of the held-out classes' "
        "images by the cosine of their features (TAR at a FAR and the EER read linearly between the ROC curve's "
        "points); a cell over several rotations (and seeds) is the mean (min-max) of them all. "
        "On one machine a seed repeats its numbers (all but the times); "
        "another CPU's kernels give other low bits, which training amplifies into other single-run numbers."
    )


def _pipe_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown pipe table; the first two columns (loss, settings) left-aligned, the numbers right."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_table(results: Sequence[LossResult]) -> str:
    """The results as a Markdown pipe table, one row per loss, columns as :data:`TABLE_COLUMNS`."""
    header = [title for _, title in TABLE_COLUMNS]
    return _pipe_table(header, [[result.row()[key] for key, _ in TABLE_COLUMNS] for result in results])


def summary_markdown_table(summaries: Sequence[LossSummary]) -> str:
    """Several seeds as a Markdown pipe table: per loss, each metric as ``mean (min-max)`` over the seeds (the
    open-set ones over every rotation of every seed)."""
    header = [
        "loss",
        "settings",
        *(f"{_TITLES[metric]}: mean (min-max)" for metric in (*METRICS, *OPEN)),
        "training time per seed (s), mean",
    ]
    rows = [
        [
            s.title,
            s.settings,
            *(getattr(s, metric).cell() for metric in METRICS),
            *(s.open[key].cell() if key in s.open else "-" for key in OPEN),
            f"{s.train_time_s:.1f}",
        ]
        for s in summaries
    ]
    return _pipe_table(header, rows)


def _write(path: Path, fieldnames: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)


def write_csv(results: Sequence[LossResult], path: Path) -> None:
    """The same rows as :func:`markdown_table`, as CSV with the short column names as header."""
    _write(path, [key for key, _ in TABLE_COLUMNS], [result.row() for result in results])


def write_summary_csv(summaries: Sequence[LossSummary], path: Path) -> None:
    """Several seeds as CSV: per loss, ``<metric>_mean``, ``_min`` and ``_max`` (:data:`SUMMARY_COLUMNS`)."""
    _write(path, SUMMARY_COLUMNS, [summary.row() for summary in summaries])


def write_runs_csv(runs: Mapping[int, Sequence[LossResult]], path: Path) -> None:
    """Every seed's own rows (:data:`RUN_COLUMNS`): the runs the summary is the mean and range of."""
    rows = [{"seed": str(seed), **result.row()} for seed, results in runs.items() for result in results]
    _write(path, RUN_COLUMNS, rows)


def write_open_set_csv(runs: Mapping[int, Sequence[LossResult]], path: Path) -> None:
    """Every open-set rotation's own row (:data:`OPEN_SET_COLUMNS`), for every seed and loss."""
    rows = [
        {"seed": str(seed), "loss": result.title, **rotation.row()}
        for seed, results in runs.items()
        for result in results
        for rotation in result.open_set
    ]
    _write(path, OPEN_SET_COLUMNS, rows)
