"""The demo's table: its columns, as Markdown and as CSV, and the note on how every loss was trained."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from torch_port.demo.settings import BATCH_SIZE, HIDDEN_SIZES, LEARNING_RATE, NUM_THREADS, WEIGHT_DECAY
from torch_port.demo.training import LossResult

# (key, title): the key is the CSV header and LossResult.row()'s key, the title the Markdown header
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"),
    ("settings", "settings"),
    ("accuracy", "held-out accuracy (%)"),
    ("intra_class_angle_deg", "mean intra-class angle (deg)"),
    ("min_center_angle_deg", "min angle between class centres (deg)"),
    ("train_time_s", "training time (s)"),
)


def training_note() -> str:
    """How every loss was trained, in one sentence, for the Markdown table."""
    layers = "-".join(str(n) for n in HIDDEN_SIZES)
    return (
        f"Each loss trains the same network (an MLP with hidden layers {layers} and ReLU, linear output) "
        f"from the same initialisation: AdamW, learning rate {LEARNING_RATE:g} on a one-cycle schedule, "
        f"weight decay {WEIGHT_DECAY:g} on the network (none on the head), batches of {BATCH_SIZE}, "
        f"{NUM_THREADS} CPU thread(s). Accuracy is the argmax of the margin-free logits; angles are those "
        "of the held-out features to their class's mean direction, and between class mean directions; "
        "t in a schedule counts training steps."
    )


def markdown_table(results: Sequence[LossResult]) -> str:
    """The results as a Markdown pipe table, one row per loss, columns as :data:`TABLE_COLUMNS`."""
    header = [title for _, title in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for result in results:
        row = result.row()
        lines.append("| " + " | ".join(row[key] for key, _ in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_csv(results: Sequence[LossResult], path: Path) -> None:
    """The same rows as :func:`markdown_table`, as CSV with the short column names as header."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[key for key, _ in TABLE_COLUMNS])
        writer.writeheader()
        for result in results:
            writer.writerow(result.row())
