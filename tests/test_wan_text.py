"""Wan text prompts: the UMT5 encoder against diffusers' Wan pipeline, prompt files, encode-prompts."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
import yaml

from packforcing.cli import main
from packforcing.models.wan.text import (
    TextEncoder,
    TextEncoderParams,
    encode_schedule,
    load_prompt_embeds,
    read_prompt_file,
    to_block_schedule,
)
from packforcing.output.video import latent_frame_of
from tests.helpers import recorded_loads
from tests.tiny_wan_io import TEXT_DIM, write_text_encoder

pytestmark = pytest.mark.usefixtures("torch_single_thread")
PROMPTS = ["a red fox running through snow", "  a blue whale &amp; the   ocean at night "]


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory):
    return write_text_encoder(tmp_path_factory.mktemp("wan") / "pipe", pipeline=True)


@pytest.mark.parametrize("layout", ["pipeline", "folder"])
def test_embeddings_equal_diffusers_wan_pipeline(tmp_path, pipeline_root, layout):
    from diffusers import WanPipeline

    root = pipeline_root if layout == "pipeline" else write_text_encoder(tmp_path / "enc", pipeline=False)
    with TextEncoder.from_path(root, max_length=16) as encoder:
        ours = torch.stack(encoder.encode(PROMPTS))
        pipe = WanPipeline(
            tokenizer=encoder.tokenizer, text_encoder=encoder.model, transformer=None, vae=None, scheduler=None
        )
        reference, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=16)
        tokens = encoder.tokenizer(["a red fox running through snow"]).input_ids[0]
    assert ours.shape == (2, 16, TEXT_DIM)
    assert torch.equal(ours, reference)
    assert ours[0, : len(tokens)].abs().sum(-1).min() > 0 and ours[0, len(tokens) :].abs().sum() == 0


def test_the_encoder_is_released_on_exit(pipeline_root):
    with TextEncoder.from_path(pipeline_root, max_length=8) as encoder:
        ref = weakref.ref(encoder.model)
        encoder.encode(["a fox"])
    gc.collect()
    assert encoder.model is None and ref() is None
    with pytest.raises(RuntimeError, match="closed"):
        encoder.encode(["a fox"])


def test_encode_prompts_writes_embeddings_and_a_schedule(tmp_path, pipeline_root, capsys):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(
        yaml.safe_dump(
            [
                {"from_second": 0, "prompt": PROMPTS[0]},
                {"from_second": 5, "prompt": PROMPTS[1]},
                {"from_block": 9, "prompt": PROMPTS[0]},
            ]
        )
    )
    out = tmp_path / "embeds"
    args = ["encode-prompts", "--text-encoder", str(pipeline_root), "--prompts", str(prompts), "--out", str(out)]
    assert main([*args, "--max-length", "16", "--device", "cpu"]) == 0
    assert "wrote 2 embedding file(s)" in capsys.readouterr().out
    schedule = read_prompt_file(out / "prompts.yaml")
    assert [list(seg) for seg in schedule] == [
        ["from_second", "embeds"],
        ["from_second", "embeds"],
        ["from_block", "embeds"],
    ]
    assert schedule[0]["embeds"] == schedule[2]["embeds"] != schedule[1]["embeds"]  # one file per distinct text
    with TextEncoder.from_path(pipeline_root, max_length=16) as encoder:
        expected = encoder.encode(PROMPTS)
    for seg, want, text in zip(schedule[:2], expected, PROMPTS, strict=True):
        embeds, stored_text = load_prompt_embeds(seg["embeds"])
        assert torch.equal(embeds, want) and stored_text == text
    assert "# a blue whale &amp; the ocean at night" in (out / "prompts.yaml").read_text()


def test_encode_schedule_without_text_loads_no_encoder(tmp_path):
    segments = [{"from_block": 0, "embeds": str(tmp_path / "x.safetensors")}]
    assert encode_schedule(segments, TextEncoderParams(path=None), tmp_path) == segments
    with pytest.raises(ValueError, match=r"text_encoder\.path"):
        encode_schedule([{"from_block": 0, "prompt": "a fox"}], TextEncoderParams(path=None), tmp_path)


def test_seconds_become_blocks_through_the_causal_vae():
    # Wan: 16 fps, 4 pixel frames per latent frame after the first, 3 latent frames per block
    assert [latent_frame_of(s, 16, 4) for s in (0, 1 / 16, 4 / 16, 5 / 16, 5)] == [0, 1, 1, 2, 20]
    segments = [{"from_second": 0, "prompt": "a"}, {"from_second": 5, "prompt": "b"}, {"from_block": 9, "prompt": "c"}]
    blocks = to_block_schedule(segments, fps=16, frames_per_block=3, temporal_stride=4)
    assert blocks == [
        {"from_block": 0, "prompt": "a"},
        {"from_block": 6, "prompt": "b"},
        {"from_block": 9, "prompt": "c"},
    ]
    with pytest.raises(ValueError, match=r"\[1\]\.from_second: 0.1 s falls in block 0"):
        to_block_schedule(
            [*segments[:1], {"from_second": 0.1, "prompt": "b"}], fps=16, frames_per_block=3, temporal_stride=4
        )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[]", r"expected a non-empty list"),
        ("- {from_block: 1, prompt: a}", r"\[0\]\.from_block: the first segment must start at 0"),
        (
            "- {from_block: 0, prompt: a}\n- {from_block: 2, from_second: 1, prompt: b}",
            r"\[1\]: give exactly one of from_block",
        ),
        ("- {from_block: 0, prompt: a, embeds: b}", r"\[0\]: give exactly one of prompt, embeds"),
        ("- {from_block: 0, prompt: ''}", r"\[0\]\.prompt: expected a non-empty string"),
        ("- {from_block: 0, prompt: a}\n- {from_block: -1, prompt: b}", r"\[1\]\.from_block: expected an integer >= 0"),
        ("- {from_block: 0, promt: a}", r"\[0\]\.promt: unknown key"),
        ("- {from_block: 0, prompt: a, recache: true}", r"\[0\]\.recache: re-caching is set .* by run\.recache"),
        ("- {from_block: 0, prompt: [a}", r"not valid YAML"),
    ],
)
def test_bad_prompt_files_are_one_line(tmp_path, content, problem):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as info:
        read_prompt_file(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_json_prompt_files_and_relative_embeds(tmp_path):
    path = tmp_path / "sub" / "p.json"
    path.parent.mkdir()
    path.write_text(json.dumps([{"from_block": 0, "embeds": "e.safetensors"}]))
    with pytest.raises(ValueError, match=r"p\.json: \[0\]\.embeds: file not found"):
        read_prompt_file(path)
    (path.parent / "e.safetensors").write_bytes(b"")
    assert read_prompt_file(path) == [{"from_block": 0, "embeds": str((path.parent / "e.safetensors").resolve())}]


def test_missing_encoder_is_one_line(tmp_path, capsys):
    code = main(["encode-prompts", "--text-encoder", str(tmp_path), "--prompt", "a fox", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "not a text encoder folder" in err


def test_a_cuda_text_encoder_without_cuda_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["encode-prompts", "--text-encoder", str(tmp_path), "--prompt", "a fox", "--device", "cuda"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device: 'cuda': this torch build has no CUDA" in err
    with pytest.raises(ValueError, match=r"^text_encoder\.device: 'cuda': this torch build has no CUDA"):
        TextEncoder.from_params(TextEncoderParams(path=str(tmp_path), device="cuda"))
    assert not (tmp_path / "o").exists()


def test_encode_prompts_refuses_bad_input_before_loading_the_encoder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(TextEncoder, "from_params", lambda params: pytest.fail("the encoder was loaded"))
    (tmp_path / "afile").write_text("")
    binary = tmp_path / "p.yaml"
    binary.write_bytes(b"\xff\xfe- {from_block: 0}")
    with pytest.raises(SystemExit) as usage:  # an argparse type: usage, the line, status 2
        main(["encode-prompts", "--text-encoder", str(tmp_path), "--prompt", "  ", "--out", str(tmp_path / "o")])
    assert usage.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "packforcing encode-prompts: error: argument --prompt: expected a non-empty text, got '  '"
    )
    cases = [
        (["--prompt", "a fox", "--out", str(tmp_path / "afile")], "is a file, not a folder"),
        (["--prompts", str(binary)], f"{binary}: not a text file"),
    ]
    for extra, problem in cases:
        argv = ["encode-prompts", "--text-encoder", str(tmp_path), *extra]
        assert main(argv if "--out" in extra else [*argv, "--out", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and problem in err, err
    assert not (tmp_path / "o").exists()


def broken_encoder(pipeline_root, tmp_path, case: str):
    """A copy of the tiny encoder pipeline with one thing wrong; returns (root, expected problem)."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path / case
    shutil.copytree(pipeline_root, root)
    weights = next((root / "text_encoder").glob("*.safetensors"))
    tensors = load_file(str(weights))
    if case == "missing":
        del tensors["encoder.block.0.layer.0.layer_norm.weight"]
        save_file(tensors, str(weights), metadata={"format": "pt"})
        return root, "missing weights (1: encoder.block.0.layer.0.layer_norm.weight)"
    if case == "unexpected":
        save_file({**tensors, "encoder.adapter.weight": torch.ones(2)}, str(weights), metadata={"format": "pt"})
        return root, "unexpected weights (1: encoder.adapter.weight)"
    if case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return root, "cannot load the UMT5 text encoder: Error while deserializing header"
    if case == "t5":
        config = json.loads((root / "text_encoder" / "config.json").read_text())
        (root / "text_encoder" / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
        return root, "config.json: a t5 model, not UMT5 (Wan's text encoder)"
    if case == "bert":
        (root / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
        return root, "config.json: a bert model, not UMT5 (Wan's text encoder)"
    assert case == "tokenizer"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    tok.add_tokens(["zebra", "mountain"])
    tok.save_pretrained(str(root / "tokenizer"))
    return root, "the tokenizer has 17 tokens, the text encoder's vocabulary 15: not this encoder's tokenizer"


@pytest.mark.parametrize("case", ["missing", "unexpected", "truncated", "t5", "bert", "tokenizer"])
def test_a_wrong_or_broken_text_encoder_is_one_line_not_random_weights(pipeline_root, tmp_path, case):
    root, problem = broken_encoder(pipeline_root, tmp_path, case)
    with pytest.raises(ValueError) as info:
        TextEncoder.from_path(root, max_length=8)
    text = str(info.value)
    assert problem in text and "\n" not in text, text
    assert text.startswith(str(root)), text


@pytest.mark.parametrize("case", ["cast", "missing", "unexpected", "tokenizer"])
def test_a_refused_text_encoder_is_freed_before_its_error_is_raised(pipeline_root, tmp_path, monkeypatch, case):
    """The error's traceback holds ``from_path``'s frame: were the loaded model still one of its
    locals, the model (UMT5-XXL's 11 GB, on the GPU when asked) would stay alive for as long as
    the error (which an interactive session keeps). It is gone while the error is still held."""
    from transformers import UMT5EncoderModel

    from tests.test_cast_range import F16, spoil

    if case == "cast":
        import shutil

        root = tmp_path / case
        shutil.copytree(pipeline_root, root)
        spoil(root / "text_encoder" / "model.safetensors", "encoder.block.1.layer.0.SelfAttention.q.weight")
        problem, dtype = f"holds 7.1e+04, {F16}", torch.float16
    else:
        (root, problem), dtype = broken_encoder(pipeline_root, tmp_path, case), torch.float32
    loaded = recorded_loads(monkeypatch, UMT5EncoderModel)
    with pytest.raises(ValueError) as info:
        TextEncoder.from_path(root, max_length=8, dtype=dtype)
    assert problem in str(info.value)
    assert info.value.__traceback__ is not None  # the error is held, traceback and frames with it
    assert len(loaded) == 1 and loaded[0]() is None


@pytest.mark.parametrize("enabled", [True, False])
def test_a_text_encoder_loads_and_is_refused_without_transformers_output_and_leaves_the_switch(
    tmp_path, capfd, enabled
):
    """transformers draws a progress bar for a sharded checkpoint and logs a multi-line "LOAD
    REPORT" of missing or unused weights (a whole UMT5's decoder, which is fine): neither shows
    on stderr, which holds the CLI's one-line errors only, and transformers' progress-bar switch
    and loader logger are as they were after each load (they were left off for good before)."""
    import logging

    from safetensors.torch import load_file, save_file
    from transformers import UMT5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from packforcing.models.wan.imports import LOADERS
    from tests.tiny_wan_io import randomize, tiny_umt5, write_tokenizer

    sharded, whole, missing = (tmp_path / name for name in ("sharded", "whole", "missing"))
    tiny_umt5().save_pretrained(str(sharded / "text_encoder"), max_shard_size="20KB")
    randomize(UMT5ForConditionalGeneration(tiny_umt5().config), 3).save_pretrained(str(whole / "text_encoder"))
    tiny_umt5().save_pretrained(str(missing / "text_encoder"))
    weights = missing / "text_encoder" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["encoder.final_layer_norm.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    for root in (sharded, whole, missing):
        write_tokenizer(root / "tokenizer")
    log = logging.getLogger(LOADERS["transformers"][1])
    level, filters = log.level, list(log.filters)
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        capfd.readouterr()
        for root in (sharded, whole):
            with TextEncoder.from_path(root) as encoder:
                assert encoder.model is not None
        with pytest.raises(ValueError, match="missing weights"):
            TextEncoder.from_path(missing)
        assert capfd.readouterr().err == ""
        assert hf_logging.is_progress_bar_enabled() == enabled and (log.level, log.filters) == (level, filters)
    finally:
        hf_logging.enable_progress_bar()
