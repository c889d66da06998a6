"""What the demo trains and how: one table of losses (:data:`DEMO_LOSSES`) and the training shared by all.

Every number the demo's table depends on is set here. :data:`DEMO_SETTINGS`, :data:`LOSS_TITLES`,
:data:`HEAD_BUILDERS` and :data:`LOSSES` are views of :data:`DEMO_LOSSES`, kept for the code that
reads them, so a loss is added or changed in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from torch_port import (
    AdaFace,
    AMSoftmax,
    ArcFace,
    CosFace,
    CurricularFace,
    ElasticArcFace,
    LSoftmax,
    MagFace,
    MarginSchedule,
    NormFace,
    SphereFace,
    SubCenterArcFace,
)
from torch_port.demo.heads import SoftmaxCenterHead, SoftmaxHead


@dataclass(frozen=True)
class DemoLoss:
    """One loss of the demo: its ``--loss`` name, its title in the table, its head class and settings.

    ``settings`` are the head's keyword arguments; a ``schedule`` among them is a dict of
    :class:`~torch_port.MarginSchedule`'s arguments, and ``schedule_symbol`` is what the table calls
    the weight that schedule sets.
    """

    name: str
    title: str
    head: type[nn.Module]
    settings: dict[str, Any] = field(default_factory=dict, hash=False)
    schedule_symbol: str = "w"

    def make_head(self, num_classes: int, dim: int, **settings: Any) -> nn.Module:
        """The head for ``num_classes`` classes in ``dim`` dimensions with the given settings."""
        if "schedule" in settings:
            settings = {**settings, "schedule": MarginSchedule(**settings["schedule"])}
        return self.head(num_classes, dim, **settings)

    def build(self, num_classes: int, dim: int) -> nn.Module:
        """The head with this loss's demo settings."""
        return self.make_head(num_classes, dim, **self.settings)

    def describe(self) -> str:
        """The settings as one short line for the table, e.g. ``s=16, m=0.2`` (``-`` for none)."""
        parts = []
        for name, value in self.settings.items():
            if name == "schedule":
                parts.append(
                    f"{self.schedule_symbol}=max({value['minimum']:g}, "
                    f"{value['base']:g}(1+{value['gamma']:g}t)^-{value['power']:g})"
                )
            elif isinstance(value, str):
                parts.append(f"{name}={value}")
            else:
                parts.append(f"{name}={value:g}")
        return ", ".join(parts) or "-"


def index_losses(entries: tuple[DemoLoss, ...]) -> dict[str, DemoLoss]:
    """The entries by name, in the order given; raises ValueError when a name repeats."""
    table: dict[str, DemoLoss] = {}
    for entry in entries:
        if entry.name in table:
            raise ValueError(f"the demo's loss table names {entry.name!r} twice")
        table[entry.name] = entry
    return table


# --------------------------------------------------------------------------------------------------
# The settings of each loss in the demo, all in one place. Names are what --loss accepts; the order
# is the table's.
#
# Why not the papers' defaults: those are tuned for face recognition (thousands of classes in 512
# dimensions). Here 10 classes share a circle, 36 degrees each, so a margin must be well below the
# angular room a class has, and the scale only needs to allow a confident softmax over 10 classes:
# CosFace's bound (refimpl.cosface_min_scale(10, 0.99) = 6.1) asks for s >= 6.1 to reach p = 0.99.
# Within that, the values were picked by a small sweep on seeds 1 and 2: with m = 0.3, ArcFace and
# AM-Softmax sometimes trained two classes onto nearly the same direction.
# --------------------------------------------------------------------------------------------------
DEMO_LOSSES: dict[str, DemoLoss] = index_losses(
    (
        DemoLoss("softmax", "Softmax", SoftmaxHead),
        DemoLoss("normface", "NormFace", NormFace, {"s": 10.0}),
        DemoLoss("cosface", "CosFace", CosFace, {"s": 16.0, "m": 0.2}),
        DemoLoss("am-softmax", "AM-Softmax", AMSoftmax, {"s": 10.0, "m": 0.2}),
        DemoLoss("arcface", "ArcFace", ArcFace, {"s": 16.0, "m": 0.2}),
        # SphereFace's released schedule: lambda = max(5, 1000 / (1 + 0.12 t)) reaches its floor of 5
        # after about 1,650 steps (75 epochs of the digits at 22 steps each).
        DemoLoss(
            "sphereface",
            "SphereFace",
            SphereFace,
            {"m": 4, "schedule": {"base": 1000.0, "gamma": 0.12, "power": 1.0, "minimum": 5.0}},
            schedule_symbol="lambda",
        ),
        # L-Softmax's released MNIST schedule decays over tens of thousands of steps (gamma 2.5e-5). Six
        # times that gamma brings beta = 1000 (1 + gamma t)^-35 to 1 after about 1,450 steps (66 epochs)
        # and to 0.05 by the end of the default 100 epochs.
        DemoLoss(
            "lsoftmax",
            "L-Softmax",
            LSoftmax,
            {"m": 4, "schedule": {"base": 1000.0, "gamma": 1.5e-4, "power": 35.0, "minimum": 0.0}},
            schedule_symbol="beta",
        ),
        DemoLoss("center", "Softmax + Center", SoftmaxCenterHead, {"alpha": 0.5, "loss_weight": 0.05}),
        # The modern margins (issues 15-16), at ArcFace's s and m above where they have one. The
        # detached row is ArcFace with insightface's gradient convention (the margin's value, the
        # gradient of s cos theta_y): the measured comparison of derivations/10, section 4.
        DemoLoss("arcface-detached", "ArcFace (detached)", ArcFace, {"s": 16.0, "m": 0.2, "margin_grad": "detached"}),
        DemoLoss("subcenter", "Sub-center ArcFace", SubCenterArcFace, {"k": 3, "s": 16.0, "m": 0.2}),
        DemoLoss("elastic", "ElasticFace-Arc", ElasticArcFace, {"s": 16.0, "m": 0.2, "sigma": 0.05}),
        DemoLoss("curricularface", "CurricularFace", CurricularFace, {"s": 16.0, "m": 0.2}),
        DemoLoss("adaface", "AdaFace", AdaFace, {"s": 16.0, "m": 0.2}),
        # MagFace's norm bounds and margins scaled to this network and circle: norms in [1, 20], margins
        # 0.1..0.3; lambda_g = 1 is 6x magface_min_lambda_g(16, 1, 20, 0.1, 0.3) = 0.17.
        DemoLoss(
            "magface",
            "MagFace",
            MagFace,
            {"s": 16.0, "l_a": 1.0, "u_a": 20.0, "l_m": 0.1, "u_m": 0.3, "lambda_g": 1.0},
        ),
    )
)

# Views of the table under the names the demo had before it had one table. DEMO_SETTINGS holds the
# table's own dicts (not copies), so it and build_head can never disagree.
DEMO_SETTINGS: dict[str, dict[str, Any]] = {name: entry.settings for name, entry in DEMO_LOSSES.items()}
LOSS_TITLES: dict[str, str] = {name: entry.title for name, entry in DEMO_LOSSES.items()}
HEAD_BUILDERS: dict[str, Callable[..., nn.Module]] = {name: entry.make_head for name, entry in DEMO_LOSSES.items()}
LOSSES: tuple[str, ...] = tuple(DEMO_LOSSES)


def build_head(loss: str, num_classes: int, dim: int) -> nn.Module:
    """The head of one loss with its demo settings (:data:`DEMO_SETTINGS`)."""
    return DEMO_LOSSES[loss].build(num_classes, dim)


def describe_settings(loss: str) -> str:
    """The settings of one loss as one short line for the table, e.g. ``s=16, m=0.2``."""
    return DEMO_LOSSES[loss].describe()


# Training of every loss: the same network, optimiser, batches and number of steps, so the rows of
# the table differ only in the loss.
DEFAULT_EPOCHS = 100
BATCH_SIZE = 64
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 0.1
HIDDEN_SIZES = (256, 128)
HELD_OUT_FRACTION = 0.25
# One intra-op thread: results are bitwise repeatable only for a fixed thread count (1 and 2 threads
# gave different low bits, and so slightly different tables), and for a network this small a second
# thread was measured to be no faster.
NUM_THREADS = 1
