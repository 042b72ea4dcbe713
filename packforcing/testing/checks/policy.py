"""The cache policy contracts, one function each, and :func:`check_policy` that runs them all."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from packforcing.core.geometry import Geometry
from packforcing.core.interfaces import AttentionContext, CachePolicy, Compressor, PositionalRealigner, Selector
from packforcing.core.records import BlockCommit, CacheStats, MemoryPlan
from packforcing.testing.blocks import build_component, make_commit, make_env, make_query, random_kv
from packforcing.testing.checks._common import contract, fail, geometries_strategy, run_examples, snapshot, unchanged

KIND = "policy"


@contract
def is_a_policy(policy: Any) -> None:
    """An instance of :class:`CachePolicy`."""
    if not isinstance(policy, CachePolicy):
        fail(KIND, policy, f"is a {type(policy).__name__}, not a packforcing.core.interfaces.CachePolicy")


@contract
def plans_without_allocating(policy: CachePolicy, plan: Any, n: int, g: Geometry) -> None:
    """``plan(n)`` is a :class:`MemoryPlan` whose full-cache reference is ``n`` full blocks."""
    if not isinstance(plan, MemoryPlan):
        fail(KIND, policy, f"plan() must return a MemoryPlan, got {type(plan).__name__}")
    if plan.full_cache_tokens != n * g.tokens_per_block:
        fail(KIND, policy, f"plan({n}).full_cache_tokens = {plan.full_cache_tokens}, expected {n} full blocks")


@contract
def gives_an_attention_context(policy: CachePolicy, ctx: Any) -> None:
    """``context(query)`` is an :class:`AttentionContext` at a finite position."""
    if not isinstance(ctx, AttentionContext):
        fail(KIND, policy, f"context() must return an AttentionContext, got {type(ctx).__name__}")
    if not (isinstance(ctx.position, (int, float)) and math.isfinite(ctx.position)):
        fail(KIND, policy, f"context position must be a finite number, got {ctx.position!r}")


@contract
def attends_in_shape(policy: CachePolicy, out: Any, q: torch.Tensor, block: int, layer: int) -> None:
    """``attend`` returns finite ``[B, N, H, D]`` outputs in the queries' dtype and device."""
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(q.shape):
        fail(KIND, policy, f"attend() at block {block}, layer {layer}: expected shape {tuple(q.shape)}")
    if out.dtype != q.dtype or out.device != q.device:
        fail(KIND, policy, f"attend() changed dtype/device to {out.dtype}/{out.device}")
    if not bool(torch.isfinite(out).all()):
        fail(KIND, policy, f"attend() at block {block}, layer {layer} returned non-finite values")


@contract
def commit_leaves_its_inputs_untouched(
    policy: CachePolicy, before: Sequence[torch.Tensor | None], commit: BlockCommit
) -> None:
    """``commit`` never writes to the keys, values or latents it is given."""
    if not unchanged(before, [*commit.keys, *commit.values, commit.latents]):
        fail(KIND, policy, f"commit() of block {commit.block_id} modified the tensors it was given")


@contract
def live_cache_equals_the_plan(policy: CachePolicy, plan: MemoryPlan, replayed: dict[str, Any], n: int) -> None:
    """Per tier, the live ``stats()`` peaks equal ``plan(n)`` (blocks, tokens, bytes); so does the
    archive count; no context attends more tokens than planned."""
    for name, (blocks, tokens, nbytes) in replayed["peaks"].items():
        planned = plan.tiers.get(name)
        if planned is None:
            fail(KIND, policy, f"tier {name!r} holds blocks but is missing from plan()")
        elif (planned.blocks, planned.tokens, planned.bytes) != (blocks, tokens, nbytes):
            fail(
                KIND,
                policy,
                f"tier {name!r}: plan({n}) says blocks/tokens/bytes {planned.blocks}/{planned.tokens}/"
                f"{planned.bytes}, the live cache peaked at {blocks}/{tokens}/{nbytes}",
            )
    stats: CacheStats = replayed["stats"]
    if stats.archive.blocks != plan.archive.blocks:
        fail(KIND, policy, f"archived {stats.archive.blocks} blocks, plan() says {plan.archive.blocks}")
    attended = max(replayed["context_tokens"][:n])  # the contexts of blocks 0..n-1, as planned
    if attended > plan.context_tokens:
        fail(KIND, policy, f"attended {attended} context tokens, more than plan()'s {plan.context_tokens}")


@contract
def refuses_non_finite_blocks(policy: CachePolicy, bad: BlockCommit) -> None:
    """A block with NaN keys is refused with a ``ValueError`` and leaves the cache as it was."""
    before = policy.stats()
    try:
        policy.commit(bad)
    except ValueError:
        pass
    else:
        fail(KIND, policy, "commit() accepted a block with NaN keys; it must raise (NonFiniteError)")
    if policy.stats() != before:
        fail(KIND, policy, "a refused commit changed the cache's stats")


@contract
def reset_replays_identically(policy: CachePolicy, first: dict[str, Any], again: dict[str, Any]) -> None:
    """After ``reset()`` the same commits give bit-identical attention, and ``reset()`` empties the cache."""
    if not all(torch.equal(a, b) for a, b in zip(first["outputs"], again["outputs"], strict=True)):
        fail(KIND, policy, "after reset(), replaying the same commits gives different attention outputs")
    policy.reset()
    if any(t.blocks for t in policy.stats().tiers.values()):
        fail(KIND, policy, "reset() left blocks in the cache")


@contract
def rebuilds_identically(policy: CachePolicy, first: dict[str, Any], other: dict[str, Any]) -> None:
    """Two fresh builds given the same commits attend bit-identically."""
    if not all(torch.equal(a, b) for a, b in zip(first["outputs"], other["outputs"], strict=True)):
        fail(KIND, policy, "two fresh builds given the same commits attend differently")


def replay(policy: CachePolicy, g: Geometry, n: int, batch: int, seed: int) -> dict[str, Any]:
    """Commit ``n`` blocks as the engine would, checking each step; outputs and live stats."""
    policy.reset()
    outputs: list[torch.Tensor] = []
    context_tokens: list[int] = []
    peaks: dict[str, list[int]] = {}
    for b in range(n + 1):
        ctx = policy.context(make_query(g, b))
        gives_an_attention_context(policy, ctx)
        q, k = random_kv(g, g.tokens_per_block, batch_size=batch, seed=seed + 10_000 + b)
        for layer in range(g.num_layers):
            out = ctx.attend(layer, q[layer], k[layer], q[layer])
            attends_in_shape(policy, out, q[layer], b, layer)
            outputs.append(out)
        context_tokens.append(ctx.context_tokens)
        if b == n:
            policy.settle()  # the last pass is not committed: read what it left on the device
            break
        commit = make_commit(g, b, batch_size=batch, position=ctx.position, seed=seed + b)
        before = snapshot([*commit.keys, *commit.values, commit.latents])
        policy.commit(commit)
        commit_leaves_its_inputs_untouched(policy, before, commit)
        for name, t in policy.stats().tiers.items():
            peak = peaks.setdefault(name, [0, 0, 0])
            peak[:] = [max(peak[0], t.blocks), max(peak[1], t.tokens), max(peak[2], t.bytes)]
    return {"outputs": outputs, "context_tokens": context_tokens, "peaks": peaks, "stats": policy.stats()}


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
    """Check a cache policy against every policy contract of this module.

    ``compressor``, ``selector``, ``realigner``: what the policy is built with (classes, names,
    factories, ``(factory, params)`` pairs or components); by default none, none and ``identity``.
    Examples whose geometry the policy (or its compressor) refuses with ``ValueError`` at build
    time are skipped.
    """
    from hypothesis import assume, given
    from hypothesis import strategies as st

    def part(spec: Any, env: Any, what: str, base: type) -> Any:
        if spec is None:
            return None
        if isinstance(spec, tuple):
            return build_component(spec[0], spec[1], env, what, base)
        return build_component(spec, None, env, what, base)

    def build(g: Geometry) -> CachePolicy:
        env = make_env(g)
        env.compressor = part(compressor, env, "compressor", Compressor)
        env.selector = part(selector, env, "selector", Selector)
        env.realigner = part(realigner, env, "realigner", PositionalRealigner) or env.realigner
        policy = build_component(factory, params, env, KIND, CachePolicy)
        is_a_policy(policy)
        return policy

    @given(
        g=geometries_strategy(geometries, latent_sizes=(8, 12)),
        n=st.integers(1, max_blocks),
        batch=st.sampled_from([1, 2]),
        seed=st.integers(0, 2**31 - 1),
    )
    def run(g: Geometry, n: int, batch: int, seed: int) -> None:
        try:
            policy = build(g)
        except ValueError:
            assume(False)  # e.g. a compressor that needs larger blocks than this geometry's
            return
        plan = policy.plan(n, batch_size=batch)
        plans_without_allocating(policy, plan, n, g)
        first = replay(policy, g, n, batch, seed)
        live_cache_equals_the_plan(policy, plan, first, n)
        bad = make_commit(g, n, batch_size=batch, seed=seed + n)
        bad.keys[0][0, 0, 0, 0] = float("nan")
        refuses_non_finite_blocks(policy, bad)
        reset_replays_identically(policy, first, replay(policy, g, n, batch, seed))
        rebuilds_identically(policy, first, replay(build(g), g, n, batch, seed))

    run_examples(run, max_examples, hypothesis_settings)
