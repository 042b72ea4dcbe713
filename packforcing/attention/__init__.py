"""Attention backends: torch SDPA everywhere (what ``auto`` picks), xformers on CUDA when named (imported only then)."""

from packforcing.attention.backends import SdpaBackend, XformersBackend, pick_backend, xformers_available

__all__ = ["SdpaBackend", "XformersBackend", "pick_backend", "xformers_available"]
