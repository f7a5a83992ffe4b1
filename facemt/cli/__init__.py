"""Command line: ``facemt synth | check-data | fit | predict | merge-predictions | evaluate | cv | explain | export``.
The only package that parses arguments or prints; one module per command group.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from rich.console import Console

from facemt import __version__
from facemt.cli import evaluate, export, predict, train
from facemt.cli.common import EPILOG, EXIT_INTERRUPTED, EXIT_PARTIAL, EXIT_USAGE
from facemt.errors import FacemtError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facemt", description="Age group, gender and facial expression from one multi-task network.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"facemt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add_parsers(sub)
    predict.add_parsers(sub)
    evaluate.add_parsers(sub)
    export.add_parsers(sub)
    evaluate.add_cv_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the exit code (0 ok, 1 some inputs failed, 2 user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # soft_wrap: a line (a path written, a summary) is never broken where the console is narrow; tables still fit it
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    try:
        return args.func(args, out, err)
    except FacemtError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        return EXIT_INTERRUPTED
    except OSError as exc:  # a disk, permission or path failure no check foresaw: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        err.print(f"error: {where}{exc.strerror or exc}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_PARTIAL



__all__ = ["EPILOG", "build_parser", "main"]
