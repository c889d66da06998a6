"""Training one loss: the loop every loss shares, and what it measures on the held-out set."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from torch_port.demo.data import DemoData
from torch_port.demo.extras import require
from torch_port.demo.metrics import class_geometry
from torch_port.demo.model import EmbeddingNet
from torch_port.demo.settings import BATCH_SIZE, DEMO_LOSSES, LEARNING_RATE, WEIGHT_DECAY


@dataclass
class LossResult:
    """One trained loss: the table row, plus the held-out features and class centres for the figures."""

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

    def row(self) -> dict[str, str]:
        """The table row as text, keyed by the short column names of :data:`TABLE_COLUMNS`."""
        return {
            "loss": self.title,
            "settings": self.settings,
            "accuracy": f"{self.accuracy:.1f}",
            "intra_class_angle_deg": f"{self.intra_class_angle_deg:.1f}",
            "min_center_angle_deg": f"{self.min_center_angle_deg:.1f}",
            "train_time_s": f"{self.train_time_s:.1f}",
        }


def train_one(
    loss: str,
    data: DemoData,
    *,
    dim: int,
    epochs: int,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> LossResult:
    """Train the embedding network with one loss and measure the held-out geometry.

    Every loss starts from the same seed, so a loss's row does not depend on which others ran.
    """
    entry = DEMO_LOSSES[loss]
    tqdm = require("tqdm").tqdm
    # the only random draws are torch's (initialisation, batch order); the split takes random_state=seed,
    # and nothing reads NumPy's global generator, so no NumPy seed is needed
    torch.manual_seed(seed)
    net = EmbeddingNet(data.train_x.shape[1], dim).to(device)
    head = entry.build(data.num_classes, dim).to(device)
    optimizer = torch.optim.AdamW(
        [
            {"params": net.parameters(), "weight_decay": WEIGHT_DECAY},
            {"params": head.parameters(), "weight_decay": 0.0},
        ],
        lr=LEARNING_RATE,
    )
    steps_per_epoch = math.ceil(data.train_x.shape[0] / BATCH_SIZE)
    # decay to zero over the run: the clusters settle instead of jittering at the last step's rate
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    order = torch.Generator().manual_seed(seed)  # batches drawn on the CPU: the same order on any device

    net.train()
    head.train()
    start = time.perf_counter()
    # A bar only on a terminal: written to a log, its frames would be kilobytes of carriage returns.
    # Elsewhere, one line per loss once it is trained.
    on_terminal = progress and sys.stderr.isatty()
    bar = tqdm(range(epochs), desc=f"{entry.title:>16}", unit="epoch", disable=not on_terminal, leave=True)
    for epoch in bar:
        total = torch.zeros((), device=device)
        for batch in torch.randperm(data.train_x.shape[0], generator=order).split(BATCH_SIZE):
            batch = batch.to(device)
            value = head(net(data.train_x[batch]), data.train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            schedule.step()
            total += value.detach() * batch.numel()
        mean_loss = float(total) / data.train_x.shape[0]
        if not math.isfinite(mean_loss):
            raise RuntimeError(f"{entry.title}: the training loss became {mean_loss} in epoch {epoch + 1}")
        bar.set_postfix(loss=f"{mean_loss:.3f}", refresh=False)  # redraw at tqdm's own pace, not every epoch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if progress and not on_terminal:
        print(f"{entry.title:>16}: {epochs} epochs, loss {mean_loss:.3f}, {seconds:.1f} s", file=sys.stderr, flush=True)

    net.eval()
    head.eval()
    with torch.no_grad():
        features = net(data.test_x)
        predictions = head.logits(features).argmax(dim=1)
        accuracy = 100.0 * float((predictions == data.test_y).double().mean())
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
        train_time_s=seconds,
        features=features_np,
        labels=labels_np,
        centers=geometry.centers,
    )
