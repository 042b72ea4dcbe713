"""Procedural worlds to train and evaluate models on (no data is downloaded)."""

from packforcing.worlds.scenes import (
    Return,
    Scene,
    SceneWorld,
    SceneWorldParams,
    conditions,
    iter_blocks,
    recall_schedule,
    returns,
    revisit_schedule,
    schedule_from_conditions,
)

__all__ = [
    "Return",
    "Scene",
    "SceneWorld",
    "SceneWorldParams",
    "conditions",
    "iter_blocks",
    "recall_schedule",
    "returns",
    "revisit_schedule",
    "schedule_from_conditions",
]
