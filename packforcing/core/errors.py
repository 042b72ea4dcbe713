"""Errors packforcing reports to users in one line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, located by source file and key path.

    ``str(err)`` reads ``"configs/x.yaml: policy.sink_frames: expected an integer >= 0, got -3"``.
    """

    def __init__(self, message: str, *, source: str | None = None, path: str | None = None) -> None:
        self.source = source
        self.path = path
        self.message = message
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [p for p in (self.source, self.path) if p]
        return ": ".join([*parts, self.message])

    def located(self, source: str | None) -> ConfigError:
        """The same error, attributed to ``source`` if it has none yet."""
        if self.source or not source:
            return self
        return ConfigError(self.message, source=source, path=self.path)


class PluginError(RuntimeError):
    """A plugin raised, or returned something unusable, while the cache was using it.

    ``str(err)`` reads ``"compressor 'dual_branch' (distribution packforcing), block 10:
    keys of layer 0 are torch.int64, expected torch.float32"``; the plugin's own exception, if
    it raised one, is chained as ``__cause__``. When it is raised from a commit, the cache is
    exactly as it was before that commit.
    """

    def __init__(
        self, problem: str, *, kind: str, name: str, distribution: str | None = None, block: int | None = None
    ) -> None:
        self.problem = problem
        self.kind = kind
        self.name = name
        self.distribution = distribution
        self.block = block
        who = f"{kind} {name!r}" + (f" (distribution {distribution})" if distribution else "")
        where = f", block {block}" if block is not None else ""
        super().__init__(f"{who}{where}: {problem}")
