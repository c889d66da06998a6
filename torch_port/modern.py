r"""The margins the field moved to after ArcFace, part I: sub-centres, per-class margins, margins on
cosines you already have.

- :func:`subcenter_arcface_loss` (Deng et al., ECCV 2020): k weight rows per class, a class's
  cosine the largest of its rows', then ArcFace. One dominant sub-centre per class gathers the clean
  samples; noisy samples settle on the others instead of pulling the class apart.
- :func:`adaptive_margins` (Ha et al., 2020): per-class margins from class sizes, larger for rare
  classes, for the heads' ``m`` (a (C,) tensor) or a per-sample ``m`` looked up by label.
- :func:`margin_logits_from_cosines`: a configuration's margin applied to (B, C) cosines a network
  already computed (insightface's ``CombinedMarginLoss(logits, labels)`` usage).

Per-sample margins (a (B,) ``m``), ``margin_grad`` and ``ignore_index`` of every margin loss are in
torch_port/margins.py and torch_port/engine.py. Derivation:
derivations/10-subcenter-and-per-sample-margins.md.
"""

from __future__ import annotations

import math

import torch

from softmax_common.checks import check_class_counts, check_ignore_index, check_interval, check_margin_range
from torch_port.engine import ABSENT, MarginConfig, ignored_rows, margin_cross_entropy, margin_logits
from torch_port.geometry import logit_scale, value_with_gradient_of
from torch_port.margins import subcenter_arcface_config
from torch_port.row_params import check_row_tensors, resolve_labels
from torch_port.tensor_checks import check_float_tensor, check_labels, compute_dtype


def subcenter_arcface_logits(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    s: float = 64.0,
    m: float = 0.5,
    k: int = 3,
    easy_margin: bool = False,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""Sub-center ArcFace logits (B, C): each class's cosine is the largest over its k weight rows.

    .. math:: \cos\theta_{ij} = \max_{r < k} \cos\angle(x_i, W_{jk + r}), \qquad
              z_{i y_i} = s\,\psi(\theta_{i y_i}), \quad z_{ij} = s \cos\theta_{ij}

    with psi ArcFace's (the fallback past pi - m sample by sample). W is (C k, D): rows j k .. j k +
    k - 1 are class j's. Arguments as :func:`subcenter_arcface_loss`.
    """
    return margin_logits(x, W, y, subcenter_arcface_config(s, m, k, easy_margin, margin_grad), ignore_index)


def subcenter_arcface_loss(
    x: torch.Tensor,
    W: torch.Tensor,
    y: torch.Tensor,
    s: float = 64.0,
    m: float = 0.5,
    k: int = 3,
    easy_margin: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
    margin_grad: str = "exact",
    ignore_index: int | None = ABSENT,
) -> torch.Tensor:
    r"""Sub-center ArcFace: ArcFace over classes whose cosine is the best of k sub-centres.

    .. math::

        \cos\theta_{ij} = \max_{r < k} \cos\angle(x_i, W_{jk + r}), \qquad
        \ell_i = -\log \frac{e^{s \psi(\theta_{i y_i})}}
                           {e^{s \psi(\theta_{i y_i})} + \sum_{j \ne y_i} e^{s \cos\theta_{ij}}}

    psi as :func:`torch_port.functional.arcface_loss` (cos(theta + m), the fallback cos theta - m sin m
    past pi - m, or the easy margin). Only the arg-max row of each class receives gradient from a
    sample (the max's rule); with k = 1 this is ArcFace. The official code has no fallback past pi - m
    (it uses cos(theta + m) throughout, in insightface recognition/subcenter_arcface/train_parall.py
    as for its ArcFace); the fallback here keeps psi non-increasing, as for this project's ArcFace.

    Args:
        x: (B, D) features. W: (C k, D) weights, rows j k .. j k + k - 1 belonging to class j.
        y: (B,) labels in [0, C). s: scale in (0, 1e4] (default 64). m: angular margin in radians in
            [0, pi/2] (default 0.5), or a (B,) tensor of per-sample margins. k: sub-centres per
            class, an int >= 1 (default 3, the paper's). easy_margin: a bool (default False).
        reduction: "mean", "sum" or "none". chunk_size: None, or classes (not rows) per chunk: chunks
            fall on whole classes (torch_port/chunked_generic.py).
        margin_grad: "exact" (default) or "detached". ignore_index: rows with this label (default
            -1; None: none) give no loss and no gradient.

    Returns:
        The loss in float32 (float64 for float64 inputs).

    References:
        Deng, Guo, Liu, Zafeiriou, "Sub-center ArcFace: Boosting Face Recognition by Large-Scale
        Noisy Web Faces", ECCV 2020; insightface, recognition/subcenter_arcface.
    """
    config = subcenter_arcface_config(s, m, k, easy_margin, margin_grad)
    return margin_cross_entropy(x, W, y, config, reduction, chunk_size, ignore_index)


def adaptive_margins(class_counts, m_min: float = 0.05, m_max: float = 0.5, p: float = -0.25) -> torch.Tensor:
    r"""Per-class margins from class sizes (Ha, Song, Shin, Jung, Park 2020): rare classes get larger ones.

    .. math:: m_j = (m_{max} - m_{min}) \frac{n_j^p - \min_k n_k^p}{\max_k n_k^p - \min_k n_k^p} + m_{min}

    With p < 0 the smallest class gets m_max and the largest m_min. When every class has the same
    size (max = min) the fraction is 0/0: every class gets m_max (as the reference decides), so
    balanced data trains as plain ArcFace with its usual margin (the default m_max = 0.5 is ArcFace's
    m). Margins are angles in radians.

    Args:
        class_counts: (C,) sample counts n_j > 0: a tensor (integer or floating) or a sequence.
        m_min, m_max: the smallest and largest margin, 0 <= m_min <= m_max <= pi/2 (defaults 0.05, 0.5).
        p: the exponent (default -0.25, the paper's), a finite number.

    Returns:
        (C,) float64 margins (on the counts' device), for ``ArcFace(m=...)``, ``CosFace(m=...)`` or
        ``AMSoftmax(m=...)``, or ``m=margins[y]`` in a functional loss.

    References:
        Ha, Song, Shin, Jung, Park, "Google Landmark Recognition 2020 Competition Third Place
        Solution", arXiv:2010.05350 (dynamic margins, their eq. (1)).
    """
    m_min, m_max = check_margin_range(m_min, m_max)
    p = check_interval(p, "p", -math.inf, math.inf, low_open=True, high_open=True)
    counts = class_counts if isinstance(class_counts, torch.Tensor) else torch.as_tensor(class_counts)
    if counts.dtype == torch.bool or counts.is_complex() or counts.dim() != 1:
        raise ValueError(f"class_counts must be a 1-d sequence of counts, got {tuple(counts.shape)} {counts.dtype}")
    counts = counts.detach().to(torch.float64)
    # aminmax propagates nan, which check_class_counts refuses
    extremes = torch.stack(torch.aminmax(counts)).tolist() if counts.numel() else [math.nan, math.nan]
    check_class_counts(counts.numel(), *extremes)
    powered = counts**p
    low, high = powered.min(), powered.max()
    if bool(high == low):
        return torch.full_like(counts, m_max)
    return (m_max - m_min) * (powered - low) / (high - low) + m_min


def margin_logits_from_cosines(
    cos: torch.Tensor, y: torch.Tensor, config: MarginConfig, *, ignore_index: int | None = ABSENT
) -> torch.Tensor:
    r"""The margin logits (B, C) of a configuration, from cosines a network already computed.

    .. math:: z_{i y_i} = s\,\psi(\cos\theta_{i y_i}, \theta_{i y_i}), \qquad z_{ij} = s \cos\theta_{ij},
              \qquad \theta = \arccos(\mathrm{clip}(\cos\theta, -1, 1))

    For a network whose last layer gives the (B, C) cosines (insightface's ``CombinedMarginLoss(
    logits, labels)``); feed the result to ``torch.nn.functional.cross_entropy`` (with
    ``ignore_index``). ``config`` comes from the builders: ``torch_port.normalized.arcface_config(s,
    m, easy_margin, margin_grad)``, ``cosface_config``, ``combined_margin_config``; configurations
    that scale by norms (SphereFace, L-Softmax) or pool sub-centres need x and W, not cosines, and are
    refused. Rows labelled ``ignore_index`` keep s cos theta (no margin).

    Numerics as the engine's: computed in float32 at least with autocast disabled. The angle comes
    from the cosine, theta = arccos(cos), whose slope is infinite at cos = +-1: there (and beyond,
    where the clip holds it) the angle is taken without gradient, so gradients stay finite
    everywhere and are exact wherever |cos| < 1 (the engine's half-angle form gives the same at the
    poles: zero through theta).

    Args:
        cos: (B, C) cosines, floating point (float16/bfloat16 are upcast). y: (B,) labels in [0, C)
            or ``ignore_index``. config: the margin configuration.
        ignore_index: the label of rows to leave margin-free (default -1; None: none).

    Returns:
        (B, C) logits in float32 (float64 for float64 cosines).
    """
    check_float_tensor(cos, "cos", ndim=2)
    if not isinstance(config, MarginConfig):
        raise TypeError(f"config must be a torch_port.engine.MarginConfig, got {type(config).__name__}")
    if config.feature_norm or config.weight_norm or config.subcenters != 1 or getattr(config.target, "takes_norms", 0):
        raise ValueError(
            "config must scale cosines by s alone and need nothing but them (no feature or weight norm, "
            "no margin from the feature norm, one row per class)"
        )
    ignore_index = check_ignore_index(ignore_index)
    y = check_labels(y, cos.shape[0], cos.shape[1], same_device_as=("cos", cos), ignore=ignore_index)
    check_row_tensors(config, cos.shape[0], cos)
    labels, kept = ignored_rows(y, ignore_index)
    rows = labels.clamp_min(0)
    config = resolve_labels(config, labels)
    with torch.autocast(device_type=cos.device.type, enabled=False):
        cos = cos.to(compute_dtype(("cos", cos)))
        scale = logit_scale(config, None, None)
        cos_y = cos.gather(1, rows[:, None])[:, 0]
        inside = cos_y.abs() < 1.0
        # arccos where its slope is finite; at (or past) the poles the clipped angle, as a constant
        pole = torch.acos(cos_y.detach().clamp(-1.0, 1.0))
        theta_y = torch.where(inside, torch.acos(torch.where(inside, cos_y, 0.0)), pole)
        if config.target is None:
            psi = cos_y
        else:
            psi = config.target(cos_y, theta_y)
        target = psi * scale
        if getattr(config.target, "detached_margin", False):
            target = value_with_gradient_of(target, cos_y * scale)
        if kept is not None:
            target = torch.where(kept, target, cos_y * scale)
        return (cos * scale).scatter(1, rows[:, None], target[:, None])


__all__ = ["adaptive_margins", "margin_logits_from_cosines", "subcenter_arcface_logits", "subcenter_arcface_loss"]
