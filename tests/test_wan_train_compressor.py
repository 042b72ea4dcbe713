"""train-compressor on a Wan config: attention matching through Wan's own K/V projections (and its
VAE for the LR branch) within a --max-blocks budget; the weights load by compressor.weights."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

import packforcing as pf
from packforcing.cli import main
from packforcing.compressors.dual_branch import UntrainedCompressorWarning
from packforcing.training.compressor import within_budget

from .tiny_wan_io import write_tiny_vae
from .wan_fixtures import tiny_transformer, write_diffusers, write_embeds

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def wan_config(tmp_path: Path) -> Path:
    root = tmp_path / "pipe"
    write_diffusers(tiny_transformer(), root, pipeline=True)
    write_tiny_vae(root, pipeline=True)
    config = {
        "model": {"name": "wan", "path": str(root), "frames_per_block": 2, "latent_height": 8, "latent_width": 8},
        "policy": {"name": "packforcing", "sink_frames": 2, "recent_frames": 2, "mid_capacity_blocks": 2},
        "compressor": {"name": "dual_branch", "hr_channels": [4, 8, 8, 8], "weights": None},
        "selector": {"name": "topk", "k": 1},
        "realigner": {"name": "temporal_rope_shift"},
        "backend": "sdpa",
        "sampler": {"name": "self_forcing"},
        "run": {
            "device": "cpu",
            "dtype": "float32",
            "prompts": [{"from_block": 0, "embeds": str(write_embeds(tmp_path / "p.safetensors"))}],
        },
    }
    path = tmp_path / "wan.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_within_budget():
    assert within_budget(16, 6, None) == (16, 6, 1)
    assert within_budget(16, 6, None, batch=4) == (16, 6, 4)
    assert within_budget(16, 6, 20) == (3, 6, 1)
    assert within_budget(16, 6, 4) == (1, 4, 1)
    # every batch item is a block generated: fewer videos, then fewer items, then shorter videos
    assert within_budget(16, 6, 64, batch=4) == (2, 6, 4)
    assert within_budget(16, 6, 20, batch=4) == (1, 6, 3)
    assert within_budget(16, 6, 4, batch=4) == (1, 4, 1)
    for videos, blocks, batch, budget in [(16, 6, 4, 64), (3, 5, 2, 7), (1, 9, 8, 2), (5, 2, 3, 100)]:
        v, b, n = within_budget(videos, blocks, budget, batch)
        assert v * b * n <= budget and b == min(blocks, budget) and (v, n) >= (1, 1)
    with pytest.raises(ValueError, match="--max-blocks"):
        within_budget(16, 6, 1)


def test_bad_batch_size_is_a_usage_error(tmp_path, capsys):
    argv = ["train-compressor", "--config", "packforcing", "--batch-size", "0", "--out", str(tmp_path / "w")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert (
        err.splitlines()[-1]
        == "packforcing train-compressor: error: argument --batch-size: expected an integer >= 1, got '0'"
    )
    assert not (tmp_path / "w").exists()


def test_a_text_prompt_is_named_with_the_way_to_embeddings(tmp_path, capsys):
    config = wan_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["run"]["prompts"] = [{"from_block": 0, "prompt": "a fox"}]
    config.write_text(yaml.safe_dump(data))
    assert main(["train-compressor", "--config", str(config), "--steps", "1", "--out", str(tmp_path / "w")]) in (1, 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.prompts[0].prompt: train-compressor takes precomputed embeddings" in err
    assert "encode-prompts" in err and not (tmp_path / "w").exists()


def test_train_compressor_on_wan_and_load_the_weights(tmp_path, capsys):
    config = wan_config(tmp_path)
    weights = tmp_path / "wan_dual_branch.safetensors"
    argv = [
        "train-compressor",
        "--config",
        str(config),
        "--steps",
        "1",
        "--blocks",
        "2",
        "--batch",
        "1",
        "--batch-size",
        "2",
    ]
    assert main([*argv, "--max-blocks", "4", "--out", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "--max-blocks 4: 2 videos of 2 blocks, batch 1 (4 blocks)" in out and "held-out loss" in out
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["architecture"])["lr"] is True and meta["hidden_size"] == "64"
    engine = pf.build_engine(pf.load_config(str(config), [f"compressor.weights={weights}"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedCompressorWarning)  # trained weights: no warning
        with engine.session(seed=0, conditions=engine.config.run.prompts) as session:
            for _ in range(4):
                session.step()
    assert [b.fidelity for b in engine.policy.tier_blocks("mid")] == ["dual_branch", "dual_branch"]
