"""``packforcing presets``: the config presets shipped inside the package."""

from __future__ import annotations

import argparse
import json

from packforcing.cli import add_verb

EXAMPLE = """example:
  packforcing presets
  packforcing presets --json
  packforcing generate --config sink_recent --blocks 40 --out out/sr
  packforcing plan --config wan1.3b/packforcing --seconds 120

A preset name works wherever a config file does (--config, validate, load_config in Python),
from any directory; an existing file of the same name takes precedence. A preset is also a
starting point: copy its file (<name>.yaml in the directory the list ends with, 'files: DIR';
--json gives each path) and edit it, or extend it.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub,
        "presets",
        help="list the config presets shipped with packforcing",
        description="List the config presets shipped inside the package: the name to pass as --config and "
        "a one-line summary, then the directory that holds their files (NAME.yaml).",
        example=EXAMPLE,
    )
    p.add_argument("--json", action="store_true", help="print a JSON list of {name, description, path}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from packforcing import presets

    rows = [(name, presets.description(name), str(presets.path(name))) for name in presets.names()]
    if args.json:
        print(json.dumps([{"name": n, "description": d, "path": p} for n, d, p in rows], indent=1))
        return 0
    width = max(len(n) for n, _, _ in rows)
    for name, description, _ in rows:
        marker = " (default)" if name == presets.DEFAULT else ""
        print(f"{name.ljust(width)}  {description}{marker}")
    print(f"files: {presets.directory()}")
    return 0
