"""Per-block conditions: a schedule of model-specific condition specs.

A schedule is an ordered list of segments ``{"from_block": N, **spec}``: the first starts at
block 0 and ``from_block`` strictly increases. Block ``i`` is generated (and committed) under
the spec of the last segment with ``from_block <= i``: the segment minus ``from_block``
(``None`` when nothing else is in it). A switch takes effect at a block boundary. Specs are
JSON-able (they are recorded in cached blocks and reports); the model turns each distinct spec
into a condition object once (``BlockModel.encode_condition``).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from packforcing.core.structure import show

FROM_BLOCK = "from_block"


class ConditionError(ValueError):
    """A segment of a schedule is malformed, or its spec was refused by the model.

    ``str(err)`` reads ``"<name>[<index>]<.key>: message"``; ``index`` and ``key`` locate it.
    """

    def __init__(self, message: str, *, index: int | None = None, key: str | None = None, name: str = "conditions"):
        self.message = message
        self.index = index
        self.key = key
        self.name = name
        where = name if index is None else f"{name}[{index}]"
        if key:
            where = f"{where}.{key}"
        super().__init__(f"{where}: {message}")

    def path(self, prefix: str) -> str:
        """The key path below ``prefix`` (e.g. ``run.prompts``) that this error names."""
        where = prefix if self.index is None else f"{prefix}[{self.index}]"
        return f"{where}.{self.key}" if self.key else where


def spec_key(spec: Mapping[str, Any] | None) -> str:
    """A canonical text for a spec (equal specs, equal keys)."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


@attrs.frozen
class ConditionSchedule:
    """Validated segments: ``starts[i]`` is the first block of ``specs[i]``."""

    starts: tuple[int, ...] = ()
    specs: tuple[Mapping[str, Any] | None, ...] = ()

    @classmethod
    def parse(cls, segments: Sequence[Mapping[str, Any]] | None, name: str = "conditions") -> ConditionSchedule:
        """A schedule from ``[{from_block: 0, ...}, ...]`` (``None``: no conditions)."""
        if segments is None:
            return cls()
        if isinstance(segments, (str, bytes, Mapping)) or not isinstance(segments, Sequence):
            raise ConditionError(f"expected a list of segments {{from_block: N, ...}}, got {show(segments)}", name=name)
        if not segments:
            raise ConditionError("expected at least one segment (the first with from_block: 0)", name=name)
        starts: list[int] = []
        specs: list[Mapping[str, Any] | None] = []
        for i, segment in enumerate(segments):
            if not isinstance(segment, Mapping):
                raise ConditionError(
                    f"expected a mapping {{from_block: N, ...}}, got {show(segment)}", index=i, name=name
                )
            if FROM_BLOCK not in segment:
                raise ConditionError("required key is missing", index=i, key=FROM_BLOCK, name=name)
            start = segment[FROM_BLOCK]
            if isinstance(start, bool) or not isinstance(start, int):
                raise ConditionError(f"expected an integer, got {show(start)}", index=i, key=FROM_BLOCK, name=name)
            if i == 0 and start != 0:
                raise ConditionError(
                    f"the first segment must start at block 0, got {start}", index=i, key=FROM_BLOCK, name=name
                )
            if i > 0 and start <= starts[-1]:
                raise ConditionError(
                    f"must be greater than the previous segment's ({starts[-1]}), got {start}",
                    index=i,
                    key=FROM_BLOCK,
                    name=name,
                )
            spec = {str(k): v for k, v in segment.items() if k != FROM_BLOCK}
            try:
                json.dumps(spec, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ConditionError(f"the condition must be JSON-able: {exc}", index=i, name=name) from None
            starts.append(start)
            specs.append(spec or None)
        return cls(tuple(starts), tuple(specs))

    def segment_of(self, block: int) -> int | None:
        """Index of the segment block ``block`` falls in (``None`` without segments)."""
        if not self.starts:
            return None
        return bisect.bisect_right(self.starts, block) - 1

    def spec_for(self, block: int) -> Mapping[str, Any] | None:
        """The spec block ``block`` is generated under."""
        segment = self.segment_of(block)
        return None if segment is None else self.specs[segment]

    def as_list(self) -> list[dict[str, Any]]:
        """The schedule as YAML/JSON data (``[{from_block: N, **spec}]``)."""
        return [{FROM_BLOCK: s, **(spec or {})} for s, spec in zip(self.starts, self.specs, strict=True)]


def check_given_conditions(model: Any, segments: Sequence[Mapping[str, Any]], where: str | None, config: Any) -> None:
    """The segments that already hold their condition (``embeds: FILE``, not text), checked by
    the planning model (no weights) before any text is encoded, so a bad one costs no encoder
    load and leaves nothing written. ``where``: the prompt file (or ``--prompt``) they came
    from; ``None`` for the config's ``run.prompts`` (``config`` the :class:`Config` that set them,
    errors located in it). A text prompt for a model whose ``condition_keys`` lack ``embeds``
    (text is encoded into embeddings) is refused likewise."""
    from packforcing.core.errors import ConfigError
    from packforcing.core.interfaces import condition_keys_of

    keys = condition_keys_of(model)
    for i, seg in enumerate(segments):
        if "prompt" in seg:
            if keys is not None and "embeds" not in keys:
                takes = ", ".join(sorted(keys)) if keys else "no condition"
                problem = f"model {config.components['model'].name} takes no text prompts (it takes {takes})"
                if where is not None:
                    raise ValueError(
                        f"{where}: {problem}" if where == "--prompt" else f"{where}: [{i}].prompt: {problem}"
                    )
                source = config.source_of("run.prompts")
                raise ConfigError(problem, source=source, path=f"run.prompts[{i}].prompt")
            continue
        spec = {k: v for k, v in seg.items() if k != FROM_BLOCK}
        try:
            model.encode_condition(spec or None)  # a segment without a spec is unconditioned, as in the engine
        except ConfigError as exc:
            if where is not None:
                raise ValueError(f"{where}: [{i}].{exc.path}: {exc.message}") from None
            path = f"run.prompts[{i}].{exc.path}"
            raise ConfigError(exc.message, source=config.source_of("run.prompts"), path=path) from None
        except (ValueError, OSError) as exc:  # BlockModel.encode_condition's ValueError("<key>: ...")
            problem = " ".join(str(exc).split())
            if where is not None:
                raise ValueError(f"{where}: [{i}]: {problem}") from None
            raise ConfigError(problem, source=config.source_of("run.prompts"), path=f"run.prompts[{i}]") from None
