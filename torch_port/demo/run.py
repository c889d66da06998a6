"""A whole demo run: check the arguments, train every chosen loss for every seed, write the figures and the table."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from softmax_common.checks import check_positive_int
from torch_port.demo.data import DemoData, load_digits, load_mnist_idx
from torch_port.demo.extras import require_all
from torch_port.demo.figures import save_grid, save_loss_figure, save_roc_figure
from torch_port.demo.openset import rotation_groups
from torch_port.demo.report import (
    markdown_table,
    summary_markdown_table,
    training_note,
    write_csv,
    write_open_set_csv,
    write_runs_csv,
    write_summary_csv,
)
from torch_port.demo.seeds import LossSummary, check_seeds, format_seeds, summarize
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


def _check_seed_choice(seed: int | None, seeds: str | int | Sequence[int] | None) -> tuple[int, ...]:
    """The seeds to run: ``seeds`` when given, else ``(seed,)`` (seed 0 when neither is)."""
    if seeds is None:
        return (check_positive_int(0 if seed is None else seed, "seed", minimum=0),)
    if seed is not None:
        raise ValueError(f"give seed or seeds, not both (got seed={seed!r} and seeds={seeds!r})")
    return check_seeds(seeds)


def _check_rotations(rotations: int | str) -> int | None:
    """How many open-set rotations to run: an integer >= 0, or None for "all" (every class held out once)."""
    if rotations == "all":
        return None
    if isinstance(rotations, str):
        raise ValueError(f"rotations must be an integer >= 0 or 'all', got {rotations!r}")
    return check_positive_int(rotations, "rotations", minimum=0)


def _open_set_groups(num_classes: int, seed: int, count: int | None) -> tuple[tuple[int, ...], ...]:
    """The first ``count`` rotations' held-out classes (all for None, none for 0)."""
    if count == 0:
        return ()
    if num_classes < 4:
        raise ValueError(
            f"rotations: the open set needs at least 4 classes (2 held out, 2 to train on), the data have "
            f"{num_classes}; use rotations=0 (--rotations 0) for none"
        )
    groups = rotation_groups(num_classes, seed)
    if count is not None and count > len(groups):
        raise ValueError(
            f"rotations must be at most {len(groups)} with {num_classes} classes (each class is held out once), "
            f"got {count}"
        )
    return groups if count is None else groups[:count]


def _describe_groups(groups: Sequence[tuple[int, ...]]) -> str:
    """E.g. ``trained without classes 2, 4, 6``, or ``4 rotations, trained without classes 2 4 6 | 3 5 7 | ...``."""
    if len(groups) == 1:
        return f"trained without classes {', '.join(map(str, groups[0]))}"
    return f"{len(groups)} rotations, trained without classes {' | '.join(' '.join(map(str, g)) for g in groups)}"


@contextmanager
def _repeatable_torch() -> Iterator[None]:
    """One intra-op thread and deterministic kernels inside; the caller's settings restored after."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(NUM_THREADS)
    # warn_only: on CUDA a few kernels have no deterministic version; the CPU path has them all
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@dataclass(frozen=True)
class DemoRun:
    """What :func:`run_demo` produced.

    ``results`` are the first seed's (the figures'), ``runs`` every seed's (seed -> results, in the
    order run), ``summaries`` each loss's mean and range over the seeds (empty for one seed), and
    ``table_markdown`` the table printed and written: the one seed's rows, or the summaries.
    """

    results: list[LossResult]
    table_markdown: str
    files: dict[str, Path]
    seeds: tuple[int, ...] = (0,)
    runs: dict[int, list[LossResult]] = field(default_factory=dict)
    summaries: list[LossSummary] = field(default_factory=list)


def run_demo(
    losses: Sequence[str] | str | None = None,
    *,
    epochs: int = DEFAULT_EPOCHS,
    dim: int = 2,
    seed: int | None = None,
    seeds: str | int | Sequence[int] | None = None,
    device: str | torch.device = "auto",
    out: str | os.PathLike = "demo-out",
    data: str | os.PathLike | None = None,
    progress: bool = True,
    rotations: int | str = 1,
) -> DemoRun:
    """Train with each loss (once per seed), write the figures and the table into ``out``, and return them.

    Args:
        losses: names from :data:`LOSSES` (or "all"); None trains every loss.
        epochs: passes over the training split (>= 1). dim: the embedding's dimension, 2 or 3.
        seed: one seed for the split, the initialisation and the batch order (>= 0; default 0).
        seeds: several seeds instead (not with ``seed``): a ``--seeds`` string such as "0-4" or
        "0,2,5", or a sequence of distinct integers >= 0. Each seed is a whole run (its own split,
        initialisation and batches); with more than one, the table gives each metric's mean and range
        (min-max) over the seeds, ``runs.csv`` every seed's rows, and the figures show the first seed.
        device: a torch device, or "auto" (CUDA when present, else the CPU).
        out: the output directory (created). data: a directory of MNIST IDX files, or None for the
        digits that ship with scikit-learn. progress: a progress bar per loss on a terminal; when
        stderr is not one (a log, a pipe), one line per loss instead.
        rotations: the open set (:mod:`~torch_port.demo.openset`): how many rotations of held-out
        classes each loss is also trained and verified on, each a whole training without those
        classes; "all" for every rotation (each class held out once: four with ten classes), 0 for
        none. ROC curves go to ``roc.png``, every rotation's numbers to ``openset.csv``.

    Deterministic on the CPU for a given seed on one machine: all but the training-time column
    repeat bitwise, and a seed's rows are the same alone or among other seeds. Another CPU's
    kernels may give other numbers. Arguments are all checked before anything is loaded, trained
    or written.

    Returns:
        :class:`DemoRun`: the results, the Markdown table, and the paths written.
    """
    # every argument is checked before anything is loaded, trained or written
    chosen = _check_losses(losses)
    epochs = check_positive_int(epochs, "epochs")
    if isinstance(dim, bool) or dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3 (the figures draw a circle or a sphere), got {dim!r}")
    seeds = _check_seed_choice(seed, seeds)
    rotation_count = _check_rotations(rotations)
    device = check_device(device)
    require_all()
    out = Path(out)

    def load(seed: int) -> DemoData:
        return (load_digits(seed) if data is None else load_mnist_idx(data, seed)).to(device)

    first = load(seeds[0])  # a bad --data fails here, before anything is written
    # and so do too many rotations
    groups = {each: _open_set_groups(first.num_classes, each, rotation_count) for each in seeds}
    out.mkdir(parents=True, exist_ok=True)
    several = len(seeds) > 1
    runs: dict[int, list[LossResult]] = {}
    with _repeatable_torch():
        for index, each in enumerate(seeds):
            dataset = first if index == 0 else load(each)
            if several and progress:
                print(f"seed {each} ({index + 1} of {len(seeds)})", file=sys.stderr, flush=True)
            runs[each] = [
                train_one(
                    name, dataset, dim=dim, epochs=epochs, seed=each, device=device, progress=progress,
                    rotations=groups[each],
                )
                for name in chosen
            ]
    results = runs[seeds[0]]

    files: dict[str, Path] = {}
    for result in results:
        files[result.loss] = out / f"{result.loss}.png"
        save_loss_figure(result, files[result.loss], dim)
    setup = (
        f"{first.name}: {first.train_x.shape[0]} training / {first.test_x.shape[0]} held-out images, "
        f"{dim}-D embedding, {epochs} epochs"
    )
    if several:
        figure_caption = f"{setup}; seed {seeds[0]} (the first of seeds {format_seeds(seeds)}); held-out features"
        table_caption = (
            f"{setup}; seeds {format_seeds(seeds)} ({len(seeds)} runs per loss): each metric's mean and "
            f"range (min-max) over the seeds, every run's rows in runs.csv; the figures show seed {seeds[0]}"
        )
    else:
        figure_caption = table_caption = f"{setup}, seed {seeds[0]}; held-out features"
    files["grid"] = out / "grid.png"
    save_grid(results, files["grid"], dim, figure_caption)
    if groups[seeds[0]]:
        table_caption += (
            f"; open set: {len(groups[seeds[0]])} rotation(s) per seed, held-out classes in openset.csv"
            if several
            else f"; open set: {_describe_groups(groups[seeds[0]])}"
        )
        files["roc.png"] = out / "roc.png"
        roc_caption = (
            f"{first.name}, seed {seeds[0]}: open-set verification by cosine similarity "
            f"({_describe_groups(groups[seeds[0]])}"
            + (")" if len(groups[seeds[0]]) == 1 else "; TAR averaged over the rotations at each FAR)")
        )
        save_roc_figure(results, files["roc.png"], roc_caption)

    summaries = summarize(runs) if several else []
    table = summary_markdown_table(summaries) if several else markdown_table(results)
    files["table.md"] = out / "table.md"
    files["table.md"].write_text(f"{table_caption}.\n\n{table}\n{training_note()}\n", encoding="utf-8")
    files["table.csv"] = out / "table.csv"
    if several:
        write_summary_csv(summaries, files["table.csv"])
        files["runs.csv"] = out / "runs.csv"
        write_runs_csv(runs, files["runs.csv"])
    else:
        write_csv(results, files["table.csv"])
    if groups[seeds[0]]:
        files["openset.csv"] = out / "openset.csv"
        write_open_set_csv(runs, files["openset.csv"])
    return DemoRun(results, table, files, seeds, runs, summaries)
