"""Command-line options of the training verbs, one definition each, importable without torch
(``packforcing --help`` lists every verb without loading the training code). Each option's range
is its argparse type (:mod:`packforcing.cli.argtypes`): a bad value is a usage error (exit 2)
before anything is loaded.

- ``packforcing train-compressor`` (also ``python -m packforcing.training.compressor``)
- ``packforcing train-model`` (also ``python -m packforcing.training.model``)
"""

from __future__ import annotations

import argparse

import attrs

from packforcing.cli.argtypes import (
    OrderedPair,
    generator_seed,
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    unit_interval,
)

TRAINING_PAIR = "a training pair is a block and a later one"
"""Why train-compressor's ``--blocks`` and ``--max-blocks`` are at least 2 (said in their errors)."""
DEFAULT_OUT = "packforcing/weights/dual_branch_world.safetensors"
"""The shipped weights of the presets' compressor (``dual_branch_tiny.safetensors`` is the one for
the untrained ``tiny_dit``): written only when ``--out`` names them explicitly."""
DATA_SOURCES = ("generated", "world")
"""Where train-compressor's recorded videos come from: the frozen model's own samples, or clips of
the scenes world (:mod:`packforcing.worlds`) committed by teacher forcing, under their scene
conditions."""

EXAMPLE = "example:\n  packforcing train-compressor --config packforcing --steps 1000 --out my_compressor.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options (shared by ``packforcing train-compressor`` and ``python -m``)."""
    parser.add_argument("--config", required=True, help="YAML config with the model and a dual_branch compressor")
    parser.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps (default 1000)")
    parser.add_argument(
        "--lr", type=positive_float, default=2e-3, help="peak learning rate, cosine decay (default 2e-3)"
    )
    parser.add_argument(
        "--out", required=True, help=f"safetensors to write (required: the shipped weights are {DEFAULT_OUT})"
    )
    parser.add_argument("--seed", type=generator_seed, default=0)
    parser.add_argument("--videos", type=positive_int, default=16, help="videos generated for the data (default 16)")
    parser.add_argument("--blocks", type=int_at_least(2, TRAINING_PAIR), default=6, help="blocks per video (default 6)")
    parser.add_argument("--batch", type=positive_int, default=4, help="batch items per video (default 4)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="training pairs per optimizer step; the held-out set is 4x as many (default 32)",
    )
    parser.add_argument(
        "--max-blocks",
        type=int_at_least(2, TRAINING_PAIR),
        default=None,
        metavar="N",
        help="budget of blocks generated for the data (videos x batch x blocks; fewer videos, then fewer "
        "batch items, then shorter videos to fit; for a large model such as Wan, where generating is the cost)",
    )
    parser.add_argument(
        "--data",
        choices=DATA_SOURCES,
        default="generated",
        help="videos: the model's own samples (default) or clips of the scenes world (under their scene "
        "conditions for a model that takes scenes)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m packforcing.training.compressor",
        description="Fit the dual_branch compressor to a frozen model by attention matching.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


# ---------------------------------------------------------------------- train-model
MODEL_DEFAULT_OUT = "packforcing/weights/world_tiny.safetensors"
SCHEDULES = ("recall", "revisit")
"""Scene schedules of the training clips (:mod:`packforcing.worlds`)."""


@attrs.frozen
class TrainModelParams:
    """Options of :func:`train_model`."""

    steps: int = 8000
    lr: float = 3e-3
    batch_size: int = 4
    clips: int = 2048
    train_blocks: int = 6
    seed: int = 0
    warmup: int = 100
    checkpoint_every: int = 250
    gain_lr_scale: float = 10.0
    """Learning-rate multiplier of the attention query/key norm gains."""
    pure_noise_fraction: float = 0.5
    """Fraction of blocks trained at σ = 1 (pure noise: only the history can tell what comes)."""
    first_appearance_weight: float = 1.0
    """Loss weight of blocks showing a scene for the first time in their clip (the others: 1).
    Their content cannot come from the history; at high noise their error is mostly irreducible.
    The shipped model was trained with 1 (an 8,000-step run at 0.25 was not finished)."""
    schedule: str = "recall"
    """Training clips' schedules: ``recall`` (new scenes, then returns to scenes drawn at random
    from those seen, so the distance back varies) or ``revisit`` (least recently seen first)."""
    new_scene_probability: float = 0.5
    """``revisit`` schedules: at a cut, the chance of a new scene rather than a return."""
    segment_blocks: tuple[int, int] = (1, 2)
    """Training clips' schedules: blocks a scene stays on screen (uniform in the range)."""
    init: str | None = None
    """Weights to start from (continue a run) instead of the seeded initialisation."""


MODEL_EXAMPLE = (
    "example:\n"
    "  packforcing train-model --config packforcing --set sampler.steps=4 --out W8k.safetensors\n"
    "  packforcing train-model --config packforcing --set sampler.steps=4 --init W8k.safetensors --steps 3000 \\\n"
    f"      --lr 1e-3 --pure-noise-fraction 0.25 --out {MODEL_DEFAULT_OUT}\n\n"
    'The two runs that made the shipped weights (README, "The default model"): the noise levels trained\n'
    "on are the config's sampler's, and the presets sample with 8 steps where the model was trained\n"
    "at 4."
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options (shared by ``packforcing train-model`` and ``python -m``)."""
    d = TrainModelParams()
    from packforcing.cli import add_overrides

    parser.add_argument("--config", required=True, help="YAML config naming the model (its weights are ignored)")
    add_overrides(parser)  # e.g. --set sampler.steps=4: the noise levels trained on are the sampler's
    parser.add_argument(
        "--out", required=True, help=f"safetensors to write (required: the shipped weights are {MODEL_DEFAULT_OUT})"
    )
    parser.add_argument("--steps", type=positive_int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    parser.add_argument(
        "--lr", type=positive_float, default=d.lr, help=f"peak learning rate, cosine decay (default {d.lr})"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=d.batch_size, help=f"clips per step (default {d.batch_size})"
    )
    parser.add_argument(
        "--train-blocks",
        type=positive_int,
        default=d.train_blocks,
        help=f"blocks per training clip (default {d.train_blocks})",
    )
    parser.add_argument(
        "--gain-lr-scale",
        type=non_negative_float,
        default=d.gain_lr_scale,
        help=f"learning-rate multiplier of the query/key norm gains (default {d.gain_lr_scale})",
    )
    parser.add_argument(
        "--clips", type=positive_int, default=d.clips, help=f"distinct training clips (default {d.clips})"
    )
    parser.add_argument(
        "--pure-noise-fraction",
        type=unit_interval,
        default=d.pure_noise_fraction,
        help=f"fraction of blocks trained at sigma = 1, where only the history helps (default {d.pure_noise_fraction})",
    )
    parser.add_argument(
        "--first-appearance-weight",
        type=non_negative_float,
        default=d.first_appearance_weight,
        help=f"loss weight of blocks showing a scene for the first time (default {d.first_appearance_weight})",
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help=f"training clips' scene schedules (default {d.schedule}: returns from random distances)",
    )
    parser.add_argument(
        "--new-scene-probability",
        type=unit_interval,
        default=d.new_scene_probability,
        help=f"revisit schedules: chance that a cut shows a new scene (default {d.new_scene_probability})",
    )
    parser.add_argument(
        "--segment-blocks",
        type=positive_int,
        nargs=2,
        action=OrderedPair,
        default=list(d.segment_blocks),
        metavar=("MIN", "MAX"),
        help=f"training clips: blocks a scene stays on screen (default {d.segment_blocks[0]} {d.segment_blocks[1]})",
    )
    parser.add_argument("--init", default=None, help="weights to continue from (default: the seeded initialisation)")
    parser.add_argument("--seed", type=generator_seed, default=d.seed)
    parser.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        default=d.checkpoint_every,
        help=f"write the weights every N steps (default {d.checkpoint_every}; 0: end only)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
