"""The documentation stays true: every relative link resolves, and the guides' Python runs.

- Links: every Markdown link and image in README.md and docs/**/*.md whose target is not a web
  address (http, https, mailto) or an anchor of the same page must name a file or folder of the
  repository (the part after '#' is not checked). Links inside code blocks and code spans are text,
  not links, and are not checked.
- Code: the ```python blocks of each docs/**/*.md file run in order in one namespace per file, as
  the derivations' do, so a later block may use what an earlier one defined. A block that calls
  ``init_process_group`` needs one process per rank: it is compiled (so a syntax error still fails)
  and reported as skipped; tests/test_distributed.py runs that path on real process groups.

The README's own blocks are run by tests/test_readme.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
MARKDOWN = [README, *DOCS]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
# [text](target) and ![alt](target), with an optional "title"; targets may be written <like this>.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
# [label]: target (reference-style definitions)
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
EXTERNAL = ("http://", "https://", "mailto:")
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
NEEDS_PROCESS_GROUP = "init_process_group"


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def link_targets(markdown: str) -> list[str]:
    """The targets of the links and images of a Markdown text, code blocks and code spans left out."""
    prose = CODE_SPAN.sub("", FENCE.sub("", markdown))
    found = [m.group(1) for m in INLINE_LINK.finditer(prose)] + [m.group(1) for m in REFERENCE_LINK.finditer(prose)]
    return [target[1:-1] if target.startswith("<") else target for target in found]


def broken_links(path: Path) -> list[str]:
    """The relative link targets of a Markdown file that name nothing in the repository."""
    broken = []
    for target in link_targets(path.read_text(encoding="utf-8")):
        if target.startswith(EXTERNAL) or target.startswith("#"):
            continue
        relative = unquote(target.split("#", 1)[0].split("?", 1)[0])
        base = ROOT if relative.startswith("/") else path.parent
        resolved = (base / relative.lstrip("/")).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(target)
    return broken


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line of the block's first code line, code) for each ```python block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def test_there_are_guides():
    assert {"demo.md", "many-classes.md", "sharded.md", "design.md"} <= {p.name for p in DOCS}


def test_link_extraction():
    """The extractor finds what a reader can click, and only that (so the link test is not vacuous)."""
    text = (
        'See [the design](docs/design.md), ![a figure](docs/demo/grid.png "title") and '
        "[a [nested] label](<docs/with space.md>), [web](https://example.org), [here](#anchor).\n"
        "`[not a link](in/a/code/span.md)`\n"
        "```sh\n[not a link](in/a/fence.md)\n```\n"
        "[ref]: benchmarks/RESULTS.md\n"
    )
    assert link_targets(text) == [
        "docs/design.md",
        "docs/demo/grid.png",
        "docs/with space.md",
        "https://example.org",
        "#anchor",
        "benchmarks/RESULTS.md",
    ]


@pytest.mark.parametrize("path", MARKDOWN, ids=_name)
def test_relative_links_resolve(path):
    assert broken_links(path) == [], f"{_name(path)} links to paths that are not in the repository"


@pytest.mark.parametrize("path", DOCS, ids=_name)
def test_python_blocks_run_in_order(path):
    namespace: dict = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    for line, code in python_blocks(path):
        if NEEDS_PROCESS_GROUP in code:
            continue  # compiled and reported by test_process_group_blocks_compile
        # Leading newlines put each line at its own line number in tracebacks. dont_inherit: the
        # block compiles as a reader's script would, without this file's __future__ imports (with
        # them, annotations are strings, which a dataclass resolves through sys.modules).
        exec(compile("\n" * (line - 1) + code, str(path), "exec", dont_inherit=True), namespace)


PROCESS_GROUP_BLOCKS = [
    pytest.param(path, line, code, id=f"{_name(path)}:{line}")
    for path in DOCS
    for line, code in python_blocks(path)
    if NEEDS_PROCESS_GROUP in code
]


@pytest.mark.parametrize(("path", "line", "code"), PROCESS_GROUP_BLOCKS)
def test_process_group_blocks_compile(path, line, code):
    compile("\n" * (line - 1) + code, str(path), "exec")
    pytest.skip(
        f"{_name(path)} line {line} calls init_process_group: it needs one process per rank, so it is only "
        "compiled here; tests/test_distributed.py runs the sharded path on 2 and 4 gloo processes"
    )
