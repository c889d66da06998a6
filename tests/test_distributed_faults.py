"""Faults of the class-sharded path on 2 gloo ranks: every rank raises the same clear error at once.

The scenarios run in the workers of tests/sharded_runner.py (tests/distributed_faults.py), each on a
process group whose timeout is FAULT_TIMEOUT_S: a rank left waiting for a peer would wait that long
and then raise the collective's timeout error, so a regression fails here within seconds instead of
hanging for gloo's default 30 minutes. "At once" is asserted as: every rank's call returned in less
than that timeout.

Covered: a local check that raises something other than ValueError/TypeError on one rank (issue 13,
item 8), uint32 labels on one rank, ranks making different calls (loss on one, logits on another,
item 9), ranks without samples and a global batch without any (item 10), and pickling and saving
whole sharded heads of every configuration (item 11). The numerics of empty ranks on 2 and 4 ranks
(loss and gradients of every reduction, plain and chunked, function and head) are cases of
tests/distributed_cases.py, run by tests/test_distributed.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import refimpl
from tests.distributed_faults import FAULT_TIMEOUT_S, NUM_CLASSES
from tests.sharded_runner import WORLD
from tests.tolerances import PATH_AGREEMENT, assert_close
from torch_port.engine import margin_cross_entropy
from torch_port.normalized import cosface_config


def _scenario(runner, name: str) -> list[dict]:
    return runner.request(("scenario", name))


def _same_error_at_once(per_rank: list[dict], call: str, error: str) -> str:
    """Every rank raised ``error`` with the same message within the group's timeout; the message."""
    outcomes = [got[call] for got in per_rank]
    for rank, outcome in enumerate(outcomes):
        assert outcome["error"] == error, f"{call}, rank {rank}: {outcome}"
        assert outcome["seconds"] < FAULT_TIMEOUT_S, f"{call}, rank {rank} waited for the timeout: {outcome}"
    messages = {outcome["message"] for outcome in outcomes}
    assert len(messages) == 1, f"{call}: the ranks' messages differ: {messages}"
    return messages.pop()


def _in_step_afterwards(per_rank: list[dict]) -> None:
    """A normal call after the faults goes through, with the same loss on every rank."""
    values = [got["afterwards"]["value"] for got in per_rank]
    assert all(got["afterwards"]["error"] is None for got in per_rank), [got["afterwards"] for got in per_rank]
    assert math.isfinite(float(values[0])) and all(np.array_equal(v, values[0]) for v in values)


def test_an_unexpected_exception_in_one_ranks_checks_reaches_every_rank_at_once(sharded_runner):
    """Item 8: the last rank's check raises NotImplementedError (as min() of uint32 labels did) or
    IndexError; every rank raises the same RuntimeError naming that rank and the original error, at
    once, for the loss, the head's loss and the logits; on the failing rank it is chained to the
    original."""
    per_rank = _scenario(sharded_runner, "unexpected_exception_in_a_check")
    for call, original, what in (
        ("loss", "NotImplementedError", "the loss"),
        ("head", "NotImplementedError", "the loss"),
        ("logits", "NotImplementedError", "the logits"),
        ("index error", "IndexError", "the loss"),
    ):
        message = _same_error_at_once(per_rank, call, "RuntimeError")
        assert message.startswith(f"rank {WORLD - 1} rejected its inputs, so no rank computes {what}: {original}: ")
        assert per_rank[-1][call]["cause"] == original
        assert all(got[call]["cause"] is None for got in per_rank[:-1])
    _in_step_afterwards(per_rank)


def test_uint32_labels_on_one_rank_give_every_rank_the_same_outcome_at_once(sharded_runner):
    """The issue's example: whatever the label checks make of uint32 labels (refused, or converted),
    every rank does the same, at once: the same error naming the last rank, or the same loss."""
    per_rank = _scenario(sharded_runner, "uint32_labels_on_one_rank")
    outcomes = [got["loss"] for got in per_rank]
    assert all(outcome["seconds"] < FAULT_TIMEOUT_S for outcome in outcomes), outcomes
    if outcomes[0]["error"] is None:
        assert all(np.array_equal(outcome["value"], outcomes[0]["value"]) for outcome in outcomes), outcomes
    else:
        message = _same_error_at_once(per_rank, "loss", outcomes[0]["error"])
        assert message.startswith(f"rank {WORLD - 1} rejected its inputs"), message


def test_ranks_making_different_calls_all_raise_a_clear_value_error(sharded_runner):
    """Item 9: rank 0 asks for the loss while rank 1 asks for the logits (through the head or the
    functions, either way round): both raise the same ValueError naming each rank's call."""
    per_rank = _scenario(sharded_runner, "mismatched_calls")
    loss, logits = "the loss (sharded_margin_cross_entropy", "the logits (sharded_logits"
    for call, first, second in (
        ("loss vs logits", loss, logits),
        ("logits vs loss", logits, loss),
        ("function vs function", loss, logits),
    ):
        message = _same_error_at_once(per_rank, call, "ValueError")
        assert message.startswith("every rank must make the same call at the same time"), message
        assert f"rank 0: {first}" in message and f"rank 1: {second}" in message, message
    _in_step_afterwards(per_rank)


def test_a_rank_without_samples_takes_part_and_an_empty_global_batch_is_refused(sharded_runner):
    """Item 10: the last rank holds x of shape (0, D). The loss is that of the other ranks' samples
    (NumPy reference, refimpl.cosface_loss, on the concatenated batch), the empty rank's logits are
    (0, C) and the others' the reference rows, its gradient is (0, D); with no sample on any rank,
    every rank raises the same ValueError at once. (Loss and gradients for every reduction, on 2 and
    4 ranks: the empty-rank cases of tests/test_distributed.py.)"""
    per_rank = _scenario(sharded_runner, "empty_batches")
    x = np.concatenate([got["x"] for got in per_rank])
    y = np.concatenate([got["y"] for got in per_rank])
    W = np.concatenate([got["W"] for got in per_rank])
    assert per_rank[-1]["x"].shape == (0, x.shape[1]) and x.shape[0] == 3
    tol = PATH_AGREEMENT["float64"]
    expected_loss = refimpl.cosface_loss(x, W, y, s=8.0, m=0.2, reduction="none")
    expected_logits = refimpl.normface_logits(x, W, s=8.0)
    xt = torch.tensor(x, requires_grad=True)
    loss = margin_cross_entropy(xt, torch.tensor(W), torch.tensor(y), cosface_config(8.0, 0.2))
    (expected_dx,) = torch.autograd.grad(loss, xt)
    offset = 0
    for rank, got in enumerate(per_rank):
        rows = slice(offset, offset + got["x"].shape[0])
        offset = rows.stop
        for call in ("loss", "head logits", "logits", "backward"):
            assert got[call]["error"] is None, f"rank {rank}, {call}: {got[call]}"
        assert_close(got["loss"]["value"], expected_loss, tol, f"rank {rank}: loss")
        for call in ("head logits", "logits"):
            assert got[call]["value"].shape == (got["x"].shape[0], NUM_CLASSES)
            assert_close(got[call]["value"], expected_logits[rows], tol, f"rank {rank}: {call}")
        assert got["backward"]["value"].shape == got["x"].shape
        assert_close(got["backward"]["value"], expected_dx[rows].numpy(), tol, f"rank {rank}: dL/dx")
    for call in ("all empty: loss", "all empty: logits"):
        message = _same_error_at_once(per_rank, call, "ValueError")
        assert message.startswith(f"x must hold at least one sample on some rank: x has 0 rows on all {WORLD} ranks")
    _in_step_afterwards(per_rank)


def test_every_sharded_head_pickles_and_saves_whole(sharded_runner):
    """Item 11: every sharded head configuration (each registry loss, the variants, a learned scale,
    a sampling head with its generator) round-trips through pickle and torch.save/torch.load
    (weights_only=False): the copies give the original's loss, sampled classes and logits exactly,
    hold its state, and their configurations compare equal to a freshly built one."""
    per_rank = _scenario(sharded_runner, "pickled_heads")
    assert "normface-learnable-scale" in per_rank[0] and "cosface, sampled" in per_rank[0]
    for rank, heads in enumerate(per_rank):
        for name, results in heads.items():
            original = results["original"]
            assert original["config equal"], f"rank {rank}, {name}: a rebuilt configuration differs"
            for which in ("pickle", "torch.save"):
                copy, what = results[which], f"rank {rank}, {name}, {which}"
                assert copy["config equal"], what
                for key in ("loss", "logits"):
                    assert np.array_equal(copy[key], original[key]), f"{what}: {key}"
                assert (copy["kept"] is None) == (original["kept"] is None), what
                if original["kept"] is not None:
                    assert np.array_equal(copy["kept"], original["kept"]), what
                assert copy["state"].keys() == original["state"].keys(), what
                for key, value in original["state"].items():
                    same = np.array_equal(copy["state"][key], value) if isinstance(value, np.ndarray) else None
                    assert same if same is not None else copy["state"][key] == value, f"{what}: {key}"
def test_host_reads_per_sharded_step(sharded_runner):
    """Issue 17: the reads of tensor data back to the host in one sharded step (forward and
    backward, torch.distributed's own calls included), each a synchronisation on a GPU. With the
    value checks on the device (what a GPU gets by default), the plain path reads once: the
    all-gathered batch sizes and metadata digests, which the padded all-gather of the rows needs.
    The chunked path adds its one read per pass that groups the labels by chunk; Partial FC's
    sampling one for the number of positives (k of top-k). In eager code on the CPU ("auto") more
    is read where a read costs nothing there: the label range, for an error with the values, and
    whether rows' norms can take the plain route (torch_port.geometry.host_reads_are_free)."""
    per_rank = _scenario(sharded_runner, "host_reads_per_step")
    expected = {"plain": 1, "chunked": 2, "head": 1, "head-sampled": 2}
    for counts in per_rank:
        for call, reads in expected.items():
            assert counts[f"{call} (device)"] == reads, (call, counts)
            assert counts[f"{call} (auto)"] > reads, (call, counts)
