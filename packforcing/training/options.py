"""Command-line options of ``packforcing train-compressor`` (also ``python -m
packforcing.training.compressor``): one definition, importable without torch."""

from __future__ import annotations

import argparse

DEFAULT_OUT = "packforcing/weights/dual_branch_tiny.safetensors"

EXAMPLE = f"example:\n  packforcing train-compressor --config packforcing --steps 1000 --out {DEFAULT_OUT}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options (shared by ``packforcing train-compressor`` and ``python -m``)."""
    parser.add_argument("--config", required=True, help="YAML config with the model and a dual_branch compressor")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine decay (default 2e-3)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"safetensors to write (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--videos", type=int, default=16, help="videos generated for the data (default 16)")
    parser.add_argument("--blocks", type=int, default=6, help="blocks per video (default 6)")
    parser.add_argument("--batch", type=int, default=4, help="batch items per video (default 4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m packforcing.training.compressor",
        description="Fit the dual_branch compressor to a frozen model by attention matching.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser
