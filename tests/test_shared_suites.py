"""The shared suites: run over every record in tests/registry.py, and over every path a record lists.

forward agreement   refimpl (float64) vs torch_port (float64), every reduction, every path
gradient agreement  HIPS autograd on the reference, torch.autograd on the port (every path), central
                    differences (on the reference, and on the port's single-process paths; not for
                    margin_grad="detached", whose gradient is not the value's derivative)
reductions          "mean" and "sum" are the mean and sum of "none"
stability           finite values and gradients on extreme/degenerate inputs, in half precision
                    and under autocast, every path
error inputs        a clear exception naming the argument, inputs left untouched

Paths (tests/paths.py): "plain" calls the port as it is; the margin losses also run chunked
(``chunk_size`` 1, 3 and > C) and class-sharded over 2 gloo ranks (tests/sharded_runner.py; the
gradients of x and W reassembled from the ranks). Every path is compared with the float64 reference
and its autograd gradient. In float64 every path meets the same table (tests/tolerances.py); in
float32 and half precision a path other than the plain one must be no farther from the float64
truth than the plain float32 path allows (``assert_no_farther_than_plain``).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from autograd import grad as hips_grad
from autograd.test_util import check_grads
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.paths import PATHS, PLAIN, Path
from tests.records.keywords import has_detached_margin
from tests.registry import RECORDS
from tests.samples import TORCH_DTYPES, LossRecord, Sample
from tests.sharded_runner import ShardedCall
from tests.tolerances import (
    assert_close,
    assert_no_farther_than_plain,
    float32_noise_floor,
    for_rounded_gradient,
    tolerance,
)

HALF = ("bfloat16", "float16")


def _record_paths():
    return [(record, PATHS[name]) for record in RECORDS for name in record.paths]


def _path_params():
    return [pytest.param(record, path, id=f"{record.name}-{path.name}") for record, path in _record_paths()]


def _reduction_params():
    return [
        pytest.param(record, path, reduction, id=f"{record.name}-{path.name}-{reduction or 'elementwise'}")
        for record, path in _record_paths()
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


def _not_shardable(path: Path, sample: Sample) -> str:
    """Why ``sample`` cannot run on ``path`` ("" if it can): every rank must hold at least one class
    (num_classes >= world size, an error otherwise) and at least one sample (an empty x is refused)."""
    if not path.sharded:
        return ""
    batch, classes = sample.tensors["x"].shape[0], sample.tensors["W"].shape[0] // sample.kwargs.get("k", 1)
    if classes < path.world:
        return f"C = {classes} < {path.world} ranks"
    if batch < path.world:
        return f"B = {batch} < {path.world} ranks"
    return ""


def _autocast(autocast_dtype):
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=TORCH_DTYPES[autocast_dtype])


def _port_value_and_grads(
    record, sample: Sample, dtype: str, reduction=None, autocast_dtype=None, path: Path = PLAIN, runner=None
):
    """Port output (a tensor) and d(sum(out * w))/d(input) (float64 NumPy) for every float input,
    computed on ``path``.

    autocast_dtype: run the forward under torch.autocast in that dtype; the backward runs outside it,
    as in PyTorch's AMP recipe (a backward inside autocast would autocast the backward's matmuls too).
    """
    return _start_port(record, sample, dtype, reduction, autocast_dtype, path, runner)()


def _start_port(record, sample: Sample, dtype: str, reduction=None, autocast_dtype=None, path=PLAIN, runner=None):
    """Start :func:`_port_value_and_grads`; returns the function that finishes it. On the sharded
    path the ranks compute while the caller goes on (with the reference, say) until it asks."""
    if path.sharded:
        return _start_sharded(record, sample, dtype, reduction, autocast_dtype, runner)
    tensors = sample.torch_tensors(dtype, requires_grad=True)
    extra = _extra(reduction)
    if path.chunk is not None:  # only margin losses (which have W) run on the chunked paths
        extra["chunk_size"] = path.chunk_size(sample.tensors["W"].shape[0])
    with _autocast(autocast_dtype):
        out = record.port(**sample.torch_args(tensors, **extra))
    w = torch.tensor(_weights(tuple(out.shape)), dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), list(tensors.values()), allow_unused=True)
    grads = [np.zeros(t.shape) if g is None else g.double().numpy() for t, g in zip(tensors.values(), grads)]
    return lambda: (out, dict(zip(tensors, grads)))


def _start_sharded(record, sample: Sample, dtype: str, reduction, autocast_dtype, runner):
    assert runner is not None, "the sharded path needs the sharded_runner fixture"
    x = sample.tensors["x"]
    shape = (x.shape[0],) if reduction == "none" else ()
    call = ShardedCall(
        record.name,
        x=np.asarray(x),
        W=np.asarray(sample.tensors["W"]),
        y=np.asarray(sample.labels["y"]),
        kwargs=dict(sample.kwargs),
        dtype=dtype,
        reduction=reduction,
        autocast=autocast_dtype,
        cotangent=_weights(shape),
    )
    runner.submit(call)

    def finish():
        result = runner.result()
        return torch.tensor(result.loss).to(TORCH_DTYPES[result.loss_dtype]), result.grads

    return finish


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


@pytest.mark.parametrize(("record", "path", "reduction"), _reduction_params())
@given(data=st.data())
def test_forward_agreement(record, path, reduction, data, sharded_runner):
    _skip_if(record, "forward")
    sample = data.draw(record.samples, label="sample")
    assume(not _not_shardable(path, sample))
    port = _start_port(record, sample, "float64", reduction, path=path, runner=sharded_runner)
    expected = record.reference(**sample.numpy_args(**_extra(reduction)))
    got, _ = port()
    assert got.dtype == torch.float64
    what = f"{record.name} on the {path.name} path"
    assert_close(got.detach().numpy(), expected, tolerance("forward", "float64", record.tolerances), what)


@pytest.mark.parametrize(("record", "path", "reduction"), _reduction_params())
@given(data=st.data())
def test_gradient_agreement(record, path, reduction, data, sharded_runner):
    """Three routes to the same gradient, in float64: autograd, torch.autograd, finite differences.

    Central differences run on the reference (once, on the plain path's parametrization: they check
    the reference, whatever path the port takes) and on the port's single-process paths (torch's
    gradcheck); the sharded path is held to the reference's autograd gradient, itself checked
    against central differences."""
    _skip_if(record, "gradient")
    sample = data.draw(record.samples, label="sample")
    assume(not _not_shardable(path, sample))
    port = _start_port(record, sample, "float64", reduction, path=path, runner=sharded_runner)
    _, expected, objective, arrays = _reference_value_and_grads(record, sample, reduction)
    _, got = port()
    tol = tolerance("gradient", "float64", record.tolerances)
    for name in sample.tensors:
        assert_close(got[name], expected[name], tol, f"{record.name}: d/d{name}, torch ({path.name}) vs autograd")
    if has_detached_margin(sample.kwargs):
        # "detached": the gradient is by design not the derivative of the value, so central
        # differences do not apply; tests/test_modern_margins.py checks it by a hand-written formula.
        return
    if path is PLAIN:
        for i in range(len(arrays)):
            check_grads(objective, modes=["rev"], order=1, argnum=i)(*arrays)
    if path.sharded:
        return
    tensors = sample.torch_tensors("float64", requires_grad=True)
    names = list(tensors)
    extra = _extra(reduction)
    if path.chunk:
        extra["chunk_size"] = path.chunk_size(sample.tensors["W"].shape[0])

    def port_objective(*ts):
        return record.port(**sample.torch_args(dict(zip(names, ts)), **extra))

    # The chunked paths: fast mode, central differences along random directions (one per input
    # rather than one per input element); the full Jacobian is already compared with autograd's.
    assert torch.autograd.gradcheck(port_objective, tuple(tensors.values()), fast_mode=path is not PLAIN)


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
    # "mean" averages over the rows not ignored (ignore_index), and is 0 when every row is
    kept = np.ones(batch, dtype=bool)
    if "y" in sample.labels:
        kept = sample.labels["y"] != sample.kwargs.get("ignore_index", -1)
    assert np.all(per_sample["none"][~kept] == 0.0), "ignored rows have a loss of 0"
    mean = per_sample["none"][kept].mean() if kept.any() else 0.0
    assert_close(per_sample["mean"], mean, tol, "mean of none over the rows not ignored")
    assert_close(per_sample["sum"], per_sample["none"].sum(), tol, "sum of none")


def _representable(sample: Sample, dtype: str) -> bool:
    """Every input survives the rounding to dtype (an infinite input, a masked logit, is itself)."""
    rounded = sample.rounded_to(dtype).tensors
    return all((np.isfinite(rounded[n]) | ~np.isfinite(v)).all() for n, v in sample.tensors.items())


def _first_reduction(record):
    return record.reductions[0] if record.reductions else None


@pytest.mark.parametrize("dtype", ["float64", "float32", *HALF])
@pytest.mark.parametrize(("record", "path"), _path_params())
def test_stability_on_edge_cases(record, path, dtype, sharded_runner):
    """Extreme and degenerate inputs: finite values and gradients, close to the float64 reference
    evaluated at the same (rounded) inputs."""
    _skip_if(record, "stability")
    checked = 0
    for sample in record.edge_cases():
        if not _representable(sample, dtype):
            continue  # e.g. 1e5 has no float16 value; that is the input's limit, not the loss's
        if dtype in sample.skip_dtypes:
            continue  # the sample states why (sample.skip_dtypes[dtype]); its record's family tests cover it
        if _not_shardable(path, sample):
            continue  # one class or one sample cannot be split over the ranks (an error by design)
        _check_against_reference(record, sample, dtype, _first_reduction(record), path, sharded_runner)
        checked += 1
    assert checked, f"no edge case of {record.name} runs in {dtype} on the {path.name} path"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("record", "path"), _path_params())
@given(data=st.data())
def test_half_precision_inputs(record, path, dtype, data, sharded_runner):
    """Half inputs are upcast: the port stays as close to the float64 truth as float32 allows."""
    _skip_if(record, "stability")
    sample = data.draw(record.samples, label="sample")
    assume(not _not_shardable(path, sample))
    _check_against_reference(record, sample, dtype, _first_reduction(record), path, sharded_runner)


def _upstream_weight(sample: Sample, reduction) -> float:
    """The total weight sum(out * w) puts on the per-sample losses (for the noise floor)."""
    batch = sample.tensors["x"].shape[0]
    if reduction == "none":
        return float(np.abs(_weights((batch,))).sum())
    return float(abs(_weights(()))) * (batch if reduction == "sum" else 1)


def _saturated(grad: np.ndarray, dtype: str) -> np.ndarray:
    """The float64 gradient as an input of ``dtype`` receives it: the port rounds a gradient that
    reaches a half-precision input to that dtype with saturation (torch_port.geometry.upcast), so a
    magnitude past float16's 65504 (a zero row's ~s/NORM_EPS) comes back as +-65504, not inf."""
    if dtype not in HALF:
        return grad
    limit = float(torch.finfo(TORCH_DTYPES[dtype]).max)
    return np.clip(grad, -limit, limit)


def _check_against_reference(record, sample: Sample, dtype: str, reduction, path: Path = PLAIN, runner=None) -> None:
    what = f"{record.name} [{dtype}, {path.name}] on {sample!r}"
    port = _start_port(record, sample, dtype, reduction, path=path, runner=runner)
    exact = sample.rounded_to(dtype)
    value, ref_grads, _, _ = _reference_value_and_grads(record, exact, reduction)
    ref_grads = {name: _saturated(g, dtype) for name, g in ref_grads.items()}
    # float64 is held to the table on every path; in lower precision a path other than the plain
    # one is held to the plain path's own distance from the truth (tests/tolerances.py).
    against_plain = path is not PLAIN and dtype != "float64"
    if against_plain:
        plain_out, plain_grads = _port_value_and_grads(record, sample, dtype, reduction)
        plain_out = plain_out.detach().double().numpy()
    out, grads = port()
    expected_dtype = torch.float64 if dtype == "float64" else torch.float32
    assert out.dtype == expected_dtype, f"{what}: result dtype {out.dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite value {out}"
    for name, g in grads.items():
        assert np.isfinite(g).all(), f"{what}: non-finite gradient for {name}"
    forward_tol = tolerance("forward", dtype, record.tolerances)
    grad_tol = for_rounded_gradient(tolerance("gradient", dtype, record.tolerances), dtype)
    if against_plain:
        assert_no_farther_than_plain(out.detach().double().numpy(), plain_out, value, forward_tol, 0.0, what)
    else:
        assert_close(out.detach().double().numpy(), value, forward_tol, what)
    for name in grads:
        if against_plain:
            config = record.config(exact.kwargs)
            x, W = exact.tensors["x"], exact.tensors["W"]
            upstream = _upstream_weight(exact, reduction)
            floor = float32_noise_floor(config, x, W, upstream, wrt=name)
            assert_no_farther_than_plain(
                grads[name], plain_grads[name], ref_grads[name], grad_tol, floor, f"{what}: d/d{name}"
            )
        else:
            assert_close(grads[name], ref_grads[name], grad_tol, f"{what}: d/d{name}")


@pytest.mark.parametrize("autocast_dtype", HALF)
@pytest.mark.parametrize(("record", "path"), _path_params())
def test_autocast_edge_cases(record, path, autocast_dtype, sharded_runner):
    """Under torch.autocast (on every rank, for the sharded path) the port still computes in float32:
    the same values and gradients as the same path without autocast, all finite, for float32 inputs
    (the parameters of a mixed-precision model)."""
    _skip_if(record, "stability")
    reduction = _first_reduction(record)
    checked = 0
    for sample in record.edge_cases():
        if _not_shardable(path, sample):
            continue  # one class or one sample cannot be split over the ranks (an error by design)
        plain, plain_grads = _port_value_and_grads(
            record, sample, "float32", reduction, path=path, runner=sharded_runner
        )
        out, grads = _port_value_and_grads(
            record, sample, "float32", reduction, autocast_dtype, path=path, runner=sharded_runner
        )
        what = f"{record.name} [{path.name}] under autocast({autocast_dtype}) on {sample!r}"
        assert out.dtype == torch.float32, f"{what}: result dtype {out.dtype}"
        assert torch.isfinite(out).all(), what
        tol = tolerance("forward", "float32", record.tolerances)
        assert_close(out.detach().double().numpy(), plain.detach().double().numpy(), tol, what)
        for name, g in grads.items():
            assert np.isfinite(g).all(), f"{what}: non-finite gradient for {name}"
            assert_close(
                g, plain_grads[name], tolerance("gradient", "float32", record.tolerances), f"{what}: d/d{name}"
            )
        checked += 1
    assert checked, f"no edge case of {record.name} runs on the {path.name} path"


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
