"""``packforcing train-compressor``: fit the dual_branch compressor against a frozen model."""

from __future__ import annotations

import argparse

from packforcing.cli import add_verb


def register(sub: argparse._SubParsersAction) -> None:
    from packforcing.training.options import EXAMPLE, add_arguments

    p = add_verb(
        sub,
        "train-compressor",
        help="train the dual_branch compressor for a model (attention matching)",
        description="Train the dual_branch compressor of CONFIG against its frozen model: attention of a "
        "block's queries over a compressed block must match attention over the full block. Writes "
        "safetensors that YAML loads with compressor.weights.",
        example=EXAMPLE,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from packforcing.training.compressor import run as train

    return train(args)
