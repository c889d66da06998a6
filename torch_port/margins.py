r"""The target transforms of the normalized-margin family and the engine configurations built from them.

A target transform psi(cos theta_y, theta_y) replaces the target class's cosine (the engine,
torch_port/engine.py, scales it by s). Each is a small frozen dataclass with ``__call__`` rather
than a closure: a configuration, and a ShardedMarginHead that stores one, can then be pickled and
saved whole (torch.save), and two transforms built from the same numbers compare equal.

Margins are numbers, or (B,) tensors: one margin per sample (ElasticFace's draws, per-class margins
looked up by label, :func:`torch_port.adaptive_margins`). A per-sample margin is a constant to the
loss (detached: it is a hyperparameter, not a parameter), checked entry by entry against the scalar
margin's range, and handed to each path with its rows (torch_port/row_params.py). The ArcFace
fallback past pi - m is applied sample by sample, with each sample's m.

The gradient convention (``margin_grad``): "exact" differentiates psi; "detached"
(:class:`DetachedMargin`) keeps psi's value but gives the target logit the gradient of the
un-margined s cos theta_y, as insightface's arcface_torch (recognition/arcface_torch/losses.py)
and opensphere compute it: their margin is built from ``logits.arccos()`` under ``torch.no_grad``
and written into the logits in place. derivations/10-subcenter-and-per-sample-margins.md compares
the two.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from softmax_common.checks import (
    MAX_MARGIN_MULTIPLIER,
    check_angular_margin,
    check_cosine_margin,
    check_flag,
    check_interval,
    check_margin_extremes,
    check_margin_grad,
    check_nonnegative,
    check_positive_int,
    check_scale,
)
from softmax_common.closed_forms import GAP_PEAK_ANGLE, arcface_fallback_gap, combined_margin_gap
from torch_port.geometry import MarginConfig
from torch_port.row_params import ByLabel
from torch_port.tensor_checks import check_float_tensor, check_scale_tensor, checks_on_device

Margin = float | torch.Tensor


def _like(m: Margin, ref: torch.Tensor) -> Margin:
    """A per-sample margin in the compute dtype and on the device of ``ref`` (a number as it is)."""
    if isinstance(m, ByLabel):
        raise RuntimeError("per-class margins are looked up by label first (torch_port.row_params.resolve_labels)")
    return m.to(dtype=ref.dtype, device=ref.device) if isinstance(m, torch.Tensor) else m


@dataclass(frozen=True)
class CosFaceTarget:
    """psi = cos theta - m (CosFace, AM-Softmax); smooth, so it uses the cosine, not the angle."""

    m: Margin

    def __call__(self, cos_y: torch.Tensor, theta_y: torch.Tensor) -> torch.Tensor:
        return cos_y - _like(self.m, cos_y)


@dataclass(frozen=True)
class ArcFaceTarget:
    """psi = cos(theta + m) while theta + m <= pi, else cos theta - m sin m; or the easy margin
    (cos(theta + m) where cos theta > 0, else cos theta)."""

    m: Margin
    easy_margin: bool

    def __call__(self, cos_y: torch.Tensor, theta_y: torch.Tensor) -> torch.Tensor:
        m = _like(self.m, cos_y)
        shifted = torch.cos(theta_y + m)
        if self.easy_margin:
            return torch.where(cos_y > 0, shifted, cos_y)
        gap = m * torch.sin(m) if isinstance(m, torch.Tensor) else arcface_fallback_gap(m)
        # The fallback uses the cosine (smooth at theta = pi) rather than cos(theta_y).
        return torch.where(theta_y + m <= math.pi, shifted, cos_y - gap)


def combined_gap(m1: Margin, m2: Margin) -> Margin:
    """softmax_common.closed_forms.combined_margin_gap, for numbers (that function, to the bit) or
    per-sample tensors (the same formula in torch operations)."""
    if not isinstance(m1, torch.Tensor) and not isinstance(m2, torch.Tensor):
        return combined_margin_gap(m1, m2)
    ref = m1 if isinstance(m1, torch.Tensor) else m2
    m1, m2 = (torch.as_tensor(v, dtype=ref.dtype, device=ref.device) for v in (m1, m2))
    delta = (math.pi * (m1 - 1.0) + m2) / m1
    held = delta.clamp_max(GAP_PEAK_ANGLE)
    return torch.maximum(held * torch.sin(held), 1.0 - torch.cos(delta))


@dataclass(frozen=True)
class CombinedMarginTarget:
    """psi = cos(m1 theta + m2) - m3 while m1 theta + m2 <= pi, else cos theta - m3 - c(m1, m2)."""

    m1: Margin
    m2: Margin
    m3: Margin

    def __call__(self, cos_y: torch.Tensor, theta_y: torch.Tensor) -> torch.Tensor:
        m1, m2, m3 = (_like(m, cos_y) for m in (self.m1, self.m2, self.m3))
        angle = m1 * theta_y + m2
        gap = combined_gap(m1, m2)
        return torch.where(angle <= math.pi, torch.cos(angle) - m3, (cos_y - m3) - gap)


@dataclass(frozen=True)
class DetachedMargin:
    """``margin_grad="detached"``: marks the wrapped transform psi so that the engine gives the target
    logit S psi the gradient of the un-margined S cos theta_y (value kept to the bit,
    :func:`torch_port.geometry.value_with_gradient_of`): d logit_y / d cos theta_y = s everywhere, the
    fallback and the easy margin's switch included (they change the value only), and for SphereFace
    and L-Softmax the gradient of |x| (|W_y|) cos theta_y. Called, it is psi itself."""

    inner: object
    detached_margin = True  # a class attribute, read by torch_port.geometry.target_logits

    @property
    def takes_norms(self) -> bool:
        return getattr(self.inner, "takes_norms", False)

    def __getattr__(self, name: str):
        # The rest of the wrapped transform's protocol (CurricularFace's modulates_negatives,
        # threshold, hard_negatives): only the target's gradient is changed, hard negatives keep theirs.
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, cos_y: torch.Tensor, theta_y: torch.Tensor, *norms: torch.Tensor) -> torch.Tensor:
        return self.inner(cos_y, theta_y, *norms)


def with_margin_grad(config: MarginConfig, margin_grad: str) -> MarginConfig:
    """The configuration under the gradient convention ``margin_grad`` ("exact" or "detached")."""
    if check_margin_grad(margin_grad) == "exact" or config.target is None:
        return config
    return dataclasses.replace(config, target=DetachedMargin(config.target))


# ---------------------------------------------------------------------------------------------
# Margins: a number, or one per sample
# ---------------------------------------------------------------------------------------------


def margin_value(m, name: str, check, low: float, high: float) -> Margin:
    """A margin ``m`` checked by the scalar check ``check(value, name)``: a number, or a 1-d
    floating-point tensor of per-sample margins (detached), each entry in [low, high]. Its values are
    read back (the smallest and largest, one transfer) in eager code on the CPU and checked there
    with the scalar's message; elsewhere a device-side assertion (torch_port.set_value_checks). Its
    length (one per sample) is checked by the engine against the batch."""
    if isinstance(m, ByLabel):  # per-class margins: the table's entries are held to the same range
        margin_value(m.table, name, check, low, high)
        return m
    if not isinstance(m, torch.Tensor):
        return check(m, name)
    if m.dim() == 0:
        raise ValueError(f"{name} must be a number or a 1-d tensor of per-sample margins, got a 0-d tensor")
    m = check_float_tensor(m, name, ndim=1).detach()
    if m.shape[0] == 0:  # a rank of the sharded path may hold no sample
        return m
    if m.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values")
    if checks_on_device(m):
        message = f"{name} must lie in [{low}, {high}] entry by entry (device-side check: torch_port.set_value_checks)"
        torch._assert_async(((m >= low) & (m <= high)).all(), message)
    else:
        # one read; aminmax propagates nan, which the scalar check refuses
        smallest, largest = torch.stack(torch.aminmax(m)).tolist()
        check_margin_extremes(smallest, largest, check, name)
    return m


def angular_margin(m, name: str = "m") -> Margin:
    """An angle in radians in [0, pi/2], or a (B,) tensor of them."""
    return margin_value(m, name, check_angular_margin, 0.0, math.pi / 2)


def cosine_margin(m, name: str = "m") -> Margin:
    """A cosine margin >= 0, or a (B,) tensor of them."""
    return margin_value(m, name, lambda value, _: check_cosine_margin(value), 0.0, math.inf)


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


def normface_config(s) -> MarginConfig:
    """NormFace: s cos theta for every class. ``s`` is a finite number > 0, or a floating-point 0-d
    tensor (a learnable scale) held to the same rules, its value read once to check it
    (:func:`torch_port.tensor_checks.check_scale_tensor`)."""
    return MarginConfig(scale=check_scale_tensor(s) if isinstance(s, torch.Tensor) else check_scale(s))


def cosface_config(s, m, margin_grad: str = "exact") -> MarginConfig:
    """CosFace/AM-Softmax: target s (cos theta - m); m is a cosine margin, not an angle (a number,
    or a (B,) tensor: one per sample)."""
    s, m = check_scale(s), cosine_margin(m)
    return with_margin_grad(MarginConfig(target=CosFaceTarget(m), scale=s), margin_grad)


def arcface_config(s, m, easy_margin, margin_grad: str = "exact") -> MarginConfig:
    """ArcFace: target s cos(theta + m), m in radians (a number, or a (B,) tensor: one per
    sample), with the fallback (or the easy margin)."""
    s, m = check_scale(s), angular_margin(m)
    target = ArcFaceTarget(m, check_flag(easy_margin, "easy_margin"))
    return with_margin_grad(MarginConfig(target=target, scale=s), margin_grad)


def combined_margin_config(s, m1, m2, m3, margin_grad: str = "exact") -> MarginConfig:
    """Combined margin: target s (cos(m1 theta + m2) - m3), m2 in radians, extended monotonically
    past pi; each of m1, m2, m3 a number or a (B,) tensor."""
    s = check_scale(s)
    top = MAX_MARGIN_MULTIPLIER
    m1 = margin_value(m1, "m1", lambda value, name: check_interval(value, name, 1.0, top), 1.0, top)
    m2 = angular_margin(m2, "m2")
    m3 = margin_value(m3, "m3", check_nonnegative, 0.0, math.inf)
    return with_margin_grad(MarginConfig(target=CombinedMarginTarget(m1, m2, m3), scale=s), margin_grad)


def subcenter_arcface_config(s, m, k, easy_margin, margin_grad: str = "exact") -> MarginConfig:
    """Sub-center ArcFace: ArcFace over the classes' pooled cosines (the largest of each class's k
    weight rows), k >= 1 an int."""
    config = arcface_config(s, m, easy_margin, margin_grad)
    return dataclasses.replace(config, subcenters=check_positive_int(k, "k"))


__all__ = [
    "ArcFaceTarget",
    "CombinedMarginTarget",
    "CosFaceTarget",
    "DetachedMargin",
    "angular_margin",
    "arcface_config",
    "class_margins",
    "combined_gap",
    "combined_margin_config",
    "cosface_config",
    "cosine_margin",
    "margin_value",
    "normface_config",
    "subcenter_arcface_config",
    "with_margin_grad",
]


def class_margins(m, num_classes: int, kind: str) -> Margin:
    """A head's margin: a number, or a (C,) tensor of per-class margins (``kind`` "angular" or
    "cosine" decides the range), checked entry by entry and copied (the head keeps it as a buffer)."""
    check = angular_margin if kind == "angular" else cosine_margin
    m = check(m.table if isinstance(m, ByLabel) else m)
    if isinstance(m, torch.Tensor):
        if m.shape[0] != num_classes:
            shape = tuple(m.shape)
            raise ValueError(f"m must be a number or hold one margin per class, shape ({num_classes},), got {shape}")
        m = m.clone()
    return m
