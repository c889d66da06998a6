"""Configurations and heads pickle, save whole and compare by value (issue 13, item 11).

The target transforms psi of the engine's configurations are small frozen dataclasses with
``__call__`` (torch_port/normalized.py, torch_port/angular.py) rather than closures, so a
MarginConfig pickles, and configurations built from the same hyperparameters compare equal. The
sharded heads, which store their configuration, are pickled on 2 ranks in
tests/test_distributed_faults.py; here: the configurations themselves, the ranks' configuration
fingerprint (torch_port/distributed/agreement.py), and every single-process head and module.
"""

from __future__ import annotations

import io
import itertools
import math
import pickle

import numpy as np
import pytest
import torch

import refimpl.angular
import refimpl.normalized
from tests.distributed_cases import LOSSES, make_config
from tests.registry import RECORDS
from torch_port import (
    AMSoftmax,
    ArcFace,
    CenterLoss,
    CombinedMargin,
    CosFace,
    DistillationLoss,
    LSoftmax,
    MarginSchedule,
    NormFace,
    SphereFace,
)
from torch_port.angular import lsoftmax_config, sphereface_config
from torch_port.distributed.agreement import config_fingerprint
from torch_port.engine import MarginConfig
from torch_port.normalized import arcface_config, combined_margin_config, cosface_config, normface_config

# Angles in [0, pi], both poles and the branch points of every default margin included.
THETA = torch.cat([torch.linspace(0.0, math.pi, 61, dtype=torch.float64), torch.tensor([math.pi - 0.5])])


def _round_trips(obj) -> dict:
    """obj through pickle and through torch.save/torch.load of the whole object (weights_only=False)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return {"pickle": pickle.loads(pickle.dumps(obj)), "torch.save": torch.load(buffer, weights_only=False)}


def _psi(config: MarginConfig) -> torch.Tensor:
    if getattr(config.target, "takes_norms", False):  # AdaFace, MagFace: the feature norms set the margin
        return config.target(torch.cos(THETA), THETA, torch.linspace(0.5, 150.0, len(THETA), dtype=torch.float64))
    return config.target(torch.cos(THETA), THETA)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_configuration_round_trips_with_the_same_target_values(name):
    config = make_config(name)
    for which, copy in _round_trips(config).items():
        assert copy == config == make_config(name), which
        if config.target is not None:
            assert torch.equal(_psi(copy), _psi(config)), which
        assert config_fingerprint(copy) == config_fingerprint(config), which


def test_the_target_transforms_are_the_papers_formulas():
    """psi of each builder against the papers' target formulas in NumPy (the gaps and L-Softmax's
    psi from refimpl), at angles over [0, pi]: the dataclasses compute what the closures did."""
    theta, cos = THETA.numpy(), torch.cos(THETA).numpy()
    torch_psi = {
        "cosface": cosface_config(64.0, 0.35),
        "arcface": arcface_config(64.0, 0.5, False),
        "arcface easy": arcface_config(64.0, 0.5, True),
        "combined": combined_margin_config(64.0, 1.2, 0.3, 0.1),
        "lsoftmax beta 0.5": lsoftmax_config(3, 0.5),
    }
    angle = 1.2 * theta + 0.3
    expected = {
        "cosface": cos - 0.35,
        "arcface": np.where(theta + 0.5 <= math.pi, np.cos(theta + 0.5), cos - refimpl.normalized.arcface_gap(0.5)),
        "arcface easy": np.where(cos > 0, np.cos(theta + 0.5), cos),
        "combined": np.where(
            angle <= math.pi, np.cos(angle) - 0.1, cos - 0.1 - refimpl.normalized.combined_gap(1.2, 0.3)
        ),
        "lsoftmax beta 0.5": (0.5 * cos + refimpl.angular.lsoftmax_psi(theta, 3)) / 1.5,
    }
    for name, config in torch_psi.items():
        got = _psi(config).numpy()
        assert abs(got - expected[name]).max() <= 1e-12, name


def test_equal_hyperparameters_give_equal_configurations_and_different_ones_do_not():
    """MarginConfig's equality (a frozen dataclass) now compares the transforms by value; the ranks'
    fingerprint tells apart every pair of configurations that compute different losses."""
    same = [
        (cosface_config(64.0, 0.35), cosface_config(64, 0.35)),
        (arcface_config(64.0, 0.5, False), arcface_config(64.0, 0.5, False)),
        (combined_margin_config(64.0, 1.2, 0.3, 0.1), combined_margin_config(64.0, 1.2, 0.3, 0.1)),
        (sphereface_config(4, 0.0), sphereface_config(4, 0.0)),
    ]
    for a, b in same:
        assert a == b and hash(a) == hash(b) and config_fingerprint(a) == config_fingerprint(b)
    different = {
        "normface s": normface_config(16.0),
        "normface s'": normface_config(17.0),
        "cosface m": cosface_config(64.0, 0.35),
        "cosface m'": cosface_config(64.0, 0.30),
        "cosface s'": cosface_config(32.0, 0.35),
        "arcface": arcface_config(64.0, 0.5, False),
        "arcface easy": arcface_config(64.0, 0.5, True),
        "arcface m'": arcface_config(64.0, 0.4, False),
        "combined m3": combined_margin_config(64.0, 1.0, 0.5, 0.1),
        "combined m1": combined_margin_config(64.0, 1.2, 0.5, 0.0),
        "lsoftmax": lsoftmax_config(4, 0.0),
        "lsoftmax beta": lsoftmax_config(4, 1.0),
        "lsoftmax m": lsoftmax_config(3, 0.0),
        "sphereface": sphereface_config(4, 0.0),
    }
    for (name_a, a), (name_b, b) in itertools.combinations(different.items(), 2):
        assert a != b, (name_a, name_b)
        assert config_fingerprint(a) != config_fingerprint(b), (name_a, name_b)


def _single_process_modules() -> dict:
    """Every head and module of the port that runs in one process: each registry record's head at
    its defaults, and the ones the records do not build (learned scale, released schedules,
    chunking, center loss, distillation, the schedule alone)."""
    modules = {
        record.name: record.head(record.defaults, 7, 4, dtype=torch.float64)
        for record in RECORDS
        if record.head is not None and record.defaults is not None
    }
    modules |= {
        "NormFace learned scale": NormFace(7, 4, learn_scale=True, dtype=torch.float64),
        "LSoftmax released schedule": LSoftmax(7, 4, dtype=torch.float64),
        "SphereFace released schedule": SphereFace(7, 4, m=3, dtype=torch.float64),
        "ArcFace chunked": ArcFace(7, 4, chunk_size=3, dtype=torch.float64),
        "CosFace sum": CosFace(7, 4, reduction="sum", dtype=torch.float64),
        "AMSoftmax none": AMSoftmax(7, 4, reduction="none", dtype=torch.float64),
        "CombinedMargin": CombinedMargin(7, 4, m1=1.1, m3=0.05, dtype=torch.float64),
        "CenterLoss": CenterLoss(7, 4, dtype=torch.float64),
        "CenterLoss learned": CenterLoss(7, 4, learn_centers=True, dtype=torch.float64),
    }
    return modules


def _outputs(module, x, y) -> dict:
    """What a module computes (in training mode, where state moves) and its state afterwards."""
    if isinstance(module, DistillationLoss):
        teacher = torch.linspace(-1.0, 1.0, 7 * x.shape[0], dtype=torch.float64).reshape(x.shape[0], 7)
        out = {"loss": module(x @ torch.ones(4, 7, dtype=torch.float64), teacher, y)}
    elif isinstance(module, MarginSchedule):
        out = {"value": torch.tensor(module.value())}
        module.step()
    else:
        out = {"loss": module(x, y)}
        if hasattr(module, "logits"):
            out["logits"] = module.logits(x)
    out |= {f"state {key}": value for key, value in module.state_dict().items()}
    return {key: value.detach() for key, value in out.items()}


def test_every_single_process_head_pickles_and_saves_whole():
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 6, 3, 3, 1])
    modules = _single_process_modules()
    modules |= {"DistillationLoss": DistillationLoss(T=2.0, alpha=0.3), "MarginSchedule": MarginSchedule.sphereface()}
    assert {"normface_loss", "cosface_loss", "arcface_loss", "lsoftmax_loss", "sphereface_loss"} <= set(modules)
    for name, module in modules.items():
        copies = _round_trips(module)  # before the original's first step, so all start alike
        expected = _outputs(module, x, y)
        for which, copy in copies.items():
            got = _outputs(copy, x, y)
            assert got.keys() == expected.keys(), (name, which)
            for key, value in expected.items():
                assert torch.equal(got[key], value), (name, which, key)
