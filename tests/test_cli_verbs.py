"""The ``plan``, ``plugins`` and ``validate`` verbs, help texts and one-line errors."""

from __future__ import annotations

import json
import re
import shlex
import types
from pathlib import Path

import attrs
import pytest
import torch

import packforcing as pf
from packforcing.cli import VERBS, build_parser, main
from packforcing.core.interfaces import Compressor
from packforcing.core.records import CompressedKV
from packforcing.plugins import ComponentFactory, hookimpl
from packforcing.plugins.manager import Registry

ROOT = Path(__file__).resolve().parent.parent
WAN = ROOT / "configs" / "wan1.3b" / "packforcing.yaml"


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def use_registry(monkeypatch, registry: Registry) -> None:
    import packforcing.plugins.manager as manager

    monkeypatch.setattr(manager, "default_registry", lambda: registry)


# ---------------------------------------------------------------------- help
@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_an_example(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "example:" in text and f"packforcing {verb}" in text.split("example:")[1]
    for command in example_commands(text.split("example:")[1]):
        build_parser().parse_args(command)  # every example is a valid command line


def example_commands(text: str) -> list[list[str]]:
    """The ``packforcing ...`` command lines of a help text's examples, continuation lines
    (``\\`` at the end) joined, as argument lists without ``packforcing`` and ``VAR=value``."""
    commands, pending = [], ""
    for line in text.splitlines():
        assert not re.search(r"\S {4,}--", line), f"a line continuation was lost: {line!r}"
        line = pending + line.strip()
        if not re.match(r"([A-Z_]+=\S* )*packforcing [a-z-]+( |$)", line):
            pending = ""
            continue  # prose
        pending = line[:-1] + " " if line.endswith("\\") else ""
        words = shlex.split(line, comments=True) if not pending else []
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words.pop(0)
        if words[:1] == ["packforcing"]:
            commands.append(words[1:])
    assert commands
    return commands


def test_top_level_help_lists_every_verb(capsys):
    text = build_parser().format_help()
    assert all(verb in text for verb in VERBS) and "examples:" in text
    for command in example_commands(text.split("examples:")[1]):
        build_parser().parse_args(command)
    code, out, _ = run(capsys)  # no verb: the help, and status 2
    assert code == 2 and "VERB" in out


# ---------------------------------------------------------------------- plan
def test_plan_json_for_the_tiny_model(capsys):
    code, out, _ = run(capsys, "plan", "--config", "configs/sliding_window.yaml", "--seconds", "10", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {
        "seconds",
        "fps",
        "latent_frames",
        "tokens_per_frame",
        "bytes_per_token",
        "context_tokens",
        "peak_cache_bytes",
        "full_cache_bytes",
        "ratio",
        "archive_bytes",
        "archive_device",
        "archive_max_blocks",
    }
    assert (data["archive_bytes"], data["archive_device"], data["archive_max_blocks"]) == (0, None, None)  # drops
    engine = pf.build_engine("configs/sliding_window.yaml")
    g = engine.geometry
    assert (data["seconds"], data["fps"]) == (10.0, 16.0)
    assert data["latent_frames"] == 160  # tiny_dit's codec decodes one pixel frame per latent frame
    assert data["tokens_per_frame"] == g.tokens_per_frame and data["bytes_per_token"] == g.bytes_per_token
    blocks = data["latent_frames"] // g.frames_per_block
    assert data["full_cache_bytes"] == blocks * g.tokens_per_block * g.bytes_per_token
    # the window holds 12 frames = 3 blocks; the planner counts allocated pages (4 slots)
    assert data["context_tokens"] == 3 * g.tokens_per_block
    assert data["peak_cache_bytes"] == pf.plan("configs/sliding_window.yaml", 10, 16).bytes
    assert data["ratio"] == pytest.approx(data["peak_cache_bytes"] / data["full_cache_bytes"])


def test_plan_json_help_names_every_key_it_prints(capsys):
    """``plan --help`` lists the ``--json`` object's keys: all of them, the archive's included."""
    code, out, _ = run(capsys, "plan", "--config", "packforcing", "--seconds", "10", "--json")
    assert code == 0
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    listed = help_text.split("print one JSON object with keys ")[1].split(" --set")[0]
    assert [key.strip() for key in listed.split(",")] == list(json.loads(out))


def test_plan_peak_matches_a_real_run(capsys):
    code, out, _ = run(capsys, "plan", "--config", "configs/sink_recent.yaml", "--seconds", "2", "--json",
                       "--set", "run.device=cpu")  # fmt: skip
    assert code == 0
    data = json.loads(out)
    blocks = -(-data["latent_frames"] // 4)
    engine = pf.build_engine(pf.load_config("configs/sink_recent.yaml", ["run.device=cpu", "sampler.steps=1"]))
    peak = max(b.stats.bytes for b in engine.generate(blocks))
    assert data["peak_cache_bytes"] == peak


@pytest.mark.skipif(not WAN.exists(), reason="configs/wan1.3b presets not present")
def test_plan_wan_packforcing_matches_the_papers_numbers(capsys):
    code, out, _ = run(capsys, "plan", "--config", str(WAN.relative_to(ROOT)), "--seconds", "120", "--json")
    assert code == 0
    data = json.loads(out)
    # 1,920 pixel frames need 481 latent frames (Wan's VAE: 1 + 4k), 121 blocks of 4, as generate counts
    assert data["latent_frames"] == 481 and data["tokens_per_frame"] == 1560 and data["bytes_per_token"] == 184_320
    assert data["full_cache_bytes"] == 121 * 6240 * 184_320  # ~139 GB (the paper's ~138 GB counts 480 frames)
    assert data["context_tokens"] == 21_632
    kv_bytes = 21_632 * 184_320  # ~3.99 GB of K/V
    latents = 16 * 4 * 60 * 104 * 2  # plus the clean latents of one recent block, kept for dual_branch
    assert kv_bytes <= data["peak_cache_bytes"] <= kv_bytes + latents
    code, table, _ = run(capsys, "plan", "--config", str(WAN.relative_to(ROOT)), "--seconds", "120")
    lines = table.splitlines()
    assert any(line.split()[:1] == ["sink"] and "12,480" in line for line in lines)
    total = next(line for line in lines if line.startswith("total"))
    assert "21,632" in total and f"{data['peak_cache_bytes']:,}" in total and "3.99 GB" in total
    assert any(line.startswith("full cache") and "139.17 GB" in line for line in lines)
    assert "34.9x smaller" in table


def test_plan_table_lists_every_tier_and_the_archive(capsys, tmp_path):
    config = tmp_path / "archive.yaml"
    config.write_text(
        "extends: " + str(ROOT / "configs" / "full.yaml") + "\n"
        "policy:\n  name: tiered\n  overflow: archive\n  tiers:\n"
        "    - {name: sink, frames: 4, pinned: true}\n    - {name: recent, frames: 8}\n"
    )
    # an explicit VAE stride overrides the model's (tiny_dit's codec: 1 pixel frame per latent frame)
    code, out, _ = run(capsys, "plan", "--config", str(config), "--seconds", "20", "--fps", "8",
                       "--pixel-frames-per-latent", "4")  # fmt: skip
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line and line.split()[0] in ("sink", "recent")}
    assert set(rows) == {"sink", "recent"}
    assert any(line.startswith("archive*") for line in out.splitlines())
    assert "20 s at 8 fps = 41 latent frames = 11 blocks of 4 frames" in out  # 160 pixel frames: 1 + 4 * 40
    archive = next(line for line in out.splitlines() if line.startswith("archive*")).split()
    assert archive[1] == "8"  # 11 blocks: 1 in the sink, 2 recent, 8 archived
    where = {
        "auto": "pinned host memory when generating on CUDA, else beside the cache",
        "pinned": "pinned host memory",
        "cpu": "host memory",
        "cuda:1": "cuda:1 memory",
    }
    for device, text in where.items():
        code, out, _ = run(capsys, "plan", "--config", str(config), "--seconds", "20", "--set",
                           f"policy.archive_device={device}", "--set", "policy.archive_max_blocks=3")  # fmt: skip
        assert code == 0
        assert f"archive: in {text} (archive_device: {device}), at most 3 blocks" in out.splitlines()


def test_plan_config_error_is_one_line(capsys):
    code, out, err = run(capsys, "plan", "--config", "configs/full.yaml", "--seconds", "10", "--set", "run.fps=-1")
    assert code == 2 and out == ""
    assert err.strip() == "error: --set: run.fps: expected a number > 0, got -1.0"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "--config", "configs/full.yaml", "--seconds", "-3"], "--seconds: expected a number > 0, got '-3'"),
        (["plan", "--config", "configs/full.yaml", "--seconds", "nan"], "--seconds: expected a number > 0, got 'nan'"),
        (["plan", "--config", "full", "--seconds", "1", "--fps", "inf"], "--fps: expected a number > 0, got 'inf'"),
        (["generate", "--seconds", "0", "--out", "x"], "--seconds: expected a number > 0, got '0'"),
        (["sweep", "full", "--seconds", "-2", "--out", "x"], "--seconds: expected a number > 0, got '-2'"),
        (["sweep", "full", "--blocks", "0", "--out", "x"], "--blocks: expected an integer >= 1, got '0'"),
        (["sweep", "full", "--cpus-per-job", "-1", "--out", "x"], "--cpus-per-job: expected a number >= 0, got '-1'"),
        (["sweep", "full", "--gpus-per-job", "inf", "--out", "x"], "--gpus-per-job: expected a number >= 0, got 'inf'"),
        (["generate", "--prompt", " ", "--out", "x"], "--prompt: expected a non-empty text, got ' '"),
        (
            ["plan", "--config", "full", "--seconds", "1", "--pixel-frames-per-latent", "0"],
            "--pixel-frames-per-latent: expected an integer >= 1, got '0'",
        ),
    ],
)
def test_bad_numeric_arguments_are_one_usage_error(capsys, argv, message):
    """Every verb's numeric options are checked by the same argument types: exit 2 and one line
    naming the option, before anything is loaded."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: argument {message}")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--blocks", "2"], "generate: error: --out DIR is required (or --resume DIR)"),
        (["generate", "--resume", "r", "--out", "elsewhere"],
         "generate: error: give --resume DIR alone (the run directory), or --out equal to it"),
        (["generate", "--resume", "r", "--config", "full", "--seconds", "2"],
         "generate: error: --resume continues the run as it was started: drop --config, --seconds"),
        (["generate", "--resume", "r", "--overwrite"],
         "generate: error: --resume continues the run as it was started: drop --overwrite"),
        (["sweep", "full", "--local-cpus", "2", "--address", "head:6379", "--out", "x"],
         "sweep: error: --local-cpus applies to a local Ray instance, not to --address"),
    ],
)  # fmt: skip
def test_options_that_do_not_go_together_are_a_usage_error(capsys, tmp_path, argv, message):
    """Options each fine alone but not together are refused as argparse refuses a bad option:
    the verb's usage, then ``packforcing VERB: error: ...``, exit 2, before anything is loaded
    or written. They were one line with exit 1, as for a failed run."""
    argv = [str(tmp_path / a) if a in ("r", "x", "elsewhere") else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: packforcing {argv[0]}") and err.splitlines()[-1] == f"packforcing {message}"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- plugins
def test_plugins_table_lists_builtins_with_distribution_and_version(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "DESCRIPTION"]
    rows = {tuple(line.split()[:2]): line.split()[2:4] for line in lines[1:]}
    assert rows[("policy", "sink_recent")] == ["packforcing", pf.__version__]
    assert ("model", "tiny_dit") in rows and ("backend", "sdpa") in rows


def test_plugins_json_and_kind_filter_include_a_plugin(capsys, monkeypatch):
    extra = types.ModuleType("extra")
    extra.packforcing_compressors = hookimpl(
        lambda: {"nan": ComponentFactory(NanParams, lambda p, env: NanCompressor())}
    )
    extra.packforcing_selectors = hookimpl(lambda: None)  # broken: listed as a problem
    use_registry(monkeypatch, Registry.create(entry_points=False, extra_plugins=[(extra, "extra-dist")]))
    code, out, err = run(capsys, "plugins", "--kind", "compressor", "--json")
    assert code == 0
    rows = json.loads(out)
    assert {r["kind"] for r in rows} == {"compressor"}
    nan = next(r for r in rows if r["name"] == "nan")
    assert nan["distribution"] == "extra-dist" and set(nan) == {
        "kind",
        "name",
        "distribution",
        "version",
        "description",
    }
    problems = [line for line in err.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and "extra-dist" in problems[0] and "packforcing_selectors" in problems[0]


# ---------------------------------------------------------------------- validate
def test_validate_ok(capsys):
    code, out, err = run(capsys, "validate", "configs/full.yaml", "configs/sink_recent.yaml")
    assert code == 0 and err == ""
    assert out.splitlines() == ["configs/full.yaml: OK", "configs/sink_recent.yaml: OK"]


def test_validate_reports_each_bad_config_on_one_line(capsys, tmp_path):
    bad_type = tmp_path / "bad_type.yaml"
    bad_type.write_text("policy: {name: sliding_window, window_frames: [8]}\n")
    bad_syntax = tmp_path / "bad_syntax.yaml"
    bad_syntax.write_text("policy:\n  name: full\n   page_blocks: 2\n")
    small = tmp_path / "small_window.yaml"
    small.write_text("policy: {name: sliding_window, window_frames: 1}\n")  # found when building
    code, out, err = run(capsys, "validate", "configs/full.yaml", str(bad_type), str(bad_syntax), str(small))
    assert code == 2
    assert out.splitlines() == ["configs/full.yaml: OK"]
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert lines[0] == f"error: {bad_type}: policy.window_frames: expected an integer, got [8]"
    assert lines[1].startswith(f"error: {bad_syntax}:3: invalid YAML")
    assert lines[2] == f"error: {small}: policy.window_frames: 1 frames is smaller than one block (4 frames)"


def test_validate_checks_run_prompts_with_the_model(capsys, tmp_path):
    """A condition the model refuses, or text for a model that takes none, is found by validate
    (as generate would find it before running), located at its run.prompts entry."""
    scene = tmp_path / "scene.yaml"
    scene.write_text("extends: sink_recent\nrun:\n  prompts: [{from_block: 0, scene: 1}, {from_block: 3, scene: 99}]\n")
    text = tmp_path / "text.yaml"
    text.write_text("extends: sink_recent\nrun:\n  prompts: [{from_block: 0, prompt: a red fox}]\n")
    good = tmp_path / "good.yaml"
    good.write_text("extends: sink_recent\nrun:\n  prompts: [{from_block: 0, scene: 1}, {from_block: 3, scene: 7}]\n")
    code, out, err = run(capsys, "validate", str(scene), str(text), str(good))
    assert code == 2 and out.splitlines() == [f"{good}: OK"]
    assert err.splitlines() == [
        f"error: {scene}: run.prompts[1].scene: expected an integer in [0, 8), got 99",
        f"error: {text}: run.prompts[0].prompt: model tiny_dit takes no text prompts (it takes scene)",
    ]


def test_validate_a_directory_and_overrides(capsys):
    code, out, err = run(capsys, "validate", "configs", "--set", "run.device=cpu")
    names = [line.split(": OK")[0] for line in out.splitlines()]
    assert all(": OK" in line for line in out.splitlines())
    assert "configs/full.yaml" in names and "configs/sliding_window.yaml" in names
    plan_only = {line.split(": OK")[0] for line in out.splitlines() if "plans memory only, cannot generate" in line}
    assert "configs/wan1.3b/full.yaml" in plan_only and "configs/full.yaml" not in plan_only
    expected = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
    assert sorted(names + [line.split(": ")[1] for line in err.splitlines()]) == expected
    assert code == (2 if err else 0)


def test_validate_missing_file(capsys):
    code, _, err = run(capsys, "validate", "configs/nope.yaml")
    assert code == 2 and err.strip() == "error: configs/nope.yaml: file not found"


def test_debug_shows_the_traceback():
    with pytest.raises(pf.ConfigError):
        main(["validate", "--debug", "configs/nope.yaml"])
    with pytest.raises(pf.ConfigError):
        main(["--debug", "plan", "--config", "configs/nope.yaml", "--seconds", "1"])


# ---------------------------------------------------------------------- non-finite values
@attrs.frozen
class NanParams:
    pass


class NanCompressor(Compressor):
    """Returns NaN keys: the cache must refuse them."""

    name = "nan"

    def output_grid(self, grid):
        return grid

    def compress(self, block, model):
        keys = [torch.full_like(k, float("nan")) for k in block.keys]
        return CompressedKV(block.grid, block.temporal_stride, block.position, keys, list(block.values))


def test_non_finite_values_from_a_plugin_are_refused_in_one_line(capsys, monkeypatch, tmp_path):
    plugin = types.ModuleType("nan_plugin")
    plugin.packforcing_compressors = hookimpl(
        lambda: {"nan": ComponentFactory(NanParams, lambda p, env: NanCompressor())}
    )
    use_registry(monkeypatch, Registry.create(entry_points=False, extra_plugins=[(plugin, "nan-dist")]))
    config = tmp_path / "nan.yaml"
    config.write_text(
        "model: {name: tiny_dit, hidden_size: 16, num_heads: 2, num_layers: 1, latent_height: 4, latent_width: 4}\n"
        "policy:\n  name: tiered\n  tiers:\n    - {name: mid, blocks: 2, fidelity: compressed}\n"
        "    - {name: recent, blocks: 1}\n"
        "compressor: nan\nbackend: sdpa\nsampler: {steps: 1}\nrun: {device: cpu}\n"
    )
    argv = ["generate", "--config", str(config), "--blocks", "4", "--out", str(tmp_path / "out"), "--no-progress"]
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("error: compressor 'nan' (distribution nan-dist), block 0: tier 'mid': ")
    assert err.strip().endswith("contains non-finite values (NaN/Inf)")
    from packforcing.core.errors import PluginError

    with pytest.raises(PluginError):
        main([*argv, "--debug", "--overwrite"])


# ---------------------------------------------------------------------- validate: plugins that fail
class RaisingCompressor(NanCompressor):
    """A constructor that raises: the plugin fails while the config is built."""

    def __init__(self) -> None:
        raise KeyError("missing")


def test_validate_reports_a_plugin_that_fails_as_a_bad_config_and_goes_on(capsys, monkeypatch, tmp_path):
    """A config naming a plugin that cannot be imported (registered by import path) or that raises
    while built is one line naming the config and the plugin; the configs after it are still
    checked, and the status is validate's for a bad config, 2."""
    from packforcing.plugins import LazyFactory

    plugin = types.ModuleType("broken_plugin")
    plugin.packforcing_compressors = hookimpl(
        lambda: {
            "gone": LazyFactory("no_such_plugin_module:Thing", "a module that is not installed"),
            "raising": ComponentFactory(NanParams, lambda p, env: RaisingCompressor()),
        }
    )
    use_registry(monkeypatch, Registry.create(entry_points=False, extra_plugins=[(plugin, "broken-dist")]))
    configs = []
    for name in ("gone", "raising"):
        configs.append(tmp_path / f"{name}.yaml")
        configs[-1].write_text(f"extends: packforcing\ncompressor: {name}\n")
    code, out, err = run(capsys, "validate", *map(str, configs), "configs/full.yaml")
    assert code == 2
    assert out.splitlines() == ["configs/full.yaml: OK"]
    lines = err.splitlines()
    assert len(lines) == 2
    who = "(distribution broken-dist)"
    assert lines[0].startswith(f"error: {configs[0]}: compressor 'gone' {who}: cannot be loaded from no_such_plugin")
    assert lines[1] == f"error: {configs[1]}: compressor 'raising' {who}: raised KeyError: 'missing'"
