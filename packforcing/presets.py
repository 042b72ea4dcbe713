"""The config presets shipped inside the package (``packforcing/configs``).

A preset is named by its path below that directory without ``.yaml``: ``packforcing``,
``sliding_window``, ``wan1.3b/packforcing``. Wherever a config file is expected
(``load_config``, ``--config``, ``validate``), an existing file wins; otherwise a preset name
resolves to the packaged file, so the presets work from any directory. In a source checkout
the repository's ``configs/`` is the same directory.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

DEFAULT = "packforcing"
"""The preset ``packforcing generate`` runs when no ``--config`` is given."""

SUFFIXES = (".yaml", ".yml")


def directory() -> Path:
    """The packaged presets directory."""
    return Path(str(resources.files("packforcing") / "configs"))


def names() -> list[str]:
    """Every preset name, sorted (``wan1.3b/packforcing`` for files in subdirectories)."""
    root = directory()
    found = [p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in found)


def path(name: str) -> Path | None:
    """The packaged file of preset ``name`` (with or without ``.yaml``), or ``None``."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return None
    root = directory()
    for candidate in (name, *(name + s for s in SUFFIXES)):
        file = root / candidate
        if file.suffix in SUFFIXES and file.is_file():
            return file
    return None


def resolve(source: str | os.PathLike[str]) -> Path:
    """``source`` as a path: the file if it exists, else the preset it names, else ``source``
    unchanged (the loader then reports the missing file)."""
    given = Path(source)
    if given.is_file():
        return given
    preset = path(os.fspath(source))
    return preset if preset is not None else given


def description(name: str) -> str:
    """The preset's summary: its leading comment up to the first ``: `` or ``. ``, or ``""``."""
    file = path(name)
    if file is None:
        return ""
    lines = []
    for line in file.read_text().splitlines():
        text = line.strip()
        if not text.startswith("#"):
            break
        lines.append(text.lstrip("#").strip())
    summary = " ".join(" ".join(lines).split())
    for stop in (": ", ". "):
        summary = summary.split(stop)[0]
    return summary.rstrip(".")
