"""The functional API of the port: the same names, arguments and defaults as ``refimpl``.

Every function takes tensors, checks its arguments before computing anything, and computes in at
least float32 (float16/bfloat16 inputs are upcast; the loss comes back in float32).
"""

from torch_port.adaptive import (
    adaface_logits,
    adaface_loss,
    curricularface_logits,
    curricularface_loss,
    magface_logits,
    magface_loss,
    magface_min_lambda_g,
)
from torch_port.angular import (
    cos_m_theta,
    lsoftmax_logits,
    lsoftmax_loss,
    lsoftmax_psi,
    sphereface_logits,
    sphereface_loss,
)
from torch_port.center import center_loss, center_update
from torch_port.modern import (
    adaptive_margins,
    subcenter_arcface_logits,
    subcenter_arcface_loss,
)
from torch_port.normalized import (
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
from torch_port.softmax import cross_entropy, distillation_loss, log_softmax, naive_softmax, softmax

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
