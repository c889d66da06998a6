"""Several seeds: what ``--seeds`` accepts, and each loss's mean and range over the seeds' runs.

One run of the demo is repeatable bitwise on one machine, but another CPU's kernels (another
instruction set) give other low bits, and 2,200 training steps amplify them: a single run's
accuracy moved by 1-2 points between two x86 machines. What holds on any machine is what holds
across seeds, so with several seeds the table reports, per loss and metric, the mean and the
range (min-max) over the seeds' runs.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from softmax_common.checks import check_positive_int
from torch_port.demo.metrics import Spread
from torch_port.demo.openset import OPEN_METRICS, open_values
from torch_port.demo.training import LossResult

# A range such as 0-99999999 would be a list of 10^8 seeds (and years of training): refuse it.
MAX_SEEDS = 1000

# the metrics the table summarises, as LossResult's attribute names
METRICS: tuple[str, ...] = ("accuracy", "intra_class_angle_deg", "min_center_angle_deg")

_ITEM = re.compile(r"(\d+)(?:-(\d+))?")


def _unique(seeds: Sequence[int]) -> tuple[int, ...]:
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"seeds: at most {MAX_SEEDS} seeds, got {len(seeds)}")
    seen: set[int] = set()
    for seed in seeds:
        if seed in seen:
            raise ValueError(f"seeds: seed {seed} is given twice")
        seen.add(seed)
    return tuple(seeds)


def parse_seeds(text: str) -> tuple[int, ...]:
    """The seeds of a ``--seeds`` argument, in the order written.

    Comma-separated items, each a seed ``N`` or an inclusive range ``A-B`` with ``A <= B``, all
    integers >= 0: ``"0-4"`` is (0, 1, 2, 3, 4), ``"0,2,5"`` is (0, 2, 5), ``"0-2,7"`` is
    (0, 1, 2, 7), ``"3"`` is (3,). Spaces around items are ignored.

    Raises:
        ValueError naming ``seeds`` and the item at fault: an empty item, a negative or
        non-integer seed, a descending range, a seed given twice, more than :data:`MAX_SEEDS`.
    """
    if not isinstance(text, str):
        raise TypeError(f"seeds must be a string such as '0-4' or '0,2,5', got {type(text).__name__}")
    seeds: list[int] = []
    for item in text.split(","):
        item = item.strip()
        match = _ITEM.fullmatch(item)
        if match is None:
            where = "" if item == text.strip() else f" in {text!r}"
            raise ValueError(
                f"seeds must be seeds N and ranges A-B of integers >= 0 separated by commas "
                f"(e.g. 0-4 or 0,2,5), got {item!r}{where}"
            )
        first = int(match.group(1))
        last = first if match.group(2) is None else int(match.group(2))
        if last < first:
            raise ValueError(f"seeds: the range {item!r} is empty (a range A-B needs A <= B; write {last}-{first})")
        if last - first >= MAX_SEEDS:
            raise ValueError(f"seeds: at most {MAX_SEEDS} seeds, the range {item!r} has {last - first + 1}")
        seeds.extend(range(first, last + 1))
    return _unique(seeds)


def check_seeds(seeds: str | int | Sequence[int]) -> tuple[int, ...]:
    """Seeds as a tuple of distinct integers >= 0: a ``--seeds`` string, one integer, or a sequence."""
    if isinstance(seeds, str):
        return parse_seeds(seeds)
    if not isinstance(seeds, Sequence):
        return (check_positive_int(seeds, "seeds", minimum=0),)
    return _unique([check_positive_int(seed, f"seeds[{i}]", minimum=0) for i, seed in enumerate(seeds)])


def format_seeds(seeds: Sequence[int]) -> str:
    """Seeds written back compactly: runs of consecutive seeds as ranges, ``0-4`` or ``0-2, 7``."""
    parts: list[str] = []
    start = previous = None
    for seed in [*seeds, None]:
        if previous is not None and seed == previous + 1:
            previous = seed
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = seed
    return ", ".join(parts)


@dataclass(frozen=True)
class LossSummary:
    """One loss over several seeds: each metric's :class:`Spread`, and the mean training time per seed.

    The open-set metrics (``open``: key of :data:`~torch_port.demo.openset.OPEN_METRICS` -> Spread)
    pool every rotation of every seed; empty when the runs had no open set.
    """

    loss: str
    title: str
    settings: str
    seeds: tuple[int, ...]
    accuracy: Spread
    intra_class_angle_deg: Spread
    min_center_angle_deg: Spread
    train_time_s: float
    open: dict[str, Spread] = field(default_factory=dict)

    def row(self) -> dict[str, str]:
        """The CSV row: ``<metric>_mean``, ``_min`` and ``_max`` per metric (open-set ones too), to one decimal."""
        row = {"loss": self.title, "settings": self.settings, "seeds": format_seeds(self.seeds)}
        for metric in METRICS:
            spread = getattr(self, metric)
            row[f"{metric}_mean"] = f"{spread.mean:.1f}"
            row[f"{metric}_min"] = f"{spread.low:.1f}"
            row[f"{metric}_max"] = f"{spread.high:.1f}"
        for key, _, _ in OPEN_METRICS:  # "-" when the runs had no open set
            spread = self.open.get(key)
            for suffix, part in (("mean", "mean"), ("min", "low"), ("max", "high")):
                row[f"{key}_{suffix}"] = "-" if spread is None else f"{getattr(spread, part):.1f}"
        row["train_time_s_mean"] = f"{self.train_time_s:.1f}"
        return row


def summarize(runs: Mapping[int, Sequence[LossResult]]) -> list[LossSummary]:
    """Per loss (in the order of the first seed's results), the mean and range of each metric.

    Args:
        runs: seed -> that seed's results, one per loss; every seed must have trained the same losses.
    """
    seeds = tuple(runs)
    if not seeds:
        raise ValueError("runs: no seeds to summarise")
    order = [result.loss for result in runs[seeds[0]]]
    by_loss: dict[str, list[LossResult]] = {loss: [] for loss in order}
    for seed, results in runs.items():
        if [result.loss for result in results] != order:
            raise ValueError(f"runs: seed {seed} trained {[r.loss for r in results]}, the first seed {order}")
        for result in results:
            by_loss[result.loss].append(result)
    summaries = []
    for loss, results in by_loss.items():
        spreads = {metric: Spread.of([getattr(result, metric) for result in results]) for metric in METRICS}
        pooled = {
            key: [value for result in results for value in open_values(result.open_set, key)]
            for key, _, _ in OPEN_METRICS
        }
        summaries.append(
            LossSummary(
                loss=loss,
                title=results[0].title,
                settings=results[0].settings,
                seeds=seeds,
                train_time_s=statistics.fmean(result.train_time_s for result in results),
                open={key: Spread.of(values) for key, values in pooled.items() if values},
                **spreads,
            )
        )
    return summaries
