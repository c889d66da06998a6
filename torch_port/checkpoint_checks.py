"""All-or-nothing checkpoint loading for the modules of the port that own state.

``nn.Module.load_state_dict`` copies every tensor whose key and shape fit and raises for the rest
only afterwards: a checkpoint of another head (another ``num_classes``) was refused, but had
already overwritten what fitted, such as the annealing schedule's iteration or a learned scale.
:class:`AtomicLoad` checks the whole checkpoint first and copies only if every check passes, as the
class-sharded head does with its shard metadata (torch_port/distributed/head.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def _problems(module: torch.nn.Module, state_dict: Mapping, prefix: str, strict: bool) -> list[str]:
    own = module.state_dict(keep_vars=True)
    problems = []
    for name, current in own.items():
        key = prefix + name
        if key not in state_dict:
            if strict:
                problems.append(f"{key!r} is missing")
            continue
        given = state_dict[key]
        if not isinstance(current, torch.Tensor):
            continue  # extra state: its owner's set_extra_state checks it
        if not isinstance(given, torch.Tensor):
            problems.append(f"{key!r} must be a tensor, got {type(given).__name__}")
        elif given.shape != current.shape:
            problems.append(f"{key!r} has shape {tuple(given.shape)}, this module's has {tuple(current.shape)}")
        elif given.device.type == "meta":
            problems.append(f"{key!r} is on the meta device, which holds no values")
    if strict:
        unexpected = [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in own]
        problems += [f"{key!r} is not part of this module" for key in unexpected]
    return problems


def check_state_dict(module: torch.nn.Module, state_dict: Mapping, prefix: str = "", *, strict: bool = False) -> None:
    """Raise a ValueError, naming every problem, unless ``state_dict`` (keys under ``prefix``) can be
    loaded into ``module`` and its submodules whole: each of their tensors that it holds is a tensor
    of the same shape with values to read, and the values pass the ``check_state_values(state_dict,
    prefix)`` of every submodule that defines one. ``strict`` also requires exactly the module's
    keys (no missing, no unexpected one). Reads nothing but what those value checks read.
    """
    problems = _problems(module, state_dict, prefix, strict)
    if problems:
        refused = f"{type(module).__name__}.load_state_dict refused the checkpoint, and changed nothing"
        raise ValueError(f"{refused}: {'; '.join(problems)}")
    for name, submodule in module.named_modules():
        check = getattr(submodule, "check_state_values", None)
        if check is not None:
            check(state_dict, f"{prefix}{name}." if name else prefix)


class AtomicLoad:
    """Mixed in before ``nn.Module``: ``load_state_dict`` is all or nothing for this module's state.

    Before anything is copied, the checkpoint's entries for this module and its submodules are
    checked by :func:`check_state_dict`: present tensors must have the shapes of the module's, and
    a module with a ``check_state_values(state_dict, prefix)`` method (raising a ValueError) vets
    their values. This holds whether the module is loaded on its own or as part of a larger model.
    Loaded on its own with ``strict=True`` (the default), missing and unexpected keys are refused
    first too; inside a larger model PyTorch reports those only after copying the rest, as it does
    for every module. The keys are checked as given, before any ``load_state_dict`` pre-hook of the
    module rewrites them.
    """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        check_state_dict(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if strict:
            check_state_dict(self, state_dict, strict=True)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


__all__ = ["AtomicLoad", "check_state_dict"]
