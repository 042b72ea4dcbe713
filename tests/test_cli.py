"""The ``packforcing generate`` main job, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio
import pytest

from packforcing.cli import main


def test_generate_writes_video_report_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "generate",
            "--config",
            "configs/sink_recent.yaml",
            "--blocks",
            "6",
            "--seed",
            "3",
            "--out",
            str(out),
            "--set",
            "policy.window_frames=4",
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["policy"] == {"name": "sink_recent", "sink_frames": 8, "window_frames": 4, "page_blocks": 4}
    assert report["config"]["run"]["seed"] == 3
    assert [b["index"] for b in report["blocks"]] == list(range(6))
    for block in report["blocks"]:
        assert set(block) >= {"index", "seconds", "context_tokens", "cache_bytes", "tiers"}
        assert block["cache_bytes"] == sum(t["bytes"] for t in block["tiers"].values())
    assert report["peak_cache_bytes"] == max(b["cache_bytes"] for b in report["blocks"])
    assert report["total_seconds"] > 0
    reader = imageio.v2.get_reader(str(out / "video.mp4"))
    count = sum(1 for _ in reader)
    assert count == 6 * 4  # one pixel frame per latent frame
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_closing_line_names_every_file_written(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["generate", "--blocks", "2", "--out", str(out), "--set", "sampler.steps=1", "--no-progress"]
    assert main([*argv, "--save-latents"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    written = sorted(p.name for p in out.iterdir())
    assert written == ["latents.safetensors", "memory.png", "report.json", "video.mp4"]
    assert line.startswith("wrote ") and all(str(out / name) in line for name in written)
    # the seconds are the blocks' own generation time (report.json's total_seconds), said as such
    total = json.loads((out / "report.json").read_text())["total_seconds"]
    assert f": 2 blocks, {total:.1f} s generating, peak cache " in line


def test_config_error_is_one_line_with_exit_2(tmp_path, capsys):
    code = main(["generate", "--config", "configs/full.yaml", "--out", str(tmp_path), "--set", "policy.name=nope"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "policy.name" in err and "available:" in err and "full" in err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "packforcing", "generate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "example:" in result.stdout


@pytest.mark.parametrize("preset", ["full", "sliding_window", "sink_recent"])
def test_presets_load(preset):
    from packforcing import load_config

    config = load_config(f"configs/{preset}.yaml")
    assert config.components["policy"].name == preset


@pytest.mark.parametrize("blocks", [1, 7])
def test_memory_plot_draws_the_tiers_at_whole_block_indices(tmp_path, blocks):
    """memory.png shows the tiers for one block too (a bar: an area needs two points), and its
    x axis has whole block indices only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from packforcing.output.plot import plot_memory

    tiers = {"sink": {"bytes": 2**20}, "recent": {"bytes": 2**19}}
    report = {"blocks": [{"index": i, "tiers": tiers} for i in range(blocks)], "config": {"policy": {"name": "x"}}}
    shown = []
    original = plt.Figure.savefig

    def capture(fig, path, **kwargs):
        shown.extend(t for t in fig.axes[0].get_xticks() if -0.5 <= t <= blocks - 0.5)
        return original(fig, path, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt.Figure, "savefig", capture)
        plot_memory(report, tmp_path / "memory.png", 2**19)
    assert shown and all(float(t).is_integer() for t in shown)
    pixels = plt.imread(tmp_path / "memory.png")[..., :3]
    coloured = (pixels.max(-1) - pixels.min(-1)) > 0.3  # the tiers' fills, not white, grey or black
    assert np.count_nonzero(coloured) > 0.05 * coloured.size


@pytest.mark.parametrize("args", [["presets", "--json"], ["presets"]])
def test_a_reader_that_goes_away_stops_the_output_quietly(args):
    """``packforcing presets --json | head -1``: no 'Broken pipe' error when the reader has gone.
    The pipe's read end is closed before the command writes, so every write fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "packforcing", *args], stdout=write, stderr=subprocess.PIPE, env=env, timeout=60
        )
    finally:
        os.close(write)
    assert proc.returncode == 1 and proc.stderr == b""
    shell = subprocess.run(
        f"{sys.executable} -m packforcing {' '.join(args)} | head -1", shell=True, capture_output=True, env=env
    )
    assert shell.stderr == b"" and len(shell.stdout.splitlines()) == 1
