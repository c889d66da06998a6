"""Angular margins are in radians, and a margin meant in degrees is told so (issue 14, item 2).

pytorch-metric-learning's ArcFace margin is in degrees (28.6 there is 0.4992 rad here). An angular
margin (ArcFace's m, the combined margin's m2) must lie in [0, pi/2]; the error says "radians", and
for a refused value that would be a valid margin in degrees (pi/2 < m <= 90) it gives the value in
radians. Expected numbers come from m * pi / 180 computed here, not from the message's code.
Both sides of the boundary pi/2 are tested, on the functions of both packages and the heads.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import refimpl
import torch_port.functional as tpf
from torch_port import ArcFace, CombinedMargin
from torch_port.normalized import arcface_config, combined_margin_config

X = np.array([[1.0, 2.0, -1.0], [0.5, -0.3, 2.0], [0.0, 1.0, 0.0]])
W = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [-1.0, 0.5, 0.0], [0.2, 0.2, 0.9]])
Y = np.array([0, 2, 3])
RIGHT_ANGLE = math.pi / 2


def _tensors():
    return torch.tensor(X), torch.tensor(W), torch.tensor(Y)


def _head(cls, name, value):
    head = cls(4, 3, **{name: value}, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(W))
    return head(*(t for i, t in enumerate(_tensors()) if i != 1))


# Every way an angular margin enters: (the margin's name, a call with that margin -> a loss or logits).
CALLS = {
    "refimpl.arcface_loss": ("m", lambda v: refimpl.arcface_loss(X, W, Y, m=v)),
    "refimpl.arcface_logits": ("m", lambda v: refimpl.arcface_logits(X, W, Y, m=v)),
    "refimpl.combined_margin_loss": ("m2", lambda v: refimpl.combined_margin_loss(X, W, Y, m2=v)),
    "torch_port.arcface_loss": ("m", lambda v: tpf.arcface_loss(*_tensors(), m=v)),
    "torch_port.arcface_logits": ("m", lambda v: tpf.arcface_logits(*_tensors(), m=v)),
    "torch_port.arcface_loss(chunked)": ("m", lambda v: tpf.arcface_loss(*_tensors(), m=v, chunk_size=2)),
    "torch_port.combined_margin_loss": ("m2", lambda v: tpf.combined_margin_loss(*_tensors(), m2=v)),
    "torch_port.combined_margin_logits": ("m2", lambda v: tpf.combined_margin_logits(*_tensors(), m2=v)),
    "arcface_config": ("m", lambda v: arcface_config(64.0, v, False)),
    "combined_margin_config": ("m2", lambda v: combined_margin_config(64.0, 1.0, v, 0.0)),
    "ArcFace head": ("m", lambda v: _head(ArcFace, "m", v)),
    "CombinedMargin head": ("m2", lambda v: _head(CombinedMargin, "m2", v)),
}


def _refusal(name: str, value: float) -> str:
    margin, call = CALLS[name]
    with pytest.raises(ValueError, match=rf"^{margin} must lie in \[0\.0, 1\.5707963267948966\]") as caught:
        call(value)
    message = str(caught.value)
    assert "radians" in message, message
    return message


@pytest.mark.parametrize("name", list(CALLS))
def test_pml_degrees_are_refused_with_their_value_in_radians(name):
    message = _refusal(name, 28.6)
    assert f"{28.6 * math.pi / 180:.4f}" == "0.4992"
    assert "0.4992" in message and "degrees" in message, message


@pytest.mark.parametrize("name", list(CALLS))
def test_right_angle_is_the_largest_margin(name):
    """pi/2 is accepted (a finite loss or logits); the next float above it is refused, with the degrees
    hint (it is a valid margin in degrees); so are 90 (its radians, pi/2, are accepted) and a negative m."""
    out = CALLS[name][1](RIGHT_ANGLE)
    if not hasattr(out, "target"):  # a loss or logits, not a configuration
        assert np.isfinite(np.asarray(out.detach() if isinstance(out, torch.Tensor) else out)).all()
    above = math.nextafter(RIGHT_ANGLE, math.inf)
    assert "math.radians(1.5708) = 0.02742" in _refusal(name, above)
    assert "math.radians(90) = 1.571" in _refusal(name, 90.0)
    CALLS[name][1](math.radians(90.0))  # what that hint says to pass is accepted
    assert "math.radians" not in _refusal(name, -0.1)


@pytest.mark.parametrize("name", list(CALLS))
def test_no_degrees_hint_where_the_value_is_no_margin_in_degrees_either(name):
    """Past 90 the value is refused in either unit: the message says radians, and suggests nothing."""
    for value in (math.nextafter(90.0, math.inf), 180.0, math.inf):
        message = _refusal(name, value)
        assert "degrees," not in message and "math.radians" not in message, message


@given(value=st.floats(min_value=RIGHT_ANGLE, max_value=90.0, exclude_min=True))
def test_the_hint_is_the_angle_in_radians_and_is_accepted(value):
    """For every refused m in (pi/2, 90]: the hint's number is m * pi / 180 to 4 significant digits, and
    the call it suggests, m=math.radians(value), is accepted and means that angle."""
    message = _refusal("torch_port.arcface_loss", value)
    hint = re.search(r"math\.radians\(([^)]*)\) = (\S+)$", message)
    assert hint is not None, message
    suggested = float(hint.group(2))
    exact = value * math.pi / 180
    assert abs(suggested - exact) <= 5e-4 * exact
    assert math.isclose(math.radians(float(hint.group(1))), exact, rel_tol=1e-5)
    assert np.isfinite(refimpl.arcface_loss(X, W, Y, m=math.radians(value)))


def test_a_head_whose_margin_is_set_to_degrees_fails_its_next_call_and_changes_nothing():
    head = ArcFace(4, 3, m=0.5, dtype=torch.float64)
    before = head.weight.detach().clone()
    head.m = 28.6
    x, _, y = _tensors()
    with pytest.raises(ValueError, match=r"radians.*0\.4992"):
        head(x, y)
    assert torch.equal(head.weight, before)


def test_both_packages_give_the_same_message():
    for margin, prefix in (("m", "arcface"), ("m2", "combined_margin")):
        messages = {_refusal(f"{package}.{prefix}_loss", 28.6) for package in ("refimpl", "torch_port")}
        assert len(messages) == 1, messages
        assert next(iter(messages)).startswith(f"{margin} must lie in")
