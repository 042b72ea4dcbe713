"""The generation engine: block-by-block sampling over a pluggable cache policy."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from packforcing.core.conditions import ConditionError, ConditionSchedule, spec_key
from packforcing.core.errors import ConfigError
from packforcing.core.interfaces import AttentionBackend, BlockModel, CachePolicy
from packforcing.core.records import BlockQuery
from packforcing.core.sampler import EulerSampler, Sampler
from packforcing.core.session import STATE_FORMAT, GeneratedBlock, GenerationSession, SessionError

__all__ = ["GeneratedBlock", "GenerationEngine", "GenerationSession", "SessionError"]


class GenerationEngine:
    """Generates a video block by block.

    Per block: a few-step sampler whose every model call attends to the policy's context; then
    one clean pass at timestep 0 whose per-layer K/V is committed to the policy. The engine
    never inspects the policy: it only asks for contexts and commits. A
    :class:`~packforcing.core.session.GenerationSession` holds one video's progress; one session
    at a time may be open on an engine (they share the cache).
    """

    def __init__(
        self,
        model: BlockModel,
        policy: CachePolicy,
        sampler: Sampler | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        config: Any = None,
        backend: AttentionBackend | None = None,
    ) -> None:
        self.model = model
        self.config = config
        """The :class:`~packforcing.core.config.Config` it was built from, if any."""
        self.backend = backend
        """The attention backend the policy's contexts run (``None`` where the engine was made
        by hand without one): what :func:`packforcing.testing.reference_generate` takes to run
        the cache-free oracle with the same backend."""
        self.policy = policy
        self.sampler: Sampler = sampler or EulerSampler()
        self.device = torch.device(device)
        self.dtype = dtype
        self._conditions: dict[str, Any] = {}
        self._session: weakref.ref[GenerationSession] | None = None
        self._opening = threading.Lock()  # two threads opening sessions at once: one wins

    @property
    def geometry(self):
        return self.model.geometry

    def block_shape(self, batch_size: int) -> tuple[int, int, int, int, int]:
        g = self.geometry
        return (batch_size, g.latent_channels, g.frames_per_block, g.latent_height, g.latent_width)

    def query(self, index: int) -> BlockQuery:
        """The :class:`BlockQuery` of block ``index``."""
        g = self.geometry
        return BlockQuery(
            block_id=index, start_frame=index * g.frames_per_block, num_frames=g.frames_per_block, grid=g.block_grid
        )

    def encode_condition(self, spec: Mapping[str, Any] | None) -> Any:
        """The model's condition object for ``spec``, encoded once per distinct spec (kept while
        sessions use it: a new session drops the conditions its schedule does not name)."""
        if spec is None:
            return None
        key = spec_key(spec)
        if key not in self._conditions:
            self._conditions[key] = self.model.encode_condition(spec)
        return self._conditions[key]

    def session(
        self,
        *,
        seed: int = 0,
        batch_size: int = 1,
        conditions: Sequence[Mapping[str, Any]] | None = None,
        recache: bool = False,
    ) -> GenerationSession:
        """A new video from an empty cache (the cache is reset).

        ``recache``: at each switch of condition, re-run the clean pass of the blocks the policy
        holds at full resolution under the new condition (LongLive's KV re-cache; see
        :meth:`GenerationSession.recache`).

        ``conditions``: a schedule ``[{"from_block": 0, **spec}, ...]`` (see
        :mod:`packforcing.core.conditions`); every distinct spec is encoded before this returns, so
        a bad one fails here (:class:`~packforcing.core.conditions.ConditionError`, naming the
        segment). Raises :class:`SessionError` while another session on this engine is open.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        with self._opening:
            return self._open_session(seed, batch_size, conditions, recache)

    def _open_session(
        self, seed: int, batch_size: int, conditions: Sequence[Mapping[str, Any]] | None, recache: bool
    ) -> GenerationSession:
        live = self._session() if self._session is not None else None
        if live is not None and not live.closed:
            raise SessionError(
                f"another generation session is open on this engine ({live.blocks_done} blocks done): close it "
                "(session.close(), or finish or close the generate() iterator) before starting a new one"
            )
        schedule = conditions if isinstance(conditions, ConditionSchedule) else ConditionSchedule.parse(conditions)
        encoded = []
        for i, spec in enumerate(schedule.specs):
            try:
                encoded.append(self.encode_condition(spec))
            except ConditionError:
                raise
            except ConfigError as exc:  # a ParamError naming the key of the spec it is about
                raise ConditionError(exc.message, index=i, key=exc.path) from None
            except (ValueError, OSError) as exc:
                raise ConditionError(" ".join(str(exc).split()), index=i) from None
        # keep only this schedule's conditions (a model's condition may hold per-layer tensors)
        wanted = {spec_key(spec) for spec in schedule.specs if spec is not None}
        self._conditions = {k: v for k, v in self._conditions.items() if k in wanted}
        self.policy.reset()
        session = GenerationSession(
            self, seed=seed, batch_size=batch_size, schedule=schedule, encoded=encoded, recache=recache
        )
        self._session = weakref.ref(session)
        return session

    def state_dict(self) -> dict[str, Any]:
        """The open session's :meth:`GenerationSession.state_dict` (the video in progress)."""
        live = self._session() if self._session is not None else None
        if live is None or live.closed:
            raise SessionError("no open generation session to save")
        return live.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> GenerationSession:
        """A session continuing the video saved by :meth:`state_dict`: the cache restored bit for
        bit (on this engine's device), the next :meth:`GenerationSession.step` makes the same
        block the saved run would have made next."""
        meta = state["meta"]
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"checkpoint: format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
        session = self.session(
            seed=int(meta["seed"]),
            batch_size=int(meta["batch_size"]),
            conditions=meta.get("conditions") or None,
            recache=bool(meta.get("recache", False)),
        )
        cache, kept = {}, {}
        for name, tensor in state["tensors"].items():
            if name.startswith("session.latents."):
                kept[int(name.rsplit(".", 1)[1])] = tensor.to(self.device)
            elif not name.startswith(("session.", "run.")):
                cache[name] = tensor.to(self.device)
        try:
            self.policy.load_state_dict(cache, meta["cache"])
        except BaseException:
            session.close()
            raise
        session._restore(int(meta["blocks_done"]), kept)
        return session

    def generate(
        self,
        num_blocks: int,
        *,
        seed: int = 0,
        batch_size: int = 1,
        conditions: Sequence[Mapping[str, Any]] | None = None,
    ) -> Iterator[GeneratedBlock]:
        """Yield ``num_blocks`` finished blocks, one at a time (the cache starts empty): a
        :meth:`session` stepped ``num_blocks`` times, closed when the iterator ends or is closed."""
        if num_blocks < 0 or batch_size < 1:
            raise ValueError("num_blocks must be >= 0 and batch_size >= 1")
        session = self.session(seed=seed, batch_size=batch_size, conditions=conditions)
        return _stepped(session, num_blocks)


def _stepped(session: GenerationSession, num_blocks: int) -> Iterator[GeneratedBlock]:
    with session:
        for _ in range(num_blocks):
            yield session.step()
