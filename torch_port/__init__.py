"""PyTorch port of the softmax family of losses: functional API and nn.Module heads.

``torch_port.functional`` mirrors ``refimpl`` name for name; the modules below own their weights
and state (buffers), so ``state_dict()`` round-trips a training run.
"""

from torch_port import functional
from torch_port.distillation import DistillationLoss

__all__ = ["DistillationLoss", "functional"]
