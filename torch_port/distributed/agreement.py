"""What the ranks of the class-sharded path must agree on, and how they find out before computing.

- the layout: which classes each rank holds (:func:`shard_range`);
- the call: shapes, dtypes, ``num_classes``, the loss configuration and the options; each rank
  checks its own arguments (:func:`check_local`), then every rank's metadata is all-gathered
  (:func:`exchange_metadata`) and every rank raises the same clear error if any rank rejected its
  inputs or the ranks disagree, before any features are sent. A rank that fails alone would
  otherwise leave the others waiting in a collective until the group's timeout.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from softmax_common.checks import check_positive_int
from torch_port.engine import MarginConfig, check_inputs
from torch_port.tensor_checks import check_labels

# Angles at which a margin's target transform psi is evaluated to compare configurations across
# ranks: a callable cannot be compared by identity between processes, its values can.
PROBE_ANGLES = (0.0, 0.3, 1.2, 2.0, 2.9, math.pi)


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The classes ``[start, end)`` that ``rank`` holds when C classes are split over R ranks.

    The first ``C % R`` ranks hold ``C // R + 1`` classes, the others ``C // R``: the layout of
    ``torch.tensor_split(torch.arange(C), R)``, so shard sizes differ by at most one.

    Args:
        num_classes: C, an integer >= world_size (every rank holds at least one class).
        world_size: R >= 1.
        rank: an integer in [0, R).

    Returns:
        ``(start, end)`` with ``end - start`` in ``{C // R, C // R + 1}``.
    """
    world_size = check_positive_int(world_size, "world_size")
    num_classes = check_positive_int(num_classes, "num_classes")
    rank = check_positive_int(rank, "rank", minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    if num_classes < world_size:
        raise ValueError(
            f"num_classes must be >= the world size {world_size} (every rank holds at least one class), "
            f"got {num_classes}"
        )
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def config_fingerprint(config: MarginConfig, device: torch.device) -> tuple:
    """What must be equal on every rank about a configuration, as plain (picklable) values."""
    scale = config.scale
    if isinstance(scale, torch.Tensor):
        # A learned scale's value is not compared: its replicas follow the same all-reduced gradient,
        # but an exact comparison would turn a last-bit difference between ranks into a failed step.
        scale = ("tensor", tuple(scale.shape), scale.requires_grad)
    target = None
    if config.target is not None:
        theta = torch.tensor(PROBE_ANGLES, dtype=torch.float64, device=device)
        try:
            with torch.no_grad():
                values = config.target(torch.cos(theta), theta)
            # repr round-trips floats exactly and compares nan equal to nan.
            target = tuple(repr(float(v)) for v in values.double().flatten().tolist())
        except Exception:
            target = getattr(config.target, "__qualname__", type(config.target).__qualname__)
    return (("scale", scale), ("feature_norm", config.feature_norm), ("weight_norm", config.weight_norm), target)


def exchange_metadata(local_error: Exception | None, metadata: dict, rank: int, world: int, group) -> list[dict]:
    """All-gather every rank's metadata and raise the same error on every rank if any rank rejected
    its inputs or the ranks disagree; returns the list of metadata, in rank order."""
    if local_error is not None:
        metadata = {"error": f"{type(local_error).__name__}: {local_error}"}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, metadata, group=group)
    failed = [(r, meta["error"]) for r, meta in enumerate(everyone) if "error" in meta]
    if failed:
        if local_error is not None:
            raise local_error
        first_rank, message = failed[0]
        raise ValueError(f"rank {first_rank} rejected its inputs, so no rank computes the loss: {message}")
    for key in metadata:
        if key == "batch":  # the one field allowed to differ: ranks may hold different batch sizes
            continue
        values = [meta[key] for meta in everyone]
        if any(value != values[0] for value in values[1:]):
            per_rank = "; ".join(f"rank {r}: {value}" for r, value in enumerate(values))
            raise ValueError(f"{key} must be the same on every rank, got {per_rank}")
    return everyone


def check_local(x, W, y, config, num_classes, rank, world) -> tuple[int, int, torch.Tensor | None]:
    """The single-rank checks: shapes, dtypes, the shard's size, labels in [0, C)."""
    if not isinstance(config, MarginConfig):
        raise TypeError(f"config must be a torch_port.engine.MarginConfig, got {type(config).__name__}")
    num_classes = check_positive_int(num_classes, "num_classes")
    start, end = shard_range(num_classes, world, rank)
    check_inputs(x, W)
    if W.shape[0] != end - start:
        raise ValueError(
            f"W must have shape ({end - start}, {x.shape[1]}): rank {rank} of {world} holds classes "
            f"[{start}, {end}) of num_classes={num_classes}, got {tuple(W.shape)}"
        )
    if y is not None:
        y = check_labels(y, x.shape[0], num_classes, same_device_as=("x", x))
    return start, end, y


def common_metadata(x, W, num_classes, config) -> dict:
    """What every call must agree on across ranks (every field but the batch size must be equal)."""
    return {
        "batch": int(x.shape[0]),
        "the feature dimension D": int(x.shape[1]),
        "x.dtype": str(x.dtype),
        "W.dtype": str(W.dtype),
        "num_classes": int(num_classes),
        "the device type": x.device.type,
        "the margin configuration (scale, norms, psi at probe angles)": config_fingerprint(config, x.device),
    }


__all__ = ["PROBE_ANGLES", "check_local", "common_metadata", "config_fingerprint", "exchange_metadata", "shard_range"]
