"""``packforcing plugins``: every registered component and the distribution that provides it."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter

from packforcing.cli import add_verb

EXAMPLE = """example:
  packforcing plugins
  packforcing plugins --kind compressor
  PACKFORCING_DISABLE_PLUGINS=packforcing-strided packforcing plugins --json

Components come from packforcing itself and from installed distributions that declare a
'packforcing' entry point. Plugins that failed to load are listed after the table. When two
distributions provide the same name, select one in YAML as '<distribution>:<name>'.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from packforcing.plugins.kinds import KINDS

    p = add_verb(
        sub,
        "plugins",
        help="list components: kind, name, providing distribution and version",
        description="List every registered component (policies, compressors, selectors, realigners, "
        "attention backends, models, samplers) with the distribution and version that provide it.",
        example=EXAMPLE,
    )
    p.add_argument(
        "--kind",
        choices=[k.name for k in KINDS],
        help="only this kind (its config key): " + ", ".join(f"{k.name} ({k.description})" for k in KINDS),
    )
    p.add_argument(
        "--json", action="store_true", help="print a JSON list of {kind, name, distribution, version, description}"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from packforcing.cli import interrupts_held
    from packforcing.plugins.manager import PluginWarning, default_registry

    with warnings.catch_warnings(), interrupts_held():  # a plugin's module may import torch
        warnings.simplefilter("ignore", PluginWarning)  # listed below instead
        registry = default_registry()
        rows = [p for p in registry.providers() if args.kind in (None, p.kind)]
    if args.json:
        items = [
            {
                "kind": p.kind,
                "name": p.name,
                "distribution": p.dist,
                "version": p.version,
                "description": p.description,
            }
            for p in rows
        ]
        print(json.dumps(items, indent=1))
    else:
        header = ("KIND", "NAME", "DISTRIBUTION", "VERSION", "DESCRIPTION")
        body = [(p.kind, p.name, p.dist, p.version or "-", p.description) for p in rows]
        widths = [max(len(r[i]) for r in (header, *body)) for i in range(4)]
        for r in (header, *body):
            print("  ".join([*(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)), r[4]]).rstrip())
    shared = Counter((p.kind, p.name) for p in rows)
    for (kind, name), count in sorted(shared.items()):
        if count > 1:
            dists = ", ".join(p.dist for p in rows if (p.kind, p.name) == (kind, name))
            print(
                f"note: {kind} {name!r} is provided by {dists}: select one as '<distribution>:{name}'", file=sys.stderr
            )
    for problem in registry.problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 0
