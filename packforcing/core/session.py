"""One video being generated: sample the next block, or commit a given clean one."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import attrs
import torch

from packforcing.core.conditions import ConditionSchedule
from packforcing.core.records import BlockCommit, BlockQuery, CacheStats
from packforcing.core.sampler import block_noise, fresh_noise

if TYPE_CHECKING:
    from packforcing.core.engine import GenerationEngine


STATE_FORMAT = "packforcing.session/1"


class SessionError(RuntimeError):
    """A session used after it was closed, or a second one opened on a busy engine."""


@attrs.frozen(eq=False)
class GeneratedBlock:
    """One finished block: ``latents [B, C, F, H, W]`` plus what generating it cost.

    ``condition`` is the spec it was generated (or observed) under; ``observed`` is true for a
    block given to :meth:`GenerationSession.observe` rather than sampled.
    """

    index: int
    start_frame: int
    latents: torch.Tensor
    seconds: float
    context_tokens: int
    stats: CacheStats
    condition: Any = None
    observed: bool = False


class GenerationSession:
    """The state of one video on a :class:`~packforcing.core.engine.GenerationEngine`.

    Made by :meth:`GenerationEngine.session` (which resets the cache). :meth:`step` samples the
    next block; :meth:`observe` commits given clean latents as the next block instead (teacher
    forcing, continuing a real video). Either way the block's clean pass runs under the block's
    condition and its K/V go to the cache. Blocks are numbered from 0 in the order they are made.
    Use it as a context manager, or call :meth:`close`, before opening another session on the
    same engine.
    """

    def __init__(
        self,
        engine: GenerationEngine,
        *,
        seed: int,
        batch_size: int,
        schedule: ConditionSchedule,
        encoded: list[Any],
        recache: bool = False,
    ) -> None:
        self.engine = engine
        self.recache_on_switch = recache
        """Re-cache the full-resolution blocks under the new condition at every switch."""
        self._latents: dict[int, torch.Tensor] = {}
        """Clean latents of the blocks the policy holds at full resolution (kept for re-caching)."""
        self.seed = seed
        self.batch_size = batch_size
        self.schedule = schedule
        self._encoded = encoded
        self._blocks_done = 0
        self._closed = False

    # ------------------------------------------------------------------ state
    @property
    def blocks_done(self) -> int:
        """Blocks generated or observed so far (the index of the next block)."""
        return self._blocks_done

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End the session (the cache keeps its blocks until the next session resets it)."""
        self._closed = True

    def __enter__(self) -> GenerationSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def condition_spec(self, index: int) -> Mapping[str, Any] | None:
        """The condition spec block ``index`` is made under."""
        return self.schedule.spec_for(index)

    def _condition(self, index: int) -> Any:
        segment = self.schedule.segment_of(index)
        return None if segment is None else self._encoded[segment]

    def _check_open(self) -> None:
        if self._closed:
            raise SessionError("this generation session is closed")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this video bit for bit: ``{"tensors": {name: tensor},
        "meta": {...}}`` — the cache (every tier's and the archive's blocks with K/V, latents and
        positions), the seed (noise is keyed by seed and block index, so that is the whole RNG
        state), batch size, condition schedule and blocks done. JSON + safetensors-able
        (:mod:`packforcing.core.checkpoint` writes it); restore with
        :meth:`GenerationEngine.load_state_dict`."""
        tensors, cache = self.engine.policy.state_dict()
        tensors.update({f"session.latents.{i}": x for i, x in self._latents.items()})  # kept for recache
        return {
            "tensors": tensors,
            "meta": {
                "format": STATE_FORMAT,
                "seed": self.seed,
                "batch_size": self.batch_size,
                "blocks_done": self._blocks_done,
                "conditions": self.schedule.as_list(),
                "recache": self.recache_on_switch,
                "cache": cache,
            },
        }

    def _restore(self, blocks_done: int, latents: dict[int, torch.Tensor]) -> None:
        self._blocks_done = blocks_done
        self._latents = dict(latents)

    # ------------------------------------------------------------------ blocks
    @torch.no_grad()
    def step(self) -> GeneratedBlock:
        """Sample the next block from its seeded noise and commit it."""
        self._check_open()
        started = time.perf_counter()
        index = self._blocks_done
        with self._settled():
            self._recache_at_switch(index)
            latents = self._sample(index)
            return self._commit(self.engine.query(index), latents, self._condition(index), started, observed=False)

    @torch.no_grad()
    def predict(self) -> torch.Tensor:
        """Sample the next block exactly as :meth:`step` would, ``[B, C, F, H, W]``, without
        committing it: the cache and :attr:`blocks_done` are unchanged. With :meth:`observe`
        this measures teacher-forced prediction (predict a block, then commit the true one)."""
        self._check_open()
        with self._settled():
            latents = self._sample(self._blocks_done)
            self.engine.policy.settle()  # the passes' deferred checks (a commit would read them)
        return latents

    @contextmanager
    def _settled(self) -> Iterator[None]:
        """Work on one block whose checks the policy may hold on the device (see
        :meth:`CachePolicy.settle`). When it fails, they are read before the error goes on: a
        pass's bad plugin output that came first (a NaN that a later check tripped on) is raised
        instead, chained to the later error; either way nothing of the abandoned block is left
        held to surface in the next one."""
        try:
            yield
        except Exception:
            self.engine.policy.settle()
            raise

    def _recache_at_switch(self, index: int) -> None:
        if self.recache_on_switch and index > 0 and index in self.schedule.starts:
            if self.condition_spec(index) != self.condition_spec(index - 1):
                self.recache(index)

    @torch.no_grad()
    def recache(self, index: int | None = None) -> int:
        """Re-run the clean pass of every block the policy holds at full resolution under the
        condition of block ``index`` (default: the next block), oldest first, each attending only
        the blocks before it, and replace their cached K/V in place: LongLive's KV re-cache on a
        prompt switch, so the recent history carries the new prompt. Needs the blocks' latents,
        kept by a session opened with ``recache=True``. Returns the number of blocks re-cached.
        """
        self._check_open()
        index = self._blocks_done if index is None else index
        with self._settled():
            return self._recache_blocks(self._condition(index), self.condition_spec(index))

    def _recache_blocks(self, condition: Any, spec: Any) -> int:
        """:meth:`recache`'s work: the clean pass of each full-resolution block, oldest first,
        replaced in place (each block's pass attends the blocks before it, already re-cached).

        All or nothing: each replaced block's old K/V (per layer ``[B, N, H, D]``), position and
        condition are kept until every block is done, and put back, newest first, if a later
        one fails (the model raising, K/V the policy refuses, an interrupt): the cache is then
        exactly as before and the error goes on. So at most one copy of the re-cached blocks
        is held besides the cache."""
        engine = self.engine
        policy = engine.policy
        blocks = policy.full_resolution_blocks()
        for block in blocks:
            if block.block_id not in self._latents:
                raise SessionError(
                    f"recache: the latents of block {block.block_id} were not kept (open the session with recache=True)"
                )
        replaced: list[tuple[int, list[torch.Tensor], list[torch.Tensor], float, Any]] = []
        try:
            for block in blocks:
                context = policy.context(engine.query(block.block_id))
                keys, values = engine.model.clean_kv(self._latents[block.block_id], context, condition=condition)
                old = [k.clone() for k in block.keys], [v.clone() for v in block.values]
                policy.replace_kv(block.block_id, keys, values, position=context.position, condition=spec)
                replaced.append((block.block_id, *old, block.position, block.condition))
        except BaseException:
            try:
                policy.settle()  # a bad pass that came first is raised instead, this error its context
            finally:
                for block_id, keys, values, position, old_spec in reversed(replaced):
                    policy.replace_kv(block_id, keys, values, position=position, condition=old_spec)
            raise
        return len(blocks)

    def _sample(self, index: int) -> torch.Tensor:
        engine = self.engine
        query = engine.query(index)
        condition = self._condition(index)
        shape = engine.block_shape(self.batch_size)
        noise = block_noise(self.seed, index, shape, engine.dtype, engine.device)
        fresh = fresh_noise(self.seed, index, shape, engine.dtype, engine.device)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return engine.model.denoise(x, t, engine.policy.context(query), condition=condition)

        return engine.sampler.sample(noise, velocity, fresh)

    @torch.no_grad()
    def observe(self, latents: torch.Tensor) -> GeneratedBlock:
        """Commit clean ``latents [B, C, F, H, W]`` as the next block, without sampling.

        The block's clean pass runs under its condition, exactly as after :meth:`step`; later
        blocks attend it like any generated block. ``latents`` must have the engine's block
        shape for this session's batch size and be finite.
        """
        self._check_open()
        engine = self.engine
        started = time.perf_counter()
        expected = engine.block_shape(self.batch_size)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"observe: expected clean latents of shape [B, C, F, H, W] = {list(expected)}, got {got}")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("observe: the latents hold NaN or Inf values")
        latents = latents.to(device=engine.device, dtype=engine.dtype)
        index = self._blocks_done
        with self._settled():
            self._recache_at_switch(index)
            return self._commit(engine.query(index), latents, self._condition(index), started, observed=True)

    def _commit(
        self, query: BlockQuery, latents: torch.Tensor, condition: Any, started: float, *, observed: bool
    ) -> GeneratedBlock:
        engine = self.engine
        spec = self.condition_spec(query.block_id)
        clean_context = engine.policy.context(query)
        keys, values = engine.model.clean_kv(latents, clean_context, condition=condition)
        engine.policy.commit(
            BlockCommit(
                block_id=query.block_id,
                start_frame=query.start_frame,
                num_frames=query.num_frames,
                grid=query.grid,
                position=clean_context.position,
                keys=keys,
                values=values,
                latents=latents,
                condition=spec,
            )
        )
        self._blocks_done += 1
        if self.recache_on_switch:
            held = {b.block_id for b in engine.policy.full_resolution_blocks()}
            self._latents[query.block_id] = latents
            self._latents = {i: x for i, x in self._latents.items() if i in held}
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        return GeneratedBlock(
            index=query.block_id,
            start_frame=query.start_frame,
            latents=latents,
            seconds=time.perf_counter() - started,
            context_tokens=clean_context.context_tokens,
            stats=engine.policy.stats(),
            condition=spec,
            observed=observed,
        )
