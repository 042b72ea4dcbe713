"""Conformance checks for plugin components, run by a plugin's own test suite.

Each check builds the component (as the registry would, with the defaults or the ``params``
you give, as YAML would) on many small random geometries and blocks (Hypothesis), and asserts
the contracts the built-in components are held to::

    from packforcing.testing import check_compressor, check_policy
    from my_plugin import StridedCompressor

    def test_conforms():
        check_compressor(StridedCompressor)                        # the class the hook returns
        check_compressor(StridedCompressor, {"stride": [2, 2, 2]})
        check_policy("tiered", {"tiers": [...]}, compressor=StridedCompressor)

The component may be given as its class, a registered name (``"tiered"``), a
:class:`~packforcing.plugins.factory.ComponentFactory` or a registry entry.

A violation raises :class:`ConformanceError` (an ``AssertionError``) naming the component, the
contract and the offending value; Hypothesis shrinks it to a small example first. The number
of examples is ``max_examples`` or, by default, a fifth of the active Hypothesis profile's
(at least 5): each example builds a model. ``hypothesis_settings`` replaces the active
profile as the base settings (e.g. ``settings(phases=[Phase.generate])`` to skip shrinking).

Contracts
---------
Compressor
    ``name`` a non-empty string other than ``"full"``; ``needs_latents`` a bool;
    ``output_grid(grid)`` three positive ints, deterministic, no more tokens than ``grid``;
    ``compress(block, model)`` returns a :class:`CompressedKV` on exactly that grid with one
    ``[B, N', H, D]`` key and value tensor per layer in the block's dtype and on its device,
    finite, with a positive temporal stride and every temporal token inside the block's time
    span; it works without latents unless ``needs_latents``; it leaves the block untouched, is
    deterministic (also across fresh builds) and treats batch items independently.
Selector
    ``budget(n)`` in ``[0, n]``, ``budget(0) == 0``, non-decreasing; ``select`` returns int64
    indices ``[B, budget(n)]`` on the queries' device, strictly increasing (time order) and in
    range, for every layer; no mutation; deterministic; one row per batch item (a row does not
    depend on the other items).
Realigner
    ``assign`` returns one finite position per span, in time order without overlaps, all before
    the query, and a query position that depends only on how many blocks are in the context;
    ``realign`` keeps shape, dtype and device, preserves per-head key norms (a rotation), leaves
    keys at their home position unchanged, accepts a per-item ``[B]`` target, does not mutate
    its input and (``exact_rope=True``) equals the model's temporal RoPE shift.
Policy
    Attention outputs ``[B, N, H, D]`` in dtype/device, finite; commits leave the committed
    tensors untouched; the live ``stats()`` peaks equal ``plan(n)`` per tier (blocks, tokens,
    bytes) and the archive count; context tokens never exceed the plan's; a block with NaN/Inf
    keys is refused (``ValueError``) and leaves the cache as it was; ``reset()`` empties the
    cache and a replay is bit-identical; two fresh builds agree bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from packforcing.core.geometry import Geometry
from packforcing.core.interfaces import AttentionContext, CachePolicy, Compressor, PositionalRealigner, Selector
from packforcing.core.records import CompressedKV, MemoryPlan
from packforcing.testing.blocks import build_component, make_block, make_commit, make_env, make_query, random_kv

__all__ = ["ConformanceError", "check_compressor", "check_policy", "check_realigner", "check_selector"]


class ConformanceError(AssertionError):
    """A component breaks one of the contracts of its kind."""


def _fail(kind: str, component: Any, message: str) -> None:
    name = getattr(component, "name", type(component).__name__)
    raise ConformanceError(f"{kind} {name!r}: {message}")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _snapshot(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().clone() for t in tensors]


def _unchanged(before: Sequence[torch.Tensor | None], after: Sequence[torch.Tensor | None]) -> bool:
    return all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(before, after, strict=True)
    )


def _block_tensors(block: Any) -> list[torch.Tensor | None]:
    return [*block.keys, *block.values, block.latents]


def _run(test: Callable[..., None], max_examples: int | None, hypothesis_settings: Any = None) -> None:
    from hypothesis import HealthCheck, settings

    current = hypothesis_settings if hypothesis_settings is not None else settings()
    examples = max_examples if max_examples is not None else max(5, current.max_examples // 5)
    configured = settings(
        current,
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. an untrained compressor's notice
        configured(test)()


def _geometries(geometries: Any, **defaults: Any) -> Any:
    from packforcing.testing import strategies as pst

    if geometries is None:
        return pst.geometries(**defaults)
    if isinstance(geometries, Geometry):
        from hypothesis import strategies as st

        return st.just(geometries)
    return geometries


# ---------------------------------------------------------------------- compressor
def check_compressor(
    factory: Any,
    params: Any = None,
    *,
    geometries: Any = None,
    max_examples: int | None = None,
    batch_sizes: Sequence[int] = (1, 2),
    rebuild: bool = True,
    atol: float = 1e-5,
    hypothesis_settings: Any = None,
) -> None:
    """Check a compressor factory against the compressor contracts (see the module docstring).

    ``geometries``: a :class:`Geometry` or a strategy of them, for compressors that need a
    minimum size (default: latents 8–16 wide, 1–2 layers and heads). Examples whose full block
    grid ``output_grid`` refuses with ``ValueError`` (too small) are skipped. ``rebuild``:
    also require two fresh builds to compress identically (seeded initialisation).
    """
    from hypothesis import assume, given
    from hypothesis import strategies as st

    geometry_strategy = _geometries(geometries, latent_sizes=(8, 12, 16))
    kind = "compressor"

    @given(g=geometry_strategy, batch=st.sampled_from(list(batch_sizes)), seed=st.integers(0, 2**31 - 1))
    def run(g: Geometry, batch: int, seed: int) -> None:
        env = make_env(g)
        comp = build_component(factory, params, env, kind, Compressor)
        if not isinstance(comp, Compressor):
            _fail(kind, comp, f"is a {type(comp).__name__}, not a packforcing.core.interfaces.Compressor")
        if not isinstance(comp.name, str) or not comp.name or comp.name == "full":
            _fail(kind, comp, f"name must be a non-empty string other than 'full', got {comp.name!r}")
        if not isinstance(comp.needs_latents, bool):
            _fail(kind, comp, f"needs_latents must be a bool, got {comp.needs_latents!r}")
        grid = g.block_grid
        try:
            out = comp.output_grid(grid)
        except ValueError:
            assume(False)  # this compressor cannot compress a block this small
            return
        if not (isinstance(out, tuple) and len(out) == 3 and all(isinstance(v, int) and v >= 1 for v in out)):
            _fail(kind, comp, f"output_grid({grid}) must be a tuple of three ints >= 1, got {out!r}")
        if comp.output_grid(grid) != out:
            _fail(kind, comp, f"output_grid({grid}) is not deterministic")
        tokens = math.prod(out)
        if tokens > math.prod(grid):
            _fail(kind, comp, f"output_grid({grid}) = {out} has more tokens than its input")
        block = make_block(g, block_id=3, batch_size=batch, latents=comp.needs_latents, seed=seed)
        before = _snapshot(_block_tensors(block))
        try:
            ckv = comp.compress(block, env.model)
        except Exception as exc:
            if comp.needs_latents:
                raise
            _fail(
                kind,
                comp,
                "compress() failed on a block without latents (blocks carry latents only when the compressor "
                f"sets needs_latents = True): {_describe(exc)}",
            )
        _check_ckv(comp, ckv, block, out, g, batch)
        if not _unchanged(before, _block_tensors(block)):
            _fail(kind, comp, "compress() modified the block it was given (keys, values or latents)")
        again = comp.compress(block, env.model)
        if not _same_ckv(ckv, again):
            _fail(kind, comp, "compress() is not deterministic: two calls on the same block differ")
        if rebuild:
            other = build_component(factory, params, make_env(g), kind, Compressor)
            if not _same_ckv(ckv, other.compress(block, env.model)):
                _fail(kind, comp, "two fresh builds with the same parameters compress differently (unseeded init?)")
        if batch > 1:
            for item in range(batch):
                single = make_block(
                    g,
                    block_id=3,
                    keys=[k[item : item + 1].clone() for k in block.keys],
                    values=[v[item : item + 1].clone() for v in block.values],
                    latents=block.latents[item : item + 1].clone() if block.latents is not None else False,
                )
                alone = comp.compress(single, env.model)
                for layer, (a, b) in enumerate(zip(ckv.keys, alone.keys, strict=True)):
                    if not torch.allclose(a[item : item + 1].float(), b.float(), atol=atol, rtol=1e-4):
                        _fail(kind, comp, f"batch item {item} depends on the other items (keys, layer {layer})")
                for layer, (a, b) in enumerate(zip(ckv.values, alone.values, strict=True)):
                    if not torch.allclose(a[item : item + 1].float(), b.float(), atol=atol, rtol=1e-4):
                        _fail(kind, comp, f"batch item {item} depends on the other items (values, layer {layer})")

    _run(run, max_examples, hypothesis_settings)


def _check_ckv(comp: Compressor, ckv: Any, block: Any, grid: Any, g: Geometry, batch: int) -> None:
    kind = "compressor"
    if not isinstance(ckv, CompressedKV):
        _fail(kind, comp, f"compress() must return a CompressedKV, got {type(ckv).__name__}")
    if tuple(ckv.grid) != tuple(grid):
        _fail(kind, comp, f"compress() produced grid {ckv.grid}, but output_grid() said {grid}")
    if len(ckv.keys) != g.num_layers or len(ckv.values) != g.num_layers:
        _fail(kind, comp, f"expected {g.num_layers} layers of keys and values, got {len(ckv.keys)}/{len(ckv.values)}")
    shape = (batch, math.prod(grid), g.num_heads, g.head_dim)
    dtype, device = block.keys[0].dtype, block.keys[0].device
    for what, tensors in (("keys", ckv.keys), ("values", ckv.values)):
        for layer, x in enumerate(tensors):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                _fail(kind, comp, f"{what} of layer {layer}: expected shape {shape} [B, N', H, D], got {got}")
            if x.dtype != dtype:
                _fail(kind, comp, f"{what} of layer {layer}: dtype {x.dtype}, expected the block's {dtype}")
            if x.device != device:
                _fail(kind, comp, f"{what} of layer {layer}: on {x.device}, expected the block's device {device}")
            if not bool(torch.isfinite(x).all()):
                _fail(kind, comp, f"{what} of layer {layer}: non-finite values")
    stride, position = ckv.temporal_stride, ckv.position
    if not (isinstance(stride, (int, float)) and math.isfinite(stride) and stride > 0):
        _fail(kind, comp, f"temporal_stride must be a finite number > 0, got {stride!r}")
    hw_stride = getattr(ckv, "hw_stride", 1.0)
    if not (isinstance(hw_stride, (int, float)) and math.isfinite(hw_stride) and hw_stride > 0):
        _fail(kind, comp, f"hw_stride must be a finite number > 0, got {hw_stride!r}")
    if not (isinstance(position, (int, float)) and math.isfinite(position)):
        _fail(kind, comp, f"position must be a finite number, got {position!r}")
    first, last = position, position + (grid[0] - 1) * stride
    start, end = block.position, block.position + block.num_frames
    if first < start - 1e-9 or last >= end - 1e-9:
        _fail(
            kind,
            comp,
            f"temporal tokens at positions {first:g}..{last:g} fall outside the block's span [{start:g}, {end:g})",
        )


def _same_ckv(a: CompressedKV, b: Any) -> bool:
    return (
        isinstance(b, CompressedKV)
        and tuple(a.grid) == tuple(b.grid)
        and a.position == b.position
        and a.temporal_stride == b.temporal_stride
        and all(torch.equal(x, y) for x, y in zip(a.keys, b.keys, strict=True))
        and all(torch.equal(x, y) for x, y in zip(a.values, b.values, strict=True))
    )


# ---------------------------------------------------------------------- selector
def check_selector(
    factory: Any,
    params: Any = None,
    *,
    geometries: Any = None,
    max_examples: int | None = None,
    max_candidates: int = 12,
    hypothesis_settings: Any = None,
) -> None:
    """Check a selector factory against the selector contracts (see the module docstring)."""
    from hypothesis import given
    from hypothesis import strategies as st

    from packforcing.testing import strategies as pst

    kind = "selector"

    @st.composite
    def cases(draw: st.DrawFn) -> tuple[Geometry, int, int, tuple[int, int, int], int, int]:
        g = draw(_geometries(geometries))
        return (
            g,
            draw(st.sampled_from([1, 2])),
            draw(st.integers(1, max_candidates)),
            draw(pst.block_grids(g)),
            draw(st.integers(0, g.num_layers - 1)),
            draw(st.integers(0, 2**31 - 1)),
        )

    @given(case=cases())
    def run(case: tuple[Geometry, int, int, tuple[int, int, int], int, int]) -> None:
        g, batch, n, grid, layer, seed = case
        env = make_env(g)
        sel = build_component(factory, params, env, kind, Selector)
        if not isinstance(sel, Selector):
            _fail(kind, sel, f"is a {type(sel).__name__}, not a packforcing.core.interfaces.Selector")
        if not isinstance(sel.shared_across_layers, bool):
            _fail(kind, sel, f"shared_across_layers must be a bool, got {sel.shared_across_layers!r}")
        budgets = [sel.budget(m) for m in range(n + 3)]
        if budgets[0] != 0:
            _fail(kind, sel, f"budget(0) must be 0, got {budgets[0]!r}")
        for m, b in enumerate(budgets):
            if not isinstance(b, int) or not 0 <= b <= m:
                _fail(kind, sel, f"budget({m}) must be an int in [0, {m}], got {b!r}")
            if m and b < budgets[m - 1]:
                _fail(kind, sel, f"budget({m}) = {b} is smaller than budget({m - 1}) = {budgets[m - 1]}")
        stride = g.block_grid[0] / grid[0] * g.patch[0]
        candidates = [
            make_block(g, block_id=i, batch_size=batch, grid=grid, temporal_stride=stride, latents=False, seed=seed + i)
            for i in range(n)
        ]
        queries = random_kv(g, g.tokens_per_block, batch_size=batch, seed=seed + 999)[0][0]
        before = _snapshot([queries, *(t for c in candidates for t in (*c.keys, *c.values))])
        idx = sel.select(queries, candidates, layer)
        expected = budgets[n]
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64:
            got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
            _fail(kind, sel, f"select() must return an int64 tensor, got {got}")
        if tuple(idx.shape) != (batch, expected):
            _fail(
                kind, sel, f"select() returned shape {tuple(idx.shape)}, expected [B, budget(n)] = {(batch, expected)}"
            )
        if idx.device != queries.device:
            _fail(
                kind, sel, f"select() returned indices on {idx.device}, expected the queries' device {queries.device}"
            )
        if expected and (int(idx.min()) < 0 or int(idx.max()) >= n):
            _fail(kind, sel, f"select() returned indices outside [0, {n}): {idx.tolist()}")
        if expected > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
            _fail(kind, sel, f"select() indices must be strictly increasing (time order, no repeats): {idx.tolist()}")
        after = [queries, *(t for c in candidates for t in (*c.keys, *c.values))]
        if not _unchanged(before, after):
            _fail(kind, sel, "select() modified its queries or the candidates' keys/values")
        if not torch.equal(idx, sel.select(queries, candidates, layer)):
            _fail(kind, sel, "select() is not deterministic: two calls differ")
        for other_layer in range(g.num_layers):
            other = sel.select(queries, candidates, other_layer)
            if tuple(other.shape) != (batch, expected):
                _fail(kind, sel, f"select() at layer {other_layer} returned shape {tuple(other.shape)}")
        if batch > 1:
            for item in range(batch):
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
                    _fail(
                        kind,
                        sel,
                        f"batch item {item} selects {idx[item].tolist()} in a batch but {alone[0].tolist()} alone",
                    )

    _run(run, max_examples, hypothesis_settings)


# ---------------------------------------------------------------------- realigner
def check_realigner(
    factory: Any,
    params: Any = None,
    *,
    geometries: Any = None,
    max_examples: int | None = None,
    exact_rope: bool = True,
    hypothesis_settings: Any = None,
) -> None:
    """Check a positional realigner factory against the realigner contracts (see the module
    docstring). ``exact_rope=False`` for realigners whose ``realign`` is not the model's
    temporal RoPE shift from the stored position (e.g. keys stored without RoPE)."""
    from hypothesis import given
    from hypothesis import strategies as st

    from packforcing.testing import strategies as pst

    kind = "realigner"

    @st.composite
    def cases(draw: st.DrawFn) -> tuple[Geometry, list[tuple[float, float]], int, int, int, float, int]:
        g = draw(_geometries(geometries))
        spans, query_start = draw(pst.spans(g.frames_per_block))
        keep = draw(st.integers(0, len(spans)))
        return (
            g,
            spans,
            query_start,
            keep,
            draw(st.sampled_from([1, 2])),
            draw(st.floats(-64, 64, allow_nan=False).map(lambda x: round(x * 4) / 4)),
            draw(st.integers(0, 2**31 - 1)),
        )

    @given(case=cases(), data=st.data())
    def run(case: tuple[Any, ...], data: st.DataObject) -> None:
        g, spans, query_start, keep, batch, shift, seed = case
        env = make_env(g)
        realigner = build_component(factory, params, env, kind, PositionalRealigner)
        if not isinstance(realigner, PositionalRealigner):
            _fail(kind, realigner, f"is a {type(realigner).__name__}, not a PositionalRealigner")
        query = make_query(g, query_start // g.frames_per_block)
        given_spans = list(spans)
        result = realigner.assign(given_spans, query)
        if given_spans != spans:
            _fail(kind, realigner, "assign() modified the spans it was given")
        if not (isinstance(result, tuple) and len(result) == 2):
            _fail(kind, realigner, f"assign() must return (targets, query position), got {result!r}")
        targets, qpos = result
        if len(targets) != len(spans):
            _fail(kind, realigner, f"assign() returned {len(targets)} targets for {len(spans)} spans")
        if not all(isinstance(t, (int, float)) and math.isfinite(t) for t in [*targets, qpos]):
            _fail(kind, realigner, f"assign() returned non-finite or non-numeric positions: {targets}, {qpos!r}")
        ends = [t + n for t, (_, n) in zip(targets, spans, strict=True)]
        for i in range(len(targets) - 1):
            if ends[i] > targets[i + 1] + 1e-6:
                _fail(kind, realigner, f"blocks {i} and {i + 1} overlap or are out of time order: {targets}")
        if ends and ends[-1] > qpos + 1e-6:
            _fail(kind, realigner, f"the context ends at {ends[-1]:g}, after the query position {qpos:g}")
        again_targets, again_qpos = realigner.assign(list(spans), query)
        if (list(again_targets), again_qpos) != (list(targets), qpos):
            _fail(kind, realigner, "assign() is not deterministic")
        if keep < len(spans):
            subset_a = spans[:keep]
            chosen = data.draw(st.lists(st.integers(0, len(spans) - 1), min_size=keep, max_size=keep, unique=True))
            subset_b = [spans[i] for i in sorted(chosen)]
            qa = realigner.assign(subset_a, query)[1]
            qb = realigner.assign(subset_b, query)[1]
            if qa != qb:
                _fail(
                    kind,
                    realigner,
                    f"the query position depends on which blocks are selected ({qa} vs {qb} for {keep} blocks); "
                    "it may depend only on how many",
                )
        block = make_block(g, block_id=max(0, query.block_id - 1), batch_size=batch, latents=False, seed=seed)
        keys = block.keys[0]
        before = keys.clone()
        home = block.position
        target = home + shift
        moved = realigner.realign(keys, block, target, env.model.rope)
        if not torch.equal(keys, before):
            _fail(kind, realigner, "realign() modified the keys it was given")
        if not isinstance(moved, torch.Tensor) or moved.shape != keys.shape:
            _fail(kind, realigner, "realign() must return keys of the input's shape")
        if moved.dtype != keys.dtype or moved.device != keys.device:
            _fail(kind, realigner, f"realign() changed dtype/device to {moved.dtype}/{moved.device}")
        if not torch.allclose(moved.float().norm(dim=-1), keys.float().norm(dim=-1), rtol=1e-4, atol=1e-5):
            _fail(kind, realigner, "realign() changed per-head key norms: it must be a rotation")
        if not torch.allclose(realigner.realign(keys, block, home, env.model.rope), keys):
            _fail(kind, realigner, "realign() to the block's own position must leave keys unchanged")
        if exact_rope and not torch.allclose(moved, env.model.rope.shift_temporal(keys, shift), rtol=1e-5, atol=1e-5):
            _fail(kind, realigner, f"realign() by {shift:g} differs from the temporal RoPE shift")
        per_item = torch.tensor([home + shift + i for i in range(batch)], dtype=torch.float64)
        batched = realigner.realign(keys, block, per_item, env.model.rope)
        for i in range(batch):
            alone = realigner.realign(keys[i : i + 1], block, home + shift + i, env.model.rope)
            if not torch.allclose(batched[i : i + 1], alone, rtol=1e-5, atol=1e-6):
                _fail(kind, realigner, "realign() with a [B] tensor target differs from per-item float targets")

    _run(run, max_examples, hypothesis_settings)


# ---------------------------------------------------------------------- policy
def check_policy(
    factory: Any,
    params: Any = None,
    *,
    compressor: Any = None,
    selector: Any = None,
    realigner: Any = None,
    geometries: Any = None,
    max_examples: int | None = None,
    max_blocks: int = 10,
    hypothesis_settings: Any = None,
) -> None:
    """Check a cache policy factory against the policy contracts (see the module docstring).

    ``compressor``, ``selector``, ``realigner``: what the policy is built with (factories,
    ``(factory, params)`` pairs or components); by default none, none and ``identity``.
    Examples whose geometry the policy (or its compressor) refuses with ``ValueError`` at build
    time are skipped.
    """
    from hypothesis import assume, given
    from hypothesis import strategies as st

    kind = "policy"
    geometry_strategy = _geometries(geometries, latent_sizes=(8, 12))

    def part(spec: Any, env: Any, what: str, base: type) -> Any:
        if spec is None:
            return None
        if isinstance(spec, tuple):
            return build_component(spec[0], spec[1], env, what, base)
        return build_component(spec, None, env, what, base)

    def build(g: Geometry) -> tuple[Any, Any]:
        env = make_env(g)
        env.compressor = part(compressor, env, "compressor", Compressor)
        env.selector = part(selector, env, "selector", Selector)
        env.realigner = part(realigner, env, "realigner", PositionalRealigner) or env.realigner
        policy = build_component(factory, params, env, kind, CachePolicy)
        if not isinstance(policy, CachePolicy):
            _fail(kind, policy, f"is a {type(policy).__name__}, not a packforcing.core.interfaces.CachePolicy")
        return env, policy

    def replay(policy: CachePolicy, env: Any, g: Geometry, n: int, batch: int, seed: int) -> dict[str, Any]:
        """Commit ``n`` blocks as the engine would; outputs and live stats along the way."""
        policy.reset()
        outputs: list[torch.Tensor] = []
        context_tokens: list[int] = []
        peaks: dict[str, list[int]] = {}
        for b in range(n + 1):
            query = make_query(g, b)
            ctx = policy.context(query)
            if not isinstance(ctx, AttentionContext):
                _fail(kind, policy, f"context() must return an AttentionContext, got {type(ctx).__name__}")
            if not (isinstance(ctx.position, (int, float)) and math.isfinite(ctx.position)):
                _fail(kind, policy, f"context position must be a finite number, got {ctx.position!r}")
            q, k = random_kv(g, g.tokens_per_block, batch_size=batch, seed=seed + 10_000 + b)
            for layer in range(g.num_layers):
                out = ctx.attend(layer, q[layer], k[layer], q[layer])
                if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(q[layer].shape):
                    _fail(kind, policy, f"attend() at block {b}, layer {layer}: expected shape {tuple(q[layer].shape)}")
                if out.dtype != q[layer].dtype or out.device != q[layer].device:
                    _fail(kind, policy, f"attend() changed dtype/device to {out.dtype}/{out.device}")
                if not bool(torch.isfinite(out).all()):
                    _fail(kind, policy, f"attend() at block {b}, layer {layer} returned non-finite values")
                outputs.append(out)
            context_tokens.append(ctx.context_tokens)
            if b == n:
                break
            commit = make_commit(g, b, batch_size=batch, position=ctx.position, seed=seed + b)
            before = _snapshot([*commit.keys, *commit.values, commit.latents])
            policy.commit(commit)
            if not _unchanged(before, [*commit.keys, *commit.values, commit.latents]):
                _fail(kind, policy, f"commit() of block {b} modified the tensors it was given")
            stats = policy.stats()
            for name, t in stats.tiers.items():
                peak = peaks.setdefault(name, [0, 0, 0])
                peak[:] = [max(peak[0], t.blocks), max(peak[1], t.tokens), max(peak[2], t.bytes)]
        return {"outputs": outputs, "context_tokens": context_tokens, "peaks": peaks, "stats": policy.stats()}

    @given(
        g=geometry_strategy,
        n=st.integers(1, max_blocks),
        batch=st.sampled_from([1, 2]),
        seed=st.integers(0, 2**31 - 1),
    )
    def run(g: Geometry, n: int, batch: int, seed: int) -> None:
        try:
            env, policy = build(g)
        except ValueError:
            assume(False)  # e.g. a compressor that needs larger blocks than this geometry's
            return
        plan = policy.plan(n, batch_size=batch)
        if not isinstance(plan, MemoryPlan):
            _fail(kind, policy, f"plan() must return a MemoryPlan, got {type(plan).__name__}")
        first = replay(policy, env, g, n, batch, seed)
        if plan.full_cache_tokens != n * g.tokens_per_block:
            _fail(kind, policy, f"plan({n}).full_cache_tokens = {plan.full_cache_tokens}, expected {n} full blocks")
        for name, (blocks, tokens, nbytes) in first["peaks"].items():
            planned = plan.tiers.get(name)
            if planned is None:
                _fail(kind, policy, f"tier {name!r} holds blocks but is missing from plan()")
            elif (planned.blocks, planned.tokens, planned.bytes) != (blocks, tokens, nbytes):
                _fail(
                    kind,
                    policy,
                    f"tier {name!r}: plan({n}) says blocks/tokens/bytes {planned.blocks}/{planned.tokens}/"
                    f"{planned.bytes}, the live cache peaked at {blocks}/{tokens}/{nbytes}",
                )
        if first["stats"].archive.blocks != plan.archive.blocks:
            _fail(kind, policy, f"archived {first['stats'].archive.blocks} blocks, plan() says {plan.archive.blocks}")
        attended = max(first["context_tokens"][:n])  # the contexts of blocks 0..n-1, as planned
        if attended > plan.context_tokens:
            _fail(
                kind,
                policy,
                f"attended {attended} context tokens, more than plan()'s {plan.context_tokens}",
            )
        # a block with non-finite keys is refused and changes nothing
        before = policy.stats()
        bad = make_commit(g, n, batch_size=batch, seed=seed + n)
        bad.keys[0][0, 0, 0, 0] = float("nan")
        try:
            policy.commit(bad)
        except ValueError:
            pass
        else:
            _fail(kind, policy, "commit() accepted a block with NaN keys; it must raise (NonFiniteError)")
        if policy.stats() != before:
            _fail(kind, policy, "a refused commit changed the cache's stats")
        # reset + replay, and a fresh build, are bit-identical
        again = replay(policy, env, g, n, batch, seed)
        if not all(torch.equal(a, b) for a, b in zip(first["outputs"], again["outputs"], strict=True)):
            _fail(kind, policy, "after reset(), replaying the same commits gives different attention outputs")
        policy.reset()
        if any(t.blocks for t in policy.stats().tiers.values()):
            _fail(kind, policy, "reset() left blocks in the cache")
        env2, fresh = build(g)
        other = replay(fresh, env2, g, n, batch, seed)
        if not all(torch.equal(a, b) for a, b in zip(first["outputs"], other["outputs"], strict=True)):
            _fail(kind, policy, "two fresh builds given the same commits attend differently")

    _run(run, max_examples, hypothesis_settings)
