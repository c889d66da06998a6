"""What the ranks of the class-sharded path must agree on, and how they find out before computing.

- the layout: which classes each rank holds (:func:`shard_range`);
- the call: which operation (the loss or the logits), shapes, dtypes, ``num_classes``, the loss
  configuration and the options; each rank checks its own arguments (:func:`check_local`; any
  exception is caught), then every rank's metadata, or its failure, is all-gathered
  (:func:`exchange_metadata`) and every rank raises the same clear error if any rank failed its
  checks or the ranks disagree, before any features are sent. A rank that fails alone would
  otherwise leave the others waiting in a collective until the group's timeout.

The exchange costs one read back to the host per call: each rank all-gathers three int64 numbers
(its batch size, a 64-bit digest of everything else it would send, a failure flag), and only when a
rank failed or the digests differ do the ranks all-gather their full metadata to say what differs.
The batch sizes have to reach the host anyway (the padded all-gather of the rows needs them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch
import torch.distributed as dist

from softmax_common.checks import check_positive_int
from torch_port.engine import MarginConfig, check_inputs
from torch_port.row_params import check_row_tensors
from torch_port.tensor_checks import check_feature_width, check_labels

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


def config_fingerprint(config: MarginConfig) -> tuple:
    """What must be equal on every rank about a configuration, as plain (picklable) values."""
    scale = config.scale
    if isinstance(scale, torch.Tensor):
        # A learned scale's value is not compared: its replicas follow the same all-reduced gradient,
        # but an exact comparison would turn a last-bit difference between ranks into a failed step.
        scale = ("tensor", tuple(scale.shape), scale.requires_grad)
    return (
        ("scale", scale),
        ("feature_norm", config.feature_norm),
        ("weight_norm", config.weight_norm),
        ("subcenters", config.subcenters),
        _target_fingerprint(config.target),
    )


def _target_fingerprint(target) -> tuple | str | None:
    """The port's target transforms are frozen dataclasses of numbers: their type and fields say
    exactly what they compute, with nothing to evaluate. Any other callable (or one holding a
    tensor) is evaluated at PROBE_ANGLES, on the CPU whatever the data's device, so reading the
    values back is no device synchronisation."""
    if target is None:
        return None
    if dataclasses.is_dataclass(target) and not isinstance(target, type):
        parts = [_field_fingerprint(getattr(target, field.name)) for field in dataclasses.fields(target)]
        if all(part is not None for part in parts):
            return (type(target).__qualname__, tuple(parts))
    theta = torch.tensor(PROBE_ANGLES, dtype=torch.float64)
    try:
        with torch.no_grad():
            values = target(torch.cos(theta), theta)
        # repr round-trips floats exactly and compares nan equal to nan.
        return tuple(repr(float(v)) for v in values.double().flatten().tolist())
    except Exception:
        return getattr(target, "__qualname__", type(target).__qualname__)


def _field_fingerprint(value):
    """A field of a frozen-dataclass transform as plain values: a number by its repr; a nested
    transform by its own fingerprint; a per-row tensor (per-sample margins, which differ between
    ranks by design) by its dtype alone; None for anything else, a 0-d tensor included (the
    transform is then evaluated at PROBE_ANGLES, which compares that tensor's value)."""
    if isinstance(value, int | float | bool | str):
        return repr(value)
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return ("per-row tensor", str(value.dtype))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _target_fingerprint(value)
    return None


# What each operation is, for the error when ranks make different calls at the same time.
OPERATIONS = {
    "loss": "the loss (sharded_margin_cross_entropy, ShardedMarginHead.forward)",
    "logits": "the logits (sharded_logits, ShardedMarginHead.logits)",
}
_MISSING = "(not given)"


def local_failure(error: Exception) -> dict:
    """How a rank's failed local check travels in the metadata exchange: the type every rank will
    raise (ValueError and TypeError keep theirs; any other exception becomes a RuntimeError, its own
    type named in the message) and the message."""
    kind = "ValueError" if isinstance(error, ValueError) else "TypeError" if isinstance(error, TypeError) else None
    message = str(error) if kind is not None else f"{type(error).__name__}: {error}"
    return {"type": kind or "RuntimeError", "message": message}


def _same_error_everywhere(failed: list[tuple[int, dict]], operation: str) -> Exception:
    first_rank, first = failed[0]
    others = [rank for rank, _ in failed[1:]]
    also = f" (and rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))})" if others else ""
    what = "the logits" if operation == "logits" else "the loss"
    text = f"rank {first_rank}{also} rejected its inputs, so no rank computes {what}: {first['message']}"
    return {"ValueError": ValueError, "TypeError": TypeError}.get(first["type"], RuntimeError)(text)


def exchange_metadata(
    operation: str, local_error: Exception | None, metadata: dict, rank: int, world: int, group
) -> list[dict]:
    """All-gather every rank's metadata and raise the same error on every rank if any rank failed
    its local checks or the ranks disagree; returns the list of metadata, in rank order.

    ``operation`` ("loss" or "logits", see OPERATIONS) says which call this rank is making: ranks
    that make different calls at the same time would otherwise pair different collectives. A
    failed check (``local_error``, any Exception) is sent instead of the metadata; then every rank
    raises the same exception, of the first failing rank's type (ValueError, TypeError, otherwise
    RuntimeError) and with the same message naming that rank; on the failing rank it is chained to
    the original (``__cause__``). Every check here uses only the gathered metadata, so all ranks
    reach the same verdict. Also refused: a global batch with no sample (B_r = 0 on every rank).
    """
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {sorted(OPERATIONS)}, got {operation!r}")
    mine = {"operation": operation}
    if local_error is not None:
        mine["error"] = local_failure(local_error)
    else:
        mine.update(metadata)
    summaries = _gather_summaries(mine, local_error is not None, world, group)  # the one host read
    if not any(failed for _, _, failed in summaries) and len({digest for _, digest, _ in summaries}) == 1:
        everyone = [{**mine, "batch": batch} for batch, _, _ in summaries]
        _refuse_an_empty_global_batch(everyone, world)
        return everyone
    # Something differs: gather everything, to say what (the error path, so its cost is no matter).
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    failed = [(r, meta["error"]) for r, meta in enumerate(everyone) if "error" in meta]
    if failed:
        raise _same_error_everywhere(failed, operation) from local_error
    calls = [meta["operation"] for meta in everyone]
    if any(call != calls[0] for call in calls[1:]):
        per_rank = "; ".join(f"rank {r}: {OPERATIONS[call]}" for r, call in enumerate(calls))
        raise ValueError(f"every rank must make the same call at the same time, got {per_rank}")
    keys = list(dict.fromkeys(key for meta in everyone for key in meta))  # every rank's keys, in order
    for key in keys:
        if key == "batch":  # the one field allowed to differ: ranks may hold different batch sizes
            continue
        values = [meta.get(key, _MISSING) for meta in everyone]
        if any(value != values[0] for value in values[1:]):
            per_rank = "; ".join(f"rank {r}: {value}" for r, value in enumerate(values))
            raise ValueError(f"{key} must be the same on every rank, got {per_rank}")
    _refuse_an_empty_global_batch(everyone, world)
    return everyone


def _digest(meta: dict) -> int:
    """A 64-bit digest of a rank's metadata but its batch size (repr of the sorted items: the
    values are numbers, strings, bools, None and tuples of them, whose repr is exact)."""
    items = sorted((key, value) for key, value in meta.items() if key != "batch")
    return int.from_bytes(hashlib.blake2b(repr(items).encode(), digest_size=8).digest(), "little", signed=True)


def _gather_summaries(mine: dict, failed: bool, world: int, group) -> list[tuple[int, int, bool]]:
    """(batch, digest, failed) of every rank, in rank order, from one all-gather of an int64 (3,)
    tensor: on the CPU for gloo (no device synchronisation at all), on this rank's CUDA device for
    NCCL (one synchronisation, the read of the result)."""
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    batch = int(mine.get("batch", -1))
    summary = torch.tensor([batch, _digest(mine), int(failed)], dtype=torch.int64, device=device)
    parts = [torch.empty_like(summary) for _ in range(world)]
    dist.all_gather(parts, summary, group=group)
    return [(batch, digest, bool(flag)) for batch, digest, flag in torch.stack(parts).tolist()]


def _refuse_an_empty_global_batch(everyone: list[dict], world: int) -> None:
    if all(meta["batch"] == 0 for meta in everyone):
        raise ValueError(
            f"x must hold at least one sample on some rank: x has 0 rows on all {world} ranks, so the "
            "global batch is empty"
        )


def check_local(
    x, W, y, config, num_classes, rank, world, *, owner=None, ignore_index=None
) -> tuple[int, int, torch.Tensor | None]:
    """The single-rank checks: shapes, dtypes, the shard's size, labels in [0, C).

    A rank may hold no sample (x of shape (0, D), y of shape (0,)): its checks run on a one-row
    stand-in of the same dtype and device, since the engine's checks refuse an empty batch (the
    exchange refuses a global batch that is empty on every rank). ``owner``: the name of the module
    that owns W (``ShardedMarginHead``), so that x of another width is x's error, naming its dim.
    """
    if not isinstance(config, MarginConfig):
        raise TypeError(f"config must be a torch_port.engine.MarginConfig, got {type(config).__name__}")
    if owner is not None:
        check_feature_width(x, W, owner, "weight shard")
    num_classes = check_positive_int(num_classes, "num_classes")
    start, end = shard_range(num_classes, world, rank)
    empty = isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] == 0 and x.shape[1] > 0
    check_inputs(x.new_zeros((1, x.shape[1])) if empty else x, W)
    k = config.subcenters
    if W.shape[0] != (end - start) * k:
        per_class = f" ({k} sub-centre rows per class)" if k > 1 else ""
        raise ValueError(
            f"W must have shape ({(end - start) * k}, {x.shape[1]}): rank {rank} of {world} holds classes "
            f"[{start}, {end}) of num_classes={num_classes}{per_class}, got {tuple(W.shape)}"
        )
    check_row_tensors(config, x.shape[0], x)
    if y is not None:
        if empty and isinstance(y, torch.Tensor) and tuple(y.shape) == (0,):
            y = check_labels(y.new_zeros(1), 1, num_classes, same_device_as=("x", x))[:0]
        else:
            y = check_labels(y, x.shape[0], num_classes, same_device_as=("x", x), ignore=ignore_index)
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
        "the margin configuration (scale, norms, psi)": config_fingerprint(config),
    }


__all__ = [
    "OPERATIONS",
    "PROBE_ANGLES",
    "check_local",
    "common_metadata",
    "config_fingerprint",
    "exchange_metadata",
    "local_failure",
    "shard_range",
]
