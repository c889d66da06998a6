"""Call the same function in either implementation on NumPy inputs, for the family tests."""

from __future__ import annotations

import autograd
import numpy as np
import torch

import refimpl
import torch_port.functional as tpf

IMPLS = ["refimpl", "torch_port"]


def call(impl: str, name: str, *arrays, dtype: torch.dtype = torch.float64, **kwargs) -> np.ndarray:
    """``name`` from one implementation, called on NumPy inputs; the result as float64 NumPy.

    Integer arrays (labels) become int64 tensors; float arrays become tensors of ``dtype``.
    """
    if impl == "refimpl":
        return np.asarray(getattr(refimpl, name)(*arrays, **kwargs), dtype=np.float64)
    tensors = [
        torch.as_tensor(a) if np.issubdtype(np.asarray(a).dtype, np.integer) else torch.as_tensor(a, dtype=dtype)
        for a in arrays
    ]
    return getattr(tpf, name)(*tensors, **kwargs).double().numpy()


def grad_first(impl: str, name: str, first: np.ndarray, *rest, **kwargs) -> np.ndarray:
    """Gradient of sum(name(first, *rest)) w.r.t. ``first``: HIPS autograd or torch.autograd, float64."""
    if impl == "refimpl":
        return autograd.grad(lambda a: autograd.numpy.sum(getattr(refimpl, name)(a, *rest, **kwargs)))(first)
    t = torch.tensor(first, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(getattr(tpf, name)(t, *map(torch.as_tensor, rest), **kwargs).sum(), t)
    return g.numpy()
