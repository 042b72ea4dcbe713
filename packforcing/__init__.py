"""packforcing: swappable, composable memory for autoregressive generation.

The names below are imported on first use, so ``import packforcing`` (and the command line's
``--help``) does not import torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "BuildEnv": "packforcing.core.build",
    "build_engine": "packforcing.core.build",
    "plan": "packforcing.core.build",
    "ConditionError": "packforcing.core.conditions",
    "ConditionSchedule": "packforcing.core.conditions",
    "Config": "packforcing.core.config",
    "load_config": "packforcing.core.config",
    "GeneratedBlock": "packforcing.core.engine",
    "GenerationEngine": "packforcing.core.engine",
    "GenerationSession": "packforcing.core.engine",
    "SessionError": "packforcing.core.engine",
    "ConfigError": "packforcing.core.errors",
    "PluginError": "packforcing.core.errors",
    "Geometry": "packforcing.core.geometry",
    "BlockCommit": "packforcing.core.records",
    "BlockQuery": "packforcing.core.records",
    "CachedBlock": "packforcing.core.records",
    "CacheStats": "packforcing.core.records",
    "MemoryPlan": "packforcing.core.records",
    "TierStats": "packforcing.core.records",
}

__all__ = [
    "BlockCommit",
    "BlockQuery",
    "BuildEnv",
    "CacheStats",
    "CachedBlock",
    "ConditionError",
    "ConditionSchedule",
    "Config",
    "ConfigError",
    "GeneratedBlock",
    "GenerationEngine",
    "GenerationSession",
    "Geometry",
    "MemoryPlan",
    "PluginError",
    "SessionError",
    "TierStats",
    "build_engine",
    "load_config",
    "plan",
]

if TYPE_CHECKING:
    from packforcing.core.build import BuildEnv, build_engine, plan
    from packforcing.core.conditions import ConditionError, ConditionSchedule
    from packforcing.core.config import Config, load_config
    from packforcing.core.engine import GeneratedBlock, GenerationEngine, GenerationSession, SessionError
    from packforcing.core.errors import ConfigError, PluginError
    from packforcing.core.geometry import Geometry
    from packforcing.core.records import BlockCommit, BlockQuery, CachedBlock, CacheStats, MemoryPlan, TierStats


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'packforcing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
