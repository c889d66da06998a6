"""Training one loss: the loop every loss shares, and what it measures on the held-out set and the open set."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from torch_port.demo.data import DemoData
from torch_port.demo.extras import require
from torch_port.demo.metrics import class_geometry
from torch_port.demo.model import EmbeddingNet
from torch_port.demo.openset import (
    OPEN_METRICS,
    OpenSetResult,
    matching_epochs,
    open_set_split,
    open_values,
    rotations_cell,
)
from torch_port.demo.settings import BATCH_SIZE, DEMO_LOSSES, LEARNING_RATE, WEIGHT_DECAY, DemoLoss
from torch_port.demo.verification import verify


@dataclass
class LossResult:
    """One trained loss: the table row, plus the held-out features and class centres for the figures, and
    each open-set rotation's result (none when the run has no open set)."""

    loss: str
    title: str
    settings: str
    accuracy: float
    intra_class_angle_deg: float
    min_center_angle_deg: float
    train_time_s: float
    features: np.ndarray
    labels: np.ndarray
    centers: np.ndarray
    open_set: tuple[OpenSetResult, ...] = ()

    def row(self) -> dict[str, str]:
        """The table row as text, keyed by the short column names of :data:`TABLE_COLUMNS`."""
        return {
            "loss": self.title,
            "settings": self.settings,
            "accuracy": f"{self.accuracy:.1f}",
            "intra_class_angle_deg": f"{self.intra_class_angle_deg:.1f}",
            "min_center_angle_deg": f"{self.min_center_angle_deg:.1f}",
            **{key: rotations_cell(open_values(self.open_set, key)) for key, _, _ in OPEN_METRICS},
            "train_time_s": f"{self.train_time_s:.1f}",
        }


@dataclass
class Fitted:
    """A trained network and head, the seconds training took, and the last epoch's mean loss."""

    net: EmbeddingNet
    head: torch.nn.Module
    seconds: float
    mean_loss: float


def fit(
    entry: DemoLoss,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    *,
    dim: int,
    epochs: int,
    seed: int,
    device: torch.device,
    bar: str | None,
) -> Fitted:
    """Train the embedding network and ``entry``'s head on ``train_x``, ``train_y`` (classes 0 .. num_classes - 1).

    The same recipe for every loss and every training set: the seed fixes the initialisation and
    the batch order. ``bar``: the progress bar's label, or None for no bar.
    """
    tqdm = require("tqdm").tqdm
    # the only random draws are torch's (initialisation, batch order); the split takes random_state=seed,
    # and nothing reads NumPy's global generator, so no NumPy seed is needed
    torch.manual_seed(seed)
    net = EmbeddingNet(train_x.shape[1], dim).to(device)
    head = entry.build(num_classes, dim).to(device)
    optimizer = torch.optim.AdamW(
        [
            {"params": net.parameters(), "weight_decay": WEIGHT_DECAY},
            {"params": head.parameters(), "weight_decay": 0.0},
        ],
        lr=LEARNING_RATE,
    )
    steps_per_epoch = math.ceil(train_x.shape[0] / BATCH_SIZE)
    # decay to zero over the run: the clusters settle instead of jittering at the last step's rate
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    order = torch.Generator().manual_seed(seed)  # batches drawn on the CPU: the same order on any device

    net.train()
    head.train()
    start = time.perf_counter()
    epoch_bar = tqdm(range(epochs), desc=f"{bar or '':>16}", unit="epoch", disable=bar is None, leave=True)
    for epoch in epoch_bar:
        total = torch.zeros((), device=device)
        for batch in torch.randperm(train_x.shape[0], generator=order).split(BATCH_SIZE):
            batch = batch.to(device)
            value = head(net(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            schedule.step()
            total += value.detach() * batch.numel()
        mean_loss = float(total) / train_x.shape[0]
        if not math.isfinite(mean_loss):
            raise RuntimeError(f"{entry.title}: the training loss became {mean_loss} in epoch {epoch + 1}")
        epoch_bar.set_postfix(loss=f"{mean_loss:.3f}", refresh=False)  # redraw at tqdm's own pace, not every epoch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    net.eval()
    head.eval()
    return Fitted(net, head, seconds, mean_loss)


def open_set_rotation(
    entry: DemoLoss,
    data: DemoData,
    held_out: tuple[int, ...],
    *,
    dim: int,
    epochs: int,
    seed: int,
    device: torch.device,
    bar: str | None,
) -> OpenSetResult:
    """Train on every class but ``held_out`` and verify pairs of the held-out classes' images
    (:mod:`~torch_port.demo.openset`), with as many optimiser steps as ``epochs`` over all of ``data``."""
    split = open_set_split(data, held_out, seed)
    open_epochs = matching_epochs(epochs, data.train_x.shape[0], split.train_x.shape[0], BATCH_SIZE)
    fitted = fit(
        entry, split.train_x, split.train_y, len(split.kept), dim=dim, epochs=open_epochs, seed=seed, device=device,
        bar=bar,
    )  # fmt: skip
    with torch.no_grad():
        features = fitted.net(split.pair_x).double().cpu().numpy()
    return OpenSetResult(
        held_out, open_epochs, fitted.seconds, features.shape[0], verify(features, split.pair_y.cpu().numpy())
    )


def train_one(
    loss: str,
    data: DemoData,
    *,
    dim: int,
    epochs: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
    rotations: Sequence[tuple[int, ...]] = (),
) -> LossResult:
    """Train the embedding network with one loss and measure the held-out geometry; then, for each group of
    classes in ``rotations``, train without those classes and verify their images (the open set).

    Every training starts from the same seed, so a loss's row does not depend on which others ran.
    """
    entry = DEMO_LOSSES[loss]
    # A bar only on a terminal: written to a log, its frames would be kilobytes of carriage returns.
    # Elsewhere, one line per loss once it is trained.
    on_terminal = progress and sys.stderr.isatty()
    fitted = fit(
        entry, data.train_x, data.train_y, data.num_classes, dim=dim, epochs=epochs, seed=seed, device=device,
        bar=entry.title if on_terminal else None,
    )  # fmt: skip
    with torch.no_grad():
        features = fitted.net(data.test_x)
        predictions = fitted.head.logits(features).argmax(dim=1)
        accuracy = 100.0 * float((predictions == data.test_y).double().mean())
    open_set = tuple(
        open_set_rotation(
            entry, data, held_out, dim=dim, epochs=epochs, seed=seed, device=device,
            bar=f"{entry.title} open {index + 1}/{len(rotations)}" if on_terminal else None,
        )
        for index, held_out in enumerate(rotations)
    )  # fmt: skip
    if progress and not on_terminal:
        line = f"{entry.title:>16}: {epochs} epochs, loss {fitted.mean_loss:.3f}, {fitted.seconds:.1f} s"
        if open_set:
            seconds = sum(result.train_time_s for result in open_set)
            line += f"; open set: {len(open_set)} rotation{'s' * (len(open_set) > 1)}, {seconds:.1f} s"
        print(line, file=sys.stderr, flush=True)

    features_np = features.double().cpu().numpy()
    labels_np = data.test_y.cpu().numpy()
    geometry = class_geometry(features_np, labels_np)
    return LossResult(
        loss=loss,
        title=entry.title,
        settings=entry.describe(),
        accuracy=accuracy,
        intra_class_angle_deg=geometry.intra_class_angle_deg,
        min_center_angle_deg=geometry.min_center_angle_deg,
        train_time_s=fitted.seconds,
        features=features_np,
        labels=labels_np,
        centers=geometry.centers,
        open_set=open_set,
    )
