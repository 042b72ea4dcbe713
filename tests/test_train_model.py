"""Scene conditioning of tiny_dit and the model training loop (seconds-long smoke runs)."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest
import torch

import packforcing as pf
from packforcing.attention.backends import SdpaBackend
from packforcing.cli import main
from packforcing.core.context import MaskedContext
from packforcing.core.geometry import spatial_stride_of
from packforcing.core.interfaces import num_scenes_of
from packforcing.models.codec import LinearPatchCodec
from packforcing.models.tiny_dit import TinyDiT, TinyDiTParams
from packforcing.testing.reference import block_causal_mask
from packforcing.training.model import (
    INIT_RECORD,
    TrainModelParams,
    read_metadata,
    render_clips,
    teacher_forcing_loss,
    teacher_masks,
    train_model,
    world_params_for,
)
from packforcing.worlds import SceneWorldParams, recall_schedule

SMALL = {
    "hidden_size": 32,
    "num_heads": 2,
    "num_layers": 2,
    "latent_height": 4,
    "latent_width": 4,
    "frames_per_block": 2,
    "codec": "dct",
}


def small_config(**model) -> dict:
    return {
        "model": {"name": "tiny_dit", **SMALL, "num_conditions": 3, **model},
        "policy": {"name": "full"},
        "backend": "sdpa",
        "sampler": {"steps": 2},
        "run": {"device": "cpu", "dtype": "float32"},
    }


def patch_teacher_forcing_loss(monkeypatch, effects) -> list[int]:
    """train_model's loss through ``effects``: on its ``n``-th call (from 1), ``effects[n](model,
    loss)`` is returned instead of the loss (it may also raise); the calls so far are counted in
    the returned list (clear it to start counting again)."""
    from packforcing.training import model as training

    real_loss = training.teacher_forcing_loss
    calls: list[int] = []

    def loss(*args, **kwargs):
        calls.append(1)
        value = real_loss(*args, **kwargs)
        effect = effects.get(len(calls))
        return effect(args[0], value) if effect is not None else value

    monkeypatch.setattr(training, "teacher_forcing_loss", loss)
    return calls


def poison(model, loss):
    """The model's weights NaN (an update that diverged), the loss as it was."""
    for p in model.parameters():
        p.data.fill_(float("nan"))
    return loss


def test_conditioning_is_off_unless_asked_and_none_is_unconditioned():
    plain = TinyDiT(TinyDiTParams(**SMALL))
    conditioned = TinyDiT(TinyDiTParams(**SMALL, num_conditions=3))
    assert plain.condition_embed is None
    # the embedding is registered last: every other weight is the same seeded initialisation
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, conditioned.state_dict()[name]), name
    x = torch.randn(1, 16, 2, 4, 4)
    ctx = MaskedContext(SdpaBackend(), torch.ones(8, 8, dtype=torch.bool))
    t = torch.tensor([500.0])
    assert torch.equal(plain.denoise(x, t, ctx), conditioned.denoise(x, t, ctx, condition=None))
    assert conditioned.encode_condition(None) is None
    scene = conditioned.encode_condition({"scene": 2})
    assert int(scene) == 2
    assert not torch.allclose(conditioned.denoise(x, t, ctx, condition=scene), conditioned.denoise(x, t, ctx))
    # per batch item and per frame indices agree with the scalar form
    same = conditioned.denoise(x, t, ctx, condition=torch.tensor([[2, 2]]))
    assert torch.allclose(same, conditioned.denoise(x, t, ctx, condition=scene), atol=1e-6)


@pytest.mark.parametrize(
    ("model", "spec", "message"),
    [
        ({}, {"scene": 3}, r"^scene: expected an integer in \[0, 3\), got 3$"),
        ({}, {"scene": "a"}, "^scene: expected an integer"),
        ({}, {"prompt": "x"}, "^prompt: unknown condition key"),
        ({"num_conditions": 0}, {"scene": 0}, "^scene: model tiny_dit is unconditional"),
    ],
)
def test_bad_condition_specs_are_one_line_errors(model, spec, message):
    net = TinyDiT(TinyDiTParams(**{**SMALL, "num_conditions": 3, **model}))
    with pytest.raises(ValueError, match=message):
        net.encode_condition(spec)


def test_teacher_forcing_sees_what_the_cache_would_hold():
    """The training pass's velocity for block i equals the model run over [clean 0..i-1, noisy i]
    with a block-causal mask (the cache-free oracle of generation with a full cache)."""
    engine = pf.build_engine(small_config())
    model = engine.model
    world = world_params_for(model)
    clean, scenes = render_clips(model, world, 3, [0, 1])
    f, tpb = model.geometry.frames_per_block, model.geometry.tokens_per_block
    sigma = torch.tensor([[0.3, 0.9, 0.6], [1.0, 0.5, 0.2]])
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    masks = teacher_masks(3, tpb)
    captured = {}
    original = model.denoise

    def spy(latents, timesteps, context, condition=None):
        out = original(latents, timesteps, context, condition=condition)
        captured["v"] = out
        return out

    model.denoise = spy
    teacher_forcing_loss(model, SdpaBackend(), clean, scenes, sigma, noise, masks)
    model.denoise = original
    s = sigma.repeat_interleave(f, 1)[:, None, :, None, None]
    noisy = (1 - s) * clean + s * noise
    for i in range(3):
        seq = torch.cat([clean[:, :, : i * f], noisy[:, :, i * f : (i + 1) * f]], dim=2)
        steps = torch.zeros(2, (i + 1) * f)
        steps[:, -f:] = 1000 * sigma[:, i : i + 1]
        ctx = MaskedContext(SdpaBackend(), block_causal_mask(i + 1, tpb, range))
        ref = model.denoise(seq, steps, ctx, condition=scenes[:, : (i + 1) * f])[:, :, -f:]
        assert torch.allclose(captured["v"][:, :, i * f : (i + 1) * f], ref, atol=1e-5), i


def test_training_clips_follow_the_schedule_options():
    """The rendered clips' per-frame scenes are the schedule's: ``revisit`` with one block per
    segment and no new scene after the second cuts at every block between two scenes."""
    model = TinyDiT(TinyDiTParams(**SMALL, num_conditions=4))
    world = world_params_for(model)
    _, scenes = render_clips(
        model, world, 6, [0, 1, 2], schedule="revisit", segment_blocks=(1, 1), new_scene_probability=0.0
    )
    per_block = scenes[:, :: world.frames_per_block]
    assert (per_block[:, 1:] != per_block[:, :-1]).all()  # a cut at every block
    assert all(len(set(row.tolist())) == 2 for row in per_block)  # never a new scene after the second
    # recall (the default): new scenes one block each, then returns from random distances
    for seed in range(20):
        order = recall_schedule(6, 4, seed)
        _, clip = render_clips(model, world, 6, [seed], schedule="recall")
        assert clip[0, :: world.frames_per_block].tolist() == order
        k = len(set(order))
        assert 2 <= k <= 4 and order[:k] == list(dict.fromkeys(order))  # every new scene comes first
        assert all(s in order[:k] for s in order[k:])


def test_training_is_reproducible_and_writes_loadable_weights(tmp_path: Path):
    params = TrainModelParams(steps=3, batch_size=2, train_blocks=3, clips=4, checkpoint_every=2)
    out = tmp_path / "w.safetensors"
    first = train_model(pf.load_config(small_config()), params, out, progress=False)
    second = train_model(pf.load_config(small_config()), params, None, progress=False)
    assert first == second and len(first) == 3
    assert all(torch.isfinite(torch.tensor(first)))
    meta = read_metadata(out)
    assert meta["steps"] == 3 and meta["train_blocks"] == 3 and meta["seed"] == 0
    assert meta["world"]["name"] == "scenes" and meta["world"]["num_scenes"] == 3
    assert meta["model"]["num_conditions"] == 3 and "commit" in meta
    assert meta["schedule"] == {"kind": "recall", "segment_blocks": [1, 2]} and meta["first_appearance_weight"] == 1.0
    more = tmp_path / "more.safetensors"
    cont = attrs.evolve(params, steps=2, init=str(out), pure_noise_fraction=0.5)
    train_model(pf.load_config(small_config()), cont, more, progress=False)
    meta2 = read_metadata(more)
    assert meta2["steps"] == 2 and meta2["total_steps"] == 5 and meta2["init"]["steps"] == 3
    # the run continued from is recorded with its recipe (the shipped model's first run was not)
    assert meta2["init"]["clips"] == 4 and meta2["init"]["batch_size"] == 2 and meta2["init"]["train_blocks"] == 3
    assert meta2["init"]["schedule"] == meta["schedule"] and meta2["init"]["sampler"] == meta["sampler"]
    assert meta2["pure_noise_fraction"] == 0.5
    engine = pf.build_engine(small_config(weights=str(out)))
    untrained = pf.build_engine(small_config())
    assert not torch.equal(engine.model.head.weight, untrained.model.head.weight)
    assert not engine.model.head.weight.requires_grad


def test_a_model_that_takes_no_scenes_trains_on_unconditioned_clips():
    """train-model on a tiny_dit without conditions: the clips' scenes are not passed to it (they
    used to be, and it stopped at the first step: "tiny_dit has no conditions")."""
    params = TrainModelParams(steps=2, batch_size=1, train_blocks=2, clips=2, checkpoint_every=0)
    losses = train_model(pf.load_config(small_config(num_conditions=0)), params, None, progress=False)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_train_model_verb(tmp_path: Path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(small_config()))
    out = tmp_path / "m.safetensors"
    code = main(
        ["train-model", "--config", str(config), "--out", str(out), "--steps", "2", "--batch-size", "1",
         "--train-blocks", "2", "--clips", "2", "--no-progress", "--set", "sampler.steps=2"]
    )  # fmt: skip
    assert code == 0 and out.is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # written atomically, readable like any output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert read_metadata(out)["sampler"]["steps"] == 2  # --set: the noise levels trained on
    assert "wrote" in capsys.readouterr().out
    bad = tmp_path / "bad.safetensors"
    for args, message in (
        (["--steps", "0"], "--steps: expected an integer >= 1, got '0'"),
        (["--new-scene-probability", "1.5"], "--new-scene-probability: expected a number in [0, 1], got '1.5'"),
        (["--segment-blocks", "3", "1"], "--segment-blocks: expected MIN <= MAX, got 3 1"),
        (["--segment-blocks", "0", "1"], "--segment-blocks: expected an integer >= 1, got '0'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["train-model", "--config", str(config), "--out", str(bad), *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.endswith(f"train-model: error: argument {message}\n")
    assert not bad.exists()
    # --out is required: the shipped weights are never overwritten by default
    with pytest.raises(SystemExit) as exit_:
        main(["train-model", "--config", str(config)])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err


def test_generate_uses_the_models_revisiting_schedule_and_reports_returns(tmp_path: Path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(small_config()))
    out = tmp_path / "run"
    argv = ["generate", "--config", str(config), "--blocks", "16", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    scenes = [b["condition"]["scene"] for b in report["blocks"]]
    assert report["conditions"][0] == {"from_block": 0, "scene": scenes[0]}
    assert len(set(scenes)) == 3  # every scene shown ...
    assert report["returns"], "... and come back to"
    for r in report["returns"]:
        assert scenes[r["block"]] == r["condition"]["scene"] != scenes[r["block"] - 1]
        assert scenes[r["block"] - r["blocks_since"]] == r["condition"]["scene"]
        assert math.isfinite(r["psnr_db"])
    assert report["return_psnr_db"] == pytest.approx(
        sum(r["psnr_db"] for r in report["returns"]) / len(report["returns"])
    )
    assert (out / "memory.png").is_file() and (out / "video.mp4").is_file()
    # an explicit schedule wins over the model's default
    assert main([*argv, "--overwrite", "--set", "run.prompts=[{from_block: 0, scene: 1}]"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["conditions"] == [{"from_block": 0, "scene": 1}] and report["returns"] == []


def test_compressor_training_on_world_clips(tmp_path: Path):
    from packforcing.training.compressor import train_compressor

    config = {**small_config(), "compressor": {"name": "dual_branch", "hr_channels": [4, 8, 8, 16]}}
    config["model"] = {**config["model"], "latent_height": 8, "latent_width": 8, "frames_per_block": 4}
    summary: dict = {}
    out = tmp_path / "c.safetensors"
    losses = train_compressor(
        pf.load_config(config), steps=2, out_path=out, videos=2, blocks=3, batch=2, data_source="world", summary=summary
    )
    assert len(losses) == 2 and out.is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert 0 < summary["held_out_drop"] and math.isfinite(summary["held_out_after"])
    # the metadata records the command's data options and what the compressor was fitted to
    meta = read_metadata(out)
    assert meta["data"] == "world" and (meta["videos"], meta["blocks"], meta["batch"]) == (2, 3, 2)
    assert meta["batch_size"] == 32 and meta["max_gap_blocks"] == 8 and meta["sampler"]["steps"] == 2
    assert meta["model"] == {"name": "tiny_dit", "weights": None} and "commit" in meta
    assert summary["held_out_sequences"] == 1 and meta["held_out_sequences"] == 1  # 4 sequences, 1 held out
    # one sequence (e.g. a tight --max-blocks): nothing can be held out, and the figures say so
    lines: list[str] = []
    one = tmp_path / "one.safetensors"
    train_compressor(pf.load_config(config), steps=1, out_path=one, videos=1, blocks=2, batch=1, log=lines.append)
    assert read_metadata(one)["held_out_sequences"] == 0
    assert any(line.startswith("loss on the training data (one sequence: nothing held out)") for line in lines)
    with pytest.raises(ValueError, match="--data: expected one of"):
        train_compressor(pf.load_config(config), steps=1, out_path=None, data_source="web")


def test_the_world_reads_the_codec_stride_and_scene_count_through_their_helpers():
    """``spatial_stride_of`` and ``num_scenes_of`` read the optional attributes where declared and
    say so where not (``None`` stride, 0 scenes), without defaults of their own."""
    codec = LinearPatchCodec(16, 4, basis="dct")
    assert spatial_stride_of(codec) == 4
    assert spatial_stride_of(StridelessCodec(codec)) is None and spatial_stride_of(None) is None
    assert num_scenes_of(TinyDiT(TinyDiTParams(**SMALL, num_conditions=3))) == 3
    assert num_scenes_of(TinyDiT(TinyDiTParams(**SMALL))) == 0
    assert num_scenes_of(SimpleNamespace()) == 0  # undeclared: takes none
    # the world of a tiny_dit: its latent size times the codec's stride, one scene per condition
    world = world_params_for(TinyDiT(TinyDiTParams(**SMALL, codec_stride=4, num_conditions=3)))
    assert (world.height, world.width, world.num_scenes, world.frames_per_block) == (16, 16, 3, 2)
    assert world_params_for(TinyDiT(TinyDiTParams(**SMALL))).num_scenes == SceneWorldParams().num_scenes


class StridelessCodec:
    """A codec that declares no spatial stride."""

    def __init__(self, inner):
        self.encode, self.decode = inner.encode, inner.decode


def stand_in(**attributes) -> SimpleNamespace:
    """A model with tiny_dit's geometry (4×4 latents, 2 frames per block) and ``attributes``."""
    return SimpleNamespace(geometry=TinyDiTParams(**SMALL).geometry(), **attributes)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (stand_in(codec=None), "needs the model's codec; SimpleNamespace has none"),
        (
            stand_in(codec=StridelessCodec(LinearPatchCodec())),
            "needs the spatial stride of the model's codec; StridelessCodec declares no stride",
        ),
        (
            stand_in(codec=LinearPatchCodec(), pixel_frames_per_latent=4),
            "renders one pixel frame per latent frame; SimpleNamespace decodes 4 per latent frame",
        ),
        (
            stand_in(codec=LinearPatchCodec(), condition_keys=frozenset({"scene"})),
            "takes scene conditions but declares no num_scenes",
        ),
    ],
)
def test_a_world_that_cannot_be_filmed_for_the_model_is_refused(model, message):
    with pytest.raises(ValueError, match=f"^the scenes world .*{message}") as info:
        world_params_for(model)
    assert "\n" not in str(info.value)


def test_the_training_verbs_refuse_a_model_the_world_cannot_be_filmed_for(tmp_path: Path, monkeypatch, capsys):
    """train-model and train-compressor --data world: one line naming what the model lacks, before
    anything is trained or written."""
    from packforcing.models import tiny_dit
    from packforcing.training.compressor import train_compressor

    real = tiny_dit.LinearPatchCodec
    monkeypatch.setattr(tiny_dit, "LinearPatchCodec", lambda *args, **kwargs: StridelessCodec(real(*args, **kwargs)))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(small_config()))
    out = tmp_path / "w.safetensors"
    assert main(["train-model", "--config", str(config), "--out", str(out), "--steps", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    lacks = "the scenes world needs the spatial stride of the model's codec; StridelessCodec declares no stride"
    assert err.startswith(f"error: {lacks}") and err.count("\n") == 1
    dual = {**small_config(), "compressor": {"name": "dual_branch", "hr_channels": [4, 8, 8, 16]}}
    with pytest.raises(ValueError, match=f"^--data world: {lacks}"):
        train_compressor(pf.load_config(dual), steps=1, out_path=out, videos=1, blocks=2, data_source="world")
    assert not out.exists()


def test_an_interrupted_run_with_non_finite_weights_writes_nothing_and_stays_interrupted(tmp_path: Path, monkeypatch):
    """Ctrl-C after an update made the weights NaN (the next loss not computed yet): the
    interrupt is what is raised (not a write error), and nothing is written."""
    out = tmp_path / "w.safetensors"
    params = TrainModelParams(steps=6, batch_size=1, train_blocks=2, clips=2, checkpoint_every=0)

    def interrupt(model, loss):
        raise KeyboardInterrupt

    patch_teacher_forcing_loss(monkeypatch, {2: poison, 3: interrupt})
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        train_model(pf.load_config(small_config()), params, out, progress=False, log=lines.append)
    assert not out.exists() and lines[-1] == f"stopped: {out} not written (the weights are not finite)"


def test_a_diverged_run_with_finite_weights_writes_nothing_more(tmp_path: Path, monkeypatch):
    """A non-finite loss from finite weights (a bad batch): --out keeps its last checkpoint, the
    weights that gave the loss are not written over it."""
    out = tmp_path / "w.safetensors"
    params = TrainModelParams(steps=6, batch_size=1, train_blocks=2, clips=2, checkpoint_every=2)
    patch_teacher_forcing_loss(monkeypatch, {4: lambda model, loss: loss * float("inf")})  # step 3
    with pytest.raises(ValueError, match=r"^training diverged at step 3: the loss is inf"):
        train_model(pf.load_config(small_config()), params, out, progress=False)
    assert read_metadata(out)["steps"] == 2


def test_a_diverging_compressor_run_stops_in_one_line_and_writes_nothing(tmp_path: Path, monkeypatch):
    from packforcing.training import compressor as training

    config = {**small_config(), "compressor": {"name": "dual_branch", "hr_channels": [4, 8, 8, 16]}}
    config["model"] = {**config["model"], "latent_height": 8, "latent_width": 8, "frames_per_block": 4}
    real_loss = training.attention_loss
    monkeypatch.setattr(training, "attention_loss", lambda *a: real_loss(*a) * float("inf"))
    out = tmp_path / "c.safetensors"
    with pytest.raises(ValueError, match=r"^training diverged at step 0: the loss is inf \(try a smaller --lr\)$"):
        training.train_compressor(pf.load_config(config), steps=2, out_path=out, videos=2, blocks=3, batch=2)
    assert not out.exists()


def test_sample_prediction_turns_the_head_into_a_velocity():
    """prediction: sample reads the head as x̂₀ and returns (x_σ − x̂₀) / σ; same weights."""
    velocity = TinyDiT(TinyDiTParams(**SMALL))
    sample = TinyDiT(TinyDiTParams(**SMALL, prediction="sample"))
    x = torch.randn(2, 16, 2, 4, 4)
    ctx = MaskedContext(SdpaBackend(), torch.ones(8, 8, dtype=torch.bool))
    t = torch.tensor([1000.0, 625.0])
    head = velocity.denoise(x, t, ctx)
    expected = (x - head) / (t / 1000)[:, None, None, None, None]
    assert torch.allclose(sample.denoise(x, t, ctx), expected, atol=1e-5)
    per_frame = torch.tensor([[1000.0, 1000.0], [625.0, 625.0]])
    assert torch.allclose(sample.denoise(x, per_frame, ctx), expected, atol=1e-5)
    with pytest.raises(ValueError, match="prediction: expected one of"):
        TinyDiTParams(prediction="noise")


def test_block_weights_weigh_each_blocks_mean_error():
    """``block_weights`` = 1 everywhere is the plain mean; weight 0 on a block removes it; the
    default recipe down-weights first appearances, which no history can predict."""
    from packforcing.training.model import first_appearances

    model = TinyDiT(TinyDiTParams(**SMALL, num_conditions=3))
    f = model.geometry.frames_per_block
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 16, 3 * f, 4, 4, generator=gen)
    noise = torch.randn(clean.shape, generator=gen)
    scenes = torch.tensor([[0, 1, 0], [2, 2, 1]]).repeat_interleave(f, dim=1)
    sigma = torch.full((2, 3), 0.8)
    masks = teacher_masks(3, model.geometry.tokens_per_block)
    args = (model, SdpaBackend(), clean, scenes, sigma, noise, masks)
    plain = teacher_forcing_loss(*args)
    torch.testing.assert_close(teacher_forcing_loss(*args, torch.ones(2, 3)), plain)
    only_first = teacher_forcing_loss(*args, torch.tensor([[1.0, 0, 0], [0, 0, 0]]))
    assert not torch.isclose(only_first, plain)
    assert first_appearances(scenes, f).tolist() == [[True, True, False], [True, False, True]]
    # first appearances weighted 0 in a batch of nothing else: a zero loss, not 0 / 0
    nothing = teacher_forcing_loss(*args, torch.zeros(2, 3))
    assert float(nothing) == 0.0


def test_a_run_stopped_before_its_first_step_leaves_the_output_as_it_was(tmp_path: Path, monkeypatch):
    """Interrupted (or failing) training keeps what it has learnt, and says so; stopped before
    any step it has learnt nothing: a previous run's weights are not replaced by the seeded
    initialisation."""
    from packforcing.training import model as training

    out = tmp_path / "w.safetensors"
    params = TrainModelParams(steps=50, batch_size=1, train_blocks=2, clips=2, checkpoint_every=0)
    train_model(pf.load_config(small_config()), attrs.evolve(params, steps=1), out, progress=False)
    before = out.read_bytes()
    original = training.ClipPool.get
    calls = []

    def interrupted_at(n):
        def get(self, indices):
            calls.append(1)
            if len(calls) > n:
                raise KeyboardInterrupt
            return original(self, indices)

        return get

    monkeypatch.setattr(training.ClipPool, "get", interrupted_at(0))
    with pytest.raises(KeyboardInterrupt):
        train_model(pf.load_config(small_config()), params, out, progress=False)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    calls.clear()
    monkeypatch.setattr(training.ClipPool, "get", interrupted_at(3))
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        train_model(pf.load_config(small_config()), params, out, progress=False, log=lines.append)
    meta = read_metadata(out)
    assert meta["steps"] == 3 and meta["planned_steps"] == 50
    assert lines[-1] == f"stopped: wrote {out} after 3 of 50 steps"


def test_the_shipped_world_model_records_how_it_was_trained():
    """The default model of the presets: ≤ 20 MB of safetensors whose metadata names the world,
    steps, seed, clip length, schedule and commit; every tiny_dit preset loads it."""
    from packforcing.compressors.dual_branch import resolve_weights

    path = resolve_weights("pkg:world_tiny.safetensors")
    assert path.stat().st_size <= 20 * 2**20
    meta = read_metadata(path)
    assert meta["world"]["name"] == "scenes" and meta["train_blocks"] == 6 and meta["seed"] == 0
    assert meta["steps"] == meta["planned_steps"] and meta["steps"] > 0
    assert meta["schedule"]["kind"] == "recall" and len(meta["commit"]) == 12
    assert meta["model"]["condition_tokens"] is True and meta["model"]["num_conditions"] == 8
    first = meta["init"]  # the 8,000-step run it continued: its whole recipe
    assert set(first) == set(INIT_RECORD) and first["init"] is None and len(first["commit"]) == 12
    assert (first["steps"], first["seed"], first["clips"], first["train_blocks"]) == (8000, 0, 2048, 6)
    assert first["schedule"]["kind"] == "recall" and first["sampler"] == meta["sampler"]
    assert meta["total_steps"] == first["total_steps"] + meta["steps"]
    for preset in ("packforcing", "full", "sliding_window", "sink_recent"):
        config = pf.load_config(preset)
        assert config.data["model"]["weights"] == "pkg:world_tiny.safetensors", preset


def test_the_world_a_preset_s_model_trains_on_is_the_world_the_shipped_model_was_trained_on():
    """``world_params_for`` (the codec's stride, the declared scene count, sizes and speeds scaled
    to the frame) gives the presets' model exactly the world its weights record: retraining it
    films the same clips."""
    from packforcing.compressors.dual_branch import resolve_weights

    meta = read_metadata(resolve_weights("pkg:world_tiny.safetensors"))
    model = pf.build_engine(pf.load_config("packforcing", ["run.device=cpu"])).model
    assert {"name": "scenes", **world_params_for(model).as_dict()} == meta["world"]


def test_weights_refuse_a_config_that_computes_differently():
    """Flags that change no tensor's shape (condition_tokens, prediction, codec…) are checked
    against the weights' metadata: a preset that forgot one is a one-line error, not a model
    silently running as it was never trained."""
    with pytest.raises(pf.ConfigError, match=r"model\.condition_tokens: world_tiny\.safetensors was trained with "
                       r"condition_tokens=True, the config has False"):  # fmt: skip
        pf.build_engine(pf.load_config("packforcing", ["model.condition_tokens=false"]))
    with pytest.raises(pf.ConfigError, match=r"model\.prediction: .* trained with prediction='sample'"):
        pf.build_engine(pf.load_config("full", ["model.prediction=velocity"]))


@pytest.mark.parametrize(
    ("verb", "args", "message"),
    [
        (
            "train-compressor",
            ["--blocks", "1"],
            "--blocks: expected an integer >= 2 (a training pair is a block and a later one), got '1'",
        ),
        ("train-compressor", ["--max-blocks", "1"], "--max-blocks: expected an integer >= 2 (a training pair is"),
        ("train-compressor", ["--videos", "0"], "--videos: expected an integer >= 1, got '0'"),
        ("train-compressor", ["--steps", "0"], "--steps: expected an integer >= 1, got '0'"),
        ("train-compressor", ["--steps", "x"], "--steps: expected an integer >= 1, got 'x'"),
        ("train-compressor", ["--batch", "0"], "--batch: expected an integer >= 1, got '0'"),
        ("train-compressor", ["--batch-size", "-1"], "--batch-size: expected an integer >= 1, got '-1'"),
        ("train-compressor", ["--lr", "0"], "--lr: expected a number > 0, got '0'"),
        (
            "train-compressor",
            ["--seed", str(2**63)],
            f"--seed: expected an integer >= 0 and < 2**63 (a torch generator seed), got '{2**63}'",
        ),
        ("train-compressor", ["--seed", "-1"], "--seed: expected an integer >= 0 and < 2**63"),
        ("train-model", ["--steps", "0"], "--steps: expected an integer >= 1, got '0'"),
        ("train-model", ["--batch-size", "0"], "--batch-size: expected an integer >= 1, got '0'"),
        ("train-model", ["--train-blocks", "0"], "--train-blocks: expected an integer >= 1, got '0'"),
        ("train-model", ["--clips", "0"], "--clips: expected an integer >= 1, got '0'"),
        ("train-model", ["--lr", "-1"], "--lr: expected a number > 0, got '-1'"),
        ("train-model", ["--lr", "nan"], "--lr: expected a number > 0, got 'nan'"),
        (
            "train-model",
            ["--pure-noise-fraction", "1.5"],
            "--pure-noise-fraction: expected a number in [0, 1], got '1.5'",
        ),
        ("train-model", ["--pure-noise-fraction", "-0.1"], "--pure-noise-fraction: expected a number in [0, 1]"),
        ("train-model", ["--new-scene-probability", "nan"], "--new-scene-probability: expected a number in [0, 1]"),
        ("train-model", ["--gain-lr-scale", "-1"], "--gain-lr-scale: expected a number >= 0, got '-1'"),
        ("train-model", ["--gain-lr-scale", "nan"], "--gain-lr-scale: expected a number >= 0, got 'nan'"),
        ("train-model", ["--first-appearance-weight", "-1"], "--first-appearance-weight: expected a number >= 0"),
        ("train-model", ["--first-appearance-weight", "inf"], "--first-appearance-weight: expected a number >= 0"),
        ("train-model", ["--seed", str(2**63)], "--seed: expected an integer >= 0 and < 2**63"),
        ("train-model", ["--checkpoint-every", "-1"], "--checkpoint-every: expected an integer >= 0, got '-1'"),
    ],
)
def test_training_options_out_of_range_are_usage_errors(tmp_path: Path, capsys, verb, args, message):
    """An option's own range is its argparse type, as for every verb: argparse's usage line and
    one error naming the option, exit 2, before the config is even read; nothing written."""
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(small_config()))
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--config", str(config), "--out", str(tmp_path / "w.safetensors"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(f"usage: packforcing {verb} ") and f"\npackforcing {verb}: error: argument {message}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


@pytest.mark.parametrize(
    ("verb", "args", "message"),
    [
        ("train-compressor", ["--out", "{file}/w.safetensors"], "--out: {file}/w.safetensors: cannot write there:"),
        ("train-model", ["--out", "{file}/w.safetensors"], "--out: {file}/w.safetensors: cannot write there:"),
        ("train-model", ["--out", "{dir}"], "--out: {dir}: is a directory"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_anything_runs(tmp_path: Path, capsys, verb, args, message):
    """One line naming the option, exit 1, nothing written: before the model is even built."""
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(small_config()))
    (tmp_path / "file").write_text("")
    names = {"file": str(tmp_path / "file"), "dir": str(tmp_path)}
    args = [a.format(**names) for a in args]
    assert main([verb, "--config", str(config), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(**names)}") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "file"]


def test_a_failed_write_leaves_no_file(tmp_path: Path, monkeypatch):
    import safetensors.torch

    from packforcing.training.output import write_weights

    out = tmp_path / "w.safetensors"
    out.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise safetensors.SafetensorError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match=r"w\.safetensors: cannot write the weights: disk full"):
        write_weights({"a": torch.zeros(2)}, out, {})
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_init_weights_of_another_architecture_are_refused_in_one_line(tmp_path: Path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(small_config()))
    compressor = Path(pf.__file__).parent / "weights" / "dual_branch_tiny.safetensors"
    code = main(["train-model", "--config", str(config), "--out", str(tmp_path / "w.safetensors"),
                 "--init", str(compressor), "--steps", "1", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: --init: ")
    assert "dual_branch_tiny.safetensors: not weights for this architecture: missing " in err
    assert "(it holds packforcing.dual_branch/1 weights; expected packforcing.block_model/1)" in err
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize(
    ("verb", "config", "message"),
    [
        ("train-compressor", "sink_recent", "compressor: train-compressor needs a config with a dual_branch "
         "compressor; this one has no compressor"),
        ("train-compressor", {"compressor": {"name": "pool"}}, "compressor: train-compressor needs a config with a "
         "dual_branch compressor; this one has compressor 'pool'"),
        ("train-model", "wan1.3b/packforcing", "model: train-model needs a config whose model starts from "
         "a seeded initialisation"),
    ],
)  # fmt: skip
def test_what_the_training_verbs_set_themselves_is_not_called_set(tmp_path: Path, capsys, verb, config, message):
    """The verbs' own overrides (weights: null, float32) are never reported as the user's --set."""
    if isinstance(config, dict):
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps({**small_config(), **config}))
        config = str(path)
    assert main([verb, "--config", config, "--out", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert message in err and "--set" not in err and err.count("\n") == 1


def test_a_diverging_run_stops_in_one_line_and_writes_no_nan_weights(tmp_path: Path, monkeypatch, capsys):
    """A loss that is not finite stops training at once, in one line naming the step; weights that
    are not finite are never written (--out keeps what it held), for both training verbs."""
    from packforcing.training.output import write_weights

    out = tmp_path / "w.safetensors"
    params = TrainModelParams(steps=6, batch_size=1, train_blocks=2, clips=2, checkpoint_every=2)
    # step 3: the weights after step 2's update were written at step 2
    calls = patch_teacher_forcing_loss(monkeypatch, {4: lambda model, loss: poison(model, loss) * float("nan")})
    with pytest.raises(ValueError, match=r"^training diverged at step 3: the loss is nan \(try a smaller --lr\)$"):
        train_model(pf.load_config(small_config()), params, out, progress=False)
    assert read_metadata(out)["steps"] == 2  # the last finite checkpoint, not the NaN weights
    assert torch.isfinite(pf.build_engine(small_config(weights=str(out))).model.head.weight).all()
    with pytest.raises(ValueError, match=r"x\.safetensors: not written: w is not finite \(training diverged"):
        write_weights({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "x.safetensors", {})
    assert not (tmp_path / "x.safetensors").exists()
    # the verb: one line, exit status 1
    calls.clear()
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(small_config()))
    argv = ["train-model", "--config", str(config), "--out", str(tmp_path / "v.safetensors"), "--steps", "6",
            "--batch-size", "1", "--train-blocks", "2", "--clips", "2", "--no-progress",
            "--checkpoint-every", "0"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == "error: training diverged at step 3: the loss is nan (try a smaller --lr)\n"
    assert not (tmp_path / "v.safetensors").exists()  # its only weights were NaN: nothing written
