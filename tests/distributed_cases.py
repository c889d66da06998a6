"""The problems the class-sharded tests run: each a global batch, the loss as a registry record's
configuration, and how the ranks call it (function, head, from a single-process head).

Used by both sides: the worker processes (tests/distributed_worker.py) compute the sharded loss of
each case, and tests/test_distributed.py computes the single-process reference of the same case.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import torch
from torch import nn

from tests.registry import BY_NAME, RECORDS
from torch_port.distributed import shard_range
from torch_port.engine import MarginConfig

# Seconds: the process group's timeout in the workers, and the short group of the timeout test.
GROUP_TIMEOUT = 60
SHORT_TIMEOUT = 2
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


# --- the losses under test: registry records with fixed hyperparameters ---------------------------

# name -> (registry record, hyperparameters): every margin loss of the registry at its defaults, by
# its stem ("arcface" for arcface_loss), and variants that reach what the defaults do not.
# (Sub-centre records need W of C k rows, which global_inputs does not build: the sharded sub-centre
# path is run by tests/test_shared_suites.py and tests/test_modern_margins.py through the runner.)
LOSSES = {
    record.name.removesuffix("_loss"): (record.name, record.defaults)
    for record in RECORDS
    if record.config and record.rows_per_class == 1
}
LOSSES |= {
    "arcface-easy": ("arcface_loss", {"s": 32.0, "m": 0.4, "easy_margin": True}),
    # m1 != 1: the multiplicative angle and the extension past theta* = (pi - m2) / m1
    "combined-m1": ("combined_margin_loss", {"s": 64.0, "m1": 1.2, "m2": 0.3, "m3": 0.1}),
    # beta > 0: the annealed target, |x| |W_j| in every logit (feature_norm and weight_norm)
    "lsoftmax-annealed": ("lsoftmax_loss", {"m": 3, "beta": 0.5}),
}


def normface_with_learnable_scale() -> MarginConfig:
    """Not a loss of the registry: NormFace's configuration with its scale an nn.Parameter (20.0), as
    a head that learns its scale has; ShardedMarginHead registers it and sums its gradient."""
    record, kwargs = LOSSES["normface"]
    config = BY_NAME[record].config(kwargs)
    return dataclasses.replace(config, scale=nn.Parameter(torch.tensor(20.0, dtype=torch.float64)))


# Variants built from records, for what a record's configuration does not have.
VARIANTS = {"normface-learnable-scale": normface_with_learnable_scale}


def make_config(name: str) -> MarginConfig:
    """A fresh configuration (a learnable scale is a new leaf on every call)."""
    if name in VARIANTS:
        return VARIANTS[name]()
    record, kwargs = LOSSES[name]
    return BY_NAME[record].config(kwargs)


def make_single_head(name: str, num_classes: int, dim: int, dtype: torch.dtype):
    """The single-process head of the record (a from-head case converts it; the reference runs it)."""
    record, kwargs = LOSSES[name]
    return BY_NAME[record].head(kwargs, num_classes, dim, dtype=dtype)


# --- the cases: one global problem each ----------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    config: str
    num_classes: int
    dim: int = 6
    batch: tuple[int, ...] = (3, 5, 2, 4)  # per rank, the first R entries; deliberately uneven
    dtype: str = "float64"
    reduction: str = "mean"
    labels: str = "random"  # "random" | "last-shard" (every label on the last rank's shard)
    chunk_size: int | None = None
    # "function" (sharded_margin_cross_entropy), "head" (ShardedMarginHead(config)), or "from-head"
    # (ShardedMarginHead.from_head of the single-process head named by ``config``)
    via: str = "function"
    sample_rate: float = 1.0
    grad_scale_is_world_size: bool = False  # feature_grad_scale = R (as with a DDP backbone)
    # Rank r back-propagates (r + 1) * loss: the gradient is that of the mean, (R + 1) / 2 * loss.
    rank_weighted_objective: bool = False
    seed: int = 0


def _random_cases() -> list[Case]:
    """A few problems drawn from fixed seeds: sizes, configuration, dtype, reduction, chunking."""
    cases = []
    for seed in (11, 12, 13, 14, 15):
        rng = random.Random(seed)
        cases.append(
            Case(
                f"random-seed-{seed}",
                rng.choice(sorted(LOSSES)),
                num_classes=rng.randint(4, 40),
                dim=rng.randint(2, 12),
                batch=tuple(rng.randint(1, 6) for _ in range(4)),
                dtype=rng.choice(["float64", "float32"]),
                reduction=rng.choice(["mean", "sum", "none"]),
                chunk_size=rng.choice([None, 3]),
                seed=seed,
            )
        )
    return cases


CASES = [
    Case("normface-uneven-shards", "normface", num_classes=11),
    Case("cosface-labels-on-one-shard", "cosface", num_classes=10, labels="last-shard", reduction="sum"),
    Case("arcface-per-sample", "arcface", num_classes=9, reduction="none"),
    Case("lsoftmax-feature-and-weight-norms", "lsoftmax-annealed", num_classes=7, dim=4),
    Case("learnable-scale", "normface-learnable-scale", num_classes=6, via="head"),
    Case("combined-margin", "combined-m1", num_classes=12, reduction="sum"),
    Case("arcface-chunked", "arcface", num_classes=13, chunk_size=2),
    Case("float32-arcface", "arcface", num_classes=13, dtype="float32"),
    Case("bfloat16-arcface-chunked", "arcface", num_classes=11, dtype="bfloat16", chunk_size=3),
    Case(
        "float32-cosface-chunked-one-shard",
        "cosface",
        num_classes=9,
        dtype="float32",
        labels="last-shard",
        chunk_size=2,
    ),
    Case("head-sample-rate-1-is-exact", "arcface", num_classes=10, via="head", sample_rate=1.0),
    Case("from-head-normface", "normface", num_classes=8, via="from-head"),
    Case("from-head-cosface-float32", "cosface", num_classes=9, via="from-head", dtype="float32"),
    Case("from-head-arcface", "arcface", num_classes=7, via="from-head", labels="last-shard"),
    Case("from-head-sphereface", "sphereface", num_classes=8, via="from-head"),
    Case("feature-grad-scale", "cosface", num_classes=8, grad_scale_is_world_size=True),
    Case("different-objectives-per-rank", "arcface", num_classes=9, rank_weighted_objective=True),
    Case("sampled-negatives", "cosface", num_classes=40, via="head", sample_rate=0.3, batch=(2, 3, 1, 2)),
    # Ranks without samples (x of shape (0, D)): the loss is that of the other ranks' samples.
    Case("empty-rank-mean", "arcface", num_classes=9, batch=(0, 5, 0, 3)),
    Case("empty-rank-sum-chunked", "cosface", num_classes=10, batch=(4, 0, 3, 0), reduction="sum", chunk_size=3),
    Case("empty-rank-none-head", "combined-m1", num_classes=8, batch=(0, 4, 2, 0), reduction="none", via="head"),
    Case("empty-rank-float32-norms", "lsoftmax-annealed", num_classes=7, batch=(3, 0, 0, 2), dtype="float32"),
    # At the size the path exists for (issue 17): a global batch of 256 over 2 ranks (383, uneven,
    # over 4), D = 512, so the chunked path's feature side runs several row blocks of 64 rows
    # (FEATURE_BLOCK_BYTES) and each shard several chunks of classes; uneven shards of 2001 classes.
    # A row index of the global batch past 64 crashed the path before the engine's primitive.
    Case("scale-arcface-chunked", "arcface", num_classes=2001, dim=512, batch=(128, 128, 61, 66), chunk_size=300),
    Case(
        "scale-cosface-head-float32",
        "cosface",
        num_classes=1501,
        dim=512,
        batch=(100, 156, 127, 0),
        chunk_size=256,
        dtype="float32",
        via="head",
    ),
    *_random_cases(),
]
SCALE_CASES = [case for case in CASES if case.name.startswith("scale-")]


def global_inputs(case: Case, world: int):
    """The global problem (float64): x (B, D), W (C, D), y (B,), and the per-rank batch sizes."""
    sizes = list(case.batch[:world])
    gen = torch.Generator().manual_seed(1000 + case.seed)
    batch = sum(sizes)
    # W first: it does not depend on the world size, so a checkpoint from 2 ranks serves 4.
    W = torch.randn(case.num_classes, case.dim, generator=gen, dtype=torch.float64)
    x = torch.randn(batch, case.dim, generator=gen, dtype=torch.float64) * 3.0
    if case.labels == "last-shard":
        start, end = shard_range(case.num_classes, world, world - 1)
        y = torch.randint(start, end, (batch,), generator=gen)
    else:
        y = torch.randint(0, case.num_classes, (batch,), generator=gen)
    # One feature opposite its class (theta = pi): ArcFace's fallback branch, the cone point; and
    # the last one zero (cos = 0 with every class by the engine's convention).
    x[0] = -2.0 * W[y[0]]
    x[-1] = 0.0 if batch > 1 else x[-1]
    return x, W, y, sizes


def cotangent(shape) -> torch.Tensor:
    """Fixed weights for reduction="none", the same on every rank and in the reference."""
    return torch.linspace(0.5, 1.5, max(1, math.prod(shape)), dtype=torch.float64).reshape(shape)


def grad_scale_of(case: Case, world: int) -> float:
    return float(world) if case.grad_scale_is_world_size else 1.0
