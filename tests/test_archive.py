"""The archive (mid overflow): bounded by ``archive_max_blocks``, placed by ``archive_device``
(pinned host memory by default when generating on CUDA), both shown by ``plan``."""

from __future__ import annotations

import pytest
import torch

import packforcing as pf
from packforcing.cli import main
from packforcing.policies.tiered import archive_placement

from .helpers import TINY_MODEL

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def config(**policy):
    return {
        "model": TINY_MODEL,
        "policy": {"name": "packforcing", "sink_frames": 4, "recent_frames": 4, "mid_capacity_blocks": 2, **policy},
        "compressor": {"name": "pool", "window": [2, 1, 1]},
        "selector": {"name": "topk", "k": 1, "min_queries": 2},
        "backend": "sdpa",
        "sampler": {"steps": 1},
        "run": {"device": "cpu"},
    }


@pytest.mark.parametrize("bound", [0, 1, 3, None])
def test_archive_max_blocks_bounds_the_archive_and_plan_agrees(bound):
    engine = pf.build_engine(config(archive_max_blocks=bound))
    policy = engine.policy
    for block in engine.generate(9, seed=0):
        policy.audit()
        planned = policy.plan(block.index + 1)
        assert block.stats.archive == planned.archive and block.stats.tiers == planned.tiers
    # blocks 0 sink, 1..6 through mid, 7-8 recent/mid: 5 overflowed mid
    overflowed = 5
    kept = overflowed if bound is None else min(bound, overflowed)
    archived = [b.block_id for b in policy.archived]
    assert archived == list(range(1, 1 + overflowed))[overflowed - kept :]
    assert policy.dropped == list(range(1, 1 + overflowed - kept))
    for block_id in policy.dropped:
        assert policy.location(block_id) == "drop"


def test_archive_lives_on_the_host_by_default_and_pinned_on_cuda():
    assert archive_placement("auto", torch.device("cuda", 0)) == (torch.device("cpu"), True)
    assert archive_placement("auto", torch.device("cpu")) == (torch.device("cpu"), False)
    assert archive_placement("cpu", torch.device("cuda", 0)) == (torch.device("cpu"), False)
    assert archive_placement("cuda:1", torch.device("cuda", 0)) == (torch.device("cuda", 1), False)
    engine = pf.build_engine(config())
    list(engine.generate(6, seed=0))
    page = engine.policy._archive_store.pages[0]
    assert page.device.type == "cpu" and not page.is_pinned()


def test_bad_archive_device_is_a_config_error():
    with pytest.raises(pf.ConfigError, match=r"policy.archive_device: expected auto, pinned, cpu or a device name"):
        pf.build_engine(config(archive_device="floppy"))


def test_plan_shows_archive_device_and_bound(capsys):
    argv = ["plan", "--config", "configs/wan1.3b/packforcing.yaml", "--seconds", "600"]
    assert main([*argv, "--set", "policy.archive_max_blocks=64"]) == 0
    out = capsys.readouterr().out
    assert "archive*        64" in out
    assert "archive: in pinned host memory when generating on CUDA, else beside the cache (archive_device: auto)" in out
    assert "at most 64 blocks" in out
    assert main([*argv, "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["archive_device"] == "auto" and data["archive_max_blocks"] is None
    assert data["archive_bytes"] == pf.plan("configs/wan1.3b/packforcing.yaml", 600, 16).archive.bytes
