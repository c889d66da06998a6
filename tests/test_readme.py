"""The README's Python examples run as written, each in a fresh namespace.

A block that calls ``init_process_group`` needs one process per rank: it is compiled (so a syntax
error still fails) and skipped; tests/test_distributed.py runs that path on real process groups.
The guides under docs/ and every relative link are checked by tests/test_docs.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text(encoding="utf-8")
# (line of the block's first code line, code) for each ```python block
BLOCKS = [
    (TEXT.count("\n", 0, m.start(1)) + 1, m.group(1))
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```", TEXT, re.S | re.M)
]


def test_readme_has_examples():
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    line, code = BLOCKS[index]
    # Leading newlines put each line at its own line number in tracebacks.
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    if "init_process_group" in code:
        pytest.skip("needs a process group per rank: tests/test_distributed.py runs that path on 2 and 4 ranks")
    exec(compiled, {"__name__": "readme_example"})
