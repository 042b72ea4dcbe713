"""The selector contracts, one function each, and :func:`check_selector` that runs them all."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from packforcing.core.geometry import Geometry, Grid
from packforcing.core.interfaces import Selector
from packforcing.core.records import CachedBlock
from packforcing.testing.blocks import build_component, make_block, make_env, random_kv
from packforcing.testing.checks._common import contract, fail, geometries_strategy, run_examples, snapshot, unchanged

KIND = "selector"


def _tensors(queries: torch.Tensor, candidates: Sequence[CachedBlock]) -> list[torch.Tensor | None]:
    return [queries, *(t for c in candidates for t in (*c.keys, *c.values))]


@contract
def is_a_selector(sel: Any) -> None:
    """An instance of :class:`Selector` with a bool ``shared_across_layers``."""
    if not isinstance(sel, Selector):
        fail(KIND, sel, f"is a {type(sel).__name__}, not a packforcing.core.interfaces.Selector")
    if not isinstance(sel.shared_across_layers, bool):
        fail(KIND, sel, f"shared_across_layers must be a bool, got {sel.shared_across_layers!r}")


@contract
def budget_is_monotone(sel: Selector, budgets: Sequence[Any]) -> None:
    """``budget(n)`` is an int in ``[0, n]``, ``budget(0) == 0``, non-decreasing in ``n``."""
    if budgets[0] != 0:
        fail(KIND, sel, f"budget(0) must be 0, got {budgets[0]!r}")
    for m, b in enumerate(budgets):
        if not isinstance(b, int) or not 0 <= b <= m:
            fail(KIND, sel, f"budget({m}) must be an int in [0, {m}], got {b!r}")
        if m and b < budgets[m - 1]:
            fail(KIND, sel, f"budget({m}) = {b} is smaller than budget({m - 1}) = {budgets[m - 1]}")


@contract
def returns_time_ordered_indices(
    sel: Selector, idx: Any, queries: torch.Tensor, n: int, expected: int, layer: int | None = None
) -> None:
    """int64 indices ``[B, budget(n)]`` on the queries' device, in range, strictly increasing."""
    batch = queries.shape[0]
    call = "select()" if layer is None else f"select() at layer {layer}"
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64:
        got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
        fail(KIND, sel, f"{call} must return an int64 tensor, got {got}")
    if tuple(idx.shape) != (batch, expected):
        fail(KIND, sel, f"{call} returned shape {tuple(idx.shape)}, expected [B, budget(n)] = {(batch, expected)}")
    if idx.device != queries.device:
        fail(KIND, sel, f"{call} returned indices on {idx.device}, expected the queries' device {queries.device}")
    if expected and (int(idx.min()) < 0 or int(idx.max()) >= n):
        fail(KIND, sel, f"{call} returned indices outside [0, {n}): {idx.tolist()}")
    if expected > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
        fail(KIND, sel, f"{call} indices must be strictly increasing (time order, no repeats): {idx.tolist()}")


@contract
def leaves_its_inputs_untouched(sel: Selector, before: Sequence[torch.Tensor | None], after: Sequence[Any]) -> None:
    """``select`` never writes to the queries or the candidates' keys/values."""
    if not unchanged(before, after):
        fail(KIND, sel, "select() modified its queries or the candidates' keys/values")


@contract
def is_deterministic(
    sel: Selector, idx: torch.Tensor, queries: torch.Tensor, candidates: Sequence[CachedBlock], layer: int
) -> None:
    """Two calls give the same indices."""
    if not torch.equal(idx, sel.select(queries, candidates, layer)):
        fail(KIND, sel, "select() is not deterministic: two calls differ")


@contract
def selects_at_every_layer(
    sel: Selector,
    idx: torch.Tensor,
    queries: torch.Tensor,
    candidates: Sequence[CachedBlock],
    g: Geometry,
    expected: int,
    layer: int,
) -> None:
    """Every layer gets valid ``[B, budget(n)]`` indices (:func:`returns_time_ordered_indices`);
    a selector ``shared_across_layers`` picks the same at every layer (a context selects once per
    pass and reuses that choice for all layers)."""
    for other_layer in range(g.num_layers):
        other = sel.select(queries, candidates, other_layer)
        returns_time_ordered_indices(sel, other, queries, len(candidates), expected, other_layer)
        if sel.shared_across_layers and not torch.equal(other, idx):
            fail(
                KIND,
                sel,
                f"shared_across_layers is True, but select() picks {other.tolist()} at layer {other_layer} "
                f"and {idx.tolist()} at layer {layer}",
            )


@contract
def treats_batch_items_independently(
    sel: Selector,
    idx: torch.Tensor,
    queries: torch.Tensor,
    candidates: Sequence[CachedBlock],
    g: Geometry,
    grid: Grid,
    stride: float,
    layer: int,
) -> None:
    """A batch item's row is what it selects alone."""
    for item in range(queries.shape[0]):
        singles = [
            make_block(
                g,
                block_id=c.block_id,
                grid=grid,
                temporal_stride=stride,
                latents=False,
                keys=[k[item : item + 1].clone() for k in c.keys],
                values=[v[item : item + 1].clone() for v in c.values],
            )
            for c in candidates
        ]
        alone = sel.select(queries[item : item + 1].clone(), singles, layer)
        if not torch.equal(alone[0], idx[item]):
            fail(KIND, sel, f"batch item {item} selects {idx[item].tolist()} in a batch but {alone[0].tolist()} alone")


def check_selector(
    factory: Any,
    params: Any = None,
    *,
    geometries: Any = None,
    max_examples: int | None = None,
    max_candidates: int = 12,
    hypothesis_settings: Any = None,
) -> None:
    """Check a selector against every selector contract of this module."""
    from hypothesis import given
    from hypothesis import strategies as st

    from packforcing.testing import strategies as pst

    @st.composite
    def cases(draw: st.DrawFn) -> tuple[Geometry, int, int, Grid, int, int]:
        g = draw(geometries_strategy(geometries))
        return (
            g,
            draw(st.sampled_from([1, 2])),
            draw(st.integers(1, max_candidates)),
            draw(pst.block_grids(g)),
            draw(st.integers(0, g.num_layers - 1)),
            draw(st.integers(0, 2**31 - 1)),
        )

    @given(case=cases())
    def run(case: tuple[Geometry, int, int, Grid, int, int]) -> None:
        g, batch, n, grid, layer, seed = case
        sel = build_component(factory, params, make_env(g), KIND, Selector)
        is_a_selector(sel)
        budgets = [sel.budget(m) for m in range(n + 3)]
        budget_is_monotone(sel, budgets)
        stride = g.block_grid[0] / grid[0] * g.patch[0]
        candidates = [
            make_block(g, block_id=i, batch_size=batch, grid=grid, temporal_stride=stride, latents=False, seed=seed + i)
            for i in range(n)
        ]
        queries = random_kv(g, g.tokens_per_block, batch_size=batch, seed=seed + 999)[0][0]
        before = snapshot(_tensors(queries, candidates))
        idx = sel.select(queries, candidates, layer)
        returns_time_ordered_indices(sel, idx, queries, n, budgets[n])
        leaves_its_inputs_untouched(sel, before, _tensors(queries, candidates))
        is_deterministic(sel, idx, queries, candidates, layer)
        selects_at_every_layer(sel, idx, queries, candidates, g, budgets[n], layer)
        if batch > 1:
            treats_batch_items_independently(sel, idx, queries, candidates, g, grid, stride, layer)

    run_examples(run, max_examples, hypothesis_settings)
