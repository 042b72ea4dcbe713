"""Errors packforcing reports to users in one line."""

from __future__ import annotations

from packforcing.plugins.kinds import KINDS, SECTIONS


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

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key path taken relative to ``prefix`` (a component's key path,
        e.g. ``"policy"``), unless the path is already absolute (starts at a top-level key)."""
        return ConfigError(self.message, source=self.source, path=join_path(prefix, self.path))


class ParamError(ConfigError):
    """A parameter problem raised by a component or its validators: the key path, relative to
    the component (``"window"``, ``"tiers.mid"``, ``"hr_channels[2]"``) or absolute from the
    config's top (``"selector.k"``), and the problem. The builder places it under the
    component's key, so the user reads ``configs/x.yaml: compressor.window: <problem>``::

        raise ParamError("window", f"expected three integers >= 1, got {value!r}")
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message, path=path)


TOP_LEVEL_KEYS = frozenset((*(k.name for k in KINDS), *SECTIONS))
"""The config's top-level keys: a path starting with one of them is absolute."""


def join_path(prefix: str, path: str | None) -> str:
    """``path`` relative to the component at ``prefix``, unless it is already absolute."""
    if not path:
        return prefix
    root = path.split(".")[0].split("[")[0]
    if root in TOP_LEVEL_KEYS or path == prefix or path.startswith((f"{prefix}.", f"{prefix}[")):
        return path
    return f"{prefix}.{path}"


class DeprecatedKeyWarning(FutureWarning):
    """A config uses a deprecated key (``attention:`` for ``backend:``, ``positional:`` for
    ``realigner:``); it is read as the new key."""


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
