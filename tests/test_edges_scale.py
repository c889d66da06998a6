"""A scale s given as a tensor is held to the rules of a number (issue 13, item 2).

``normface_loss``/``normface_logits`` take s as a number or a tensor (a learnable scale). A tensor
must be a floating-point 0-d tensor with a finite value > 0, and is refused with the error a number
of that value gets; before, tensor(-2.) gave a finite sign-flipped loss, tensor(0.) log C, and a
(B, 1) tensor scaled each row by its own s. ``NormFace(learn_scale=True)`` keeps s = exp(log_scale)
positive by construction: its shape is checked on every call, its value is not read back (no host
synchronisation per step), and a diverged log_scale shows as a non-finite loss.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import refimpl
import torch_port.functional as tpf
from torch_port import NormFace
from torch_port.normalized import normface_config

X = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.3, 2.0]], dtype=torch.float64)
W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [-1.0, 0.5, 0.0]], dtype=torch.float64)
Y = torch.tensor([0, 2])

CALLS = {
    "normface_loss": lambda s: tpf.normface_loss(X, W, Y, s=s),
    "normface_loss(none)": lambda s: tpf.normface_loss(X, W, Y, s=s, reduction="none"),
    "normface_loss(chunked)": lambda s: tpf.normface_loss(X, W, Y, s=s, chunk_size=2),
    "normface_logits": lambda s: tpf.normface_logits(X, W, Y, s=s),
    "normface_logits(no y)": lambda s: tpf.normface_logits(X, W, s=s),
    "normface_config": normface_config,
}


def _outcome(call):
    try:
        return "ok", call()
    except (TypeError, ValueError) as error:
        return type(error), str(error)


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("value", [-2.0, 0.0, -0.0, math.nan, math.inf, -math.inf])
def test_a_bad_tensor_scale_gets_the_error_of_the_same_number(name, value):
    kind, message = _outcome(lambda: CALLS[name](value))
    assert kind is ValueError and "s" in message
    for dtype in (torch.float64, torch.float32, torch.float16):
        s = torch.tensor(value, dtype=dtype, requires_grad=True)
        assert _outcome(lambda: CALLS[name](s)) == (kind, message), dtype  # noqa: B023
        assert s.grad is None


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("shape", [(2, 1), (1,), (3,), (1, 1)])
def test_a_scale_tensor_that_is_not_0d_is_refused(name, shape):
    with pytest.raises(ValueError, match=r"^s must be a number or a 0-d tensor.*got shape"):
        CALLS[name](torch.full(shape, 16.0, dtype=torch.float64))


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("s", [torch.tensor(16), torch.tensor(True), torch.tensor(16.0 + 0j)], ids=str)
def test_a_scale_tensor_that_is_not_floating_point_is_refused(name, s):
    with pytest.raises(TypeError, match=r"^s must be a real number or a floating-point 0-d tensor"):
        CALLS[name](s)


@given(
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e300, 64.0, -64.0]),
    )
)
def test_tensor_and_number_scales_are_one_rule(value):
    """For any float: both accepted with the same loss, or both refused with the same error."""
    number = _outcome(lambda: tpf.normface_loss(X, W, Y, s=value))
    tensor = _outcome(lambda: tpf.normface_loss(X, W, Y, s=torch.tensor(value, dtype=torch.float64)))
    assert number[0] == tensor[0]
    if number[0] == "ok":
        assert torch.equal(number[1], tensor[1]) or (number[1].isnan() and tensor[1].isnan())
    else:
        assert number[1] == tensor[1]


def test_a_good_tensor_scale_is_the_reference_loss_and_differentiable():
    s = torch.tensor(12.5, dtype=torch.float64, requires_grad=True)
    loss = tpf.normface_loss(X, W, Y, s=s)
    x, w, y = X.numpy(), W.numpy(), Y.numpy()
    assert loss.item() == pytest.approx(refimpl.normface_loss(x, w, y, s=12.5), rel=1e-13)
    loss.backward()
    h = 1e-6
    numeric = (refimpl.normface_loss(x, w, y, s=12.5 + h) - refimpl.normface_loss(x, w, y, s=12.5 - h)) / (2 * h)
    assert s.grad.item() == pytest.approx(numeric, rel=1e-7)
    logits = tpf.normface_logits(X, W, s=torch.tensor(12.5, dtype=torch.float64))
    assert np.allclose(logits.numpy(), refimpl.normface_logits(x, w, s=12.5), rtol=1e-14, atol=1e-14 * 12.5)


def test_the_learned_scales_config_reads_no_value():
    """A meta tensor has no values: building the config of a meta head reads none, so it makes no
    host synchronisation on GPU. A tensor given to the functional path is checked: a meta one, which
    has no value to check, is refused."""
    head = NormFace(5, 4, learn_scale=True, device="meta")
    assert head.margin_config().scale.device.type == "meta"
    assert head.inference_config().scale.device.type == "meta"
    with pytest.raises(ValueError, match="s is on the meta device"):
        normface_config(torch.tensor(16.0, device="meta"))


def test_a_learned_scale_of_the_wrong_shape_is_refused_changing_nothing():
    head = NormFace(3, 3, s=10.0, learn_scale=True, dtype=torch.float64)
    head.log_scale = nn.Parameter(torch.full((2, 1), math.log(10.0), dtype=torch.float64))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match=r"^s must be a number or a 0-d tensor.*\(2, 1\)"):
        head(X, Y)
    with pytest.raises(ValueError, match=r"^s must be a number or a 0-d tensor"):
        head.logits(X)
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("log_scale", [math.nan, math.inf, -math.inf, 200.0])
def test_a_diverged_learned_scale_shows_as_a_non_finite_loss(log_scale):
    """Not read back per step, so not refused: the loss says it (what AMP's GradScaler checks)."""
    head = NormFace(3, 3, learn_scale=True)
    with torch.no_grad():
        head.log_scale.fill_(log_scale)
    if log_scale == -math.inf:  # s = 0 exactly: every logit 0, the loss log C (the documented silent case)
        assert head(X.float(), Y).item() == pytest.approx(math.log(3))
    else:
        assert not torch.isfinite(head(X.float(), Y))


def test_a_learned_scale_still_refuses_bad_values_that_enter_from_outside():
    head = NormFace(3, 3, s=10.0, learn_scale=True, dtype=torch.float64)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"\bs\b"):
            head.s = bad
        with pytest.raises(ValueError, match=r"\bs\b"):
            NormFace(3, 3, s=bad, learn_scale=True)
    assert head.s == pytest.approx(10.0, rel=1e-15)
