"""The open-set evaluation: which classes each rotation holds out, its data, and what it measured.

Margin losses are trained to embed identities never seen in training. To measure that with the
digits, a rotation holds out whole classes: a network is trained, from the same initialisation and
with the same recipe as the closed-set run, on the training images of the other classes only, and
the held-out classes' images are then verified pair by pair by the cosine of their embeddings
(:mod:`~torch_port.demo.verification`).

**Rotations.** The classes, permuted by the seed, are cut into ceil(C / 3) groups as equal as
possible; each group is held out once. With the digits' ten classes that is four rotations holding
out 3, 3, 2 and 2 classes (training on 7, 7, 8 and 8), and every class is held out exactly once. A
run uses the first ``rotations`` groups (the default run one: train on 7, verify the other 3); the
``--full`` run uses all.

**Pairs.** Every image of the held-out classes, from the training split and the held-out split
alike (none of them was seen in training), and every unordered pair of them: with the digits about
540 images, 145,000 pairs, a third of them genuine. More than :data:`MAX_PAIR_IMAGES` images (MNIST
files) are subsampled at random, by the seed, to that many.

**Steps.** The training set is smaller than the closed-set run's, so the network trains for more
epochs: the fewest that give at least as many optimiser steps as the closed-set run, so that the
losses' schedules (SphereFace's lambda, L-Softmax's beta, counted in steps) end where they end there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from torch_port.demo.data import DemoData
from torch_port.demo.metrics import Spread
from torch_port.demo.verification import FAR_TARGET, Verification

# At most this many held-out images are paired (n (n - 1) / 2 pairs: 2 million at 2,000).
MAX_PAIR_IMAGES = 2000
# A rotation holds out at most this many classes.
MAX_HELD_OUT = 3

# The open-set columns of the table, in percent: (key, title, the Verification attribute it reads).
OPEN_METRICS: tuple[tuple[str, str, str], ...] = (
    ("open_auc", "open-set ROC AUC (%)", "auc"),
    ("open_tar", f"open-set TAR at FAR={FAR_TARGET:g} (%)", "tar"),
    ("open_eer", "open-set EER (%)", "eer"),
)
_SOURCE = {key: attribute for key, _, attribute in OPEN_METRICS}


def rotation_groups(num_classes: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """The held-out classes of each rotation: a seeded permutation cut into ceil(C / 3) near-equal groups.

    Every class is in exactly one group, each group has 2 or 3 classes, and at least two classes
    are left to train on. Needs ``num_classes >= 4``.
    """
    if num_classes < 4:
        raise ValueError(
            f"the open-set evaluation needs at least 4 classes (2 to hold out, 2 to train on), got {num_classes}"
        )
    order = np.random.default_rng(seed).permutation(num_classes)
    count = math.ceil(num_classes / MAX_HELD_OUT)
    return tuple(tuple(sorted(int(k) for k in group)) for group in np.array_split(order, count))


@dataclass(frozen=True)
class OpenSetSplit:
    """One rotation's data: the kept classes' training images, labelled 0 .. len(kept) - 1 in the order of
    ``kept``, and the held-out classes' images to pair (``pair_y`` their original classes)."""

    held_out: tuple[int, ...]
    kept: tuple[int, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    pair_x: torch.Tensor
    pair_y: torch.Tensor


def open_set_split(data: DemoData, held_out: tuple[int, ...], seed: int) -> OpenSetSplit:
    """Train on the training images of every class not in ``held_out``; pair every image of those in it."""
    kept = tuple(k for k in range(data.num_classes) if k not in held_out)
    classes = torch.as_tensor(held_out, device=data.train_y.device)
    relabel = torch.full((data.num_classes,), -1, dtype=torch.int64, device=data.train_y.device)
    relabel[torch.as_tensor(kept, device=data.train_y.device)] = torch.arange(len(kept), device=data.train_y.device)
    train = ~torch.isin(data.train_y, classes)
    pair_x = torch.cat([data.train_x[~train], data.test_x[torch.isin(data.test_y, classes)]])
    pair_y = torch.cat([data.train_y[~train], data.test_y[torch.isin(data.test_y, classes)]])
    if pair_x.shape[0] > MAX_PAIR_IMAGES:
        chosen = np.sort(np.random.default_rng(seed).choice(pair_x.shape[0], MAX_PAIR_IMAGES, replace=False))
        chosen = torch.as_tensor(chosen, device=pair_x.device)
        pair_x, pair_y = pair_x[chosen], pair_y[chosen]
    return OpenSetSplit(held_out, kept, data.train_x[train], relabel[data.train_y[train]], pair_x, pair_y)


def matching_epochs(epochs: int, full_size: int, open_size: int, batch_size: int) -> int:
    """The fewest epochs over ``open_size`` images with at least the steps of ``epochs`` over ``full_size``."""
    steps = epochs * math.ceil(full_size / batch_size)
    return math.ceil(steps / math.ceil(open_size / batch_size))


@dataclass(frozen=True)
class OpenSetResult:
    """One rotation of one loss: the classes held out, the epochs and time it trained, and its verification."""

    held_out: tuple[int, ...]
    epochs: int
    train_time_s: float
    images: int
    verification: Verification

    def row(self) -> dict[str, str]:
        """The rotation's row of ``openset.csv`` (AUC, TAR and EER in percent)."""
        v = self.verification
        return {
            "held_out": " ".join(str(k) for k in self.held_out),
            "images": str(self.images),
            "genuine_pairs": str(v.genuine_pairs),
            "impostor_pairs": str(v.impostor_pairs),
            "auc": f"{100 * v.auc:.2f}",
            "tar_at_far": f"{100 * v.tar:.2f}",
            "eer": f"{100 * v.eer:.2f}",
            "epochs": str(self.epochs),
            "train_time_s": f"{self.train_time_s:.1f}",
        }


def open_values(results: Sequence[OpenSetResult], metric: str) -> list[float]:
    """One open-set metric (a key of :data:`OPEN_METRICS`) of each rotation, in percent."""
    return [100.0 * getattr(result.verification, _SOURCE[metric]) for result in results]


def rotations_cell(values: Sequence[float]) -> str:
    """A table cell for one metric over the rotations: ``-`` for none, the value for one, else
    ``mean (min-max)``."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return Spread.of(values).cell()
