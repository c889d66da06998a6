"""Tensor checks, the compute dtype rule and the one reduction helper of the port.

Compute dtype: float64 inputs compute in float64; float32, float16 and bfloat16 compute in float32
(half inputs are upcast, and the loss comes back in float32). Mixing float64 with a lower precision
is refused rather than silently resolved, because it almost always means a model and its head were
put on different precisions by mistake. All checks run before any computation or state change.
"""

from __future__ import annotations

import torch

from softmax_common.checks import MAX_SCALE, check_positive_int, check_reduction, check_scale, label_range_message

HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_float_tensor(t, name: str, ndim: int | None = None, min_ndim: int = 0) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    return t


def compute_dtype(*named: tuple[str, torch.Tensor]) -> torch.dtype:
    """float64 if all float inputs are float64, float32 if none is; a mix is a TypeError."""
    is64 = [t.dtype == torch.float64 for _, t in named]
    if all(is64):
        return torch.float64
    if any(is64):
        names = ", ".join(f"{n}: {t.dtype}" for n, t in named)
        raise TypeError(f"inputs mix float64 with a lower precision ({names}); cast them to one dtype")
    return torch.float32


def check_same_device(*named: tuple[str, torch.Tensor]) -> None:
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        names = ", ".join(f"{n}: {t.device}" for n, t in named)
        raise ValueError(f"inputs are on different devices ({names})")


# Unsigned label dtypes wider than 8 bits: PyTorch has no min/max (nor much else) for them. uint16
# and uint32 convert to int64 exactly; uint64 is read through int64 with its top bit flipped, which
# maps unsigned order onto signed order, so a label >= 2**63 is reported as itself, not wrapped.
_EXACT_IN_INT64 = (torch.uint16, torch.uint32)
_TOP_BIT = -(2**63)


def _label_range(y: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(labels as int64 where that is exact, smallest, largest): one read back from the device."""
    if y.dtype == torch.uint64:
        flipped = torch.bitwise_xor(y.view(torch.int64), _TOP_BIT)
        smallest, largest = (v - _TOP_BIT for v in torch.stack(torch.aminmax(flipped)).tolist())
        return y.view(torch.int64), smallest, largest  # the view is exact once largest < num_classes
    if y.dtype in _EXACT_IN_INT64:
        y = y.to(torch.int64)
    smallest, largest = torch.stack(torch.aminmax(y)).tolist()
    return y, smallest, largest


# How the values of labels (and of a tensor scale) are checked; see set_value_checks.
VALUE_CHECK_MODES = ("auto", "host", "device")
_value_checks = "auto"


def set_value_checks(mode: str) -> str:
    """Choose how label ranges (and a tensor scale's value) are checked; returns the previous mode.

    - ``"auto"`` (the default): read back to the host (a clear error with the values found) in eager
      code on the CPU, where reading costs nothing; a device-side assertion everywhere else: inside
      ``torch.compile`` (a host read would break the graph), while a CUDA graph is captured, and in
      eager code on an accelerator (a host read synchronises the device every step).
    - ``"host"``: always read back, for the clearest error while debugging on a GPU (one
      synchronisation per call; under torch.compile it breaks the graph).
    - ``"device"``: always a device-side assertion (``torch._assert_async``): no read, no
      synchronisation, no graph break. Its message names the argument and the allowed range but not
      the values; on CUDA it is reported asynchronously, as a device-side assert, and the CUDA
      context cannot be used afterwards (as with any device-side assert).
    """
    global _value_checks
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, VALUE_CHECK_MODES))}, got {mode!r}")
    previous, _value_checks = _value_checks, mode
    return previous


def checks_on_device(t: torch.Tensor) -> bool:
    """Whether a value check of ``t`` runs as a device-side assertion (see :func:`set_value_checks`)."""
    if _value_checks != "auto":
        return _value_checks == "device"
    if torch.compiler.is_compiling():
        return True
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True
    return t.device.type != "cpu"


def _assert_labels_on_device(y: torch.Tensor, name: str, low: int, num_classes: int) -> torch.Tensor:
    """The range check as a device-side assertion; returns the labels as int64 (exact where valid)."""
    message = f"{name} must lie in [{low}, {num_classes}) (a device-side check: see torch_port.set_value_checks)"
    if y.dtype == torch.uint64:  # unsigned order through the flipped top bit, as in _label_range
        flipped = torch.bitwise_xor(y.view(torch.int64), _TOP_BIT)
        torch._assert_async((flipped < _TOP_BIT + num_classes).all(), message)
        return y.view(torch.int64)
    y = y.to(torch.int64)
    torch._assert_async(((y >= low) & (y < num_classes)).all(), message)
    return y


def check_labels(
    y,
    batch: int,
    num_classes: int,
    name: str = "y",
    low: int = 0,
    same_device_as: tuple[str, torch.Tensor] | None = None,
    ignore: int | None = None,
) -> torch.Tensor:
    """Integer labels of shape (batch,) with values in [low, num_classes) (low is 0, or -1 where
    -1 marks a row whose target is not among the classes); returns them as int64.

    Every integer dtype is accepted, unsigned ones included (uint16, uint32 and uint64, for which
    PyTorch has no min/max, are read exactly; indexing needs int64 anyway). ``same_device_as``
    (name, tensor): the labels must be on that tensor's device, checked before any value is read,
    so labels on another device (or on ``meta``, which holds no values) get the device error.

    The range check reads the smallest and largest label back to the host in one transfer, in
    eager code on the CPU (a ValueError with the values found); inside torch.compile, during CUDA
    graph capture and on accelerators it is a device-side assertion instead, which neither breaks a
    compiled graph nor synchronises the device (:func:`set_value_checks` chooses otherwise).
    ``ignore``: a negative label (``ignore_index``) also allowed, marking rows to skip; it is kept
    in the labels returned.
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class indices, got dtype {y.dtype}")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got {tuple(y.shape)}")
    if same_device_as is not None:
        check_same_device(same_device_as, (name, y))
    if y.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values; put the labels on a real device")
    if ignore is not None and y.dtype.is_signed:
        # The range is checked over the rows not ignored; the labels returned keep the ignored ones.
        labels = y.long()
        kept = labels != ignore
        if checks_on_device(labels):
            _assert_labels_on_device(torch.where(kept, labels, low), name, low, num_classes)
            return labels
        top, bottom = torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min
        ends = torch.stack([torch.where(kept, labels, top).min(), torch.where(kept, labels, bottom).max()])
        smallest, largest = ends.tolist()
        if (smallest < low or largest >= num_classes) and smallest != top:
            raise ValueError(label_range_message(name, num_classes, smallest, largest, ignore, low))
        return labels
    if checks_on_device(y):
        return _assert_labels_on_device(y, name, low, num_classes)
    y, smallest, largest = _label_range(y)
    if smallest < low or largest >= num_classes:
        raise ValueError(label_range_message(name, num_classes, smallest, largest, None, low))
    return y.long()


def check_features_table_labels(x, table, y, table_name: str, low: int = 0):
    """Features x (B, D), a per-class table (C, D) (weights W or centers) and optional labels (B,)
    in [low, C).

    Checks shapes, the dtype rule and devices; returns the labels as int64 (None when y is None).
    """
    check_float_tensor(x, "x", ndim=2)
    check_float_tensor(table, table_name, ndim=2)
    if table.shape[1] != x.shape[1]:
        raise ValueError(
            f"{table_name} must have shape (C, {x.shape[1]}) to match x's feature dimension, got {tuple(table.shape)}"
        )
    compute_dtype(("x", x), (table_name, table))
    check_same_device(("x", x), (table_name, table))
    if y is None:
        return None
    return check_labels(y, x.shape[0], table.shape[0], low=low, same_device_as=("x", x))


def check_feature_width(x, table: torch.Tensor, owner: str, table_name: str = "weight") -> None:
    """For a module that owns its per-class table (a head's weight, CenterLoss's centers): features x
    (B, D) must have the table's D columns, and a mismatch blames x, the argument the caller gave,
    naming the module's dim. (:func:`check_features_table_labels`, given both tensors by the caller,
    names both.) Only the width of a 2-d tensor is checked here; the rest is left to that check."""
    if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] != table.shape[1]:
        raise ValueError(
            f"x must have {table.shape[1]} columns, the dim of this {owner} (its {table_name} has shape "
            f"{tuple(table.shape)}), got {x.shape[1]}: x has shape {tuple(x.shape)}"
        )


def check_scale_tensor(s: torch.Tensor, *, read_value: bool = True) -> torch.Tensor:
    """A scale s given as a tensor (a learnable s, or s kept on a device), held to the rules of a number.

    Always, from metadata alone: a floating-point 0-d tensor (a (B, 1) tensor would silently scale
    each row by its own s). ``read_value=True`` also requires its value to be finite and > 0 by
    :func:`softmax_common.checks.check_scale`, with the error a number gets; that reads the value
    back from the device (a synchronisation on GPU). ``read_value=False`` is for callers that keep
    the scale positive by construction (``NormFace(learn_scale=True)``'s s = exp(log_scale)) and
    would otherwise pay that read on every training step.
    """
    if not s.is_floating_point():
        raise TypeError(f"s must be a real number or a floating-point 0-d tensor, got a tensor of dtype {s.dtype}")
    if s.dim() != 0:
        raise ValueError(f"s must be a number or a 0-d tensor (one scale for every logit), got shape {tuple(s.shape)}")
    if read_value and s.device.type == "meta":
        raise ValueError("s is on the meta device, which holds no value; give a number or a tensor on a real device")
    if read_value and checks_on_device(s):
        value = s.detach()
        torch._assert_async(
            (torch.isfinite(value) & (value > 0) & (value <= MAX_SCALE)).all(),
            f"s must lie in (0, {MAX_SCALE:g}] (a device-side check: see torch_port.set_value_checks)",
        )
    elif read_value:
        check_scale(float(s.detach()))
    return s


def check_chunk_size(chunk_size) -> int | None:
    """None (the plain path) or the classes per chunk of the memory-efficient path, an int >= 1."""
    return None if chunk_size is None else check_positive_int(chunk_size, "chunk_size")


def reduce_loss(per_sample: torch.Tensor, reduction: str, kept: torch.Tensor | None = None) -> torch.Tensor:
    """The one reduction every loss ends with: mean over the batch, sum, or none.

    ``kept``: a bool (B,) mask of the rows that count (``ignore_index``); the others must already be
    0 in ``per_sample``. "mean" then divides by their number, and by 1 when there is none (a loss of
    0 with zero gradients: an all-ignored batch trains nothing, rather than giving nan)."""
    if reduction == "mean" and kept is not None:
        return per_sample.sum() / kept.sum().clamp_min(1).to(per_sample.dtype)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


__all__ = [
    "HALF_DTYPES",
    "check_chunk_size",
    "check_feature_width",
    "check_features_table_labels",
    "check_float_tensor",
    "check_labels",
    "check_reduction",
    "check_same_device",
    "check_scale_tensor",
    "checks_on_device",
    "compute_dtype",
    "reduce_loss",
    "set_value_checks",
]
