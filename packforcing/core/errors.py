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
