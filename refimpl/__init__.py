"""Reference implementations of the softmax family of losses (NumPy + autograd, float64).

Each function reads like its paper; ``torch_port.functional`` has the same names and arguments.
"""

from refimpl.angular import (
    cos_m_theta,
    lsoftmax_logits,
    lsoftmax_loss,
    lsoftmax_psi,
    sphereface_logits,
    sphereface_loss,
)
from refimpl.center import center_loss, center_update
from refimpl.modern import (
    adaface_logits,
    adaface_loss,
    curricularface_logits,
    curricularface_loss,
    magface_logits,
    magface_loss,
)
from refimpl.normalized import (
    am_softmax_logits,
    am_softmax_loss,
    arcface_logits,
    arcface_loss,
    combined_margin_logits,
    combined_margin_loss,
    cosface_logits,
    cosface_loss,
    cosface_min_scale,
    normface_logits,
    normface_loss,
    normface_lower_bound,
)
from refimpl.softmax import cross_entropy, distillation_loss, log_softmax, naive_softmax, softmax
from refimpl.subcenter import adaptive_margins, subcenter_arcface_logits, subcenter_arcface_loss
from softmax_common.closed_forms import magface_min_lambda_g

__all__ = [
    "adaface_logits",
    "adaface_loss",
    "adaptive_margins",
    "am_softmax_logits",
    "am_softmax_loss",
    "arcface_logits",
    "arcface_loss",
    "center_loss",
    "center_update",
    "combined_margin_logits",
    "combined_margin_loss",
    "cos_m_theta",
    "cosface_logits",
    "cosface_loss",
    "cosface_min_scale",
    "cross_entropy",
    "curricularface_logits",
    "curricularface_loss",
    "distillation_loss",
    "log_softmax",
    "lsoftmax_logits",
    "lsoftmax_loss",
    "lsoftmax_psi",
    "magface_logits",
    "magface_loss",
    "magface_min_lambda_g",
    "naive_softmax",
    "normface_logits",
    "normface_loss",
    "normface_lower_bound",
    "softmax",
    "sphereface_logits",
    "sphereface_loss",
    "subcenter_arcface_logits",
    "subcenter_arcface_loss",
]
