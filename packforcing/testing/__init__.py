"""Tools for testing cache policies and plugins.

- :func:`reference_generate` / :func:`block_causal_mask`: the cache-free oracle.
- :func:`check_compressor`, :func:`check_selector`, :func:`check_realigner`,
  :func:`check_policy`, :func:`check_model`: conformance checks a plugin's own test suite calls (they need
  ``hypothesis``); :mod:`packforcing.testing.strategies`: the Hypothesis strategies behind them
  (geometries, blocks with K/V, configs); :mod:`packforcing.testing.blocks`: plain builders.
"""

from __future__ import annotations

from typing import Any

from packforcing.testing.reference import block_causal_mask, reference_generate

_CHECKS = ("ConformanceError", "check_compressor", "check_model", "check_policy", "check_realigner", "check_selector")

__all__ = ["block_causal_mask", "reference_generate", "strategies", *_CHECKS]


def __getattr__(name: str) -> Any:
    # the checks and strategies import hypothesis (a test dependency): load them on first use
    if name in _CHECKS:
        from packforcing.testing import checks

        return getattr(checks, name)
    if name == "strategies":
        import importlib

        return importlib.import_module("packforcing.testing.strategies")
    raise AttributeError(f"module 'packforcing.testing' has no attribute {name!r}")
