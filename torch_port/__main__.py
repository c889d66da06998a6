"""Command line of the port: ``python -m torch_port demo [options]`` (or the ``softmax-variants`` script).

Only the top-level parser lives here; the demo itself is the package :mod:`torch_port.demo`, its
options and their run :mod:`torch_port.demo.cli`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from torch_port.demo import cli

    parser = argparse.ArgumentParser(
        prog="python -m torch_port",
        description="The softmax family of losses in PyTorch.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo",
        help="train with each loss on real digits and show what the margins do",
        description=(
            "Train a small network on scikit-learn's handwritten digits (or MNIST IDX files you have) to a "
            "2-D or 3-D embedding under each loss; write a figure per loss, a grid and a table into --out."
        ),
    )
    cli.add_arguments(demo_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from torch_port.demo import cli

    try:
        return cli.run_from_args(args)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
