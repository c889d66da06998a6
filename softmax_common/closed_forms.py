r"""Closed forms of the normalized-margin family: functions of hyperparameters, not of tensors.

Both packages use these numbers, so they live here once, in plain Python:

- :func:`arcface_fallback_gap` and :func:`combined_margin_gap`, the cosine gaps the ArcFace and
  combined-margin target transforms subtract past their last monotone angle (the port's psi uses
  them; the reference computes the same gaps by its own formulas in ``refimpl/normalized.py``);
- :func:`normface_lower_bound` and :func:`cosface_min_scale`, the two bounds of the family, and
  :func:`magface_min_lambda_g`, MagFace's least regulariser weight, which both packages export under
  the contract's names.

Derivations: ``derivations/03-normface.md``, ``04-cosface-am-softmax.md``, ``05-arcface-combined.md``.
"""

from __future__ import annotations

import math
from fractions import Fraction

from softmax_common.checks import (
    check_bounds_pair,
    check_interval,
    check_margin_range,
    check_positive,
    check_positive_int,
    check_scale,
)

# The angle where Delta * sin(Delta) peaks on [0, pi]: the root of sin(D) + D cos(D) = 0 in (pi/2, pi).
# Past it the first-order cosine gap of the combined margin's extension is held at its peak, so the
# gap never shrinks as the margin grows (derivations/05-arcface-combined.md checks the root).
GAP_PEAK_ANGLE = 2.028757838110434


def arcface_fallback_gap(m: float) -> float:
    """m sin m: the cosine gap ArcFace subtracts once theta + m > pi (insightface's ``mm``); m in radians."""
    return m * math.sin(m)


def combined_margin_gap(m1: float, m2: float) -> float:
    r"""The cosine gap c of the combined margin's extension past theta* = (pi - m2) / m1.

    .. math::

        \Delta = \pi - \theta^* = \frac{\pi (m_1 - 1) + m_2}{m_1}, \qquad
        c = \max\bigl(g(\Delta),\; 1 - \cos\Delta\bigr), \qquad
        g(\Delta) = \Delta' \sin\Delta',\ \Delta' = \min(\Delta, \Delta_{peak})

    Delta is the angular margin left at theta*; Delta sin(Delta) = Delta sin(theta*) turns it into a
    cosine gap to first order (for m1 = 1 it is ArcFace's m2 sin m2 exactly). The term 1 - cos(Delta)
    = 1 + cos(theta*) makes the jump at theta* go down, never up; holding g at its peak keeps c
    non-decreasing in Delta, hence in m1 and m2. m2 in radians.
    """
    # Delta written so that m1 = 1 gives exactly m2 (not pi - (pi - m2), which rounds).
    delta = (math.pi * (m1 - 1.0) + m2) / m1
    held = min(delta, GAP_PEAK_ANGLE)
    return max(held * math.sin(held), 1.0 - math.cos(delta))


def normface_lower_bound(n, s) -> float:
    r"""The least mean NormFace loss n classes can reach at scale s (NormFace, Proposition 2).

    .. math:: L_{min}(n, s) = \log\bigl(1 + (n-1)\, e^{-\frac{n}{n-1} s}\bigr)
                            = \mathrm{softplus}\bigl(\log(n-1) - \tfrac{n}{n-1} s\bigr)

    For unit class weights with each class's feature at its own weight, the mean loss is at least
    this, with equality exactly for a regular simplex (possible when n <= D + 1). With s = 1 (no
    scale) and n = 10575 (CASIA-WebFace) it is about 8.27.

    Computed to full relative precision for every s: the exponent n s/(n-1) is split exactly into
    hi + lo (rational arithmetic on the float inputs), u = (n-1) e^{-hi} (1 - lo) is formed exactly
    from the one rounded exp, and the result is log1p(u). Forming log(n-1) - n s/(n-1) first and
    taking softplus would not do: that difference carries an absolute rounding error of about
    1e-16 * max(log n, s), which exp turns into a relative error of up to 1e-13 when the bound is
    tiny. log1p(u) has condition number <= 1, so the one rounding of exp is all that remains.

    Args:
        n: number of classes, an integer >= 2.
        s: scale > 0 (the NormFace paper's l^2: features and weights both of norm l).

    Returns:
        The bound as a Python float (0.0 once it underflows, for n s/(n-1) above ~745 + log n).

    References:
        Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face Verification", 2017.
    """
    n = check_positive_int(n, "n", minimum=2)
    s = check_positive(s, "s")
    exponent = Fraction(n) * Fraction(s) / (n - 1)
    hi = float(exponent)
    lo = exponent - Fraction(hi)  # |lo| <= ulp(hi)/2, so exp(-lo) = 1 - lo to far beyond double precision
    if hi < 700.0:
        decay = Fraction(math.exp(-hi))
    else:
        # exp(-hi) alone would be subnormal (and imprecise) while (n-1) exp(-hi) may still be normal.
        decay = Fraction(math.exp(-0.5 * hi)) ** 2
    # u = (n-1) e^{-s n/(n-1)} exactly up to exp's own rounding, kept as hi + lo parts so that neither
    # the products nor the conversion to float add a rounding: log1p(u_hi + u_lo) ~ log1p(u_hi) + u_lo/(1 + u_hi).
    u = (n - 1) * decay * (1 - lo)
    u_hi = float(u)
    u_lo = float(u - Fraction(u_hi))
    return math.log1p(u_hi) + u_lo / (1.0 + u_hi)


def cosface_min_scale(C, p) -> float:
    r"""The least scale at which C perfectly separated classes can all reach posterior p (CosFace).

    .. math:: s_{min} = \frac{C - 1}{C} \log \frac{(C - 1)\, p}{1 - p}

    Assumption (CosFace, the section on feature normalization): every feature sits at its own class
    weight (all unit vectors). Then for at least one class the posterior of its own weight is at most
    e^s / (e^s + (C-1) e^{-s/(C-1)}), with equality for a regular simplex; reaching p for every class
    therefore needs s >= s_min. A value <= 0 (p <= 1/C) means every positive scale suffices.

    Args:
        C: number of classes, an integer >= 2.
        p: the desired posterior, in (0, 1).

    Returns:
        s_min as a Python float.

    References:
        Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.
    """
    C = check_positive_int(C, "C", minimum=2)
    p = check_interval(p, "p", 0.0, 1.0, low_open=True, high_open=True)
    return (C - 1) / C * math.log((C - 1) * p / (1.0 - p))


def magface_min_lambda_g(s, l_a, u_a, l_m, u_m) -> float:
    r"""The least regulariser weight lambda_g of MagFace's convergence argument.

    .. math::

        \lambda_g \ge \frac{s\,k\,u_a^2 l_a^2}{u_a^2 - l_a^2}, \qquad k = \frac{u_m - l_m}{u_a - l_a}

    The per-sample loss in the feature norm a is L(a) = CE(m(a)) + lambda_g g(a) with m(a) = l_m +
    k (a - l_a) and g(a) = a / u_a^2 + 1 / a. d CE / d m = s (1 - p_y) sin(theta + m) lies in [0, s),
    so d CE / d a lies in [0, s k); g is convex with g'(u_a) = 0 and its steepest descent at l_a,
    g'(l_a) = -(u_a^2 - l_a^2) / (u_a^2 l_a^2). At this lambda_g the regulariser's pull at l_a
    outweighs any push of the cross-entropy (L'(l_a) < 0 <= L'(u_a)), so the optimal norm lies inside
    [l_a, u_a], the premise of the paper's convergence and monotonicity results. With the defaults
    (s = 64, 10, 110, 0.45, 0.8) it is 22.59: the run script's 35 satisfies it, the trainer's
    argument default of 20 does not.

    Args:
        s: scale in (0, 1e4]. l_a < u_a: the feature-norm bounds (> 0).
        l_m <= u_m: the margins at l_a and u_a, radians in [0, pi/2].

    Returns:
        The bound as a Python float.

    References:
        Meng, Zhao, Jiang, Wang, Zhou, "MagFace: A Universal Representation for Face Recognition and
        Quality Assessment", CVPR 2021; IrvingMeng/MagFace ``run/trainer.py`` (``main``: the
        ``min_lambda`` check, with s fixed at 64 there).
    """
    s = check_scale(s)
    l_a, u_a = check_bounds_pair(l_a, u_a, "l_a", "u_a")
    l_m, u_m = check_margin_range(l_m, u_m, "l_m", "u_m")
    slope = (u_m - l_m) / (u_a - l_a)
    return s * slope * u_a**2 * l_a**2 / (u_a**2 - l_a**2)
