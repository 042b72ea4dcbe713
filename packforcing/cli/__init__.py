"""The ``packforcing`` command line.

Each verb lives in its own module exposing ``register(subparsers)``; it sets
``func(args) -> int`` on its parser. Config problems print one line and exit with status 2
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from packforcing.core.errors import ConfigError

VERBS = ("generate",)
"""Modules under packforcing.cli, one per verb, in help order."""

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="packforcing",
        description="Long-horizon autoregressive video generation with pluggable KV-cache memory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  packforcing generate --config configs/full.yaml --blocks 8 --out out/",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        importlib.import_module(f"packforcing.cli.{verb.replace('-', '_')}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return EXIT_CONFIG
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (LookupError, ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


def add_debug(parser: argparse.ArgumentParser) -> None:
    """Accept ``--debug`` after the verb too."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
