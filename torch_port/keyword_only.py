"""Keyword-only hyperparameters for the port's modules, with an error that says so.

Every head and loss module takes its structural arguments (``num_classes, dim``; the sharded head's
``config``) by position and its hyperparameters by keyword only: ``ArcFace(10, 16, s=64.0, m=0.5)``.
Positional hyperparameters are easy to pass in another library's order and be silently accepted:
pytorch-metric-learning's order is (margin, scale), ours was (s, m), so ``ArcFace(10, 16, 0.3, 0.5)``
once built s = 0.3. The signatures put the hyperparameters after ``*``, so Python refuses them by
position anyway; :func:`keyword_hyperparameters` replaces Python's bare "takes 3 positional arguments
but 5 were given" with a message that names the hyperparameters and says to pass them by keyword.
"""

from __future__ import annotations

import functools
import inspect

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def keyword_hyperparameters(init):
    """Decorate an ``__init__(self, <structural>, *, <hyperparameters>)``: a call with more positional
    arguments than the structural ones raises a TypeError naming the keyword-only ones, before the
    body runs (so nothing is built). The signature seen by ``inspect`` is the original one."""
    parameters = list(inspect.signature(init).parameters.values())[1:]  # without self
    positional = [p.name for p in parameters if p.kind in _POSITIONAL]
    keyword = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    if not keyword or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        raise TypeError(f"{init.__qualname__} must have keyword-only parameters and no *args")

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        if len(args) > len(positional):
            name = type(self).__name__
            takes = f"{len(positional)} ({', '.join(positional)})" if positional else "none"
            call = ", ".join([*positional, *(f"{k}=..." for k in keyword)])
            raise TypeError(
                f"{name}() got {len(args)} positional argument{'s' * (len(args) > 1)} but takes {takes}: "
                "its hyperparameters are keyword-only (a positional order is easily taken from another "
                f"library and misread, e.g. pytorch-metric-learning's (margin, scale)). Write {name}({call})"
            )
        return init(self, *args, **kwargs)

    return checked_init


__all__ = ["keyword_hyperparameters"]
