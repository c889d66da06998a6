"""The demo's command line: the options of ``python -m torch_port demo`` and the run they start.

The top-level parser (the ``demo`` sub-command itself) is torch_port/__main__.py's.
"""

from __future__ import annotations

import argparse
import time

from torch_port.demo.run import run_demo
from torch_port.demo.seeds import parse_seeds
from torch_port.demo.settings import DEFAULT_EPOCHS, LOSSES


def _seeds_argument(text: str) -> tuple[int, ...]:
    """``--seeds``' type: :func:`parse_seeds`, its ValueError as argparse's message for the option."""
    try:
        return parse_seeds(text)
    except ValueError as error:
        # argparse already names the option ("argument --seeds: ..."): drop the message's own "seeds: "
        raise argparse.ArgumentTypeError(str(error).removeprefix("seeds: ")) from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (the ``demo`` sub-command of torch_port/__main__.py)."""
    parser.add_argument(
        "--loss",
        nargs="+",
        choices=[*LOSSES, "all"],
        default=["all"],
        metavar="LOSS",
        help=f"one or several of: {', '.join(LOSSES)}, all (default: all)",
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"default {DEFAULT_EPOCHS}")
    parser.add_argument("--dim", type=int, choices=(2, 3), default=2, help="embedding dimension (default 2)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed", type=int, default=None, help="one seed for split, initialisation and batches (default 0)"
    )
    seeds.add_argument(
        "--seeds",
        type=_seeds_argument,
        default=None,
        metavar="SEEDS",
        help=(
            "several seeds, e.g. 0-4 or 0,2,5: one whole run per seed; the table gives each metric's mean "
            "and range (min-max) over them, runs.csv every run, and the figures show the first seed"
        ),
    )
    open_set = parser.add_mutually_exclusive_group()
    open_set.add_argument(
        "--rotations",
        type=int,
        default=1,
        metavar="N",
        help=(
            "open set: for each loss, also train N times without a group of held-out classes and verify pairs "
            "of their images (default 1: train on 7 digits, verify the other 3; 0: no open set)"
        ),
    )
    open_set.add_argument(
        "--full",
        action="store_const",
        const="all",
        dest="rotations",
        help="open set: every rotation, so that each class is held out once (4 with the digits' 10 classes)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when present, else cpu; the default) or a torch device, e.g. cpu, cuda:1",
    )
    parser.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    parser.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="a directory with MNIST IDX files (train-images-idx3-ubyte, ...) to use instead of the digits",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (off a terminal: no per-loss lines either)"
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed options, print the table and the files written; returns 0."""
    started = time.perf_counter()
    run = run_demo(
        args.loss,
        epochs=args.epochs,
        dim=args.dim,
        seed=args.seed,
        seeds=args.seeds,
        device=args.device,
        out=args.out,
        data=args.data,
        progress=not args.no_progress,
        rotations=args.rotations,
    )
    print()
    print(run.table_markdown, end="")
    print()
    print(f"wrote {', '.join(str(p) for p in run.files.values())}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0
