"""Prompt switching with ``recache``: after a switch the full-resolution history is re-computed
under the new prompt — equal to what a run with the new prompt from the start holds for the same
latents (LongLive's KV re-cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import packforcing as pf
from packforcing.core.session import SessionError

from .wan_fixtures import tiny_transformer, write_diffusers, write_embeds

pytestmark = pytest.mark.usefixtures("torch_single_thread")
SWITCH = 3


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("wan")
    write_diffusers(tiny_transformer(), root / "model")
    return (
        root / "model",
        str(write_embeds(root / "fox.safetensors", seed=1)),
        str(write_embeds(root / "whale.safetensors", seed=2)),
    )


def engine(path: Path, policy: dict):
    model = {"name": "wan", "path": str(path), "frames_per_block": 2, "latent_height": 4, "latent_width": 6}
    config = {"model": model, "policy": policy, "backend": "sdpa", "sampler": {"name": "self_forcing"}}
    return pf.build_engine({**config, "run": {"device": "cpu", "dtype": "float32"}})


def held(engine) -> dict[int, tuple[list[torch.Tensor], list[torch.Tensor], object]]:
    return {
        b.block_id: ([k.clone() for k in b.keys], [v.clone() for v in b.values], b.condition)
        for b in engine.policy.full_resolution_blocks()
    }


POLICIES = [
    {"name": "full"},
    {"name": "sink_recent", "sink_frames": 2, "window_frames": 8},  # every block still held
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p["name"])
def test_recache_equals_the_new_prompt_from_the_start(wan, policy):
    path, fox, whale = wan
    schedule = [{"from_block": 0, "embeds": fox}, {"from_block": SWITCH, "embeds": whale}]
    switched = engine(path, policy)
    with switched.session(seed=0, conditions=schedule, recache=True) as session:
        latents = [session.step().latents for _ in range(SWITCH)]
        assert session.recache() == SWITCH  # what the next step does at the switch
        after = held(switched)
    # the reference: the new prompt from block 0, teacher-forced on the same latents
    reference = engine(path, policy)
    with reference.session(seed=0, conditions=[{"from_block": 0, "embeds": whale}]) as session:
        for x in latents:
            session.observe(x)
        expected = held(reference)
    assert sorted(after) == sorted(expected) == list(range(SWITCH))
    for block_id, (keys, values, condition) in after.items():
        ref_keys, ref_values, ref_condition = expected[block_id]
        assert condition == ref_condition == {"embeds": whale}
        for k, v, rk, rv in zip(keys, values, ref_keys, ref_values, strict=True):
            assert torch.allclose(k, rk, atol=1e-5, rtol=1e-5) and torch.allclose(v, rv, atol=1e-5, rtol=1e-5)


def test_without_recache_the_history_keeps_the_old_prompt(wan):
    path, fox, whale = wan
    schedule = [{"from_block": 0, "embeds": fox}, {"from_block": SWITCH, "embeds": whale}]
    plain, switched = engine(path, {"name": "full"}), engine(path, {"name": "full"})
    with (
        plain.session(seed=0, conditions=schedule) as a,
        switched.session(seed=0, conditions=schedule, recache=True) as b,
    ):
        for _ in range(SWITCH + 1):  # the switch happens inside step SWITCH
            ga, gb = a.step(), b.step()
        kept, recached = held(plain), held(switched)
    assert kept[0][2] == {"embeds": fox} and recached[0][2] == {"embeds": whale}
    assert not torch.allclose(kept[0][0][1], recached[0][0][1], atol=1e-3)  # layer 1 keys moved with the prompt
    assert torch.equal(kept[0][0][0], recached[0][0][0])  # layer 0 keys do not depend on the text
    assert not torch.allclose(ga.latents, gb.latents, atol=1e-4)  # the new block reads the re-cached history
    for block_id in range(SWITCH):  # blocks before the switch were generated the same way in both runs
        assert kept[block_id][2] == {"embeds": fox}


def test_recache_needs_the_latents(wan):
    path, fox, _ = wan
    e = engine(path, {"name": "full"})
    with e.session(seed=0, conditions=[{"from_block": 0, "embeds": fox}]) as session:
        session.step()
        with pytest.raises(SessionError, match="recache=True"):
            session.recache()
