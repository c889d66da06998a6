"""Reference implementations of the softmax family of losses (NumPy + autograd, float64).

Each function reads like its paper; ``torch_port.functional`` has the same names and arguments.
"""

from refimpl.softmax import cross_entropy, distillation_loss, log_softmax, naive_softmax, softmax

__all__ = ["cross_entropy", "distillation_loss", "log_softmax", "naive_softmax", "softmax"]
