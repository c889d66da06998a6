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


def distillation_grads(impl: str, student, teacher, y, T, alpha, dtype=torch.float64):
    """Gradients of sum(distillation_loss(..., reduction="none")) w.r.t. the student's and the
    teacher's logits (both, as float64 NumPy): HIPS autograd, or torch.autograd in ``dtype``."""
    if impl == "refimpl":

        def total(a, b):
            return autograd.numpy.sum(refimpl.distillation_loss(a, b, y, T, alpha, "none"))

        return autograd.grad(total, (0, 1))(student, teacher)
    zs = torch.tensor(student, dtype=dtype, requires_grad=True)
    zt = torch.tensor(teacher, dtype=dtype, requires_grad=True)
    loss = tpf.distillation_loss(zs, zt, torch.from_numpy(y), T, alpha, "none").sum()
    return tuple(g.double().numpy() for g in torch.autograd.grad(loss, (zs, zt)))
