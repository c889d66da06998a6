"""Per-row parameters of a target transform: one value per row of the batch (per-sample margins).

A target transform (torch_port/geometry.py, ``MarginConfig.target``) that is a dataclass may hold
1-d tensor fields, one entry per row of the batch: ArcFace with a margin per sample, ElasticFace's
drawn margins, per-class margins looked up by label. Each path of the engine hands such a transform
the rows it works on: the plain path all of them, the chunked path a block of rows at a time
(:func:`rows_of_config`), the sharded path the global batch, gathered over the ranks
(:func:`map_row_tensors` with an all-gather). The tensors are constants to the loss: their
gradient is not computed (a per-sample margin is a hyperparameter, not a parameter).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from softmax_common.checks import check_margin_vector_shape
from torch_port.geometry import MarginConfig


@dataclass(frozen=True, eq=False)
class ByLabel:
    """Per-class values (C,) of a transform's field (per-class margins), looked up by each row's label
    where the labels are known (:func:`resolve_labels`: the engine's losses, and the sharded path
    with the global batch's labels), which makes them per-row values. Its table is not a per-row
    tensor: the row functions below leave it alone."""

    table: torch.Tensor


def _map_by_label(target, fn):
    if target is None or not dataclasses.is_dataclass(target) or isinstance(target, type):
        return target
    changes = {}
    for field in dataclasses.fields(target):
        value = getattr(target, field.name)
        if isinstance(value, ByLabel):
            changes[field.name] = fn(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            inner = _map_by_label(value, fn)
            if inner is not value:
                changes[field.name] = inner
    return dataclasses.replace(target, **changes) if changes else target


def resolve_labels(config: MarginConfig, y: torch.Tensor) -> MarginConfig:
    """The configuration with every :class:`ByLabel` field replaced by its values at the labels y
    (B,) (a label below 0, an absent or ignored row, reads class 0's; its target is masked anyway)."""
    target = _map_by_label(config.target, lambda by: by.table[y.clamp_min(0)])
    return config if target is config.target else dataclasses.replace(config, target=target)


def by_label_tables(config: MarginConfig) -> list[torch.Tensor]:
    """The tables of the configuration's :class:`ByLabel` fields."""
    found: list[torch.Tensor] = []
    _map_by_label(config.target, lambda by: found.append(by.table) or by)
    return found


def with_by_label_table(config: MarginConfig, table: torch.Tensor) -> MarginConfig:
    """The configuration with its :class:`ByLabel` tables replaced by ``table`` (a module's buffer,
    where the module has moved it to another device or dtype)."""
    target = _map_by_label(config.target, lambda by: ByLabel(table))
    return config if target is config.target else dataclasses.replace(config, target=target)


def map_row_tensors(target, fn):
    """The target transform with every per-row tensor field (a 1-d tensor: one value per row of the
    batch) replaced by ``fn(field)``, through nested dataclasses (a wrapped transform); anything
    else unchanged. ``fn`` restricts them to a block of rows (the chunked path) or gathers them
    over ranks (the sharded path)."""
    if target is None or not dataclasses.is_dataclass(target) or isinstance(target, type):
        return target
    changes = {}
    for field in dataclasses.fields(target):
        value = getattr(target, field.name)
        if isinstance(value, ByLabel):
            continue
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            changes[field.name] = fn(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            inner = map_row_tensors(value, fn)
            if inner is not value:
                changes[field.name] = inner
    return dataclasses.replace(target, **changes) if changes else target


def row_tensors(target) -> list[tuple[str, torch.Tensor]]:
    """(field name, tensor) of every per-row tensor field of a target transform (see :func:`map_row_tensors`)."""
    found: list[tuple[str, torch.Tensor]] = []
    if target is not None and dataclasses.is_dataclass(target) and not isinstance(target, type):
        for field in dataclasses.fields(target):
            value = getattr(target, field.name)
            if isinstance(value, torch.Tensor) and value.dim() == 1:
                found.append((field.name, value))
            elif dataclasses.is_dataclass(value) and not isinstance(value, type) and not isinstance(value, ByLabel):
                found.extend(row_tensors(value))
    return found


def rows_of_config(config: MarginConfig, rows) -> MarginConfig:
    """The configuration for a block of rows of the batch (``rows`` a slice or an index tensor)."""
    target = map_row_tensors(config.target, lambda t: t[rows])
    return config if target is config.target else dataclasses.replace(config, target=target)


def check_row_tensors(config: MarginConfig, batch: int, x: torch.Tensor) -> None:
    """Every per-row tensor of the configuration holds one value per row of the batch, on x's device."""
    for name, value in row_tensors(config.target):
        check_margin_vector_shape(tuple(value.shape), batch, name)
        if value.device != x.device:
            raise ValueError(f"{name} must be on x's device ({x.device}), got {value.device}")


__all__ = [
    "ByLabel",
    "by_label_tables",
    "check_row_tensors",
    "map_row_tensors",
    "resolve_labels",
    "row_tensors",
    "rows_of_config",
    "with_by_label_table",
]
