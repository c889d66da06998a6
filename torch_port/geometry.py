r"""The margin geometry: what every margin loss of the port is made of.

A margin loss is a configuration (:class:`MarginConfig`): how each logit is scaled, and how the
target class's cosine is transformed (the margin). With theta_ij the angle between x_i and W_j,

    logit_ij = S_ij * cos(theta_ij)                 for j != y_i
    logit_iy = S_iy * psi(cos theta_iy, theta_iy)   for the target class (the target logit t_i)
    S_ij     = s * (|x_i| if feature_norm) * (|W_j| if weight_norm)

NormFace, CosFace/AM-Softmax, ArcFace and the combined margin use a fixed s and no norms;
SphereFace keeps |x_i|; L-Softmax keeps |x_i| |W_j|. This module owns the pieces every path of the
engine (plain, chunked, sharded) builds on: normalisation (:func:`unit_rows`), the scale S
(:func:`logit_scale`), the (B, C) logits of the plain path (:class:`Geometry`), the target
logits computed from the rows W[y] alone (:func:`target_logits`), and the plain path's primitive
(:func:`plain_lse_and_target`; the chunked path differentiates it for second derivatives). It
imports nothing else of the port.

Numerics: normalisation divides by max(|v|, NORM_EPS), so a zero row is a zero unit vector (cosine
0 with everything). The target angle is computed by the half-angle form
theta = 2 atan2(|x^ - w^|, |x^ + w^|): exact to rounding at the poles, with a gradient that is
finite everywhere (zero exactly at theta = 0 and pi, the cone points where a margin loss has no
derivative; derivations/05-arcface-combined.md). Callers compute in float32 at least (float64 stays
float64) with autocast disabled; see :func:`torch_port.tensor_checks.compute_dtype`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from torch_port.tensor_checks import compute_dtype

# Normalisation divides by max(|v|, NORM_EPS), as torch.nn.functional.normalize does; the same
# constant as refimpl.geometry.NORM_EPS.
NORM_EPS = 1e-12

TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MarginConfig:
    """One loss as a configuration of the engine.

    target: psi(cos_y, theta_y) -> the target's transformed cosine, elementwise on (B,) tensors
        (before scaling). ``None`` means no margin (psi = cos).
    scale: the fixed scale s (a float, or a 0-d tensor such as a learnable scale); None means 1.
    feature_norm: multiply logits by |x_i| (SphereFace, L-Softmax).
    weight_norm: multiply logits by |W_j| (L-Softmax).
    """

    target: TargetFn | None = None
    scale: float | torch.Tensor | None = None
    feature_norm: bool = False
    weight_norm: bool = False


def unit_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows / max(|row|, NORM_EPS) and the norms |row| as a column, for a 2-D tensor."""
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return rows / norms.clamp_min(NORM_EPS), norms


def target_cos_and_angle(x_hat: torch.Tensor, w_hat_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos theta_y and theta_y (both (B,)) from unit features and their own unit class weights."""
    cos_y = (x_hat * w_hat_y).sum(dim=1)
    gap = torch.linalg.vector_norm(x_hat - w_hat_y, dim=1)
    span = torch.linalg.vector_norm(x_hat + w_hat_y, dim=1)
    return cos_y, 2.0 * torch.atan2(gap, span)


class _Cosines(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hat, w_hat):
        ctx.save_for_backward(x_hat, w_hat)
        return x_hat @ w_hat.T

    @staticmethod
    def backward(ctx, grad):
        x_hat, w_hat = ctx.saved_tensors
        with torch.autocast(device_type=grad.device.type, enabled=False):
            return grad @ w_hat, grad.T @ x_hat


def cosines(x_hat: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """x_hat @ w_hat.T, (B, C), whose backward's two products also run with autocast disabled.

    The engine disables autocast around its forward, and eager autograd runs the backward of a
    product in the dtype of its inputs. torch.compile traces the backward under the autocast of the
    forward's caller instead (torch._functorch.config.backward_pass_autocast = "same_as_forward",
    the default in torch 2.13), which would put the two (B, C)-sized products of the backward in
    bfloat16/float16: gradients 1e-3 away from eager's. The products are the only operations of the
    plain path autocast lowers, so a product with its own backward is all it takes for a compiled
    step to match eager to float32 rounding. Differentiable twice (its backward is torch operations).
    """
    return _Cosines.apply(x_hat, w_hat)


class Geometry:
    """Normalised features and class weights with their norms, in the compute dtype (the plain
    path's view of a problem: everything the (B, C) logits are made of)."""

    def __init__(self, x: torch.Tensor, W: torch.Tensor):
        dtype = compute_dtype(("x", x), ("W", W))
        self.x = x.to(dtype)
        self.W = W.to(dtype)
        self.x_hat, self.x_norm = unit_rows(self.x)
        self.w_hat, self.w_norm = unit_rows(self.W)

    def logits(self, config: MarginConfig) -> torch.Tensor:
        """The margin-free logits S_ij cos theta_ij, (B, C)."""
        return cosines(self.x_hat, self.w_hat) * logit_scale(config, self.x_norm, self.w_norm.T)

    def target_logits(self, y: torch.Tensor, config: MarginConfig, present: torch.Tensor | None = None):
        """t_i for the labels y (B,) (any integer in [0, C) where ``present`` is False); see :func:`target_logits`."""
        return target_logits(self.x_hat, self.x_norm, self.w_hat[y], self.w_norm[y], config, present)


def logit_scale(config: MarginConfig, x_norm: torch.Tensor, w_norm: torch.Tensor) -> torch.Tensor | float:
    """S = s |x_i| |W_j| with each norm only where the config keeps it, as a factor broadcast from
    the norms given: (B, 1) features against (1, C) classes for the (B, C) logits, or (B, 1) against
    each row's own class (B, 1) for the target logits. A number when neither norm is kept."""
    factor: torch.Tensor | float = 1.0 if config.scale is None else config.scale
    if config.feature_norm:
        factor = factor * x_norm
    if config.weight_norm:
        factor = factor * w_norm
    return factor


def target_logits(
    x_hat: torch.Tensor,
    x_norm: torch.Tensor,
    w_hat_y: torch.Tensor,
    w_norm_y: torch.Tensor,
    config: MarginConfig,
    present: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The target logits t_i = S_iy psi(cos theta_iy, theta_iy), (B,), from each row's own class alone.

    .. math:: t_i = s\,\|x_i\|^{[\mathrm{feature\_norm}]}\,\|W_{y_i}\|^{[\mathrm{weight\_norm}]}\,
              \psi(\cos\theta_{iy_i}, \theta_{iy_i})

    Args:
        x_hat, x_norm: unit features (B, D) and their norms (B, 1) (from :func:`unit_rows`).
        w_hat_y, w_norm_y: each row's unit class weight W[y_i] / |W[y_i]| (B, D) and its norm (B, 1).
        config: the loss.
        present: optional bool mask (B,); where False the row's target class is not among the
            classes at hand (another shard holds it): t_i = 0 there, with zero gradient. psi is
            evaluated at theta = pi/2 on those rows instead of at an arbitrary angle (the
            double-where idiom), so a psi with an infinite slope somewhere never multiplies it by
            the zero cotangent of a masked row.

    Returns:
        (B,) target logits in the dtype of ``x_hat``.
    """
    cos_y, theta_y = target_cos_and_angle(x_hat, w_hat_y)
    if present is not None:
        cos_y = torch.where(present, cos_y, 0.0)
        theta_y = torch.where(present, theta_y, math.pi / 2)
    psi = cos_y if config.target is None else config.target(cos_y, theta_y)
    factor = logit_scale(config, x_norm, w_norm_y)
    if isinstance(factor, torch.Tensor) and factor.dim() == 2:
        factor = factor[:, 0]
    logits = factor * psi
    return logits if present is None else torch.where(present, logits, 0.0)


def plain_lse_and_target(
    x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, config: MarginConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's primitive on the plain path: per row (B,), the log-sum-exp over the (B, C) logits
    with the target's margin applied, and the target logit (0 where y_i = -1); arguments already
    checked, autocast already disabled (see :func:`torch_port.engine.lse_and_target`). Ordinary
    autograd all the way, so it is differentiable any number of times.
    """
    geo = Geometry(x, W)
    present = y >= 0
    rows = y.clamp_min(0)  # absent rows read class 0's column and put it back unchanged
    logits = geo.logits(config)
    target = geo.target_logits(rows, config, present)
    kept = logits.gather(1, rows[:, None])[:, 0]
    logits = logits.scatter(1, rows[:, None], torch.where(present, target, kept)[:, None])
    # log sum exp with the row maximum held out of the graph: the gradient is e^{z - M} / sum (M
    # cancels exactly), which keeps M's rounding out of every probability.
    peak = logits.detach().amax(dim=1, keepdim=True)
    lse = peak[:, 0] + torch.log(torch.exp(logits - peak).sum(dim=1))
    return lse, target


__all__ = [
    "NORM_EPS",
    "Geometry",
    "MarginConfig",
    "TargetFn",
    "cosines",
    "logit_scale",
    "plain_lse_and_target",
    "target_cos_and_angle",
    "target_logits",
    "unit_rows",
]
