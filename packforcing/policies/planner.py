"""The tiered policy's memory plan, computed without allocating.

The plan replays the policy's own :class:`~packforcing.policies.layout.TierLayout` (where each
block would be) and asks each tier's own :class:`~packforcing.core.store.TierStore` how many bytes
its pages would hold (:meth:`~packforcing.core.store.TierStore.planned_nbytes`, the same page
shapes it allocates), so the plan equals the live cache by construction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from packforcing.core.errors import ParamError
from packforcing.core.records import MemoryPlan, TierStats
from packforcing.policies.layout import ARCHIVE, TierLayout
from packforcing.policies.tier_specs import MAX_PLAN_BLOCKS

if TYPE_CHECKING:
    from packforcing.policies.tiered import TieredPolicy


def plan_tiers(policy: TieredPolicy, num_blocks: int, batch_size: int = 1) -> MemoryPlan:
    """Peak tokens and bytes per tier (and the archive) over ``num_blocks`` commits of ``batch_size``."""
    if num_blocks > MAX_PLAN_BLOCKS:
        raise ParamError("run.blocks", f"{num_blocks} blocks is more than the {MAX_PLAN_BLOCKS} a run may plan")
    g = policy.geometry
    tiers = policy.tiers
    layout = TierLayout(policy.layout.specs, policy.layout.overflow)
    peak = [0] * len(tiers)
    archived = 0
    bound = policy.params.archive_max_blocks
    context_tokens = 0
    for block_id in range(num_blocks):
        context_tokens = max(context_tokens, planned_context(policy, layout))
        for move in layout.commit(block_id):
            if move.dst == ARCHIVE:
                archived += 1
        if bound is not None:
            archived = min(archived, bound)
        for i, members in enumerate(layout.members):
            peak[i] = max(peak[i], len(members))
    latent_shape = (g.latent_channels, g.frames_per_block, g.latent_height, g.latent_width)
    planned: dict[str, TierStats] = {}
    for tier, live in zip(tiers, peak, strict=True):
        assert tier.store is not None
        planned[tier.name] = TierStats(
            blocks=live,
            tokens=live * tier.tokens,
            bytes=tier.store.planned_nbytes(live, batch_size, g.itemsize, latent_shape),
        )
    oldest = next((t for t in tiers if not t.spec.pinned), tiers[-1])
    archive_store = policy.new_archive_store(oldest.tokens, torch.device("cpu"))  # nothing is allocated
    archive = TierStats(
        blocks=archived,
        tokens=archived * oldest.tokens,
        bytes=archive_store.planned_nbytes(archived, batch_size, g.itemsize),
    )
    full_tokens = num_blocks * g.tokens_per_block
    return MemoryPlan(
        num_blocks=num_blocks,
        tiers=planned,
        archive=archive,
        context_tokens=context_tokens,
        full_cache_tokens=full_tokens,
        full_cache_bytes=full_tokens * g.bytes_per_token * batch_size,
        archive_device=policy.params.archive_device if policy.params.overflow == ARCHIVE else None,
        archive_max_blocks=policy.params.archive_max_blocks,
    )


def planned_context(policy: TieredPolicy, layout: TierLayout) -> int:
    """Context tokens the next block attends with the tiers as ``layout`` holds them."""
    total = 0
    for tier, members in zip(policy.tiers, layout.members, strict=True):
        count = len(members)
        if tier.spec.select and count:
            count = policy.selector_budget(count)
        total += count * tier.tokens
    return total
