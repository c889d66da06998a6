"""The API contract (docs/design.md): names, argument names and defaults, in both packages.

The expected defaults below are copied from the contract's table (the specification), not from the
code, so a default changed in either package by accident fails here.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import refimpl
import torch_port
import torch_port.functional as tpf

# name -> (positional arguments in order, {hyperparameter: default}) as the contract states them.
DESIGN = {
    "softmax": (["z", "T"], {"T": 1.0}),
    "log_softmax": (["z", "T"], {"T": 1.0}),
    "naive_softmax": (["z", "T"], {"T": 1.0}),
    "cross_entropy": (["logits", "y"], {}),
    "distillation_loss": (["student_logits", "teacher_logits", "y", "T", "alpha"], {"T": 4.0, "alpha": 0.9}),
    "cos_m_theta": (["c", "m"], {}),
    "lsoftmax_psi": (["theta", "m"], {}),
    "lsoftmax_loss": (["x", "W", "y", "m", "beta"], {"m": 4, "beta": 0.0}),
    "sphereface_loss": (["x", "W", "y", "m", "lamb"], {"m": 4, "lamb": 0.0}),
    "center_loss": (["x", "y", "centers"], {}),
    "center_update": (["x", "y", "centers", "alpha"], {"alpha": 0.5}),
    "normface_loss": (["x", "W", "y", "s"], {"s": 16.0}),
    "cosface_loss": (["x", "W", "y", "s", "m"], {"s": 64.0, "m": 0.35}),
    "am_softmax_loss": (["x", "W", "y", "s", "m"], {"s": 30.0, "m": 0.35}),
    "arcface_loss": (["x", "W", "y", "s", "m", "easy_margin"], {"s": 64.0, "m": 0.5, "easy_margin": False}),
    "combined_margin_loss": (["x", "W", "y", "s", "m1", "m2", "m3"], {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0}),
    "normface_lower_bound": (["n", "s"], {}),
    "cosface_min_scale": (["C", "p"], {}),
}
LOSSES = [name for name in DESIGN if name.endswith("_loss") or name == "cross_entropy"]
MARGIN_LOSSES = ["lsoftmax", "sphereface", "normface", "cosface", "am_softmax", "arcface", "combined_margin"]
HEADS = ["NormFace", "CosFace", "AMSoftmax", "ArcFace", "CombinedMargin", "LSoftmax", "SphereFace"]


def _parameters(fn):
    return {k: v.default for k, v in inspect.signature(fn).parameters.items()}


@pytest.mark.parametrize("name", sorted(DESIGN))
@pytest.mark.parametrize("package", [refimpl, tpf], ids=["refimpl", "torch_port"])
def test_names_arguments_and_defaults_follow_the_design(package, name):
    args, defaults = DESIGN[name]
    params = _parameters(getattr(package, name))
    assert list(params)[: len(args)] == args
    for arg, default in defaults.items():
        assert params[arg] == default and type(params[arg]) is type(default), (arg, params[arg])
    if name in LOSSES:
        assert params["reduction"] == "mean"


@pytest.mark.parametrize("name", sorted(set(refimpl.__all__) | set(tpf.__all__)))
def test_port_mirrors_reference(name):
    """Same names in both packages; the port adds only chunk_size (the memory-efficient path), right
    after ``reduction`` where it has always been (the modern keywords, margin_grad and ignore_index,
    come after it in the port)."""
    ref, port = _parameters(getattr(refimpl, name)), _parameters(getattr(tpf, name))
    extra = {k: v for k, v in port.items() if k not in ref}
    assert [k for k in port if k != "chunk_size"] == list(ref) and all(port[k] == ref[k] for k in ref)
    assert extra in ({}, {"chunk_size": None})
    if extra:
        assert list(port)[list(port).index("chunk_size") - 1] == "reduction"


@pytest.mark.parametrize("family", MARGIN_LOSSES)
def test_every_margin_loss_has_its_logits(family):
    for package in (refimpl, tpf):
        loss = _parameters(getattr(package, f"{family}_loss"))
        logits = _parameters(getattr(package, f"{family}_logits"))
        hyper = {k: v for k, v in loss.items() if k not in ("x", "W", "y", "reduction", "chunk_size")}
        assert {k: logits[k] for k in hyper} == hyper


@pytest.mark.parametrize("name", HEADS)
def test_heads_own_a_class_by_dim_weight(name):
    head = getattr(torch_port, name)(7, 3)
    assert tuple(head.weight.shape) == (7, 3)
    logits = head.logits(torch.randn(5, 3))
    assert tuple(logits.shape) == (5, 7) and torch.isfinite(logits).all()
