"""The hyperparameter bounds of softmax_common.checks at their edges: both packages and the heads.

s <= MAX_SCALE = 1e4 (every normalized loss), the integer m <= MAX_MARGIN_MULTIPLIER = 16 (L-Softmax,
SphereFace) and m1 <= 16 (the combined margin); docs/design.md says why. At the bound the losses
work: finite values and gradients in float64 and float32, the port agreeing with the reference, the
heads with the functions. One step past it (the next float; m + 1) the configuration builders, the
heads and NormFace's scale setter refuse with a ValueError that names the argument, and change
nothing. The functions' refusals, with the values that once broke them (s = 1e39 gave nan in
float32, m1 = 1e308 a math domain error, m = 1e300 an OverflowError), are error inputs of the
registry, run by tests/test_shared_suites.py.
"""

from __future__ import annotations

import inspect
import math

import autograd
import numpy as np
import pytest
import torch

import refimpl
import torch_port.functional as tpf
from softmax_common.checks import MAX_MARGIN_MULTIPLIER, MAX_SCALE
from tests.registry import RECORDS
from tests.tolerances import Tol, assert_close
from torch_port import NormFace

# argument -> (the bound, the next value), and which records take it (a margin loss whose defaults
# name it; the integer m of L-Softmax and SphereFace, not CosFace's or ArcFace's real margin m).
BOUNDS = {
    "s": (MAX_SCALE, math.nextafter(MAX_SCALE, math.inf)),
    "m1": (float(MAX_MARGIN_MULTIPLIER), math.nextafter(float(MAX_MARGIN_MULTIPLIER), math.inf)),
    "m": (MAX_MARGIN_MULTIPLIER, MAX_MARGIN_MULTIPLIER + 1),
}
CASES = [
    pytest.param(record, arg, id=f"{record.name}-{arg}")
    for record in RECORDS
    for arg in BOUNDS
    if record.head is not None and arg in record.defaults and (arg != "m" or isinstance(record.defaults["m"], int))
    and record.rows_per_class == 1  # these build W as (C, D)
]

RNG = np.random.default_rng(13)
# Targets at angles from about 1 to 176 degrees, on both sides of the combined margin's switch
# (pi - m2)/m1 = 9.5 degrees at m1 = 16, across many branches of psi at m = 16; not at the poles,
# where the reference has no derivative (the shared suites hold the port's convention there).
X, W = RNG.normal(size=(6, 3)), RNG.normal(size=(5, 3))
Y = np.array([1, 0, 2, 3, 4, 0])
X[0] = 2.0 * W[1] + 0.05 * RNG.normal(size=3)
X[5] = -0.5 * W[0] + 0.05 * RNG.normal(size=3)
U32 = 2.0**-24


def test_every_bound_has_its_losses():
    assert {arg for _, arg in (case.values for case in CASES)} == set(BOUNDS)


@pytest.mark.parametrize(("record", "arg"), CASES)
def test_the_bound_itself_works_in_both_packages(record, arg):
    kwargs = {**record.defaults, arg: BOUNDS[arg][0]}
    logits_of = getattr(refimpl, record.name.replace("_loss", "_logits"))
    # the logits take the loss's keywords but a per-sample penalty's (MagFace's lambda_g)
    logits = logits_of(X, W, Y, **{k: v for k, v in kwargs.items() if k in inspect.signature(logits_of).parameters})
    loss, (gx, gW) = record.reference(X, W, Y, **kwargs), autograd.grad(record.reference, (0, 1))(X, W, Y, **kwargs)
    assert np.isfinite(loss) and np.all(np.isfinite(gx)) and np.all(np.isfinite(gW))
    scale = max(1.0, float(np.max(np.abs(logits))))
    for dtype, tol in ((torch.float64, Tol(1e-10, 1e-10)), (torch.float32, Tol(0.0, 64 * U32))):
        xt, Wt = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in (X, W))
        out = record.port(xt, Wt, torch.from_numpy(Y), **kwargs)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(xt.grad).all() and torch.isfinite(Wt.grad).all()
        # float32: a logit carries a few u of its size (the bound's own argument), and so does the loss
        assert_close(out.item(), loss, Tol(tol.rtol, tol.atol * scale), f"{record.name} {dtype}")
        if dtype == torch.float64:
            assert_close(xt.grad.numpy(), gx, tol, f"{record.name}: d/dx")
            assert_close(Wt.grad.numpy(), gW, tol, f"{record.name}: d/dW")


@pytest.mark.parametrize(("record", "arg"), CASES)
def test_the_head_at_the_bound_is_the_function(record, arg):
    kwargs = {**record.defaults, arg: BOUNDS[arg][0]}
    head = record.head(kwargs, W.shape[0], W.shape[1], dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(W))
    x = torch.tensor(X, requires_grad=True)
    loss = head(x, torch.from_numpy(Y))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    assert_close(loss.item(), record.reference(X, W, Y, **kwargs), Tol(1e-10, 1e-10), record.name)


@pytest.mark.parametrize(("record", "arg"), CASES)
def test_one_step_past_the_bound_is_refused_naming_the_argument(record, arg):
    kwargs = {**record.defaults, arg: BOUNDS[arg][1]}
    match = rf"\b{arg}\b.*(\(0, 10000\]|\[1(\.0)?, 16\])"
    for build in (
        lambda: record.config(kwargs),
        lambda: record.head(kwargs, W.shape[0], W.shape[1]),
        lambda: record.port(torch.tensor(X), torch.tensor(W), torch.from_numpy(Y), **kwargs),
        lambda: record.reference(X, W, Y, **kwargs),
    ):
        with pytest.raises(ValueError, match=match):
            build()


@pytest.mark.parametrize("learn_scale", [False, True])
def test_normface_scale_setter_refuses_past_the_bound_and_keeps_its_scale(learn_scale):
    head = NormFace(5, 3, s=MAX_SCALE, learn_scale=learn_scale, dtype=torch.float64)
    assert head.s == pytest.approx(MAX_SCALE, rel=1e-15)
    head.s = 30.0
    before = {k: v.clone() for k, v in head.state_dict().items()}
    for bad in (BOUNDS["s"][1], 1e39):
        with pytest.raises(ValueError, match=r"\bs\b.*\(0, 10000\]"):
            head.s = bad
    assert head.s == pytest.approx(30.0, rel=1e-15)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())


def test_the_values_that_broke_the_computation_are_refused_by_the_heads():
    """s = 1e39 gave a nan loss in float32; m1 = 1e308 a math domain error; L-Softmax's m = 1e300 an
    OverflowError after work linear in m. Each is now a ValueError naming its argument."""
    by_name = {record.name: record for record in RECORDS}
    for name, arg, value in [
        ("normface_loss", "s", 1e39),
        ("combined_margin_loss", "m1", 1e308),
        ("lsoftmax_loss", "m", 1e300),
        ("sphereface_loss", "m", 10**400),
    ]:
        record = by_name[name]
        with pytest.raises(ValueError, match=rf"\b{arg}\b"):
            record.head({**record.defaults, arg: value}, 5, 3)
        with pytest.raises(ValueError, match=rf"\b{arg}\b"):
            tpf.cos_m_theta(torch.zeros(2), value) if arg == "m" else record.config({**record.defaults, arg: value})


@pytest.mark.parametrize("impl", ["refimpl", "torch_port"])
def test_the_elementwise_functions_at_the_bound(impl):
    """cos_m_theta and lsoftmax_psi at m = 16: cos(16 theta) to the accuracy the bound is chosen for
    (128 ulp; derivations/06-lsoftmax.md measures it), and psi = (-1)^k cos(16 theta) - 2k as the paper
    writes it, k = floor(16 theta / pi) clamped to 15."""
    m = MAX_MARGIN_MULTIPLIER
    theta = np.linspace(0.0, math.pi, 1001)
    if impl == "refimpl":
        cos_m, psi = refimpl.cos_m_theta(np.cos(theta), m), refimpl.lsoftmax_psi(theta, m)
    else:
        cos_m = tpf.cos_m_theta(torch.tensor(np.cos(theta)), m).numpy()
        psi = tpf.lsoftmax_psi(torch.tensor(theta), m).numpy()
    assert np.allclose(cos_m, np.cos(m * theta), rtol=0, atol=128 * np.finfo(np.float64).eps + 1e-14)
    k = np.minimum(np.floor(m * theta / math.pi), m - 1)
    assert np.allclose(psi, (-1.0) ** k * np.cos(m * theta) - 2 * k, rtol=0, atol=1e-13)
