"""Positional realigners: where context blocks sit in time, and rotating keys there."""

from packforcing.positional.identity import IdentityRealigner
from packforcing.positional.temporal_shift import TemporalRopeShift, TemporalRopeShiftParams

__all__ = ["IdentityRealigner", "TemporalRopeShift", "TemporalRopeShiftParams"]
