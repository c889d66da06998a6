"""The architecture, checked: one direction of dependency, public seams, small files, light imports.

- No import cycle among the modules of ``torch_port``, ``refimpl`` and ``softmax_common`` (every
  import statement counts, function-level ones included: a deferred import hides a cycle, it does
  not remove it).
- No module imports an underscore name, or from an underscore module, of another module: a module
  that needs another's internals is asking for a public function.
- No file of ``torch_port`` is longer than 450 lines (a longer one mixes concerns).
- ``import torch_port`` loads neither ``refimpl`` nor ``autograd``; ``softmax_common`` loads neither
  NumPy, torch nor autograd.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch_port", "refimpl", "softmax_common")
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement of a file, at any depth; names is [] for ``import m``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def project_edges(module: str) -> set[str]:
    """The project's modules that ``module`` imports. ``from a.b import c`` is an edge to a.b.c when
    that is a module, else to a.b (a name defined in a.b, or re-exported by its __init__)."""
    edges = set()
    for target, names in imports_of(MODULES[module]):
        if target.split(".")[0] not in PACKAGES:
            continue
        for name in names or [None]:
            edges.add(f"{target}.{name}" if f"{target}.{name}" in MODULES else target)
    return edges - {module}


def test_the_module_list_is_what_the_repository_holds():
    """The checks below see every module (a positive control for the walk)."""
    expected = ("torch_port.engine", "torch_port.geometry", "torch_port.chunked", "torch_port.distributed.loss")
    expected += ("torch_port.demo.cli", "refimpl.normalized", "softmax_common.checks")
    assert set(expected) <= MODULES.keys()
    assert project_edges("torch_port.engine") >= {"torch_port.geometry", "torch_port.chunked"}


def test_no_import_cycle():
    graph = {module: project_edges(module) & MODULES.keys() for module in MODULES}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")


def test_the_geometry_is_below_every_path():
    """The plain, chunked and sharded paths build on the geometry; the geometry and the chunked path
    import no path above them."""
    assert not {m for m in project_edges("torch_port.geometry") if m.startswith("torch_port")} - {
        "torch_port.tensor_checks"
    }
    assert "torch_port.engine" not in project_edges("torch_port.chunked")
    assert not any(m.startswith("torch_port.distributed") for m in project_edges("torch_port.engine"))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_another_modules_private_names(module):
    for target, names in imports_of(MODULES[module]):
        if target == "__future__":
            continue
        private_parts = [part for part in target.split(".") if part.startswith("_")]
        assert not private_parts, f"{module} imports from the private module {target}"
        if target.split(".")[0] in PACKAGES:
            private = [name for name in names if name.startswith("_")]
            assert not private, f"{module} imports {private} from {target}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("torch_port")))
def test_no_file_of_the_port_is_over_the_limit(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines (limit {MAX_LINES})"


def loaded_after(statement: str, roots: tuple[str, ...]) -> list[str]:
    """The top-level packages among ``roots`` that a fresh interpreter has loaded after ``statement``."""
    code = f"import sys\n{statement}\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & {set(roots)!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return eval(done.stdout.strip())  # a list literal printed by the child


def test_import_torch_port_loads_neither_the_reference_nor_autograd():
    statement = "import torch_port, torch_port.functional, torch_port.distributed"
    assert loaded_after(statement, ("refimpl", "autograd")) == []
    # the positive control: the same probe sees them when they are imported
    assert loaded_after("import refimpl", ("refimpl", "autograd")) == ["autograd", "refimpl"]


def test_the_shared_module_is_plain_python():
    statement = "import softmax_common.checks, softmax_common.closed_forms"
    assert loaded_after(statement, ("numpy", "torch", "autograd", "refimpl", "torch_port")) == []
