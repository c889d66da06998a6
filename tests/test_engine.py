"""The engine's primitive, ``lse_and_target``: per row, the log-sum-exp over the classes given and the
target logit, on the plain and the chunked path, labels of -1 (target held elsewhere) included.

Expected values come from the float64 reference: for a row whose target is present, lse is the
log-sum-exp of ``refimpl.<loss>_logits`` and t its target entry; for a row with label -1, lse is the
log-sum-exp of the margin-free logits S_ij cos theta_ij (written here with the reference's cosines)
and t is 0. Gradients are checked with independent cotangents on lse and t (the cross-entropy ties
them, the sharded path does not), against HIPS autograd of that reference objective. Every margin
loss of the registry runs; its record supplies the strategy and the engine configuration.
"""

from __future__ import annotations

import inspect
import math

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import refimpl
from refimpl.geometry import cosines, row_norms
from refimpl.subcenter import subcenter_cosines
from tests.dispatch_probe import HostReads
from tests.registry import RECORDS
from tests.tolerances import Tol, assert_close
from torch_port import geometry
from torch_port.engine import ABSENT, MarginConfig, lse_and_target, margin_cross_entropy

MARGIN_RECORDS = [record for record in RECORDS if record.config is not None]
CLOSE = Tol(rtol=1e-10, atol=1e-12)
GRADIENT_CLOSE = Tol(rtol=1e-9, atol=1e-11)
# The plain path, and the chunked path one class at a time, three at a time and in one chunk wider than C.
CHUNKS = {"plain": lambda C: None, "k=1": lambda C: 1, "k=3": lambda C: 3, "k>C": lambda C: C + 1}


def reference_logsumexp(z):
    top = anp.max(z, axis=1, keepdims=True)
    return top[:, 0] + anp.log(anp.sum(anp.exp(z - top), axis=1))


def margin_free_logits(x, W, config: MarginConfig):
    """S_ij cos theta_ij with the reference's cosines: the logits of a row whose target is elsewhere."""
    factor = 1.0 if config.scale is None else float(config.scale)
    pooled = cosines(x, W) if config.subcenters == 1 else subcenter_cosines(x, W, config.subcenters)[0]
    logits = factor * pooled
    if config.feature_norm:
        logits = logits * row_norms(x)
    if config.weight_norm:
        logits = logits * row_norms(W).T
    return logits


def logits_keywords(logits_of, kwargs: dict) -> dict:
    """The sample's keywords that the reference's logits take (MagFace's lambda_g is the loss's)."""
    return {k: v for k, v in kwargs.items() if k in inspect.signature(logits_of).parameters}


def reference_terms(record, sample, absent: np.ndarray):
    """(lse, t) of the float64 reference as a function of (x, W), for autograd."""
    logits_of = getattr(refimpl, record.name.replace("_loss", "_logits"))
    config = record.config(sample.kwargs)
    y = sample.labels["y"]
    absent = absent | (y < 0)  # a sample's ignored rows (label -1) have no target here either
    keywords = logits_keywords(logits_of, sample.kwargs)

    def terms(x, W):
        margin = logits_of(x, W, y, **keywords)
        free = margin_free_logits(x, W, config)
        lse = anp.where(absent, reference_logsumexp(free), reference_logsumexp(margin))
        target = anp.where(absent, 0.0, margin[np.arange(len(y)), np.maximum(y, 0)])
        return lse, target

    return terms


def port_terms(record, sample, absent: np.ndarray, chunk_size):
    x, W = (torch.tensor(sample.tensors[name], requires_grad=True) for name in ("x", "W"))
    y = torch.tensor(np.where(absent, ABSENT, sample.labels["y"]))
    lse, target = lse_and_target(x, W, y, record.config(sample.kwargs), chunk_size)
    return (x, W), lse, target


@pytest.mark.parametrize("chunks", sorted(CHUNKS))
@pytest.mark.parametrize("record", MARGIN_RECORDS, ids=str)
@given(data=st.data())
def test_lse_and_target_agree_with_the_reference(record, chunks, data):
    sample = data.draw(record.samples, label="sample")
    batch, classes = len(sample.labels["y"]), len(sample.tensors["W"])
    absent = np.array(data.draw(st.lists(st.booleans(), min_size=batch, max_size=batch), label="absent"))
    # A row the sample ignores (ignore_index) reaches the primitive as an absent row (the engine's rule).
    absent |= sample.labels["y"] == sample.kwargs.get("ignore_index", -1)
    (x, W), lse, target = port_terms(record, sample, absent, CHUNKS[chunks](classes))
    terms = reference_terms(record, sample, absent)
    expected_lse, expected_target = terms(sample.tensors["x"], sample.tensors["W"])
    assert lse.dtype == target.dtype == torch.float64
    assert_close(lse.detach().numpy(), expected_lse, CLOSE, f"{record.name} [{chunks}] lse")
    assert_close(target.detach().numpy(), expected_target, CLOSE, f"{record.name} [{chunks}] target")
    assert not target[torch.from_numpy(absent)].any(), "a row without its target must have t = 0"

    # independent cotangents on the two outputs
    rng = np.random.default_rng(batch * 31 + classes)
    a, b = rng.uniform(0.5, 1.5, batch), rng.uniform(-1.5, 1.5, batch)

    def objective(x_, W_):
        lse_, target_ = terms(x_, W_)
        return anp.sum(a * lse_ + b * target_)

    grads = torch.autograd.grad((lse * torch.tensor(a)).sum() + (target * torch.tensor(b)).sum(), (x, W))
    for argnum, (name, got) in enumerate(zip(("x", "W"), grads)):
        expected = autograd.grad(objective, argnum)(sample.tensors["x"], sample.tensors["W"])
        assert_close(got.numpy(), expected, GRADIENT_CLOSE, f"{record.name} [{chunks}] d/d{name}")


# psi with an infinite slope at cos = 1 (d/dc of -sqrt(1 - c^2)): finite wherever a row is evaluated
# away from cos = 1, so the only way to meet the pole is a row that should not be evaluated at all.
STEEP = MarginConfig(target=lambda cos, theta: cos - 0.2 * torch.sqrt(1.0 - cos * cos), scale=8.0)


@pytest.mark.parametrize("chunks", sorted(CHUNKS))
def test_a_row_without_its_target_never_differentiates_psi_at_a_stand_in(chunks):
    """A row with label -1 gets no gradient through the target side, even when the row of W it
    reads to fill its place (class 0) sits exactly where psi's slope is infinite. The same row with
    its target present is the positive control: there the gradient is not finite."""
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[2.0, 0.0, 0.0], [0.3, 1.0, -0.2]], dtype=torch.float64)  # row 0 parallel to W_0
    chunk_size = CHUNKS[chunks](3)
    for labels, finite in (([ABSENT, 1], True), ([0, 1], False)):
        xs, Ws = x.clone().requires_grad_(), W.clone().requires_grad_()
        lse, target = lse_and_target(xs, Ws, torch.tensor(labels), STEEP, chunk_size)
        (lse - target).sum().backward()
        assert bool(torch.isfinite(xs.grad).all() and torch.isfinite(Ws.grad).all()) is finite, (labels, xs.grad)


def test_labels_are_checked():
    x, W = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"y must lie in \[-1, 4\)"):
        lse_and_target(x, W, torch.tensor([-2, 0]), MarginConfig(scale=2.0))
    with pytest.raises(ValueError, match=r"y must lie in \[0, 4\)"):
        margin_cross_entropy(x, W, torch.tensor([-2, 0]), MarginConfig(scale=2.0))
    # the loss skips -1 by default (ignore_index); without it, -1 is refused like any other
    with pytest.raises(ValueError, match=r"y must lie in \[0, 4\), got values in \[-1, 0\]$"):
        margin_cross_entropy(x, W, torch.tensor([ABSENT, 0]), MarginConfig(scale=2.0), ignore_index=None)
    with pytest.raises(ValueError, match="chunk_size"):
        lse_and_target(x, W, torch.tensor([0, 1]), MarginConfig(), chunk_size=0)


@pytest.mark.parametrize(
    ("chunk_size", "validate", "reads"), [(None, False, 0), (None, True, 1), (4, False, 1), (4, True, 2)]
)
def test_host_reads_per_step(monkeypatch, chunk_size, validate, reads):
    """Forward and backward read back from the device only what they must: the label range check
    (smallest and largest label in one transfer) when validating, and on the chunked path the
    sizes of the label groups per chunk, once per step (the backward reuses them). Counted as on an
    accelerator: on a CPU, where a read is free, the geometry also checks whether sqrt(sum v^2) is
    right before it takes the scaled route for norms (tests/test_edges_norms.py)."""
    monkeypatch.setattr(geometry, "host_reads_are_free", lambda t: False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen, requires_grad=True)
    W = torch.randn(10, 5, generator=gen, requires_grad=True)
    y = torch.tensor([0, 9, ABSENT, 4, 4, ABSENT])
    config = MarginConfig(target=lambda cos, theta: torch.cos(theta + 0.5), scale=16.0)
    probe = HostReads()
    with probe:
        lse, target = lse_and_target(x, W, y, config, chunk_size, validate=validate)
        (lse - target).sum().backward()
    assert probe.count == reads
    # positive control: the probe sees a read where one happens
    with HostReads() as control:
        int(y.max())
        y.tolist()
    assert control.count == 2
    assert math.isfinite(float(lse.detach().sum()))
