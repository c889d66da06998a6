"""Features of the wrong width: a head blames x, not the weight it owns (issue 14, item 3).

A head built with dim=4 and given x of width 6 used to say "W must have shape (C, 6) to match x's
feature dimension, got (5, 4)", blaming W, which the caller never passed. A module that owns its
per-class table (the margin heads, CenterLoss; ShardedMarginHead in tests/test_distributed.py) now
names x and its own dim. The functions, given both x and W by the caller, name both. Heads come from
the registry's records; so do the functions, in both packages.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch

from tests.registry import RECORDS
from torch_port import CenterLoss

# W of (C, D) per head; SubCenterArcFace (C k rows) is tested in tests/test_modern_margins.py.
HEAD_RECORDS = [record for record in RECORDS if record.head is not None and record.rows_per_class == 1]
C, D, WIDE = 5, 4, 6


def _head_message(owner: str, table: str = "weight") -> str:
    return rf"^x must have {D} columns, the dim of this {owner} \(its {table} has shape \({C}, {D}\)\), got {WIDE}: "


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unchanged(module: torch.nn.Module, before: dict) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("record", HEAD_RECORDS, ids=str)
def test_a_head_names_x_and_its_dim(record, training, chunk_size):
    head = record.head(record.defaults, C, D, chunk_size=chunk_size, dtype=torch.float64).train(training)
    name = type(head).__name__
    before = _state(head)
    x, y = torch.randn(3, WIDE, dtype=torch.float64), torch.tensor([0, 4, 2])
    with pytest.raises(ValueError, match=_head_message(name)):
        head(x, y)
    with pytest.raises(ValueError, match=_head_message(name)):
        head.logits(x)
    assert _unchanged(head, before)  # the weight, and the annealing schedule's iteration
    # the right width still works, and other errors of x are still the engine's
    assert torch.isfinite(head(torch.randn(3, D, dtype=torch.float64), y))
    with pytest.raises(ValueError, match=r"^x must have 2 dimensions"):
        head(torch.randn(3, D, 1, dtype=torch.float64), y)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_center_loss_names_x_and_its_dim(training):
    module = CenterLoss(C, D, dtype=torch.float64).train(training)
    module.centers.add_(1.0)
    before = _state(module)
    with pytest.raises(ValueError, match=_head_message("CenterLoss", "centers")):
        module(torch.randn(3, WIDE, dtype=torch.float64), torch.tensor([0, 4, 2]))
    assert _unchanged(module, before)


FUNCTION_RECORDS = [
    (record, table)
    for record in RECORDS
    for table in ("W", "centers")
    if {"x", table} <= set(inspect.signature(record.reference).parameters)
]


@pytest.mark.parametrize("package", ["reference", "port"])
@pytest.mark.parametrize(("record", "table"), FUNCTION_RECORDS, ids=str)
def test_a_function_given_both_names_both(record, table, package):
    """The caller passed x and W (or centers): the message names both, with both widths."""
    x, weights, y = np.ones((3, WIDE)), np.ones((C, D)), np.array([0, 4, 2])
    arrays = {"x": x, table: weights, "y": y}
    fn = getattr(record, package)
    if package == "port":
        arrays = {k: torch.tensor(v) for k, v in arrays.items()}
    names = [n for n in inspect.signature(record.reference).parameters if n in arrays]
    with pytest.raises(ValueError) as caught:
        fn(*(arrays[n] for n in names), **record.defaults)
    message = str(caught.value)
    assert re.search(rf"\b{table}\b", message) and re.search(r"\bx\b", message), message
    assert str(WIDE) in message and f"({C}, {D})" in message, message
