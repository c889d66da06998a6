"""Registry records: softmax, log_softmax, naive_softmax, cross_entropy, distillation_loss.

derivations/01-softmax.md and 02-distillation.md; family properties in tests/test_softmax.py.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import refimpl
import torch_port.functional as tpf
from tests import strategies as S
from tests.samples import ErrorSample, LossRecord, Sample
from tests.tolerances import Tol

# Logits drawn for the agreement suites: wide enough to saturate the softmax (|z|/T up to 120),
# small enough that naive_softmax (no shift) does not overflow, so it can be compared too.
LOGIT_BOUND = 30.0


@st.composite
def _temperature_samples(draw):
    batch, classes = draw(S.batch_and_classes())
    z = draw(S.float_arrays((batch, classes), -LOGIT_BOUND, LOGIT_BOUND))
    return Sample({"z": z}, kwargs={"T": draw(S.temperatures())})


@st.composite
def _cross_entropy_samples(draw):
    batch, classes = draw(S.batch_and_classes())
    logits = draw(S.float_arrays((batch, classes), -LOGIT_BOUND, LOGIT_BOUND))
    return Sample({"logits": logits}, {"y": draw(S.labels(batch, classes))})


@st.composite
def _distillation_samples(draw):
    batch, classes = draw(S.batch_and_classes())
    student = draw(S.float_arrays((batch, classes), -LOGIT_BOUND, LOGIT_BOUND))
    teacher = draw(S.float_arrays((batch, classes), -LOGIT_BOUND, LOGIT_BOUND))
    return Sample(
        {"student_logits": student, "teacher_logits": teacher},
        {"y": draw(S.labels(batch, classes))},
        {"T": draw(S.temperatures()), "alpha": draw(S.unit_interval())},
    )


def _extreme_logit_matrices() -> list[tuple[np.ndarray, str]]:
    """Logits that break textbook code: +-1e4, ties, one class, a batch of one."""
    big = 1e4
    return [
        (np.array([[5.0, 1.0, big, 6.0], [-big, big, 0.0, -big]]), "logits of +-1e4 (the seed's example)"),
        (np.array([[big, big, -big], [-big, -big, -big]]), "ties at +-1e4"),
        (np.zeros((3, 5)), "all ties at zero"),
        (np.array([[7.0], [-big]]), "one class"),
        (np.array([[1.1, 2.2, 5.0, 10.1]]), "batch of one (the seed's example)"),
    ]


def _temperature_edges() -> list[Sample]:
    # T = 1e-30: the max is subtracted before dividing (z / T first overflows to inf - inf = nan).
    # Its gradient, up to |w|/T = 1e30, is beyond float16 (the gradient comes back in the input's dtype).
    too_big = {"float16": "the gradient at T = 1e-30 is of order 1/T, beyond float16's range (65504)"}
    samples = [
        Sample({"z": z}, kwargs={"T": T}, note=note, skip_dtypes=too_big if T < 1e-3 else {})
        for z, note in _extreme_logit_matrices()
        for T in (1.0, 0.05, 50.0, 1e-30)
    ]
    samples.append(Sample({"z": np.array([5.0, 1.0, 1e4, 6.0])}, kwargs={"T": 1.0}, note="a 1-D vector"))
    return samples


def _temperature_errors() -> list[ErrorSample]:
    z = np.zeros((2, 3))
    return [
        ErrorSample(Sample({"z": z}, kwargs={"T": 0.0}), ValueError, r"\bT\b"),
        ErrorSample(Sample({"z": z}, kwargs={"T": -1.0}), ValueError, r"\bT\b"),
        ErrorSample(Sample({"z": z}, kwargs={"T": float("nan")}), ValueError, r"\bT\b"),
        ErrorSample(Sample({"z": z}, kwargs={"T": float("inf")}), ValueError, r"\bT\b"),
        ErrorSample(Sample({"z": z}, kwargs={"T": "2"}), TypeError, r"\bT\b"),
        ErrorSample(Sample({"z": np.array(3.0)}), ValueError, r"\bz\b"),
    ]


def _cross_entropy_edges() -> list[Sample]:
    out = []
    for logits, note in _extreme_logit_matrices():
        batch, classes = logits.shape
        for y in {0, classes - 1}:
            out.append(Sample({"logits": logits}, {"y": np.full(batch, y)}, note=f"{note}, label {y}"))
    return out


def _cross_entropy_errors() -> list[ErrorSample]:
    logits = np.zeros((2, 3))
    return [
        ErrorSample(Sample({"logits": logits}, {"y": np.array([0, 3])}), ValueError, r"\by\b.*\[0, 3\)"),
        ErrorSample(Sample({"logits": logits}, {"y": np.array([-1, 0])}), ValueError, r"\by\b.*\[0, 3\)"),
        ErrorSample(Sample({"logits": logits}, {"y": np.array([0.0, 1.0])}), TypeError, r"\by\b.*integer"),
        ErrorSample(Sample({"logits": logits}, {"y": np.array([0, 1, 2])}), ValueError, r"\by\b.*shape"),
        ErrorSample(Sample({"logits": np.zeros(3)}, {"y": np.array([0])}), ValueError, r"\blogits\b"),
        ErrorSample(
            Sample({"logits": logits}, {"y": np.array([0, 1])}, {"reduction": "avg"}), ValueError, r"reduction"
        ),
    ]


def _distillation_edges() -> list[Sample]:
    out = []
    for logits, note in _extreme_logit_matrices():
        batch, classes = logits.shape
        for T in (1.0, 0.05, 50.0):
            out.append(
                Sample(
                    {"student_logits": logits, "teacher_logits": -logits[:, ::-1].copy()},
                    {"y": np.zeros(batch, dtype=np.int64)},
                    {"T": T, "alpha": 0.9},
                    note=f"{note}; teacher reversed and negated; T={T}",
                )
            )
            out.append(
                Sample(
                    {"student_logits": logits, "teacher_logits": logits.copy()},
                    {"y": np.full(batch, classes - 1)},
                    {"T": T, "alpha": 1.0},
                    note=f"{note}; student == teacher; T={T}",
                )
            )
    # Masked classes: a teacher logit of -inf (0 log 0 = 0), the student masked there too or not.
    teacher = np.array([[2.0, -np.inf, 0.5, 1.0], [-np.inf, 3.0, -np.inf, -1.0]])
    student = np.array([[1.0, 0.3, -2.0, 0.5], [-np.inf, 0.5, -np.inf, 2.0]])
    for T in (1.0, 4.0, 1e-30):
        out.append(
            Sample(
                {"student_logits": student, "teacher_logits": teacher},
                {"y": np.array([0, 1])},
                {"T": T, "alpha": 0.9},
                note=f"teacher classes masked with -inf (student too in row 1); T={T}",
            )
        )
    return out


def _distillation_errors() -> list[ErrorSample]:
    z = np.zeros((2, 3))
    good = {"student_logits": z, "teacher_logits": z}
    y = {"y": np.array([0, 1])}
    return [
        ErrorSample(Sample(good, y, {"alpha": 1.5}), ValueError, r"\balpha\b.*\[0\.0, 1\.0\]"),
        ErrorSample(Sample(good, y, {"alpha": -0.1}), ValueError, r"\balpha\b"),
        ErrorSample(Sample(good, y, {"T": 0.0}), ValueError, r"\bT\b"),
        ErrorSample(
            Sample({"student_logits": z, "teacher_logits": np.zeros((2, 4))}, y), ValueError, r"teacher_logits"
        ),
        ErrorSample(Sample(good, {"y": np.array([0, 5])}), ValueError, r"\by\b"),
    ]


RECORDS: list[LossRecord] = [
    LossRecord(
        name="softmax",
        reference=refimpl.softmax,
        port=tpf.softmax,
        samples=_temperature_samples(),
        edge_cases=_temperature_edges,
        error_inputs=_temperature_errors,
        reductions=(),
    ),
    LossRecord(
        name="log_softmax",
        reference=refimpl.log_softmax,
        port=tpf.log_softmax,
        samples=_temperature_samples(),
        edge_cases=_temperature_edges,
        error_inputs=_temperature_errors,
        reductions=(),
    ),
    LossRecord(
        name="naive_softmax",
        reference=refimpl.naive_softmax,
        port=tpf.naive_softmax,
        samples=_temperature_samples(),
        edge_cases=_temperature_edges,
        error_inputs=_temperature_errors,
        reductions=(),
        skips={
            "stability": "naive_softmax overflows by design (it is the counter-example); "
            "tests/test_softmax.py asserts that it returns nan where softmax does not"
        },
    ),
    LossRecord(
        name="cross_entropy",
        reference=refimpl.cross_entropy,
        port=tpf.cross_entropy,
        samples=_cross_entropy_samples(),
        edge_cases=_cross_entropy_edges,
        error_inputs=_cross_entropy_errors,
    ),
    LossRecord(
        name="distillation_loss",
        reference=refimpl.distillation_loss,
        port=tpf.distillation_loss,
        samples=_distillation_samples(),
        edge_cases=_distillation_edges,
        error_inputs=_distillation_errors,
        # At high T the KL is a small sum of O(1/T) terms that cancel: float32 loses ~C*T^2*eps of it
        # (measured 8e-5 relative at T=50, C=4), so low precision gets a looser relative bound.
        tolerances={("forward", d): Tol(rtol=5e-4, atol=2e-6) for d in ("float32", "bfloat16", "float16")},
    ),
]
