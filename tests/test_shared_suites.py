"""The shared suites: run over every record in tests/registry.py.

forward agreement   refimpl (float64) vs torch_port (float64), every reduction
gradient agreement  HIPS autograd on the reference, torch.autograd on the port, central differences
reductions          "mean" and "sum" are the mean and sum of "none"
stability           finite values and gradients on extreme/degenerate inputs, in half precision
                    and under autocast
error inputs        a clear exception naming the argument, inputs left untouched
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from autograd import grad as hips_grad
from autograd.test_util import check_grads
from hypothesis import given
from hypothesis import strategies as st

from tests.registry import RECORDS
from tests.samples import TORCH_DTYPES, LossRecord, Sample
from tests.tolerances import assert_close, tolerance

HALF = ("bfloat16", "float16")


def _reduction_params():
    return [
        pytest.param(record, reduction, id=f"{record.name}-{reduction or 'elementwise'}")
        for record in RECORDS
        for reduction in (record.reductions or (None,))
    ]


def _extra(reduction):
    return {} if reduction is None else {"reduction": reduction}


def _skip_if(record: LossRecord, suite: str) -> None:
    if suite in record.skips:
        pytest.skip(record.skips[suite])


def _weights(shape) -> np.ndarray:
    """Fixed cotangent weights, so a scalar objective sees every output element."""
    return np.random.default_rng(1234).uniform(0.5, 1.5, size=shape)


def _port_value_and_grads(record, sample: Sample, dtype: str, reduction=None, autocast_dtype=None):
    """Port output (as float64 NumPy) and d(sum(out * w))/d(input) for every float input.

    autocast_dtype: run the forward under torch.autocast in that dtype; the backward runs outside it,
    as in PyTorch's AMP recipe (a backward inside autocast would autocast the backward's matmuls too).
    """
    tensors = sample.torch_tensors(dtype, requires_grad=True)
    autocast = (
        contextlib.nullcontext()
        if autocast_dtype is None
        else torch.autocast("cpu", dtype=TORCH_DTYPES[autocast_dtype])
    )
    with autocast:
        out = record.port(**sample.torch_args(tensors, **_extra(reduction)))
    w = torch.tensor(_weights(tuple(out.shape)), dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), list(tensors.values()), allow_unused=True)
    grads = [np.zeros(t.shape) if g is None else g.double().numpy() for t, g in zip(tensors.values(), grads)]
    return out, dict(zip(tensors, grads))


def _reference_value_and_grads(record, sample: Sample, reduction=None):
    names = list(sample.tensors)
    fixed = {**sample.labels, **sample.kwargs, **_extra(reduction)}

    def objective(*arrays):
        out = record.reference(**dict(zip(names, arrays)), **fixed)
        return np.sum(out * _weights(np.shape(out)))

    arrays = [np.array(a) for a in sample.tensors.values()]
    value = record.reference(**sample.numpy_args(**_extra(reduction)))
    grads = {n: hips_grad(objective, argnum=i)(*arrays) for i, n in enumerate(names)}
    return value, grads, objective, arrays


@pytest.mark.parametrize(("record", "reduction"), _reduction_params())
@given(data=st.data())
def test_forward_agreement(record, reduction, data):
    _skip_if(record, "forward")
    sample = data.draw(record.samples, label="sample")
    expected = record.reference(**sample.numpy_args(**_extra(reduction)))
    got = record.port(**sample.torch_args(sample.torch_tensors("float64"), **_extra(reduction)))
    assert got.dtype == torch.float64
    assert_close(got.numpy(), expected, tolerance("forward", "float64", record.tolerances), record.name)


@pytest.mark.parametrize(("record", "reduction"), _reduction_params())
@given(data=st.data())
def test_gradient_agreement(record, reduction, data):
    """Three routes to the same gradient, in float64: autograd, torch.autograd, finite differences."""
    _skip_if(record, "gradient")
    sample = data.draw(record.samples, label="sample")
    _, expected, objective, arrays = _reference_value_and_grads(record, sample, reduction)
    _, got = _port_value_and_grads(record, sample, "float64", reduction)
    tol = tolerance("gradient", "float64", record.tolerances)
    for name in sample.tensors:
        assert_close(got[name], expected[name], tol, f"{record.name}: d/d{name}, torch vs autograd")
    # Central differences along random directions, on the reference (autograd's check) ...
    for i in range(len(arrays)):
        check_grads(objective, modes=["rev"], order=1, argnum=i)(*arrays)
    # ... and on the port (torch's gradcheck).
    tensors = sample.torch_tensors("float64", requires_grad=True)
    names = list(tensors)

    def port_objective(*ts):
        return record.port(**sample.torch_args(dict(zip(names, ts)), **_extra(reduction)))

    assert torch.autograd.gradcheck(port_objective, tuple(tensors.values()))


@pytest.mark.parametrize("record", [r for r in RECORDS if r.reductions], ids=str)
@given(data=st.data())
def test_reductions(record, data):
    _skip_if(record, "reductions")
    sample = data.draw(record.samples, label="sample")
    per_sample = {}
    for reduction in ("none", "mean", "sum"):
        tensors = sample.torch_tensors("float32")
        per_sample[reduction] = record.port(**sample.torch_args(tensors, reduction=reduction)).double().numpy()
    batch = next(iter(sample.tensors.values())).shape[0]
    assert per_sample["none"].shape == (batch,)
    tol = tolerance("forward", "float32", record.tolerances)
    assert_close(per_sample["mean"], per_sample["none"].mean(), tol, "mean of none")
    assert_close(per_sample["sum"], per_sample["none"].sum(), tol, "sum of none")


def _representable(sample: Sample, dtype: str) -> bool:
    return all(np.isfinite(sample.rounded_to(dtype).tensors[n]).all() for n in sample.tensors)


@pytest.mark.parametrize("dtype", ["float64", "float32", *HALF])
@pytest.mark.parametrize("record", RECORDS, ids=str)
def test_stability_on_edge_cases(record, dtype):
    """Extreme and degenerate inputs: finite values and gradients, close to the float64 reference
    evaluated at the same (rounded) inputs."""
    _skip_if(record, "stability")
    for sample in record.edge_cases():
        if not _representable(sample, dtype):
            continue  # e.g. 1e5 has no float16 value; that is the input's limit, not the loss's
        if dtype in sample.skip_dtypes:
            continue  # the sample states why (sample.skip_dtypes[dtype]); its record's family tests cover it
        _check_against_reference(record, sample, dtype, record.reductions[0] if record.reductions else None)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("record", RECORDS, ids=str)
@given(data=st.data())
def test_half_precision_inputs(record, dtype, data):
    """Half inputs are upcast: the port stays as close to the float64 truth as float32 allows."""
    _skip_if(record, "stability")
    sample = data.draw(record.samples, label="sample")
    _check_against_reference(record, sample, dtype, record.reductions[0] if record.reductions else None)


def _check_against_reference(record, sample: Sample, dtype: str, reduction) -> None:
    what = f"{record.name} [{dtype}] on {sample!r}"
    out, grads = _port_value_and_grads(record, sample, dtype, reduction)
    expected_dtype = torch.float64 if dtype == "float64" else torch.float32
    assert out.dtype == expected_dtype, f"{what}: result dtype {out.dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite value {out}"
    for name, g in grads.items():
        assert np.isfinite(g).all(), f"{what}: non-finite gradient for {name}"
    exact = sample.rounded_to(dtype)
    value, ref_grads, _, _ = _reference_value_and_grads(record, exact, reduction)
    assert_close(out.detach().double().numpy(), value, tolerance("forward", dtype, record.tolerances), what)
    grad_tol = tolerance("gradient", dtype, record.tolerances)
    if dtype in HALF:
        # The gradient reaching a half-precision input is itself rounded to that dtype.
        eps = float(torch.finfo(TORCH_DTYPES[dtype]).eps)
        grad_tol = type(grad_tol)(rtol=max(grad_tol.rtol, eps), atol=max(grad_tol.atol, eps))
    for name in grads:
        if not np.isfinite(ref_grads[name]).all():
            # A kink or cone point (cos = +-1, a zero vector): the reference has no derivative there,
            # the port's convention is finite (checked above) and pinned down by the family's tests.
            continue
        assert_close(grads[name], ref_grads[name], grad_tol, f"{what}: d/d{name}")


@pytest.mark.parametrize("autocast_dtype", HALF)
@pytest.mark.parametrize("record", RECORDS, ids=str)
def test_autocast_edge_cases(record, autocast_dtype):
    """Under torch.autocast the port still computes in float32: the same values and gradients as
    without autocast, all finite, for float32 inputs (the parameters of a mixed-precision model)."""
    _skip_if(record, "stability")
    reduction = record.reductions[0] if record.reductions else None
    for sample in record.edge_cases():
        plain, plain_grads = _port_value_and_grads(record, sample, "float32", reduction)
        out, grads = _port_value_and_grads(record, sample, "float32", reduction, autocast_dtype)
        what = f"{record.name} under autocast({autocast_dtype}) on {sample!r}"
        assert out.dtype == torch.float32, f"{what}: result dtype {out.dtype}"
        assert torch.isfinite(out).all(), what
        tol = tolerance("forward", "float32", record.tolerances)
        assert_close(out.detach().double().numpy(), plain.detach().double().numpy(), tol, what)
        for name, g in grads.items():
            assert np.isfinite(g).all(), f"{what}: non-finite gradient for {name}"
            assert_close(
                g, plain_grads[name], tolerance("gradient", "float32", record.tolerances), f"{what}: d/d{name}"
            )


@pytest.mark.parametrize("record", RECORDS, ids=str)
def test_error_inputs(record):
    """Bad input: the expected exception, its message naming the argument; inputs untouched."""
    for case in record.error_inputs():
        sample = case.sample
        tensors = sample.torch_tensors("float32") if sample.tensors else {}
        before = {k: v.clone() for k, v in tensors.items()}
        with pytest.raises(case.error, match=case.match):
            record.port(**sample.torch_args(tensors))
        for k in tensors:
            assert torch.equal(tensors[k], before[k]), f"{record.name}: {k} changed by a failed call"
        arrays = sample.numpy_args()
        before_np = {k: np.copy(v) for k, v in arrays.items() if isinstance(v, np.ndarray)}
        with pytest.raises(case.error, match=case.match):
            record.reference(**arrays)
        for k, v in before_np.items():
            assert np.array_equal(arrays[k], v), f"{record.name}: {k} changed by a failed reference call"
