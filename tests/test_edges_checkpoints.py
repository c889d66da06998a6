"""A refused ``load_state_dict`` changes nothing (issue 13, item 13).

PyTorch's own load copies whatever fits before it raises for what does not: a checkpoint of a head
with another num_classes had already overwritten the schedule's iteration (L-Softmax, SphereFace)
or a learned NormFace scale. Every module of the port with state (each margin head, the learned
NormFace scale, CenterLoss in both modes, MarginSchedule on its own) is checked here against bad
checkpoints: another shape, a missing or unexpected key (strict), a non-tensor, a bad value; each
is refused with a ValueError and leaves every parameter and buffer bit-identical, loaded on its own
or as part of a larger model. A good checkpoint still round-trips.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from tests.records.angular import HEADS as ANGULAR_HEADS
from tests.records.normalized import HEADS as NORMALIZED_HEADS
from torch_port import CenterLoss, MarginSchedule

HEADS = {**NORMALIZED_HEADS, **ANGULAR_HEADS}
MODULES = {
    **{name: functools.partial(cls, dtype=torch.float64) for name, cls in HEADS.items()},
    "normface_learned": lambda c, d: NORMALIZED_HEADS["normface"](c, d, learn_scale=True, dtype=torch.float64),
    "center": lambda c, d: CenterLoss(c, d, dtype=torch.float64),
    "center_learned": lambda c, d: CenterLoss(c, d, learn_centers=True, dtype=torch.float64),
}


def trained(name: str, num_classes: int = 5, dim: int = 3, steps: int = 3, seed: int = 0) -> nn.Module:
    """A module after a few training steps: every piece of its state has moved from the start."""
    torch.manual_seed(seed)
    module = MODULES[name](num_classes, dim)
    parameters = list(module.parameters())  # CenterLoss's rule-driven centers are a buffer
    optimizer = torch.optim.SGD(parameters, lr=0.1) if parameters else None
    for _ in range(steps):
        x = torch.randn(7, dim, dtype=torch.float64)
        y = torch.randint(0, num_classes, (7,))
        loss = module(x, y)
        if optimizer is not None:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return module


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def bad_checkpoints(name: str) -> dict[str, tuple[dict, str]]:
    """label -> (checkpoint, what the message must say); each from a module that differs everywhere."""
    more_classes = trained(name, num_classes=6, steps=7, seed=1).state_dict()
    wider = trained(name, dim=4, steps=7, seed=1).state_dict()
    same = dict(trained(name, steps=7, seed=1).state_dict())
    table = "centers" if name.startswith("center") else "weight"
    out = {
        "another num_classes": (more_classes, rf"'{table}' has shape \(6, 3\), this module's has \(5, 3\)"),
        "another dim": (wider, rf"'{table}' has shape \(5, 4\)"),
        "a missing key": ({k: v for k, v in same.items() if k != table}, rf"'{table}' is missing"),
        "an unexpected key": ({**same, "bias": torch.zeros(5)}, r"'bias' is not part of this module"),
        "a non-tensor": ({**same, table: same[table].tolist()}, rf"'{table}' must be a tensor, got list"),
        "a meta tensor": ({**same, table: same[table].to("meta")}, r"meta device"),
    }
    if "schedule.iteration" in same:
        out["a negative iteration"] = ({**same, "schedule.iteration": torch.tensor(-1)}, r"'schedule.iteration'.*>= 0")
        out["a fractional iteration"] = ({**same, "schedule.iteration": torch.tensor(2.5)}, r"'schedule.iteration'")
    if "log_scale" in same:
        for bad in (math.nan, math.inf, 1000.0, -1000.0):
            out[f"log_scale = {bad}"] = ({**same, "log_scale": torch.tensor(bad, dtype=torch.float64)}, r"'log_scale'")
    return out


CASES = [(name, label) for name in MODULES for label in bad_checkpoints(name)]


@pytest.mark.parametrize(("name", "label"), CASES, ids=[f"{n}-{lab}" for n, lab in CASES])
def test_a_refused_load_leaves_every_parameter_and_buffer_bit_identical(name, label):
    module = trained(name)
    before = snapshot(module)
    checkpoint, message = bad_checkpoints(name)[label]
    with pytest.raises(ValueError, match=message):
        module.load_state_dict(checkpoint)
    assert_unchanged(module, before)


@pytest.mark.parametrize("name", list(MODULES))
def test_a_refused_load_inside_a_larger_model_leaves_the_head_unchanged(name):
    model = nn.ModuleDict({"backbone": nn.Linear(3, 3), "head": trained(name)})
    other = nn.ModuleDict({"backbone": nn.Linear(3, 3), "head": trained(name, num_classes=6, steps=7, seed=1)})
    before = snapshot(model["head"])
    with pytest.raises(ValueError, match=r"has shape \(6, 3\)"):
        model.load_state_dict(other.state_dict())
    assert_unchanged(model["head"], before)


@pytest.mark.parametrize("name", list(MODULES))
def test_a_good_checkpoint_still_loads_whole(name):
    module, source = trained(name), trained(name, steps=7, seed=1)
    module.load_state_dict(source.state_dict())
    assert_unchanged(module, snapshot(source))
    # strict=False: missing keys stay as they were, the rest is loaded (PyTorch's rule)
    partial = {k: v for k, v in trained(name, steps=2, seed=2).state_dict().items() if k != "schedule.iteration"}
    module.load_state_dict(partial, strict=False)
    for key, value in partial.items():
        assert torch.equal(module.state_dict()[key], value), key


def test_a_schedule_on_its_own_refuses_a_bad_iteration():
    schedule = MarginSchedule.sphereface()
    schedule.step()
    with pytest.raises(ValueError, match=r"'iteration'.*>= 0"):
        schedule.load_state_dict({"iteration": torch.tensor(-3)})
    with pytest.raises(TypeError, match=r"'iteration'"):
        schedule.load_state_dict({"iteration": torch.tensor(True)})
    assert int(schedule.iteration) == 1
    schedule.load_state_dict({"iteration": torch.tensor(40)})
    assert int(schedule.iteration) == 40 and schedule.value() == schedule.value_at(40)
