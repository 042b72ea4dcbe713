"""The README's commands and Python example stay true."""

from __future__ import annotations

import re
from pathlib import Path

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
