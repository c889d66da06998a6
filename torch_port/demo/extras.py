"""The demo's optional dependencies (the ``demo`` extra), imported only when a run needs them.

Importing :mod:`torch_port.demo` loads none of them, so the parser and ``--help`` work without the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA_MODULES: tuple[str, ...] = ("sklearn", "matplotlib", "tqdm")
EXTRA_HINT = "the demo needs the 'demo' extra: pip install 'softmax-variants[demo]' (scikit-learn, matplotlib, tqdm)"


def require(module: str) -> ModuleType:
    """Import an optional dependency of the demo, or raise ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{module} is missing; {EXTRA_HINT}") from error


def require_all() -> None:
    """Import every optional dependency now, so a missing one is reported before any work starts."""
    for module in EXTRA_MODULES:
        require(module)
