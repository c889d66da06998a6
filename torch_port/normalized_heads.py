r"""nn.Module heads of the normalized-margin losses: NormFace, CosFace, AMSoftmax, ArcFace, CombinedMargin.

Each head owns ``weight`` (num_classes, dim) and returns its loss's configuration of the engine;
``forward(x, y)`` is the loss with the margin, ``logits(x)`` the margin-free ``s cos theta`` used at
inference (the argmax and the cosine scores of a trained model). Hyperparameters are plain attributes,
checked when the head is built and again on every call (by the configuration builders), so an
attribute set to a bad value fails the next call before anything is computed.

Initialisation: ``weight`` ~ N(0, 0.01^2) elementwise (MarginHead's): the logits use only the
directions of W's rows, and an isotropic Gaussian draws those uniformly on the sphere. The 0.01 does
not change the loss, only the size of the first steps (the gradient of a normalized row scales as
1/|W_j|).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from softmax_common.checks import check_combined_margins, check_flag, check_margin_grad, check_scale
from torch_port.engine import MarginConfig
from torch_port.heads import MarginHead
from torch_port.keyword_only import keyword_hyperparameters
from torch_port.margins import (
    arcface_config,
    class_margins,
    combined_margin_config,
    cosface_config,
    normface_config,
)
from torch_port.row_params import ByLabel
from torch_port.tensor_checks import check_scale_tensor


class PerClassMargin:
    """A head whose ``m`` is a number or a (C,) tensor of per-class margins (:func:`torch_port.adaptive_margins`).

    A per-class ``m`` is a buffer (saved in the state dict, moved by ``.to()``; cast with the head
    by ``.to(dtype)``), each entry held to the scalar margin's range, here and in a checkpoint; the
    engine looks each sample's margin up by its label (torch_port.row_params.ByLabel), on the plain,
    chunked and sharded paths.
    """

    def set_margin(self, m, kind: str) -> None:
        self.margin_kind = kind
        m = class_margins(m, self.num_classes, kind)
        if isinstance(m, torch.Tensor):
            self.register_buffer("m", m.to(device=self.weight.device))
        else:
            self.m = m

    @property
    def per_class(self) -> bool:
        return isinstance(self.m, torch.Tensor)

    def config_with(self, m) -> MarginConfig:
        raise NotImplementedError

    def margin_config(self) -> MarginConfig:
        # Per-class margins: a table the engine looks up by label (torch_port.row_params.ByLabel),
        # on every path, the sharded head's included (ShardedMarginHead.from_head keeps it as a buffer).
        return self.config_with(ByLabel(self.m) if self.per_class else self.m)

    def inference_config(self) -> MarginConfig:
        return dataclasses.replace(self.config_with(0.0), target=None)

    def check_state_values(self, state_dict, prefix: str) -> None:
        """A checkpoint's per-class ``m`` must hold valid margins (one per class, in range)."""
        key = prefix + "m"
        if self.per_class and key in state_dict:
            class_margins(state_dict[key].detach(), self.num_classes, self.margin_kind)

    def margin_repr(self) -> str:
        return f"m=<{self.num_classes} per-class margins>" if self.per_class else f"m={self.m}"


class NormFace(MarginHead):
    r"""NormFace head: softmax over :math:`s \cos\theta_{ij}`, with a fixed or learnable scale.

    .. math:: \ell_i = -\log \frac{e^{s \cos\theta_{i y_i}}}{\sum_j e^{s \cos\theta_{ij}}}

    With ``learn_scale=True`` the scale is learned as s = exp(log_scale), with ``log_scale`` an
    unconstrained parameter initialised to log(s): s stays positive whatever the optimiser does, and
    its gradient s dL/ds makes steps relative to s (the NormFace paper learns s as a parameter and
    recommends it). ``log_scale`` is kept in float32 at least (float64 for a float64 head) so that
    the initial scale is exact.

    Checks of a learned scale: every value that enters from outside is checked (``s`` here, the
    ``s`` setter, and ``log_scale`` in a checkpoint given to ``load_state_dict``, which must be
    finite with exp(log_scale) a valid s). What the optimiser makes of it is not read back on each
    step (on GPU that would be a host synchronisation per step): a log_scale in exp's range is a
    positive scale, and one that is non-finite or past exp's range (above about 88.7 in float32: a
    diverged run) gives a non-finite loss, visible to the caller and to AMP's GradScaler, not a
    silently wrong one. The one case that stays silent is exp underflowing to 0 (log_scale below
    about -104 in float32, -745 in float64), which no ordinary step reaches.

    Args:
        num_classes: C >= 1. dim: feature dimension D >= 1.
        s: the (initial) scale in (0, 1e4] (default 16). learn_scale: learn s (default False).
        reduction: "mean", "sum" or "none". chunk_size: None or classes per chunk.
        ignore_index: rows with this label (default -1; None: none) give no loss and no gradient.
        device, dtype: of ``weight``.

    References:
        Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face Verification", 2017.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        s: float = 16.0,
        learn_scale: bool = False,
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        device=None,
        dtype=None,
    ) -> None:
        s = check_scale(s)
        learn_scale = check_flag(learn_scale, "learn_scale")
        options = dict(reduction=reduction, chunk_size=chunk_size, ignore_index=ignore_index)
        options.update(device=device, dtype=dtype)
        super().__init__(num_classes, dim, **options)
        self.learn_scale = learn_scale
        if learn_scale:
            scale_dtype = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
            self.log_scale = nn.Parameter(torch.tensor(math.log(s), device=device, dtype=scale_dtype))
        else:
            self._fixed_scale = s

    @property
    def s(self) -> float:
        """The current scale as a number (for a learned scale: exp(log_scale), detached)."""
        return float(self.log_scale.detach().exp()) if self.learn_scale else self._fixed_scale

    @s.setter
    def s(self, value: float) -> None:
        value = check_scale(value)
        if self.learn_scale:
            with torch.no_grad():
                self.log_scale.fill_(math.log(value))
        else:
            self._fixed_scale = value

    def check_state_values(self, state_dict, prefix: str) -> None:
        """A checkpoint's ``log_scale`` must be finite with exp(log_scale) a valid s (finite, > 0),
        in this head's dtype; checked before anything is loaded."""
        key = prefix + "log_scale"
        if not self.learn_scale or key not in state_dict:
            return
        log_scale = state_dict[key].detach().to(self.log_scale.dtype)
        if not torch.isfinite(log_scale):
            raise ValueError(f"the checkpoint's {key!r} must be finite, got {log_scale.item()}")
        try:
            check_scale(log_scale.exp().item())
        except ValueError as error:
            raise ValueError(f"the checkpoint's {key!r} = {log_scale.item()} is not a valid scale: {error}") from None

    def margin_config(self) -> MarginConfig:
        if not self.learn_scale:
            return normface_config(self._fixed_scale)
        # exp(log_scale) > 0 by construction: the shape and dtype are checked, the value is not read
        # (that would be a host synchronisation per step on GPU); see the class docstring.
        return MarginConfig(scale=check_scale_tensor(self.log_scale.exp(), read_value=False))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s:.6g}, learn_scale={self.learn_scale}"


class CosFace(PerClassMargin, MarginHead):
    r"""CosFace (LMCL) head: the target's cosine lowered by m, then scaled by s.

    .. math::

        \ell_i = -\log \frac{e^{s(\cos\theta_{i y_i} - m)}}
                           {e^{s(\cos\theta_{i y_i} - m)} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

    m is a cosine margin, subtracted from the target's cosine: a plain number, not an angle (no radians
    or degrees; pytorch-metric-learning's CosFaceLoss margin is the same number).

    Args:
        num_classes: C >= 1. dim: feature dimension D >= 1.
        s: scale in (0, 1e4] (default 64). m: cosine margin >= 0 (default 0.35), or a (C,) tensor
            of per-class margins (:class:`PerClassMargin`).
        margin_grad: "exact" (default) or "detached" (torch_port/margins.py).
        reduction, chunk_size, ignore_index, device, dtype: as for :class:`torch_port.heads.MarginHead`.

    References:
        Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        s: float = 64.0,
        m: float | torch.Tensor = 0.35,
        margin_grad: str = "exact",
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        device=None,
        dtype=None,
    ) -> None:
        s, margin_grad = check_scale(s), check_margin_grad(margin_grad)
        options = dict(reduction=reduction, chunk_size=chunk_size, ignore_index=ignore_index)
        options.update(device=device, dtype=dtype)
        super().__init__(num_classes, dim, **options)
        self.s, self.margin_grad = s, margin_grad
        self.set_margin(m, "cosine")

    def config_with(self, m) -> MarginConfig:
        return cosface_config(self.s, m, self.margin_grad)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, {self.margin_repr()}"


class AMSoftmax(CosFace):
    r"""AM-Softmax head: CosFace's formula with AM-Softmax's default scale s = 30.

    .. math:: z_{i y_i} = s (\cos\theta_{i y_i} - m), \qquad z_{ij} = s \cos\theta_{ij}

    m is a cosine margin, subtracted from the target's cosine: a plain number, not an angle (no radians
    or degrees; pytorch-metric-learning's CosFaceLoss margin is the same number).

    Args:
        num_classes: C >= 1. dim: feature dimension D >= 1.
        s: scale in (0, 1e4] (default 30). m: cosine margin >= 0 (default 0.35), or a (C,) tensor
            of per-class margins (:class:`PerClassMargin`).
        margin_grad: "exact" (default) or "detached" (torch_port/margins.py).
        reduction, chunk_size, ignore_index, device, dtype: as for :class:`torch_port.heads.MarginHead`.

    References:
        Wang, Cheng, Liu, Liu, "Additive Margin Softmax for Face Verification", IEEE SPL 2018.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        s: float = 30.0,
        m: float | torch.Tensor = 0.35,
        margin_grad: str = "exact",
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        device=None,
        dtype=None,
    ) -> None:
        options = dict(reduction=reduction, chunk_size=chunk_size, ignore_index=ignore_index)
        options.update(device=device, dtype=dtype)
        super().__init__(num_classes, dim, s=s, m=m, margin_grad=margin_grad, **options)


class ArcFace(PerClassMargin, MarginHead):
    r"""ArcFace head: the margin m added to the target's angle.

    .. math::

        \psi(\theta) = \cos(\theta + m) \text{ while } \theta + m \le \pi,
        \text{ else } \cos\theta - m \sin m; \qquad z_{i y_i} = s\,\psi(\theta_{i y_i})

    m is an angle in radians (the default 0.5 rad is 28.6 degrees; pytorch-metric-learning's ArcFaceLoss
    takes degrees), in [0, pi/2]: past a right angle a feature on its class's direction would get the
    target logit s cos m < 0, below that of any class orthogonal to it. A larger m is refused, with its
    value in radians when it reads as degrees (28.6 -> 0.4992).

    Args:
        num_classes: C >= 1. dim: feature dimension D >= 1.
        s: scale in (0, 1e4] (default 64). m: angular margin in radians in [0, pi/2] (default 0.5),
            or a (C,) tensor of per-class margins (:class:`PerClassMargin`).
        easy_margin: apply the margin only where cos theta_y > 0 (default False).
        margin_grad: "exact" (default) or "detached" (torch_port/margins.py).
        reduction, chunk_size, ignore_index, device, dtype: as for :class:`torch_port.heads.MarginHead`.

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019.
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        s: float = 64.0,
        m: float | torch.Tensor = 0.5,
        easy_margin: bool = False,
        margin_grad: str = "exact",
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        device=None,
        dtype=None,
    ) -> None:
        s, margin_grad = check_scale(s), check_margin_grad(margin_grad)
        easy_margin = check_flag(easy_margin, "easy_margin")
        options = dict(reduction=reduction, chunk_size=chunk_size, ignore_index=ignore_index)
        options.update(device=device, dtype=dtype)
        super().__init__(num_classes, dim, **options)
        self.s, self.easy_margin, self.margin_grad = s, easy_margin, margin_grad
        self.set_margin(m, "angular")

    def config_with(self, m) -> MarginConfig:
        return arcface_config(self.s, m, self.easy_margin, self.margin_grad)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, {self.margin_repr()}, easy_margin={self.easy_margin}"


class CombinedMargin(MarginHead):
    r"""Combined-margin head: target :math:`s(\cos(m_1\theta + m_2) - m_3)`, extended monotonically past pi.

    (m1, m2, m3) = (1, m, 0) is ArcFace, (1, 0, m) is CosFace; see
    ``torch_port.functional.combined_margin_loss`` for the extension past theta* = (pi - m2)/m1.

    Units: m1 multiplies the target's angle (a number >= 1, no unit); m2 is an angle in radians added to
    it, in [0, pi/2] as ArcFace's m (a larger m2 is refused, with its value in radians when it reads as
    degrees); m3 is a cosine margin subtracted from the cosine, not an angle.

    Args:
        num_classes: C >= 1. dim: feature dimension D >= 1.
        s: scale in (0, 1e4] (default 64). m1: in [1, 16] (default 1). m2: in [0, pi/2] (default 0.5).
        m3: >= 0 (default 0). margin_grad: "exact" (default) or "detached" (torch_port/margins.py).
        reduction, chunk_size, ignore_index, device, dtype: as for :class:`torch_port.heads.MarginHead`.

    References:
        Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
        CVPR 2019 (the combined margin).
    """

    @keyword_hyperparameters
    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        margin_grad: str = "exact",
        reduction: str = "mean",
        chunk_size: int | None = None,
        ignore_index: int | None = -1,
        device=None,
        dtype=None,
    ) -> None:
        s, margin_grad = check_scale(s), check_margin_grad(margin_grad)
        m1, m2, m3 = check_combined_margins(m1, m2, m3)
        options = dict(reduction=reduction, chunk_size=chunk_size, ignore_index=ignore_index)
        options.update(device=device, dtype=dtype)
        super().__init__(num_classes, dim, **options)
        self.s, self.m1, self.m2, self.m3, self.margin_grad = s, m1, m2, m3, margin_grad

    def margin_config(self) -> MarginConfig:
        return combined_margin_config(self.s, self.m1, self.m2, self.m3, self.margin_grad)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}"


__all__ = ["AMSoftmax", "ArcFace", "CombinedMargin", "CosFace", "NormFace", "PerClassMargin"]
