"""Bad input to the port's modern margins (issues 15-16) gets a clear error that names the argument,
before anything is computed or any state moves. The reference's own checks are tested in
tests/test_refimpl_modern.py and by the registry's error inputs; these are the port's checks of
tensors and modules that the registry's NumPy samples cannot express.
"""

from __future__ import annotations

import math

import pytest
import torch

import torch_port.functional as F
from torch_port import AdaFace, ArcFace, CosFace, CurricularFace, ElasticArcFace, SubCenterArcFace, adaptive_margins

T64 = torch.float64


def problem(batch=4, classes=5, dim=3):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=generator, dtype=T64)
    W = torch.randn(classes, dim, generator=generator, dtype=T64)
    return x, W, torch.arange(batch) % classes


SHORT = torch.full((3,), 0.2, dtype=T64)
WITH_NAN = torch.tensor([0.1, math.nan, 0.2, 0.3], dtype=T64)
TOO_LARGE = torch.tensor([0.1, 0.2, 2.0, 0.3], dtype=T64)
NEGATIVE = torch.tensor([0.1, -0.2, 0.2, 0.3], dtype=T64)
BELOW_ONE = torch.tensor([1.0, 0.5, 1.0, 1.0], dtype=T64)


@pytest.mark.parametrize(
    ("loss", "name", "margins", "error", "match"),
    [
        (F.arcface_loss, "m", SHORT, ValueError, r"\bm\b must be a number or an array of shape \(4,\)"),
        (F.arcface_loss, "m", WITH_NAN, ValueError, r"\bm\b must not be nan"),
        (F.arcface_loss, "m", TOO_LARGE, ValueError, r"\bm\b must lie in \[0\.0, 1\.57.*largest entry"),
        (F.cosface_loss, "m", NEGATIVE, ValueError, r"\bm\b must be .*>= 0.*smallest entry"),
        (F.combined_margin_loss, "m1", BELOW_ONE, ValueError, r"\bm1\b must lie in \[1\.0, 16"),
        (F.arcface_loss, "m", torch.tensor(0.3, dtype=T64), ValueError, r"\bm\b must be a number or a 1-d tensor"),
        (F.arcface_loss, "m", torch.tensor([1, 0, 0, 1]), TypeError, r"\bm\b"),
    ],
)
def test_per_sample_margins_are_checked(loss, name, margins, error, match):
    x, W, y = problem()
    with pytest.raises(error, match=match):
        loss(x, W, y, **{name: margins})


@pytest.mark.parametrize(
    ("counts", "kwargs", "match"),
    [
        ([3, 0, 2], {}, r"class_counts must be finite and > 0"),
        ([3, -1, 2], {}, r"class_counts must be finite and > 0"),
        ([3.0, math.nan, 2.0], {}, r"class_counts must be finite and > 0"),
        ([], {}, r"class_counts must hold one count per class"),
        ([[3, 4]], {}, r"class_counts must be a 1-d sequence"),
        ([3, 4], {"m_min": 0.6, "m_max": 0.5}, r"m_min must be <= m_max"),
    ],
)
def test_adaptive_margins_refuses_bad_counts_and_bounds(counts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        adaptive_margins(counts, **kwargs)


def test_per_class_margins_must_hold_one_margin_per_class():
    with pytest.raises(ValueError, match=r"\bm\b must be a number or hold one margin per class, shape \(5,\)"):
        ArcFace(5, 3, m=torch.full((4,), 0.3))
    with pytest.raises(ValueError, match=r"\bm\b must be a finite number >= 0"):
        CosFace(5, 3, m=torch.tensor([0.1, 0.2, -0.3, 0.1, 0.1]))


def test_elastic_and_statistics_hyperparameters_are_checked():
    with pytest.raises(ValueError, match=r"\bsigma\b.*>= 0"):
        ElasticArcFace(5, 3, sigma=-0.1)
    with pytest.raises(TypeError, match=r"\bgenerator\b"):
        ElasticArcFace(5, 3, generator=0)
    with pytest.raises(ValueError, match=r"\bstatistics\b must be one of"):
        AdaFace(5, 3, statistics="per-rank")
    with pytest.raises(ValueError, match=r"\bmomentum\b must lie in \[0\.0, 1\.0\]"):
        CurricularFace(5, 3, momentum=1.5)


def test_subcenter_cleaning_arguments_are_checked_and_move_nothing():
    head = SubCenterArcFace(5, 3, k=2, dtype=T64)
    x, _, y = problem()
    before = head.subcenter_counts.clone()
    with pytest.raises(ValueError, match=r"\bthreshold\b.*\[0\.0, 3\.14"):
        head.outliers(x, y, threshold=75.0)  # degrees, not radians
    with pytest.raises(ValueError, match=r"both x and y, or neither"):
        head.dominant_subcenters(x)
    with pytest.raises(ValueError, match=r"\by\b must lie in \[0, 5\)"):
        head(x, torch.tensor([0, 1, 7, 2]))
    assert torch.equal(head.subcenter_counts, before), "a refused call moved the counts"
