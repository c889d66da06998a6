"""A dispatch-mode probe that watches the aten ops a piece of torch code runs (test helper)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MATRIX_PRODUCTS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)


class OpProbe(TorchDispatchMode):
    """Records, over the aten ops that run, the largest number of elements of any tensor one
    produces and how many matrix-matrix products (mm and addmm, any overload) there were."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in MATRIX_PRODUCTS:
            self.products += 1
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
