"""``packforcing validate``: load, compose and build configs without generating anything."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from packforcing.cli import EXIT_CONFIG, add_overrides, add_verb, one_line

EXAMPLE = """example:
  packforcing validate configs/packforcing.yaml configs/sink_recent.yaml
  packforcing validate packforcing wan1.3b/full        # preset names
  packforcing validate configs/                    # every *.yaml below the directory
  packforcing validate configs/full.yaml --set policy.page_blocks=0

Each config is loaded (extends, overrides), every component is built as for planning (no
weights, nothing allocated; a checkpoint's tensor names and shapes are checked from its
headers) and cross-checked, run.prompts' conditions are checked by the model (text is not
encoded), and its memory plan is computed. Prints '<file>: OK' per valid
config (noting configs that can plan but not generate, e.g. a shapes-only model) and one
'error: <file>: <key.path>: <problem>' line per invalid one (a plugin it names that cannot
be loaded or built: 'error: <file>: <kind> '<name>' (distribution D): <problem>'); the exit
status is 2 if any config is invalid.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub,
        "validate",
        help="check configs: OK, or one line per problem",
        description="Check that each CONFIG loads, composes, builds and plans.",
        example=EXAMPLE,
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML files, directories of them, or preset names")
    add_overrides(p)
    p.set_defaults(func=run)


def expand(paths: list[str]) -> list[str]:
    """Files and preset names as given; directories become their ``*.yaml``/``*.yml`` files,
    sorted (a directory without any that shares its name with a preset is the preset)."""
    from packforcing import presets

    out: list[str] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
            out.extend(str(p) for p in found)
            if not found and presets.path(name) is not None:
                out.append(name)
        else:
            out.append(name)
    return out


def run(args: argparse.Namespace) -> int:
    from packforcing.core.build import check_config, generation_blocker
    from packforcing.core.config import load_config
    from packforcing.core.errors import ConfigError, PluginError

    files = expand(args.configs)
    if not files:
        print("error: no YAML files found in " + ", ".join(args.configs), file=sys.stderr)
        return EXIT_CONFIG
    failed = 0
    for name in files:
        try:
            config = check_config(load_config(name, args.overrides), conditions=True)
        except (ConfigError, PluginError) as exc:
            if getattr(args, "debug", False):
                raise
            failed += 1
            # a plugin the config names that cannot be loaded or built: the config is bad too,
            # and the configs after it are still checked
            line = one_line(exc) if isinstance(exc, ConfigError) else f"{name}: {one_line(exc)}"
            print(f"error: {line}", file=sys.stderr)
            continue
        blocker = generation_blocker(config)
        note = f" (plans memory only, cannot generate: {blocker})" if blocker else ""
        print(f"{config.source or name}: OK{note}")
    return EXIT_CONFIG if failed else 0
