"""ShardedMarginHead cases of issue 15 for the sharded runner (tests/sharded_runner.py): a head whose
configuration has sub-centres, one whose configuration holds per-sample margins (each rank its
rows'), and one made by ``from_head`` of an ArcFace head with per-class margins (a table looked up
by the global labels). Each rank builds the head, loads the full weight, runs one training forward
and backward on its rows of the global batch; tests/test_modern_margins.py compares with one process.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES, DIM, BATCH = 5, 4, 7


def global_problem(k: int):
    """x (B, D), W (C k, D), y (B,), per-sample margins (B,): float64 NumPy, fixed."""
    rng = np.random.default_rng(15)
    x = rng.normal(size=(BATCH, DIM)) * 2.0
    W = rng.normal(size=(NUM_CLASSES * k, DIM))
    y = rng.integers(0, NUM_CLASSES, BATCH)
    y[2] = -1  # an ignored row
    margins = np.linspace(0.1, 0.8, BATCH)
    return x, W, y, margins


def class_margins():
    """Per-class margins (C,), fixed: those of class sizes 1, 2, ... (adaptive_margins)."""
    return np.linspace(0.5, 0.05, NUM_CLASSES)


def config_of(case: str, margins):
    from torch_port.margins import arcface_config, subcenter_arcface_config

    if case == "subcenter":
        return subcenter_arcface_config(30.0, 0.5, 3, False)
    return arcface_config(30.0, torch.as_tensor(margins), False)


K = {"subcenter": 3, "per-sample": 1, "per-class": 1}


def run_head_case(case: str, rank: int, world: int) -> dict:
    from torch_port.distributed import ShardedMarginHead

    x, W, y, margins = global_problem(K[case])
    rows = np.array_split(np.arange(BATCH), world)[rank]
    if case == "per-class":
        from torch_port import ArcFace

        single = ArcFace(NUM_CLASSES, DIM, s=30.0, m=torch.tensor(class_margins()), dtype=torch.float64)
        head = ShardedMarginHead.from_head(single)
    else:
        head = ShardedMarginHead(NUM_CLASSES, DIM, config_of(case, margins[rows]), dtype=torch.float64)
    head.load_full_weight(torch.tensor(W))
    xs = torch.tensor(x[rows], requires_grad=True)
    loss = head(xs, torch.tensor(y[rows]))
    loss.backward()
    return {"loss": loss.item(), "x": xs.grad.numpy(), "W": head.weight.grad.numpy()}
