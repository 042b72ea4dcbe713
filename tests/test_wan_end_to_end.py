"""Wan end to end on the CPU: a tiny random diffusers pipeline folder (transformer, VAE, UMT5
text encoder, tokenizer), text prompts with a switch, --seconds, the MP4 streamed through the VAE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from packforcing.cli import main
from packforcing.models.wan.text import load_prompt_embeds
from packforcing.output.video import pixel_frames

from .tiny_wan_io import write_tiny_pipeline
from .wan_fixtures import tiny_transformer, write_diffusers

pytestmark = pytest.mark.usefixtures("torch_single_thread")
FPB = 2


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("wan") / "Wan2.1-tiny-Diffusers")


def wan_config(folder: Path, root: Path, **model) -> Path:
    config = {
        "model": {
            "name": "wan",
            "path": str(root),
            "frames_per_block": FPB,
            "latent_height": 4,
            "latent_width": 6,
            **model,
        },
        "policy": {"name": "sink_recent", "sink_frames": FPB, "window_frames": 2 * FPB},
        "backend": "sdpa",
        "sampler": {"name": "self_forcing"},
        "text_encoder": {"max_length": 16},
        "run": {"device": "cpu", "dtype": "float32", "fps": 16},
    }
    path = folder / "wan.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_text_prompts_to_a_streamed_mp4(tmp_path, pipeline):
    import imageio.v2 as imageio

    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(
        yaml.safe_dump(
            [{"from_second": 0, "prompt": "a red fox running"}, {"from_second": 0.5, "prompt": "a blue whale"}]
        )
    )
    out = tmp_path / "out"
    argv = ["generate", "--config", str(wan_config(tmp_path, pipeline)), "--prompts", str(prompts)]
    assert main([*argv, "--seconds", "1", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    # 1 s at 16 fps = 16 frames <= 1 + 4 (k - 1): k = 5 latent frames -> 3 blocks of 2
    assert report["video"] == {
        "seconds_requested": 1.0,
        "blocks": 3,
        "latent_frames": 6,
        "pixel_frames": 21,
        "fps": 16.0,
        "video_seconds": 21 / 16,
    }
    # 0.5 s = pixel frame 8, in latent frame 2 = block 1
    starts = [seg["from_block"] for seg in report["conditions"]]
    assert starts == [0, 1] and report["prompts"][1] == {"from_block": 1, "prompt": "a blue whale"}
    assert [b["condition"]["embeds"] for b in report["blocks"]] == [
        report["conditions"][i]["embeds"] for i in (0, 1, 1)
    ]
    embeds, text = load_prompt_embeds(report["conditions"][1]["embeds"])
    assert text == "a blue whale" and embeds.shape == (16, 32)
    reader = imageio.get_reader(str(out / "video.mp4"))
    count = sum(1 for _ in reader)
    first = reader.get_data(0)
    reader.close()
    assert count == pixel_frames(6, 4) == 21
    assert first.shape == (32, 48, 3)


def test_the_text_encoder_is_freed_before_the_transformer_runs(tmp_path, pipeline, monkeypatch):
    """Text is encoded first and the UMT5 encoder released: while blocks are generated no
    encoder module is alive (on a GPU it would otherwise sit beside the transformer)."""
    import functools
    import gc

    from transformers import UMT5EncoderModel

    import packforcing.cli.generate as generate

    def encoders() -> int:
        return sum(type(o) is UMT5EncoderModel for o in gc.get_objects())

    gc.collect()
    before = encoders()  # encoders other tests keep (a fixture's pipeline) are not this run's
    alive: list[int] = []

    def count_encoders(done: int) -> None:
        gc.collect()
        alive.append(encoders() - before)

    from packforcing.models.wan import text

    encoded: list[int] = []
    original = text.TextEncoder.encode

    def encode(self, *args, **kwargs):
        encoded.append(encoders() - before)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(text.TextEncoder, "encode", encode)
    monkeypatch.setattr(generate, "run_job", functools.partial(generate.run_job, on_block=count_encoders))
    argv = ["generate", "--config", str(wan_config(tmp_path, pipeline)), "--prompt", "a red fox", "--blocks", "2"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert encoded and encoded[0] >= 1  # the encoder was alive while it encoded
    assert alive == [0, 0]  # and gone for every block


def test_the_vae_found_beside_the_transformer_folder(tmp_path, pipeline):
    from packforcing.core.build import build_engine
    from packforcing.core.config import load_config

    engine = build_engine(load_config(wan_config(tmp_path, pipeline / "transformer")))
    assert engine.model.codec is not None and engine.model.codec.temporal_stride == 4
    assert engine.model.pixel_frames_per_latent == 4


def test_a_bad_vae_is_one_line(tmp_path, pipeline, capsys):
    config = wan_config(tmp_path, pipeline, vae=str(tmp_path))
    code = main(["generate", "--config", str(config), "--blocks", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "model.vae" in err and "not a Wan VAE folder" in err


@pytest.mark.parametrize("problem", ["vae", "embeds"])
def test_a_run_refused_up_front_encodes_no_text_and_writes_nothing(tmp_path, pipeline, capsys, monkeypatch, problem):
    """A bad VAE folder or a precomputed embedding of the wrong width is refused before the text
    encoder loads: one line, and no output folder (no embeddings) left behind."""
    from packforcing.models.wan import text

    monkeypatch.setattr(text.TextEncoder, "from_params", lambda params: pytest.fail("the encoder was loaded"))
    bad = tmp_path / "bad.safetensors"
    save_file({"prompt_embeds": torch.zeros(7, 5)}, str(bad))
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump([{"from_block": 0, "prompt": "a fox"}, {"from_block": 1, "embeds": str(bad)}]))
    config = wan_config(tmp_path, pipeline, **({"vae": str(tmp_path)} if problem == "vae" else {}))
    argv = ["generate", "--config", str(config), "--blocks", "3", "--out", str(tmp_path / "o")]
    argv += ["--prompt", "a fox"] if problem == "vae" else ["--prompts", str(prompts)]
    assert main(argv) in (1, 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert ("not a Wan VAE folder" if problem == "vae" else "[1].embeds: ") in err
    assert problem == "vae" or "expected [L, 32]" in err
    assert not (tmp_path / "o").exists()


def test_embeddings_are_named_from_anywhere(tmp_path, pipeline, monkeypatch):
    """A run started with a relative --out names its prompt embeddings by absolute path, so it
    resumes from any directory."""
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--config", str(wan_config(tmp_path, pipeline)), "--prompt", "a fox", "--no-progress"]
    assert main([*argv, "--blocks", "2", "--set", "run.checkpoint_every=1", "--out", "rel"]) == 0
    embeds = json.loads((tmp_path / "rel" / "report.json").read_text())["conditions"][0]["embeds"]
    assert Path(embeds).is_absolute() and Path(embeds).is_file()
    monkeypatch.chdir("/")
    assert main(["generate", "--resume", str(tmp_path / "rel"), "--blocks", "3", "--no-progress"]) == 0


def test_streamed_video_equals_decoding_the_whole_latent_video(tmp_path, pipeline):
    """The frames written block by block are the VAE's decode of the whole latent video."""
    from packforcing.core.build import build_engine
    from packforcing.core.config import load_config

    engine = build_engine(load_config(wan_config(tmp_path, pipeline)))
    codec = engine.model.codec
    stream = codec.streaming_decoder()
    with engine.session(seed=0) as session:
        blocks = [session.step().latents for _ in range(3)]
    streamed = torch.cat([stream.decode(b) for b in blocks], dim=2)
    whole = codec.decode(torch.cat(blocks, dim=2))
    assert streamed.shape[2] == 1 + 4 * (3 * FPB - 1)
    assert (streamed - whole).abs().max() <= 1e-5


def test_text_prompts_need_a_text_encoder(tmp_path, capsys):
    """A Wan transformer folder alone (no pipeline root with a text_encoder/ beside it) and no
    text_encoder.path: one line saying what is missing, nothing written."""
    folder = write_diffusers(tiny_transformer(), tmp_path / "transformer-only")
    config = wan_config(tmp_path, folder)
    out = tmp_path / "o"
    assert main(["generate", "--config", str(config), "--prompt", "a fox", "--blocks", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == "error: text_encoder.path: text prompts need a text encoder (a pipeline root or its folder)\n"
    assert not out.exists()


@pytest.mark.parametrize("how", ["interrupted", "checkpoint_every"])
def test_an_interrupted_wan_run_resumes_to_the_same_video(tmp_path, pipeline, how):
    """A Wan run's video has 1 + 4(F - 1) pixel frames for F latent ones and a causal decoder:
    an interrupted run (Ctrl-C) and a run killed after a periodic checkpoint both resume to the
    uninterrupted run's latents and every one of its frames, once each (the decoder's causal
    cache is saved with the checkpoint)."""
    import imageio.v2 as imageio
    from safetensors.torch import load_file

    from packforcing.cli.generate import Interrupted, run_job

    config = wan_config(tmp_path, pipeline)
    overrides = ["run.blocks=5", "run.checkpoint_every=2"] if how == "checkpoint_every" else ["run.blocks=5"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_job(config, whole, overrides=overrides, save_latents=True)

    def stop(done: int) -> None:
        if done == 3:
            raise KeyboardInterrupt if how == "interrupted" else SystemExit("killed")

    with pytest.raises(Interrupted if how == "interrupted" else SystemExit):
        run_job(config, resumed, overrides=overrides, save_latents=True, on_block=stop)
    state = json.loads((resumed / "checkpoint" / "state.json").read_text())
    assert state["meta"]["blocks_done"] == (3 if how == "interrupted" else 2)
    run_job(None, resumed, resume=True)

    def frames(out: Path) -> list:
        return list(imageio.mimread(out / "video.mp4"))

    expected, got = frames(whole), frames(resumed)
    assert len(expected) == len(got) == 1 + 4 * (5 * FPB - 1)
    assert all((a == b).all() for a, b in zip(expected, got, strict=True))
    latents = [load_file(str(out / "latents.safetensors"))["latents"] for out in (whole, resumed)]
    assert torch.equal(*latents)
