"""The one engine behind every margin loss of the port.

A margin loss is a configuration (:class:`MarginConfig`): how each logit is scaled, and how the
target class's cosine is transformed (the margin). The engine turns (x, W, y, config) into logits
and a cross-entropy:

    logit_ij = S_ij * cos(theta_ij)                 for j != y_i
    logit_iy = S_iy * psi(cos theta_iy, theta_iy)   for the target class
    S_ij     = s * (|x_i| if feature_norm) * (|W_j| if weight_norm)

NormFace, CosFace/AM-Softmax, ArcFace and the combined margin use a fixed s and no norms;
SphereFace keeps |x_i|; L-Softmax keeps |x_i| |W_j|. Because every loss goes through here, the
memory-efficient and class-sharded paths serve them all at once.

Numerics (DESIGN.md): cosines, norms and the softmax are computed in float32 (float64 stays
float64), with autocast disabled inside, so bfloat16/float16 training never overflows at s = 64.
The target angle is computed by the half-angle form 2*atan2(|x^ - w^|, |x^ + w^|): exact to
rounding at the poles, and its gradient is finite everywhere (zero exactly at theta = 0 and pi,
the cone points where the margin loss has no derivative; see derivations/05-arcface-combined.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softmax_common.checks import check_reduction
from torch_port.tensor_checks import (
    check_chunk_size,
    check_features_table_labels,
    compute_dtype,
    reduce_loss,
)

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


def check_inputs(x, W, y=None):
    """Validate features (B, D), weights (C, D) and optional labels (B,); returns labels as int64."""
    return check_features_table_labels(x, W, y, "W")


def unit_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows / max(|row|, NORM_EPS) and the norms |row| as a column, for a 2-D tensor."""
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return rows / norms.clamp_min(NORM_EPS), norms


class _Geometry:
    """Normalised features and weights with their norms, in the compute dtype."""

    def __init__(self, x: torch.Tensor, W: torch.Tensor):
        dtype = compute_dtype(("x", x), ("W", W))
        self.x = x.to(dtype)
        self.W = W.to(dtype)
        self.x_hat, self.x_norm = unit_rows(self.x)
        self.w_hat, self.w_norm = unit_rows(self.W)

    def cosines(self) -> torch.Tensor:
        return self.x_hat @ self.w_hat.T

    def scales(self, config: MarginConfig, rows=None) -> torch.Tensor | float:
        """S_ij as a broadcastable factor: (B, 1), (1, C) or (B, C); ``rows`` picks W rows (the targets)."""
        factor: torch.Tensor | float = 1.0 if config.scale is None else config.scale
        if config.feature_norm:
            factor = factor * self.x_norm
        if config.weight_norm:
            w = self.w_norm.T if rows is None else self.w_norm[rows]
            factor = factor * w
        return factor


def target_cos_and_angle(x_hat: torch.Tensor, w_hat_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos theta_y and theta_y (both (B,)) from unit features and their own unit class weights."""
    cos_y = (x_hat * w_hat_y).sum(dim=1)
    gap = torch.linalg.vector_norm(x_hat - w_hat_y, dim=1)
    span = torch.linalg.vector_norm(x_hat + w_hat_y, dim=1)
    return cos_y, 2.0 * torch.atan2(gap, span)


def plain_logits(x: torch.Tensor, W: torch.Tensor, config: MarginConfig) -> torch.Tensor:
    """Margin-free logits S_ij * cos theta_ij (B, C): what a head gives at inference."""
    check_inputs(x, W)
    with torch.autocast(device_type=x.device.type, enabled=False):
        geo = _Geometry(x, W)
        return geo.cosines() * geo.scales(config)


def margin_logits(x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, config: MarginConfig) -> torch.Tensor:
    """The (B, C) logits with the target's margin applied, as fed to cross-entropy."""
    y = check_inputs(x, W, y)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _margin_logits(_Geometry(x, W), y, config)


def _margin_logits(geo: _Geometry, y: torch.Tensor, config: MarginConfig) -> torch.Tensor:
    logits = geo.cosines() * geo.scales(config)
    target = _target_logits(geo, y, config)
    # scatter, not in-place assignment: the replaced entry's gradient goes to the target path only.
    return logits.scatter(1, y[:, None], target[:, None])


def _target_logits(geo: _Geometry, y: torch.Tensor, config: MarginConfig) -> torch.Tensor:
    """S_iy * psi(cos theta_iy, theta_iy), computed from the (B, D) rows W[y] alone."""
    cos_y, theta_y = target_cos_and_angle(geo.x_hat, geo.w_hat[y])
    psi = cos_y if config.target is None else config.target(cos_y, theta_y)
    scale = geo.scales(config, rows=y)
    if isinstance(scale, torch.Tensor) and scale.dim() == 2:
        scale = scale[:, 0]
    return scale * psi


def margin_cross_entropy(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    config: MarginConfig,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the margin logits, reduced over the batch.

    chunk_size: None computes the (B, C) logits at once; an int walks the classes in chunks of that
    many and never keeps a (B, C) tensor (the memory-efficient path, torch_port/chunked.py; equal
    to the plain path to rounding, once-differentiable).
    """
    reduction = check_reduction(reduction)
    chunk_size = check_chunk_size(chunk_size)
    y = check_inputs(x, W, y)
    if chunk_size is not None:
        # Imported here: torch_port.chunked builds on this module's geometry and target logits.
        from torch_port.chunked import chunked_margin_cross_entropy

        with torch.autocast(device_type=x.device.type, enabled=False):
            return reduce_loss(chunked_margin_cross_entropy(x, W, y, config, chunk_size), reduction)
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = _margin_logits(_Geometry(x, W), y, config)
        return reduce_loss(F.cross_entropy(logits, y, reduction="none"), reduction)
