"""Two-rank scenarios of the stateful heads (CurricularFace, AdaFace, MagFace), run in the workers of
tests/sharded_runner.py like the fault scenarios (tests/distributed_faults.py registers them); the
test process computes the expected values itself, without a process group (tests/test_adaptive_margins.py).

- ``adaptive_statistics_modes``: DDP-like, each rank its own batch and the whole head; one training
  forward of each statistics head in "global" and in "local" mode; the statistics after it.
- ``adaptive_sharded_from_head``: every rank the same global batch, its rows and its shard of the
  classes: ``ShardedMarginHead.from_head`` of each head, two training steps; losses, this rank's
  x-gradients, the statistics.
"""

from __future__ import annotations

import torch

from torch_port import AdaFace, CurricularFace, MagFace, ShardedMarginHead

HEADS = {"CurricularFace": CurricularFace, "AdaFace": AdaFace, "MagFace": MagFace}
C, D = 7, 5


def rank_batch(rank: int, batch: int = 5):
    """Rank r's own batch (features of norms from 1 to 40, one ignored row), the same on both sides."""
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(batch, D, dtype=torch.float64, generator=generator)
    x = x * torch.linspace(1.0, 40.0, batch, dtype=torch.float64)[:, None] * (1 + rank)
    y = torch.randint(0, C, (batch,), generator=generator)
    y[1] = -1
    return x, y


def global_batch(batch: int = 9):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(batch, D, dtype=torch.float64, generator=generator)
    x = x * torch.linspace(2.0, 60.0, batch, dtype=torch.float64)[:, None]
    y = torch.randint(0, C, (batch,), generator=generator)
    y[4] = -1
    return x, y


def make_head(name: str, **options):
    torch.manual_seed(3)
    return HEADS[name](C, D, s=16.0, dtype=torch.float64, **options)


def statistics_of(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items() if "statistics" in k}


def adaptive_statistics_modes(rank: int, world: int, group) -> dict:
    x, y = rank_batch(rank)
    out = {}
    for name in ("CurricularFace", "AdaFace"):
        for mode in ("global", "local"):
            head = make_head(name, statistics=mode)
            head(x, y)
            out[f"{name}-{mode}"] = statistics_of(head)
    return out


def rows_of(rank: int, world: int, batch: int) -> torch.Tensor:
    return torch.tensor_split(torch.arange(batch), world)[rank]


def adaptive_sharded_from_head(rank: int, world: int, group) -> dict:
    x, y = global_batch()
    rows = rows_of(rank, world, len(y))
    out = {}
    for name in HEADS:
        sharded = ShardedMarginHead.from_head(make_head(name))
        losses, grads = [], []
        for _ in range(2):
            leaf = x[rows].clone().requires_grad_()
            loss = sharded(leaf, y[rows])
            losses.append(loss.detach())
            grads.append(torch.autograd.grad(loss, leaf)[0])
        out[name] = {"losses": torch.stack(losses), "grads": grads, "statistics": statistics_of(sharded)}
    return out


SCENARIOS = {scenario.__name__: scenario for scenario in (adaptive_statistics_modes, adaptive_sharded_from_head)}
