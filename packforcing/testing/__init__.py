"""Tools for testing cache policies and plugins against cache-free references."""

from packforcing.testing.reference import block_causal_mask, reference_generate

__all__ = ["block_causal_mask", "reference_generate"]
