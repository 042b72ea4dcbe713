"""Generation sessions (step / observe), condition schedules and per-block conditions."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import packforcing as pf
from packforcing.api import ParamError
from packforcing.cli import main
from packforcing.core.conditions import ConditionError, ConditionSchedule
from packforcing.core.engine import GenerationEngine, SessionError
from packforcing.core.store import NonFiniteError

from .helpers import engine_for, generate

FULL = {"name": "full"}


class OffsetModel:
    """``tiny_dit`` conditioned by a latent offset ``{"offset": x}``: a stand-in for a real
    conditional model (the condition changes every pass, clean pass included). Records the
    specs it was asked to encode."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.geometry = inner.geometry
        self.rope = inner.rope
        self.hidden_size = inner.hidden_size
        self.codec = inner.codec
        self.encoded: list[dict] = []

    def encode_condition(self, spec):
        if set(spec) != {"offset"}:
            raise ParamError(next(iter(set(spec) - {"offset"})), "unknown condition key")
        self.encoded.append(dict(spec))
        return float(spec["offset"])

    def denoise(self, latents, timesteps, context, condition=None):
        return self.inner.denoise(latents + (condition or 0.0), timesteps, context)

    def clean_kv(self, latents, context, condition=None):
        return self.inner.clean_kv(latents + (condition or 0.0), context)

    def project_kv(self, hidden, grid, position, temporal_stride, hw_stride):
        return self.inner.project_kv(hidden, grid, position, temporal_stride, hw_stride)


def offset_engine(policy=FULL, **sections) -> GenerationEngine:
    base = engine_for(policy, **sections)
    return GenerationEngine(OffsetModel(base.model), base.policy, base.sampler)


def bits(x: torch.Tensor) -> bytes:
    return x.numpy().tobytes()


# ---------------------------------------------------------------------- sessions
def test_generate_is_a_session_stepped():
    engine = engine_for({"name": "sliding_window", "window_frames": 8})
    generated = generate(engine, 4, seed=9)
    with engine.session(seed=9) as session:
        stepped = [session.step() for _ in range(4)]
        assert session.blocks_done == 4
    assert [bits(a.latents) for a in generated] == [bits(b.latents) for b in stepped]
    assert [b.index for b in stepped] == [0, 1, 2, 3]
    assert not any(b.observed for b in stepped)


@pytest.mark.parametrize("policy", [FULL, {"name": "sink_recent", "sink_frames": 4, "window_frames": 4}])
def test_observed_blocks_condition_the_next_exactly_as_generated_ones(policy):
    reference = generate(engine_for(policy), 4, seed=2, batch_size=2)
    engine = engine_for(policy)
    with engine.session(seed=2, batch_size=2) as session:
        first = [session.observe(block.latents.clone()) for block in reference[:3]]
        assert session.blocks_done == 3
        nxt = session.step()
    assert [b.observed for b in first] == [True, True, True]
    assert [bits(b.latents) for b in first] == [bits(b.latents) for b in reference[:3]]
    assert [b.stats.bytes for b in first] == [b.stats.bytes for b in reference[:3]]
    assert nxt.index == 3 and bits(nxt.latents) == bits(reference[3].latents)


@pytest.mark.parametrize("policy", [FULL, {"name": "sliding_window", "window_frames": 4}])
def test_predict_samples_the_next_block_without_committing(policy):
    reference = generate(engine_for(policy), 4, seed=6)
    engine = engine_for(policy)
    with engine.session(seed=6) as session:
        for block in reference[:2]:
            session.observe(block.latents)
        before = engine.policy.stats()
        first = session.predict()
        again = session.predict()
        assert session.blocks_done == 2 and engine.policy.stats() == before
        # teacher forcing: commit the true block 2, then block 3 continues as in the reference
        session.observe(reference[2].latents)
        last = session.step()
    assert bits(first) == bits(again) == bits(reference[2].latents)
    assert bits(last.latents) == bits(reference[3].latents)


def test_observed_latents_really_steer_the_continuation():
    engine = engine_for(FULL)
    reference = generate(engine, 3, seed=4)
    with engine.session(seed=4) as session:
        session.observe(reference[0].latents)
        session.observe(torch.zeros_like(reference[1].latents))
        changed = session.step()
    assert not torch.equal(changed.latents, reference[2].latents)


def test_observe_refuses_bad_latents_and_leaves_the_cache_unchanged():
    engine = engine_for(FULL)
    g = engine.geometry
    with engine.session(batch_size=1) as session:
        good = session.step()
        before = session.engine.policy.stats()
        wrong = torch.zeros(1, g.latent_channels, g.frames_per_block + 1, g.latent_height, g.latent_width)
        with pytest.raises(ValueError, match=r"observe: expected clean latents of shape \[B, C, F, H, W\]"):
            session.observe(wrong)
        with pytest.raises(ValueError, match="observe: expected"):
            session.observe(torch.zeros(2, *good.latents.shape[1:]))  # wrong batch size
        nan = torch.full_like(good.latents, float("nan"))
        with pytest.raises(ValueError, match="NaN or Inf"):
            session.observe(nan)
        assert session.blocks_done == 1
        assert session.engine.policy.stats() == before


def test_one_open_session_per_engine():
    engine = engine_for(FULL)
    session = engine.session(seed=1)
    session.step()
    with pytest.raises(SessionError, match="another generation session is open on this engine"):
        engine.session()
    with pytest.raises(SessionError):
        list(engine.generate(2))
    assert session.blocks_done == 1  # the refused session did not reset the cache
    assert session.engine.policy.stats().blocks == 1
    session.close()
    with pytest.raises(SessionError, match="closed"):
        session.step()
    assert len(generate(engine, 2)) == 2  # a finished generate() closes its session
    stream = engine.generate(3)
    next(stream)
    stream.close()  # an abandoned generate() closes its session too
    with engine.session() as again:
        again.step()


def test_bad_arguments_fail_before_touching_the_cache():
    engine = engine_for(FULL)
    generate(engine, 2)
    with pytest.raises(ValueError, match="batch_size"):
        engine.generate(2, batch_size=0)
    with pytest.raises(ConditionError, match=r"conditions\[0\]\.from_block"):
        engine.session(conditions=[{"from_block": 1}])
    assert engine.policy.stats().blocks == 2


# ---------------------------------------------------------------------- schedules
@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ({"from_block": 0}, r"conditions: expected a list of segments"),
        ([], r"conditions: expected at least one segment"),
        ([{"from_block": 1}], r"conditions\[0\]\.from_block: the first segment must start at block 0, got 1"),
        ([{"from_block": 0}, {"from_block": 0}], r"conditions\[1\]\.from_block: must be greater .* \(0\), got 0"),
        ([{"from_block": 0}, {"from_block": 3}, {"from_block": 2}], r"conditions\[2\]\.from_block: .*got 2"),
        ([{"from_block": 0}, {"x": 1}], r"conditions\[1\]\.from_block: required key is missing"),
        ([{"from_block": "0"}], r"conditions\[0\]\.from_block: expected an integer, got '0'"),
        ([{"from_block": True}], r"conditions\[0\]\.from_block: expected an integer, got true"),
        ([3], r"conditions\[0\]: expected a mapping"),
        ([{"from_block": 0, "embeds": object()}], r"conditions\[0\]: the condition must be JSON-able"),
    ],
)
def test_schedule_validation(segments, message):
    with pytest.raises(ConditionError, match=message):
        ConditionSchedule.parse(segments)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 40), unique=True, max_size=5).map(sorted),
    st.lists(st.sampled_from([None, {"p": "a"}, {"p": "b"}, {"p": 1, "q": [1, 2]}]), min_size=6, max_size=6),
)
def test_schedule_picks_the_last_segment_started(later_starts, specs):
    starts = [0, *later_starts]
    segments = [{"from_block": s, **(spec or {})} for s, spec in zip(starts, specs, strict=False)]
    schedule = ConditionSchedule.parse(segments)
    for block in range(45):
        last = max(i for i, s in enumerate(starts) if s <= block)
        assert schedule.spec_for(block) == specs[last]
        assert schedule.segment_of(block) == last
    assert ConditionSchedule.parse(schedule.as_list()) == schedule
    assert ConditionSchedule.parse(None).spec_for(7) is None


def test_run_prompts_errors_name_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("policy: full\nrun:\n  prompts:\n    - {from_block: 0}\n    - {from_block: 0}\n")
    with pytest.raises(pf.ConfigError) as info:
        pf.load_config("c.yaml")
    expected = "c.yaml: run.prompts[1].from_block: must be greater than the previous segment's (0), got 0"
    assert str(info.value) == expected
    (tmp_path / "d.yaml").write_text("policy: full\nrun: {prompts: {from_block: 0}}\n")
    with pytest.raises(pf.ConfigError, match=r"^d.yaml: run.prompts: expected a list"):
        pf.load_config("d.yaml")


# ---------------------------------------------------------------------- conditions
def test_condition_switch_takes_effect_at_the_block_boundary():
    constant = generate_with(offset_engine(), [{"from_block": 0, "offset": 0.0}])
    switched = generate_with(offset_engine(), [{"from_block": 0, "offset": 0.0}, {"from_block": 2, "offset": 0.5}])
    assert [bits(b.latents) for b in constant[:2]] == [bits(b.latents) for b in switched[:2]]
    assert not torch.equal(constant[2].latents, switched[2].latents)
    assert [b.condition for b in switched] == [{"offset": 0.0}] * 2 + [{"offset": 0.5}] * 2


def test_conditions_are_encoded_once_per_distinct_spec_and_recorded_in_the_cache():
    engine = offset_engine()
    schedule = [
        {"from_block": 0, "offset": 0.25},
        {"from_block": 1, "offset": -0.5},
        {"from_block": 2, "offset": 0.25},
    ]
    blocks = generate_with(engine, schedule)
    assert engine.model.encoded == [{"offset": 0.25}, {"offset": -0.5}]
    generate_with(engine, schedule)
    assert len(engine.model.encoded) == 2  # cached across sessions
    cached = [block for tier in engine.policy._tiers for block in tier.blocks]
    assert [b.condition for b in sorted(cached, key=lambda b: b.block_id)] == [b.condition for b in blocks]
    # repeating a spec in a new segment changes nothing
    same = generate_with(offset_engine(), [{"from_block": 0, "offset": 0.25}, {"from_block": 2, "offset": 0.25}])
    plain = generate_with(offset_engine(), [{"from_block": 0, "offset": 0.25}])
    assert [bits(a.latents) for a in same] == [bits(b.latents) for b in plain]


def test_a_spec_the_model_refuses_names_its_segment():
    engine = offset_engine()
    with pytest.raises(ConditionError, match=r"^conditions\[1\]\.colour: unknown condition key$"):
        engine.session(conditions=[{"from_block": 0, "offset": 0.0}, {"from_block": 1, "colour": 2}])


def test_tiny_dit_accepts_no_condition_and_refuses_a_spec():
    engine = engine_for(FULL)
    plain = generate(engine, 2, seed=5)
    empty = list(engine.generate(2, seed=5, conditions=[{"from_block": 0}]))
    assert [bits(a.latents) for a in plain] == [bits(b.latents) for b in empty]
    with pytest.raises(ConditionError, match=r"^conditions\[0\]\.embeds: model tiny_dit is unconditional"):
        engine.session(conditions=[{"from_block": 0, "embeds": "x.safetensors"}])


def test_cli_records_the_schedule_and_refuses_a_spec_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["generate", "--config", "configs/full.yaml", "--blocks", "2", "--out", str(out), "--no-progress"]
    assert main([*args, "--set", "run.prompts=[{from_block: 0}]", "--set", "sampler.steps=1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["conditions"] == [{"from_block": 0}]
    assert report["config"]["run"]["prompts"] == [{"from_block": 0}]
    assert [b["condition"] for b in report["blocks"]] == [None, None]
    capsys.readouterr()
    code = main([*args, "--overwrite", "--set", "run.prompts=[{from_block: 0, embeds: p.safetensors}]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    # configs/full.yaml's tiny_dit is conditioned on scenes: it refuses other keys
    assert err == "error: --set: run.prompts[0].embeds: unknown condition key (tiny_dit takes 'scene')"


def generate_with(engine, conditions, blocks: int = 4):
    return list(engine.generate(blocks, seed=3, conditions=conditions))


def test_a_new_session_drops_conditions_its_schedule_does_not_use():
    engine = offset_engine()
    generate_with(engine, [{"from_block": 0, "offset": 0.25}, {"from_block": 2, "offset": 0.5}])
    assert len(engine._conditions) == 2
    generate_with(engine, [{"from_block": 0, "offset": 0.5}])
    assert len(engine._conditions) == 1 and len(engine.model.encoded) == 2  # 0.5 reused, 0.25 dropped
    generate_with(engine, [{"from_block": 0, "offset": 0.25}])
    assert len(engine.model.encoded) == 3


# ---------------------------------------------------------------------- re-cache at a switch
def cache_of(engine) -> list[tuple]:
    """Every held block: id, tier, position, condition, slot and K/V (copies)."""
    policy = engine.policy
    return [
        (
            b.block_id,
            name,
            b.position,
            b.condition,
            (b.slot.page, b.slot.index),
            [bits(t) for t in (*b.keys, *b.values)],
        )
        for name in policy.tier_names
        for b in policy.tier_blocks(name)
    ]


class Boom(RuntimeError):
    """What the flaky clean pass raises."""


@pytest.mark.parametrize("how", ["raise", "nan"])
@pytest.mark.parametrize("policy", [FULL, {"name": "sink_recent", "sink_frames": 4, "window_frames": 8}])
def test_a_failing_recache_leaves_the_cache_as_before_and_a_retry_goes_on_as_if_uninterrupted(policy, how):
    """A re-cache at a prompt switch is all or nothing: when the clean pass of the 3rd block to
    re-cache raises, or returns NaN keys the cache refuses, the blocks already replaced get back
    their K/V, position and condition (the cache is exactly as before), the step fails, and
    retrying it gives the uninterrupted run."""
    schedule = [{"from_block": 0, "offset": 0.0}, {"from_block": 4, "offset": 0.5}]
    reference = offset_engine(policy)
    with reference.session(seed=3, conditions=schedule, recache=True) as session:
        expected = [bits(session.step().latents) for _ in range(6)]
    engine = offset_engine(policy)
    with engine.session(seed=3, conditions=schedule, recache=True) as session:
        for _ in range(4):
            session.step()
        before = cache_of(engine)
        assert len(engine.policy.full_resolution_blocks()) >= 3
        clean_kv, calls = engine.model.clean_kv, []

        def flaky(*args, **kwargs):
            calls.append(1)
            keys, values = clean_kv(*args, **kwargs)
            if len(calls) == 3 and how == "raise":
                raise Boom("the clean pass of the 3rd re-cached block")
            if len(calls) == 3:
                keys = [k.clone().fill_(float("nan")) for k in keys]
            return keys, values

        engine.model.clean_kv = flaky
        with pytest.raises(Boom if how == "raise" else NonFiniteError):
            session.step()
        engine.model.clean_kv = clean_kv
        assert cache_of(engine) == before and session.blocks_done == 4
        engine.policy.audit()
        assert [bits(session.step().latents) for _ in range(2)] == expected[4:]


def test_recache_skips_compressed_blocks_held_by_a_tier_without_a_compressor():
    """A full-fidelity tier older than a compressed one receives compressed blocks: those are not
    full-resolution blocks (nothing to re-cache, their latents are not kept), only the sink's
    block is, and a switch re-caches it alone."""
    policy = {
        "name": "tiered",
        "overflow": "drop",
        "tiers": [
            {"name": "sink", "blocks": 1, "pinned": True},
            {"name": "mid", "blocks": 2},
            {"name": "recent", "blocks": 1, "fidelity": "compressed"},
        ],
    }
    engine = offset_engine(policy, compressor={"name": "pool", "window": [2, 1, 1]})
    schedule = [{"from_block": 0, "offset": 0.0}, {"from_block": 4, "offset": 0.5}]
    with engine.session(seed=3, conditions=schedule, recache=True) as session:
        for _ in range(4):
            session.step()
        held = {b.block_id: b.fidelity for name in engine.policy.tier_names for b in engine.policy.tier_blocks(name)}
        assert held == {0: "full", 1: "pool", 2: "pool", 3: "pool"}
        assert [b.block_id for b in engine.policy.full_resolution_blocks()] == [0]
        mid = engine.policy.tier_blocks("mid")[0]
        with pytest.raises(ValueError, match=r"block 1 is not held at full resolution \(it is pool in tier 'mid'\)"):
            engine.policy.replace_kv(1, mid.keys, mid.values, position=mid.position)
        assert session.recache() == 1
        assert [b.condition for b in engine.policy.tier_blocks("sink")] == [{"offset": 0.5}]
        session.step()  # the switch: re-caches block 0 again, then samples block 4
