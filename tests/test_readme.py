"""The README's commands and Python example stay true."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from packforcing.plugins.manager import Registry, entry_points_in

README = Path(__file__).resolve().parent.parent / "README.md"


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_example_runs(capsys, monkeypatch):
    monkeypatch.chdir(README.parent)
    (example,) = code_blocks("python")
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 41  # 40 blocks, then the plan
    last_block_bytes = int(printed[-2].split()[2])
    assert int(printed[-1]) == last_block_bytes > 0  # planned peak == bytes held (a bounded policy plateaus)


def test_ci_runs_the_readme_test_command():
    commands = [b.strip() for b in code_blocks("bash")]
    test_command = next(c for c in commands if "pytest" in c)
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert "set -euo pipefail" in ci


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_a_plugin_written_from_the_readme_installs_and_generates(tmp_path, monkeypatch):
    """The "Writing a plugin" section alone: its module, its entry-point table, installed with pip
    as its own distribution, then its generate command run from an unrelated directory."""
    text = section("Writing a plugin")
    module = next(b for b in re.findall(r"```py\n(.*?)```", text, flags=re.S) if "@hookimpl" in b)
    (entry_points,) = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    project = tmp_path / "my-plugin"
    project.mkdir()
    (project / "my_plugin.py").write_text(module)
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=70.1"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "my-plugin"\nversion = "0.1.0"\n\n[tool.setuptools]\npy-modules = ["my_plugin"]\n\n'
        + entry_points
    )
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    result = subprocess.run([*install, "--target", str(site), str(project)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "my_plugin", raising=False)
    try:
        registry = Registry.create(entry_points=entry_points_in(site))
    finally:
        sys.modules.pop("my_plugin", None)
    provided = registry.get("compressor", "every_nth")
    assert (provided.dist, provided.version) == ("my-plugin", "0.1.0")
    assert provided.factory.description == "Keep every stride-th latent frame's tokens."

    (command,) = [
        line for line in text.splitlines() if line.startswith("$ .venv/bin/packforcing generate --config pack")
    ]
    argv = command.removeprefix("$ .venv/bin/packforcing ").split()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(README.parent)])}
    env.pop("PACKFORCING_DISABLE_PLUGINS", None)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "packforcing", *argv, "--no-progress"], capture_output=True, text=True, env=env, cwd=cwd
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((cwd / "out" / "mine" / "report.json").read_text())
    assert report["config"]["compressor"] == {"name": "every_nth", "stride": 2}
    # tiny_dit blocks are 4 x 4 x 4 tokens; every other frame keeps 2 x 4 x 4 of them
    mid = report["blocks"][-1]["tiers"]["mid"]
    assert mid["blocks"] > 0 and mid["tokens"] == mid["blocks"] * 32


def test_the_readmes_lazy_plugin_lists_without_importing_its_implementation(tmp_path, monkeypatch):
    """The "Writing a plugin" section's import-path registration: listed with its description,
    the implementation module (the section's compressor) imported only when the factory is used."""
    import importlib

    blocks = [b for b in re.findall(r"```py\n(.*?)```", section("Writing a plugin"), flags=re.S) if "@hookimpl" in b]
    implementation, lazy = blocks[0], next(b for b in blocks if "LazyFactory(" in b)
    (tmp_path / "my_plugin_impl.py").write_text(implementation)
    (tmp_path / "my_plugin_lazy.py").write_text(lazy)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_plugin_impl", "my_plugin_lazy"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    registry = Registry.create(entry_points=False, extra_plugins=[(importlib.import_module("my_plugin_lazy"), "lazy")])
    provided = registry.get("compressor", "every_nth")
    assert provided.description == "Keep every stride-th latent frame's tokens."
    assert "my_plugin_impl" not in sys.modules  # listed without importing it
    assert provided.factory.component.__name__ == "EveryNth" and "my_plugin_impl" in sys.modules
    sys.modules.pop("my_plugin_impl", None)
