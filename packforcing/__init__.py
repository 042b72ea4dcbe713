"""packforcing: swappable, composable memory for autoregressive generation."""

from packforcing.core.build import BuildEnv, build_engine, plan
from packforcing.core.conditions import ConditionError, ConditionSchedule
from packforcing.core.config import Config, load_config
from packforcing.core.engine import GeneratedBlock, GenerationEngine, GenerationSession, SessionError
from packforcing.core.errors import ConfigError
from packforcing.core.geometry import Geometry
from packforcing.core.records import BlockCommit, BlockQuery, CachedBlock, CacheStats, MemoryPlan, TierStats

__version__ = "0.1.0"

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
    "SessionError",
    "TierStats",
    "build_engine",
    "load_config",
    "plan",
]
