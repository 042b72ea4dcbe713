"""Presets shipped in the package, the command line from any directory, start-up, CPU threads."""

from __future__ import annotations

import gc
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import packforcing as pf
from packforcing import presets
from packforcing.cli import main
from packforcing.core.geometry import Geometry
from packforcing.core.threads import WORK_PER_THREAD, auto_threads, block_work

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "packforcing", *argv], capture_output=True, text=True, cwd=cwd, env=env
    )


# ---------------------------------------------------------------------- presets
def test_the_packaged_presets_are_the_repository_configs():
    """One source: the package's presets directory is this repository's configs/ (no copies)."""
    assert presets.directory().resolve() == (ROOT / "configs").resolve()
    files = sorted(
        p.relative_to(ROOT / "configs").with_suffix("").as_posix() for p in (ROOT / "configs").rglob("*.yaml")
    )
    assert presets.names() == files
    assert {"packforcing", "full", "sliding_window", "sink_recent", "wan1.3b/packforcing"} <= set(files)
    assert presets.DEFAULT == "packforcing"


def test_a_preset_name_loads_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = pf.load_config("sink_recent", ["policy.window_frames=16"])
    assert config.components["policy"].name == "sink_recent"
    assert config.components["policy"].params.window_frames == 16
    assert pf.load_config("wan1.3b/packforcing.yaml").components["model"].name == "geometry"


def test_an_existing_file_wins_over_a_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "full").write_text("policy: {name: sliding_window, window_frames: 8}\n")
    assert pf.load_config("full").components["policy"].name == "sliding_window"


def test_a_copied_preset_and_extends_by_preset_name_load_from_any_directory(tmp_path, monkeypatch):
    """The README's "copy one to start your own config, or `extends:` it": a copy of
    sink_recent.yaml (which extends full.yaml) and a file extending `sink_recent` by name load
    outside the repository; a file beside the config still wins over the preset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text(presets.path("sink_recent").read_text())
    copied = pf.load_config("mine.yaml")
    assert copied.resolved() == pf.load_config("sink_recent").resolved()
    (tmp_path / "child.yaml").write_text("extends: sink_recent\npolicy: {window_frames: 16}\n")
    child = pf.load_config("child.yaml")
    assert child.components["policy"].name == "sink_recent"
    assert child.components["policy"].params.window_frames == 16
    assert child.source_of("policy.sink_frames").endswith("sink_recent.yaml")
    (tmp_path / "full.yaml").write_text("run: {threads: 2}\n")
    beside = pf.load_config("mine.yaml")
    assert beside.run.threads == 2 and beside.source_of("run.threads") == "full.yaml"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("packforcng", "packforcng: file not found (did you mean the preset 'packforcing'?)"),
        ("zzz", "zzz: file not found (nor a preset: see 'packforcing presets')"),
    ],
)
def test_a_missing_config_says_so_and_names_presets(tmp_path, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pf.ConfigError) as info:
        pf.load_config(name)
    assert str(info.value) == message


def test_generate_with_no_config_runs_the_default_preset_outside_the_repository(tmp_path):
    result = run_cli(
        "generate", "--blocks", "3", "--out", "out", "--no-progress", "--set", "sampler.steps=1", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["policy"]["name"] == "packforcing" and len(report["blocks"]) == 3
    assert (tmp_path / "out" / "video.mp4").stat().st_size > 0


def test_presets_verb_lists_names_and_files(capsys):
    assert main(["presets", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(presets.names())
    assert rows["packforcing"]["description"].startswith("PackForcing")
    assert Path(rows["sink_recent"]["path"]).read_text() == (ROOT / "configs" / "sink_recent.yaml").read_text()
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("packforcing ") and line.endswith("(default)") for line in lines)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"packforcing {pf.__version__}"


def test_every_help_example_of_generate_and_plan_is_valid(capsys):
    """The examples in --help run against the default config (here: validated, nothing generated)."""
    from packforcing.cli import build_parser
    from packforcing.cli.generate import EXAMPLE as GENERATE
    from packforcing.cli.plan import EXAMPLE as PLAN

    parser = build_parser()
    text = (GENERATE + PLAN).replace("\\\n", " ")  # join continued lines
    commands = [shlex.split(line, comments=True) for line in text.splitlines() if line.startswith("  packforcing")]
    assert len(commands) >= 5
    for command in commands:
        args = parser.parse_args(command[1:])
        if args.config == "my.yaml" or any("model.path=" in o for o in args.overrides):
            continue  # placeholders (a file of your own, a checkpoint)
        overrides = list(args.overrides)
        assert main(["validate", args.config, *(f"--set={o}" for o in overrides)]) == 0, command
    assert "--set policy.recent_frames=8" in GENERATE
    help_text = parser._subparsers._group_actions[0].choices["generate"].format_help()
    assert "policy.recent_frames=8" in help_text


# ---------------------------------------------------------------------- start-up
def test_help_and_version_do_not_import_torch():
    code = (
        "import sys\n"
        "from packforcing.cli import build_parser\n"
        "build_parser().format_help()\n"
        "import packforcing\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stderr


def test_plugins_presets_help_and_version_verbs_do_not_import_torch(tmp_path):
    """``plugins`` lists the built-ins from the hook table (each imported only when a config uses
    it); ``presets``, ``--help`` and ``--version`` read files: none of them imports torch. (Other
    installed plugin distributions are disabled: their modules may import what they like.)"""
    code = (
        "import contextlib, io, sys\n"
        "from packforcing.cli import main\n"
        "outputs = []\n"
        "for argv in (['plugins'], ['plugins', '--kind', 'compressor', '--json'], ['presets'], ['--help'], "
        "['plan', '--help'], ['validate', '--help'], ['--version']):\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            code = main(argv)\n"
        "        except SystemExit as exit:\n"
        "            code = exit.code\n"
        "    assert code == 0 and out.getvalue(), (argv, code)\n"
        "    assert 'torch' not in sys.modules, f'{argv} imported torch'\n"
        "    outputs.append(out.getvalue())\n"
        "assert 'tiny_dit' in outputs[0] and 'temporal_rope_shift' in outputs[0], outputs[0]\n"
        "assert '\"pool\"' in outputs[1] and '\"dual_branch\"' in outputs[1], outputs[1]\n"
    )
    others = {ep.dist.name for ep in importlib.metadata.entry_points(group="packforcing") if ep.dist is not None}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PACKFORCING_DISABLE_PLUGINS": ",".join(sorted(others))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr


def test_a_torch_verb_freezes_the_collector_only_when_it_imports_torch(tmp_path, capsys):
    """``plan``/``validate`` in a fresh process freeze what importing torch left tracked by the
    garbage collector (start-up time, see ``import_torch``); the collector stays on, and a process
    that had torch already (this one) is left alone."""
    code = (
        "import contextlib, gc, io, sys\n"
        "from packforcing.cli import main\n"
        "assert 'torch' not in sys.modules and gc.get_freeze_count() == 0\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['validate', 'packforcing']) == 0\n"
        "frozen = gc.get_freeze_count()\n"
        "assert frozen > 10_000 and gc.isenabled(), frozen\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['plan', '--config', 'packforcing', '--seconds', '1']) == 0\n"
        "assert gc.get_freeze_count() == frozen, (gc.get_freeze_count(), frozen)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    before = gc.get_freeze_count()
    assert main(["validate", "packforcing"]) == 0
    assert gc.get_freeze_count() == before
    capsys.readouterr()


# ---------------------------------------------------------------------- threads
def geometry(latent: int, hidden: int, heads: int, layers: int = 4) -> Geometry:
    return Geometry(
        latent_height=latent,
        latent_width=latent,
        num_layers=layers,
        num_heads=heads,
        head_dim=hidden // heads,
        dtype="float32",
    )


def test_auto_threads_follow_the_measured_rule():
    tiny = geometry(8, 64, 2)
    assert block_work(tiny) == 64 * 64 * 64 * 4  # 64 tokens per block, hidden 64, 4 layers
    cpu = torch.device("cpu")
    assert auto_threads(tiny, cpu, cores=2) == 1
    assert auto_threads(tiny, cpu, cores=64) == 1
    big = geometry(64, 1024, 16, layers=30)
    assert block_work(big) >= 8 * WORK_PER_THREAD
    assert auto_threads(big, cpu, cores=4) == 4  # bounded by the cores
    assert auto_threads(big, cpu, cores=1) == 1


def test_run_threads_is_validated_and_applied(torch_single_thread):
    with pytest.raises(pf.ConfigError, match=r"^--set: run.threads: expected an integer >= 1 or auto, got 0$"):
        pf.load_config("sink_recent", ["run.threads=0"])
    assert pf.load_config("sink_recent").run.threads == "auto"
    pf.build_engine(pf.load_config("sink_recent", ["run.threads=2", "run.device=cpu"]))
    assert torch.get_num_threads() == 2
    pf.build_engine(pf.load_config("sink_recent", ["run.device=cpu"]))
    assert torch.get_num_threads() == 1  # auto, tiny_dit
