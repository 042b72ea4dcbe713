"""``packforcing train-model``: train the block-causal model on clips of the scenes world."""

from __future__ import annotations

import argparse

from packforcing.cli import add_verb


def register(sub: argparse._SubParsersAction) -> None:
    from packforcing.training.options import MODEL_EXAMPLE, add_model_arguments

    p = add_verb(
        sub,
        "train-model",
        help="train the model on short clips of the procedural scenes world (teacher forcing)",
        description="Train CONFIG's model from its seeded initialisation on clips of --train-blocks blocks "
        "of the procedural scenes world, conditioned on the scene index where the model takes scenes: "
        "block-causal teacher forcing (clean history, noisy current block) with flow matching. Writes "
        "safetensors (with metadata) that YAML loads with model.weights, every --checkpoint-every steps "
        "and at the end.",
        example=MODEL_EXAMPLE,
    )
    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from packforcing.training.model import run as train

    return train(args)
