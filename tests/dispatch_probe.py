"""Dispatch-mode probes that watch the aten ops a piece of torch code runs (test helpers)."""

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


class HostReads(TorchDispatchMode):
    """Counts the reads of tensor data back to the host that a step makes: ``.item()``, ``int()``,
    ``bool()`` (aten._local_scalar_dense), data-dependent shapes (nonzero, masked_select), and
    ``.tolist()``, which on CPU bypasses the dispatcher and is counted by wrapping the method while
    the probe is active. On a GPU each is a synchronisation with the device."""

    OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select")

    def __init__(self):
        super().__init__()
        self.count = 0
        self._tolist = None

    def __enter__(self):
        original = self._tolist = torch.Tensor.tolist

        def counted(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.OPS):
            self.count += 1
        return func(*args, **(kwargs or {}))


class SubnormalProbe(TorchDispatchMode):
    """Counts, per aten op, the subnormal entries (0 < |v| < tiny of its dtype) of the floating
    tensors the op computes: views and uninitialised allocations (whose entries are whatever the
    memory held) are skipped."""

    def __init__(self):
        super().__init__()
        self.found: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or "empty" in func.overloadpacket.__name__:
            return out
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                size = t.detach().abs()
                count = int(((size > 0) & (size < torch.finfo(t.dtype).tiny)).sum())
                if count:
                    name = str(func.overloadpacket)
                    self.found[name] = self.found.get(name, 0) + count
        return out
