"""PyTorch port of the softmax family of losses: functional API and nn.Module heads.

``torch_port.functional`` mirrors ``refimpl`` name for name; the modules below own their weights
and state (buffers), so ``state_dict()`` round-trips a training run.
"""

__version__ = "0.2.0.dev0"  # the distribution's version (pyproject.toml reads it from here)

from torch_port import functional
from torch_port.adaptive_heads import AdaFace, CurricularFace, MagFace
from torch_port.angular_heads import LSoftmax, MarginSchedule, SphereFace
from torch_port.center import CenterLoss
from torch_port.distillation import DistillationLoss
from torch_port.distributed import ShardedMarginHead
from torch_port.modern import adaptive_margins, margin_logits_from_cosines
from torch_port.modern_heads import ElasticArcFace, ElasticCosFace, SubCenterArcFace
from torch_port.normalized_heads import AMSoftmax, ArcFace, CombinedMargin, CosFace, NormFace
from torch_port.tensor_checks import set_value_checks

__all__ = [
    "AMSoftmax",
    "AdaFace",
    "ArcFace",
    "CenterLoss",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "DistillationLoss",
    "ElasticArcFace",
    "ElasticCosFace",
    "LSoftmax",
    "MagFace",
    "MarginSchedule",
    "NormFace",
    "ShardedMarginHead",
    "SphereFace",
    "SubCenterArcFace",
    "__version__",
    "adaptive_margins",
    "functional",
    "margin_logits_from_cosines",
    "set_value_checks",
]
