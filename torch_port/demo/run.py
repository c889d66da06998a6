"""A whole demo run: check the arguments, train every chosen loss, write the figures and the table."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from softmax_common.checks import check_positive_int
from torch_port.demo.data import load_digits, load_mnist_idx
from torch_port.demo.extras import require_all
from torch_port.demo.figures import save_grid, save_loss_figure
from torch_port.demo.report import markdown_table, training_note, write_csv
from torch_port.demo.settings import DEFAULT_EPOCHS, DEMO_LOSSES, LOSSES, NUM_THREADS
from torch_port.demo.training import LossResult, train_one


def _check_losses(losses: Sequence[str] | str | None) -> list[str]:
    """The names to train, in the order given and without repeats; "all" stands for every loss."""
    if losses is None:
        return list(LOSSES)
    if isinstance(losses, str):
        losses = [losses]
    chosen: list[str] = []
    for name in losses:
        if name == "all":
            chosen.extend(LOSSES)
        elif name in DEMO_LOSSES:
            chosen.append(name)
        else:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)} (or 'all'), got {name!r}")
    if not chosen:
        raise ValueError("loss: choose at least one loss")
    return list(dict.fromkeys(chosen))  # drop repeats, keep the order given


def check_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here ("auto": CUDA when present, else the CPU); ValueError otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        expected = "'auto' or a torch device such as 'cpu' or 'cuda'"
        raise ValueError(f"device must be {expected}, got {device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but MPS (Apple GPU) is not available here")
    if device.type == "meta":
        raise ValueError("device 'meta' holds no data: training needs a real device such as 'cpu' or 'cuda'")
    if device.type != "cpu":
        try:  # any other backend, or an index past the devices present
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as error:
            raise ValueError(f"device {str(device)!r} cannot be used here: {error}") from error
    return device


@dataclass(frozen=True)
class DemoRun:
    """What :func:`run_demo` produced: the per-loss results, the Markdown table and the paths written."""

    results: list[LossResult]
    table_markdown: str
    files: dict[str, Path]


def run_demo(
    losses: Sequence[str] | str | None = None,
    *,
    epochs: int = DEFAULT_EPOCHS,
    dim: int = 2,
    seed: int = 0,
    device: str | torch.device = "auto",
    out: str | os.PathLike = "demo-out",
    data: str | os.PathLike | None = None,
    progress: bool = True,
) -> DemoRun:
    """Train with each loss, write the figures and the table into ``out``, and return them.

    Args:
        losses: names from :data:`LOSSES` (or "all"); None trains every loss.
        epochs: passes over the training split (>= 1). dim: the embedding's dimension, 2 or 3.
        seed: seeds the split, the initialisation and the batch order (>= 0). device: a torch device,
        or "auto" (CUDA when present, else the CPU).
        out: the output directory (created). data: a directory of MNIST IDX files, or None for the
        digits that ship with scikit-learn. progress: a progress bar per loss on a terminal; when
        stderr is not one (a log, a pipe), one line per loss instead.

    Deterministic on the CPU for a given seed: all but the training-time column repeat bitwise.
    Arguments are all checked before anything is loaded, trained or written.

    Returns:
        :class:`DemoRun`: the per-loss results, the Markdown table, and the paths written.
    """
    # every argument is checked before anything is loaded, trained or written
    chosen = _check_losses(losses)
    epochs = check_positive_int(epochs, "epochs")
    if isinstance(dim, bool) or dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3 (the figures draw a circle or a sphere), got {dim!r}")
    seed = check_positive_int(seed, "seed", minimum=0)
    device = check_device(device)
    require_all()
    out = Path(out)

    dataset = load_digits(seed) if data is None else load_mnist_idx(data, seed)
    dataset = dataset.to(device)
    out.mkdir(parents=True, exist_ok=True)

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(NUM_THREADS)
    # warn_only: on CUDA a few kernels have no deterministic version; the CPU path has them all
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        results = [
            train_one(name, dataset, dim=dim, epochs=epochs, seed=seed, device=device, progress=progress)
            for name in chosen
        ]
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)

    files: dict[str, Path] = {}
    for result in results:
        files[result.loss] = out / f"{result.loss}.png"
        save_loss_figure(result, files[result.loss], dim)
    caption = (
        f"{dataset.name}: {dataset.train_x.shape[0]} training / {dataset.test_x.shape[0]} held-out images, "
        f"{dim}-D embedding, {epochs} epochs, seed {seed}; held-out features"
    )
    files["grid"] = out / "grid.png"
    save_grid(results, files["grid"], dim, caption)
    table = markdown_table(results)
    files["table.md"] = out / "table.md"
    files["table.md"].write_text(f"{caption}.\n\n{table}\n{training_note()}\n", encoding="utf-8")
    files["table.csv"] = out / "table.csv"
    write_csv(results, files["table.csv"])
    return DemoRun(results, table, files)
