"""Command line: argument parsing only; one module per group of verbs, calling into the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import bench_cmds, eval_cmds, inspect_cmds, train_cmds, viz_cmds, weights_cmds

# Each module exposes register(subparsers); a verb sets func(args) -> int.
COMMAND_MODULES = [inspect_cmds, viz_cmds, weights_cmds, train_cmds, eval_cmds, bench_cmds]


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densenets",
        description="Densely Connected Convolutional Networks: build, inspect, train, evaluate.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, UsageError, FileNotFoundError) as e:
        print(f"densenets {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"densenets {args.command}: interrupted", file=sys.stderr)
        return 130
