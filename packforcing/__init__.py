"""packforcing: swappable, composable memory for autoregressive generation."""

from packforcing.core.build import BuildEnv, build_engine, plan
from packforcing.core.config import Config, load_config
from packforcing.core.engine import GeneratedBlock, GenerationEngine
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
    "Config",
    "ConfigError",
    "GeneratedBlock",
    "GenerationEngine",
    "Geometry",
    "MemoryPlan",
    "TierStats",
    "build_engine",
    "load_config",
    "plan",
]
