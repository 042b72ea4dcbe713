"""Compressors: a cached block → a smaller block with its own per-layer K/V."""

from packforcing.compressors.dual_branch import DualBranchCompressor, DualBranchNet, DualBranchParams
from packforcing.compressors.pool import PoolCompressor, PoolParams

__all__ = ["DualBranchCompressor", "DualBranchNet", "DualBranchParams", "PoolCompressor", "PoolParams"]
