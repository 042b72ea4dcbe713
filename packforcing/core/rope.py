"""Wan-style 3D rotary position embedding.

Each head's ``head_dim / 2`` complex pairs (adjacent channels ``(2i, 2i+1)``) are split into
three bands, temporal first: with ``d = head_dim`` the temporal band has
``(d - 4 * (d // 6)) / 2`` pairs and height and width ``d // 6`` pairs each (22/21/21 for
``d = 128``). Each band has its own frequency ladder ``theta ** (-2j / band_dim)``.

Angles are computed in float64 and applied in float32 whatever the storage dtype, so a
rotation costs exactly one rounding to the storage dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import attrs
import torch

from packforcing.core.geometry import Grid


@functools.lru_cache(maxsize=64)
def _ladder(theta: float, pairs: int) -> torch.Tensor:
    """Frequencies ``theta ** (-2j / (2 * pairs))`` of one band, ``[pairs]`` float64 (read-only use)."""
    dim = 2 * pairs
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return 1.0 / (theta**exponents)


@functools.lru_cache(maxsize=64)
def _ladder_on(theta: float, pairs: int, device: torch.device) -> torch.Tensor:
    """:func:`_ladder` on ``device``, copied there once: a per-call ``.to(device)`` of a host tensor
    would synchronise the host with an accelerator on every rotation."""
    return _ladder(theta, pairs).to(device)


@functools.lru_cache(maxsize=16)
def _unit_on(device: torch.device) -> torch.Tensor:
    """A 0-d float64 one on ``device`` (the modulus :func:`torch.polar` broadcasts), made once:
    a ``ones_like`` per rotation table is one more kernel launch per layer call."""
    return torch.ones((), dtype=torch.float64, device=device)


@attrs.define
class _LastTurn:
    """The last :meth:`Rope3D.temporal_turn` table and the shift tensor it was made from:
    ``(delta, delta's version counter, table)``, or ``None``."""

    entry: tuple[torch.Tensor, int, torch.Tensor] | None = None


@attrs.frozen
class Rope3D:
    """Rotary embedding over ``(t, h, w)`` positions for keys/queries ``[B, N, H, D]``."""

    head_dim: int
    theta: float = 10000.0
    _last_turn: _LastTurn = attrs.field(factory=_LastTurn, init=False, repr=False, eq=False)
    """:meth:`temporal_turn`'s one-entry memo (not part of the value: equality and hash ignore it)."""

    def __attrs_post_init__(self) -> None:
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim must be even and >= 6 for 3D RoPE, got {self.head_dim}")

    @property
    def band_pairs(self) -> tuple[int, int, int]:
        """Number of complex pairs in the (temporal, height, width) bands."""
        d = self.head_dim
        spatial = d // 6
        return (d - 4 * spatial) // 2, spatial, spatial

    def _band_freqs(self, band: int, device: torch.device | str | None = None) -> torch.Tensor:
        if device is None:
            return _ladder(self.theta, self.band_pairs[band])
        return _ladder_on(self.theta, self.band_pairs[band], torch.device(device))

    def temporal_freqs(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Angular frequencies of the temporal band, ``[Pt]`` float64 (on ``device``, held there)."""
        return self._band_freqs(0, device)

    def angles(self, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Rotation angles ``[N, D/2]`` (float64) for token positions ``t, h, w`` of shape ``[N]``."""
        parts = [
            pos.to(torch.float64)[:, None] * self._band_freqs(i, pos.device)[None, :] for i, pos in enumerate((t, h, w))
        ]
        return torch.cat(parts, dim=1)

    @staticmethod
    def grid_positions(
        grid: Grid,
        t_start: float = 0.0,
        t_stride: float = 1.0,
        hw_stride: float = 1.0,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions ``[N]`` of a t-major token grid ``(t, h, w)``.

        Token ``(i, j, k)`` sits at temporal position ``t_start + i * t_stride`` and at spatial
        position ``(j * hw_stride, k * hw_stride)``; compressed grids pass their strides so a
        coarse token covers the same extent as the full tokens it replaces.
        """
        gt, gh, gw = grid
        ti = torch.arange(gt, dtype=torch.float64, device=device) * t_stride + t_start
        hi = torch.arange(gh, dtype=torch.float64, device=device) * hw_stride
        wi = torch.arange(gw, dtype=torch.float64, device=device) * hw_stride
        tt, hh, ww = torch.meshgrid(ti, hi, wi, indexing="ij")
        return tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)

    @staticmethod
    def rotation(angles: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """The rotation table of ``angles [N, P]`` (or ``[B, N, P]``): ``e^{iθ}`` as complex64
        ``[1 or B, N, 1, P]``, from float64 angles, which :meth:`rotate` reuses (compute it once per
        forward pass, not per layer)."""
        if angles.dim() == 2:
            angles = angles[None]
        if device is not None and angles.device != torch.device(device):
            angles = angles.to(device)
        angles = angles.to(torch.float64)
        turn = torch.polar(_unit_on(angles.device).expand_as(angles), angles).to(torch.complex64)
        return turn[:, :, None, :]

    @staticmethod
    def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """Rotate pairs of ``x [B, N, H, 2P]`` by ``angles [N, P]`` (or ``[B, N, P]``), or by their
        :meth:`rotation` table (complex), in float32: one complex multiply of the pairs, with one
        widening copy before it and one rounding to ``x``'s dtype after (three kernels, where the
        pairs' real arithmetic takes ten)."""
        table = angles if angles.is_complex() else Rope3D.rotation(angles, x.device)
        pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * table).flatten(-2).to(x.dtype)

    def rotate(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [B, N, H, D]`` by precomputed :meth:`angles` ``[N, D/2]`` or their
        :meth:`rotation` table (reuse it across layers: one table per forward pass)."""
        return self._rotate(x, angles)

    def apply(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Apply the full 3D rotation to ``x [B, N, H, D]`` at positions ``[N]``."""
        return self._rotate(x, self.angles(t, h, w))

    def apply_grid(
        self, x: torch.Tensor, grid: Grid, t_start: float, t_stride: float = 1.0, hw_stride: float = 1.0
    ) -> torch.Tensor:
        """Apply RoPE to ``x [B, N, H, D]`` whose tokens form the t-major ``grid``."""
        return self.apply(x, *self.grid_positions(grid, t_start, t_stride, hw_stride, device=x.device))

    def unapply(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`apply` at positions ``[N]`` (rotate by the negated angles)."""
        return self._rotate(x, -self.angles(t, h, w))

    def unapply_grid(
        self, x: torch.Tensor, grid: Grid, t_start: float, t_stride: float = 1.0, hw_stride: float = 1.0
    ) -> torch.Tensor:
        """Undo :meth:`apply_grid` (the keys as they were before RoPE, up to one rounding)."""
        return self.unapply(x, *self.grid_positions(grid, t_start, t_stride, hw_stride, device=x.device))

    def shift_temporal(self, x: torch.Tensor, delta: float | torch.Tensor) -> torch.Tensor:
        """Move ``x [B, N, H, D]`` by ``delta`` temporal positions, touching only the temporal band.

        ``delta`` is a number (same shift for all tokens) or a ``[B]`` tensor (one shift per
        batch item). Because rotations compose, this equals recomputing RoPE at the new
        position; it is computed in float32 from the given keys, so it costs one rounding.
        """
        pt = self.band_pairs[0]
        band = 2 * pt
        freqs = self.temporal_freqs(x.device)
        # one angle per pair (per batch item), broadcast over tokens and heads
        if isinstance(delta, torch.Tensor):
            ang = delta.to(device=x.device, dtype=torch.float64)[:, None, None] * freqs[None, None, :]  # [B, 1, Pt]
        else:
            ang = (float(delta) * freqs)[None, :]  # [1, Pt]
        return torch.cat([self._rotate(x[..., :band], ang), x[..., band:]], dim=-1)

    def shift_temporal_tokens(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Like :meth:`shift_temporal` with one shift per token: ``delta [N]`` (the same for every
        batch item) or ``[B, N]`` for ``x [B, N, H, D]``. ``delta`` should be on ``x``'s device (a
        host tensor is copied there, which synchronises with an accelerator). Returns a new tensor;
        :meth:`shift_temporal_tokens_` rotates in place."""
        return self.shift_temporal_tokens_(x.clone(), delta)

    @staticmethod
    def shifts_of_runs(runs: Sequence[tuple[float, int]]) -> torch.Tensor:
        """Per-token shifts ``[Σ count]`` (float64, on the host) of ``(shift, count)`` runs: each
        run's shift repeated over its ``count`` tokens (one host-made tensor, however many tokens)."""
        table = torch.tensor(runs, dtype=torch.float64)  # [R, 2]
        return torch.repeat_interleave(table[:, 0], table[:, 1].to(torch.int64))

    def shift_temporal_tokens_(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """:meth:`shift_temporal_tokens` in place: rotates the temporal band of ``x [B, N, H, D]``
        (a writable tensor or view) by ``delta [N]`` or ``[B, N]`` and returns ``x``.

        Float64 angles, the rotation in float32, one rounding to ``x``'s dtype (as
        :meth:`shift_temporal`), in three kernels over the band — widen, complex multiply, write
        back — instead of a dozen over the whole head: the form a context uses on every layer.
        It is :meth:`turn_temporal_` with the table of :meth:`temporal_turn`."""
        if delta.device != x.device:
            delta = delta.to(x.device)
        return self.turn_temporal_(x, self.temporal_turn(delta))

    def temporal_turn(self, delta: torch.Tensor) -> torch.Tensor:
        """The temporal band's rotation by ``delta [N]`` or ``[B, N]`` (``[1]``: every token) as a
        complex64 table ``[1 or B, N, 1, Pt]`` on ``delta``'s device, angles in float64: what
        :meth:`turn_temporal_` multiplies by (made once, it can rotate many tensors): the
        :meth:`rotation` table of the band's angles. Read-only.

        The last table is kept with the tensor it was made from: given that same tensor again,
        unmodified since (its version counter unchanged), the kept table is returned without a
        kernel. A context passes one shift tensor to every layer of a forward pass when the
        layers' shifts are the same (see
        :meth:`~packforcing.core.interfaces.PositionalRealigner.gather_shifted`), so the table is
        then made once per pass instead of three kernels per layer call. (Tensors made under
        :func:`torch.inference_mode` have no version counter: their tables are not kept.)"""
        tracked = not delta.is_inference()  # an inference tensor has no version counter: not kept
        last = self._last_turn.entry
        if tracked and last is not None and last[0] is delta and last[1] == delta._version:
            return last[2]
        angles = delta.to(torch.float64)[..., None] * self.temporal_freqs(delta.device)  # [N, Pt] or [B, N, Pt]
        table = self.rotation(angles)
        self._last_turn.entry = (delta, delta._version, table) if tracked else None
        return table

    def turn_temporal_(self, x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
        """Multiply the temporal band of ``x [B, N, H, D]`` in place by ``turn`` (a
        :meth:`temporal_turn` table) in float32, one rounding to ``x``'s dtype; returns ``x``."""
        band = 2 * self.band_pairs[0]
        part = x[..., :band]
        if part.dtype == torch.float32:  # rotate in place
            torch.view_as_complex(part.unflatten(-1, (-1, 2))).mul_(turn)
            return x
        pairs = torch.view_as_complex(part.float().unflatten(-1, (-1, 2)))
        pairs.mul_(turn)
        part.copy_(torch.view_as_real(pairs).flatten(-2))
        return x
