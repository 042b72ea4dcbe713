"""Attention backends: torch SDPA everywhere, xformers on CUDA (imported only when chosen)."""

from packforcing.attention.backends import SdpaBackend, XformersBackend, pick_backend, xformers_available

__all__ = ["SdpaBackend", "XformersBackend", "pick_backend", "xformers_available"]
