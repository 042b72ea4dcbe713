"""``generate --seconds`` / ``--prompt(s)`` / the CPU refusal, and the video-length arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import packforcing as pf
from packforcing.cli import main
from packforcing.output.video import blocks_for_seconds, latent_frame_of, pixel_frames

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "sink_recent.yaml")
TINY = [
    "--set",
    "model.hidden_size=32",
    "--set",
    "model.num_layers=2",
    "--set",
    "model.weights=null",
    "--set",
    "run.device=cpu",
]


@pytest.mark.parametrize(
    ("seconds", "fps", "fpb", "stride", "blocks"),
    [
        # Wan: 1,920 pixel frames need 1 + ceil(1919 / 4) = 481 latent frames (480 give 1,917): 161 blocks
        (120, 16, 3, 4, 161),
        (5, 16, 3, 4, 7),
        (1 / 16, 16, 3, 4, 1),
        (3, 16, 4, 1, 12),  # tiny_dit: one pixel frame per latent frame
    ],
)
def test_seconds_to_blocks(seconds, fps, fpb, stride, blocks):
    got = blocks_for_seconds(seconds, fps, fpb, stride)
    assert got == blocks
    # the decoded video is at least that long, and one block fewer would be shorter
    assert pixel_frames(got * fpb, stride) >= round(seconds * fps)
    assert got == 1 or pixel_frames((got - 1) * fpb, stride) < round(seconds * fps)


def test_latent_frame_of_a_moment():
    assert [latent_frame_of(s, 16, 4) for s in (0, 1 / 16, 4 / 16, 5 / 16, 5)] == [0, 1, 1, 2, 20]
    assert pixel_frames(21, 4) == 81  # Wan's 81-frame clip is 21 latent frames


def test_generate_seconds_records_both(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["generate", "--config", CONFIG, "--seconds", "1.5", "--out", str(out), "--no-progress", *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["video"] == {
        "seconds_requested": 1.5,
        "blocks": 6,
        "latent_frames": 24,
        "pixel_frames": 24,
        "fps": 16.0,
        "video_seconds": 1.5,
    }
    assert len(report["blocks"]) == 6 and report["config"]["run"]["blocks"] == 6


def test_text_prompts_for_a_model_without_text_are_refused_up_front(tmp_path, capsys):
    """tiny_dit takes scenes, not text: said so, not that a text encoder is missing (a model
    taking text without an encoder configured: tests/test_wan_end_to_end.py)."""
    code = main(["generate", "--config", CONFIG, "--prompt", "a fox", "--out", str(tmp_path / "o"), *TINY])
    assert code == 1 and capsys.readouterr().err == (
        "error: --prompt: model tiny_dit takes no text prompts (it takes scene)\n"
    )
    assert not (tmp_path / "o").exists()
    prompts = tmp_path / "p.yaml"
    prompts.write_text("- {from_block: 0, scene: 1}\n- {from_block: 2, prompt: a fox}\n")
    code = main(["generate", "--config", CONFIG, "--prompts", str(prompts), "--out", str(tmp_path / "o"), *TINY])
    assert code == 1 and capsys.readouterr().err == (
        f"error: {prompts}: [1].prompt: model tiny_dit takes no text prompts (it takes scene)\n"
    )
    unconditional = [*TINY, "--set", "model.num_conditions=0"]
    code = main(["generate", "--config", CONFIG, "--prompt", "a fox", "--out", str(tmp_path / "o"), *unconditional])
    assert code == 1 and "takes no text prompts (it takes no condition)" in capsys.readouterr().err


def test_a_models_plain_value_error_names_the_segment(tmp_path):
    """BlockModel.encode_condition refuses a spec with ``ValueError("<key>: ...")`` (its documented
    contract; tiny_dit raises a ParamError): the check before a run locates it in run.prompts or
    the prompt file as for the built-ins (a config error, exit status 2), not as a bare line."""
    from packforcing.cli.generate import check_given_conditions
    from packforcing.core.errors import ConfigError

    class PaletteModel:
        condition_keys = frozenset({"palette"})

        def encode_condition(self, spec):
            raise ValueError(f"palette: expected an integer in [0, 4), got {spec['palette']}")

    config = pf.load_config(CONFIG)
    segments = [{"from_block": 0, "palette": 1}, {"from_block": 2, "palette": 9}]
    with pytest.raises(ConfigError) as caught:
        check_given_conditions(PaletteModel(), segments, None, config)
    assert caught.value.path == "run.prompts[0]" and caught.value.message == (
        "palette: expected an integer in [0, 4), got 1"
    )
    with pytest.raises(ValueError, match=r"^p\.yaml: \[0\]: palette: expected an integer in \[0, 4\), got 1$"):
        check_given_conditions(PaletteModel(), segments, "p.yaml", config)


def test_a_segment_without_a_condition_is_checked_as_the_engine_runs_it():
    """A segment holding only ``from_block`` runs unconditioned: the engine encodes it as
    ``encode_condition(None)`` (a spec-less segment is ``None``), so the check before a run
    passes it ``None`` too, not ``{}`` (which Wan's adapter refuses: no ``embeds``)."""
    from packforcing.core.conditions import check_given_conditions

    seen = []

    class WanLike:
        condition_keys = frozenset({"embeds"})

        def encode_condition(self, spec):
            seen.append(spec)
            if spec is not None and "embeds" not in spec:
                raise ValueError("embeds: required key is missing")

    check_given_conditions(WanLike(), [{"from_block": 0}, {"from_block": 2, "embeds": "e.safetensors"}], None, None)
    assert seen == [None, {"embeds": "e.safetensors"}]


def test_bad_prompt_file_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "p.yaml"
    prompts.write_text("- {from_second: 1, prompt: a}\n")
    code = main(["generate", "--config", CONFIG, "--prompts", str(prompts), "--out", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err
    assert (
        code == 1 and err.count("\n") == 1 and f"{prompts}: [0].from_second: the first segment must start at 0" in err
    )


def test_a_prompt_file_of_the_models_own_conditions(tmp_path, capsys):
    """--prompts FILE takes the model's condition keys as run.prompts does (tiny_dit: scene),
    with from_second converted as for text; a bad key or value is one line naming the file."""
    prompts = tmp_path / "scenes.yaml"
    prompts.write_text("- {from_second: 0, scene: 2}\n- {from_second: 0.5, scene: 5}\n")
    out = tmp_path / "o"
    argv = ["generate", "--blocks", "4", "--out", str(out), "--no-progress", "--set", "sampler.steps=1"]
    assert main([*argv, "--prompts", str(prompts)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["conditions"] == [{"from_block": 0, "scene": 2}, {"from_block": 2, "scene": 5}]
    assert [b["condition"] for b in report["blocks"]] == [{"scene": 2}] * 2 + [{"scene": 5}] * 2
    capsys.readouterr()
    for segment, problem in [
        ("{from_block: 0, scene: 9}", "[0].scene: expected an integer in [0, 8), got 9"),
        ("{from_block: 0, sene: 1}", "[0].sene: unknown condition key (tiny_dit takes 'scene')"),
        ("{from_block: 0, prompt: a, scene: 1}", "[0]: give prompt or embeds alone, or the model's condition keys"),
        ("{from_block: 0}", "[0]: give the segment's condition"),
    ]:
        prompts.write_text(f"- {segment}\n")
        assert main([*argv, "--overwrite", "--prompts", str(prompts)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {prompts}: {problem}"), err


def test_full_size_model_on_the_cpu_is_refused_up_front(tmp_path, capsys):
    wan_sized = [
        "--set", "model.hidden_size=1536", "--set", "model.num_heads=12", "--set", "model.num_layers=30",
        "--set", "model.latent_height=60", "--set", "model.latent_width=104", "--set", "run.device=cpu",
        "--set", "model.weights=null",
    ]  # fmt: skip
    code = main(["generate", "--config", CONFIG, "--seconds", "120", "--out", str(tmp_path / "o"), *wan_sized])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "min per block on a CPU" in err and "--force" in err and "6,240 tokens per block" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("config", "stride"),
    [
        ("configs/wan2.1-1.3b/packforcing.yaml", 4),  # the Wan adapter's VAE
        ("configs/wan1.3b/packforcing.yaml", 4),  # a shapes-only preset declares the same stride
        ("configs/packforcing.yaml", 1),  # tiny_dit's codec
    ],
)
def test_plan_counts_seconds_as_generate_does(capsys, config, stride):
    """``plan --seconds S`` plans exactly the blocks ``generate --seconds S`` makes (the model's
    own VAE stride, the causal 1 + stride·k rule): 120 s of Wan is 481 latent frames, not 480."""
    from packforcing.core.build import build_for_planning
    from packforcing.core.geometry import temporal_stride_of

    env = build_for_planning(pf.load_config(ROOT / config))
    assert temporal_stride_of(env.model) == stride
    fpb = env.geometry.frames_per_block
    for seconds in (1, 5, 120):
        assert main(["plan", "--config", str(ROOT / config), "--seconds", str(seconds), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        blocks = blocks_for_seconds(seconds, 16, fpb, stride)
        assert data["latent_frames"] == pixel_frames_inverse(seconds * 16, stride)
        assert -(-data["latent_frames"] // fpb) == blocks
        assert pf.plan(ROOT / config, seconds, 16).num_blocks == blocks


def pixel_frames_inverse(pixels: int, stride: int) -> int:
    """The fewest latent frames decoding to at least ``pixels`` pixel frames."""
    latent = 1
    while pixel_frames(latent, stride) < pixels:
        latent += 1
    return latent


def test_blocks_and_seconds_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--blocks", "3", "--seconds", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "argument --seconds: not allowed with argument --blocks" in err
    assert not (tmp_path / "o").exists()
