"""Selectors: which candidate blocks of a ``select: true`` tier enter attention."""

from packforcing.selectors.recency import RecencyParams, RecencySelector
from packforcing.selectors.topk import TopKParams, TopKSelector

__all__ = ["RecencyParams", "RecencySelector", "TopKParams", "TopKSelector"]
