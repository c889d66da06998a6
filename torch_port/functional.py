"""The functional API of the port: the same names, arguments and defaults as ``refimpl``.

Every function takes tensors, checks its arguments before computing anything, and computes in at
least float32 (float16/bfloat16 inputs are upcast; the loss comes back in float32).
"""

from torch_port.softmax import cross_entropy, distillation_loss, log_softmax, naive_softmax, softmax

__all__ = [
    "cross_entropy",
    "distillation_loss",
    "log_softmax",
    "naive_softmax",
    "softmax",
]
