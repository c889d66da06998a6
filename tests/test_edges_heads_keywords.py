"""Keyword-only hyperparameters of every head and loss module (issue 14, item 1).

``ArcFace(10, 16, 0.3, 0.5)`` used to build s = 0.3: pytorch-metric-learning's positional order is
(margin, scale), the reverse of ours. Now only the structural arguments (num_classes, dim; the
sharded head's config) are positional, and a positional hyperparameter is a TypeError naming the
keyword-only arguments, raised before anything is built. The heads come from the registry's records
(their ``head`` builders); the modules without a record are listed here; and a sweep over
``torch_port.__all__`` keeps a module added later from slipping through.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import torch_port
from tests.registry import RECORDS
from tests.tolerances import Tol, assert_close
from torch_port import CenterLoss, DistillationLoss, MarginSchedule, ShardedMarginHead
from torch_port.demo.heads import SoftmaxCenterHead
from torch_port.heads import MarginHead
from torch_port.normalized import cosface_config

HEAD_RECORDS = [record for record in RECORDS if record.head is not None]
STRUCTURAL = {"num_classes", "dim", "config"}  # the only arguments allowed by position
C, D = 7, 3

# Modules without a record: (the class, its structural arguments, its hyperparameters as keywords).
OTHER_MODULES = {
    "CenterLoss": (CenterLoss, (C, D), {"alpha": 0.3, "loss_weight": 0.5, "learn_centers": False}),
    "DistillationLoss": (DistillationLoss, (), {"T": 2.0, "alpha": 0.25}),
    "MarginSchedule": (MarginSchedule, (), {"base": 100.0, "gamma": 0.1, "power": 2.0, "minimum": 1.0}),
    "ShardedMarginHead": (ShardedMarginHead, (C, D, cosface_config(8.0, 0.2)), {"reduction": "sum"}),
    "demo SoftmaxCenterHead": (SoftmaxCenterHead, (C, D), {"alpha": 0.5, "loss_weight": 0.05}),
}


def positional_names(cls) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(cls).parameters.values() if p.kind in kinds]


def keyword_names(cls) -> list[str]:
    return [p.name for p in inspect.signature(cls).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def assert_refused(cls, args: tuple) -> None:
    """cls(*args) is the TypeError that names every keyword-only argument, and it draws no random number
    (nothing was initialised: the check runs before the constructor's body)."""
    rng = torch.random.get_rng_state()
    with pytest.raises(TypeError, match=rf"{cls.__name__}\(\) got {len(args)} positional") as caught:
        cls(*args)
    message = str(caught.value)
    assert "keyword-only" in message
    for name in keyword_names(cls):
        assert f"{name}=..." in message, (name, message)
    assert torch.equal(torch.random.get_rng_state(), rng)


@pytest.mark.parametrize("record", HEAD_RECORDS, ids=str)
def test_every_head_refuses_positional_hyperparameters(record):
    kwargs = record.defaults
    head = record.head(kwargs, C, D, dtype=torch.float64)  # keyword construction (the record's builder)
    cls = type(head)
    assert positional_names(cls) == ["num_classes", "dim"]
    hyper = [name for name in keyword_names(cls) if name in kwargs or name == "schedule"]
    assert hyper, "the record's hyperparameters are keyword-only arguments of the head"
    values = [kwargs.get(name, MarginSchedule.constant(0.0)) for name in hyper]
    # every hyperparameter by position, and only the first one (the s-for-m swap of the issue)
    assert_refused(cls, (C, D, *values))
    assert_refused(cls, (C, D, values[0]))


# Values other than the defaults, so that a keyword that did not reach its hyperparameter shows.
NON_DEFAULT = {"s": 5.0, "m1": 1.2, "m2": 0.3, "m3": 0.1, "easy_margin": True, "beta": 0.5, "lamb": 0.5}
# MagFace's bounds must stay ordered (l_a < u_a, l_m <= u_m); lambda_g above its bound at s = 5.
NON_DEFAULT |= {"l_a": 0.5, "u_a": 3.0, "l_m": 0.2, "u_m": 0.6, "lambda_g": 3.0, "norm_mean": 2.0, "norm_std": 1.5}


@pytest.mark.parametrize("record", HEAD_RECORDS, ids=str)
def test_keyword_construction_gives_the_functional_loss(record):
    """The head built by keywords computes the functional loss of the same hyperparameters (the port's
    function called with W = head.weight): every keyword reached its hyperparameter."""
    kwargs = {k: NON_DEFAULT.get(k, 3 if isinstance(v, int) else 0.2) for k, v in record.defaults.items()}
    head = record.head(kwargs, C, D, dtype=torch.float64)
    torch.manual_seed(0)
    x = torch.randn(5, D, dtype=torch.float64)
    y = torch.tensor([0, 6, 2, 2, 4])
    expected = record.port(x, head.weight.detach(), y, **kwargs)
    assert_close(head(x, y).detach().numpy(), expected.numpy(), Tol(rtol=1e-12, atol=1e-12), record.name)


def test_the_issue_example_is_refused_and_its_keyword_form_means_what_it_says():
    with pytest.raises(TypeError, match=r"ArcFace\(\) got 4 positional.*s=\.\.\., m=\.\.\., easy_margin=\.\.\."):
        torch_port.ArcFace(10, 16, 0.3, 0.5)
    head = torch_port.ArcFace(10, 16, m=0.3, s=0.5)
    assert (head.s, head.m) == (0.5, 0.3)


@pytest.mark.parametrize("name", sorted(OTHER_MODULES))
def test_the_other_modules_refuse_positional_hyperparameters(name):
    cls, structural, kwargs = OTHER_MODULES[name]
    assert positional_names(cls) == [p for p in positional_names(cls) if p in STRUCTURAL]
    assert_refused(cls, (*structural, *kwargs.values()))
    assert_refused(cls, (*structural, next(iter(kwargs.values()))))
    if cls is not ShardedMarginHead:  # that one needs a process group to be built
        module = cls(*structural, **kwargs)
        for key, value in kwargs.items():
            assert getattr(module.center if cls is SoftmaxCenterHead else module, key) == value


def test_every_exported_module_takes_only_structural_arguments_by_position():
    """A sweep of the package's exports: every nn.Module class takes at most num_classes, dim and
    config by position, so a module added later cannot take a hyperparameter positionally."""
    modules = [getattr(torch_port, n) for n in torch_port.__all__]
    modules = [m for m in modules if inspect.isclass(m) and issubclass(m, nn.Module)]
    assert {type(record.head(record.defaults, C, D)) for record in HEAD_RECORDS} <= set(modules)
    assert {CenterLoss, DistillationLoss, MarginSchedule, ShardedMarginHead} <= set(modules)
    for module in [*modules, MarginHead]:
        assert set(positional_names(module)) <= STRUCTURAL, module.__name__
        if keyword_names(module):
            with pytest.raises(TypeError, match="keyword-only"):
                module(*(C, D, cosface_config(8.0, 0.2))[: len(positional_names(module))], 1.0)
