"""The README's Python examples run as written (all but the multi-process one, which
tests/test_distributed.py covers by launching real process groups)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index]
    if "init_process_group" in code:
        pytest.skip("needs a process group per rank: tests/test_distributed.py runs that path on 2 and 4 ranks")
    exec(compile(code, f"README.md python block {index}", "exec"), {})
