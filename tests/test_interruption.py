"""Runs survive interruption, and resume bit-exactly.

``run_job`` (what ``packforcing generate`` runs) is interrupted in-process at chosen blocks —
between blocks, inside a commit that compresses and archives, during the first blocks — then
resumed; the latents must be bit-identical to an uninterrupted run and the MP4 must hold
every frame once. Real signals (SIGINT, SIGTERM, SIGKILL) are sent to a CLI subprocess.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from packforcing.cli import main
from packforcing.cli.generate import Interrupted, run_job

from .faults import FaultyCompressor

pytestmark = pytest.mark.usefixtures("torch_single_thread")

REPO = Path(__file__).resolve().parent.parent
MODEL = {
    "name": "tiny_dit",
    "hidden_size": 16,
    "num_heads": 2,
    "num_layers": 1,
    "latent_channels": 4,
    "latent_height": 4,
    "latent_width": 4,
    "frames_per_block": 2,
    "codec_stride": 4,
}
POLICIES: dict[str, dict[str, Any]] = {
    "full": {"policy": {"name": "full"}},
    "sliding_window": {"policy": {"name": "sliding_window", "window_frames": 4}},
    "sink_recent": {"policy": {"name": "sink_recent", "sink_frames": 2, "window_frames": 2}},
    "packforcing": {
        "policy": {
            "name": "packforcing",
            "sink_frames": 2,
            "recent_frames": 2,
            "mid_capacity_blocks": 2,
            "mid_overflow": "archive",
        },
        "compressor": {"name": "pool", "window": [1, 2, 2]},
        "selector": {"name": "topk", "k": 1, "min_queries": 2},
        "realigner": "temporal_rope_shift",
    },
    "tiered": {
        "policy": {
            "name": "tiered",
            "overflow": "archive",
            "tiers": [
                {"name": "sink", "frames": 2, "pinned": True},
                {"name": "far", "blocks": 1, "fidelity": {"name": "pool", "window": [2, 1, 1]}},
                {"name": "mid", "blocks": 1, "fidelity": "compressed", "select": True},
                {"name": "recent", "blocks": 1},
            ],
        },
        "compressor": {"name": "pool", "window": [1, 2, 2]},
        "selector": {"name": "recency", "k": 1},
    },
}
BLOCKS = 6  # packforcing/tiered: compression from block 2, archiving from block 4


def write_config(tmp_path: Path, policy: str, **run: Any) -> Path:
    config = {
        "model": MODEL,
        **POLICIES[policy],
        "backend": "sdpa",
        "sampler": {"steps": 2},
        "run": {"device": "cpu", "blocks": BLOCKS, "seed": 5, **run},
    }
    path = tmp_path / f"{policy}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def frames_of(path: Path) -> np.ndarray:
    return np.stack(imageio.mimread(path))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    out: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
    for policy in POLICIES:
        tmp = tmp_path_factory.mktemp(policy)
        run_job(write_config(tmp, policy), tmp / "run", save_latents=True)
        out[policy] = (load_file(str(tmp / "run" / "latents.safetensors"))["latents"], frames_of(tmp / "run/video.mp4"))
    return out


def stop_at(block: int):
    def on_block(done: int) -> None:
        if done == block:
            raise KeyboardInterrupt

    return on_block


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("at", [1, 4])
def test_interrupted_then_resumed_is_bit_identical(tmp_path, uninterrupted, policy, at):
    config = write_config(tmp_path, policy)
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as caught:
        run_job(config, out, save_latents=True, on_block=stop_at(at))
    assert caught.value.blocks_done == at and caught.value.resume_dir == out
    report = json.loads((out / "report.json").read_text())
    assert (report["status"], report["blocks_done"]) == ("interrupted", at)
    assert (out / "memory.png").stat().st_size > 0
    assert len(frames_of(out / "video.mp4")) == at * MODEL["frames_per_block"]  # playable, every finished block
    result = run_job(None, out, resume=True)
    assert (result["status"], result["blocks_done"]) == ("complete", BLOCKS)
    latents, frames = uninterrupted[policy]
    resumed = load_file(str(out / "latents.safetensors"))["latents"]
    assert resumed.numpy().tobytes() == latents.numpy().tobytes()
    got = frames_of(out / "video.mp4")
    assert got.shape == frames.shape  # every frame once
    assert np.array_equal(got, frames)
    assert [b["index"] for b in result["blocks"]] == list(range(BLOCKS))
    assert not (out / "checkpoint").exists()


@pytest.mark.parametrize(("policy", "runs"), [("sliding_window", [[0, 2]]), ("sink_recent", [[1, 3]])])
def test_a_checkpoint_listing_dropped_ids_as_earlier_versions_did_resumes_bit_identical(
    tmp_path, uninterrupted, policy, runs
):
    """Checkpoints save the dropped ids as runs ``[start, stop)``; earlier versions listed every
    id. A run directory whose checkpoint lists them (rewritten so here) resumes bit-exactly."""
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_job(write_config(tmp_path, policy), out, save_latents=True, on_block=stop_at(4))
    index = out / "checkpoint" / "state.json"
    state = json.loads(index.read_text())
    assert state["meta"]["cache"]["dropped"] == runs
    state["meta"]["cache"]["dropped"] = [i for start, stop in runs for i in range(start, stop)]
    index.write_text(json.dumps(state, indent=1) + "\n")
    result = run_job(None, out, resume=True)
    assert (result["status"], result["blocks_done"]) == ("complete", BLOCKS)
    latents, frames = uninterrupted[policy]
    assert load_file(str(out / "latents.safetensors"))["latents"].numpy().tobytes() == latents.numpy().tobytes()
    assert np.array_equal(frames_of(out / "video.mp4"), frames)


class InterruptingCompressor(FaultyCompressor):
    """Raises KeyboardInterrupt inside a commit (a second Ctrl-C landing mid-block), or sends
    the process SIGINT (a first Ctrl-C) while block ``at`` is being compressed and archived."""

    def __init__(self, inner, at: int, how: str) -> None:
        super().__init__(inner)
        self.at, self.how, self.fired = at, how, False

    def compress(self, block, model):
        if block.block_id == self.at and not self.fired:
            self.fired = True
            if self.how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return super().compress(block, model)


@pytest.mark.parametrize("how", ["raise", "signal"])
def test_interrupted_while_archiving_resumes_bit_identical(tmp_path, uninterrupted, how):
    config = write_config(tmp_path, "packforcing")
    out = tmp_path / "run"

    def wrap(kind, component):
        return InterruptingCompressor(component, at=3, how=how) if kind == "compressor" else component

    # block 5's commit compresses block 3 (leaving recent) and archives block 1 (leaving mid)
    with pytest.raises(Interrupted) as caught:
        run_job(config, out, save_latents=True, wrap=wrap)
    done = 4 if how == "raise" else 5  # a signal lets the block finish; a raise aborts its commit whole
    assert caught.value.blocks_done == done
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["meta"]["blocks_done"] == done
    run_job(None, out, resume=True)
    latents, frames = uninterrupted["packforcing"]
    assert load_file(str(out / "latents.safetensors"))["latents"].numpy().tobytes() == latents.numpy().tobytes()
    assert np.array_equal(frames_of(out / "video.mp4"), frames)


def test_checkpoint_every_and_resume_after_a_lost_tail(tmp_path, uninterrupted):
    """SIGKILL after block 5 with checkpoints every 2 blocks: the MP4 and report hold 5 blocks,
    the checkpoint 4; resuming cuts both back to 4 and continues bit-exactly."""
    config = write_config(tmp_path, "packforcing", checkpoint_every=2)
    out = tmp_path / "run"

    def killed(done: int) -> None:
        if done == 5:
            raise SystemExit("simulated SIGKILL")  # nothing is saved on the way out of a kill

    with pytest.raises(SystemExit):
        run_job(config, out, save_latents=True, on_block=killed)
    assert json.loads((out / "checkpoint/state.json").read_text())["meta"]["blocks_done"] == 4
    assert len(frames_of(out / "video.mp4")) == 5 * MODEL["frames_per_block"]
    run_job(None, out, resume=True)
    latents, frames = uninterrupted["packforcing"]
    assert load_file(str(out / "latents.safetensors"))["latents"].numpy().tobytes() == latents.numpy().tobytes()
    assert np.array_equal(frames_of(out / "video.mp4"), frames)
    assert (out / "checkpoint").exists()  # kept: run.checkpoint_every asks for checkpoints


def test_engine_state_dict_round_trip_is_bit_exact(uninterrupted):
    import packforcing as pf
    from packforcing.core.checkpoint import load_checkpoint, save_checkpoint

    config = yaml.safe_load(write_config(Path(os.environ.get("TMPDIR", "/tmp")), "packforcing").read_text())
    engine = pf.build_engine(config)
    session = engine.session(seed=5)
    first = [session.step().latents for _ in range(3)]
    state = engine.state_dict()
    rest = [session.step().latents for _ in range(3)]
    session.close()
    other = pf.build_engine(config)
    resumed = other.load_state_dict(state)
    assert resumed.blocks_done == 3
    again = [resumed.step().latents for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(rest, again, strict=True))
    assert torch.cat([*first, *rest], dim=2).numpy().tobytes() == uninterrupted["packforcing"][0].numpy().tobytes()
    resumed.close()
    # and through the on-disk format (safetensors + JSON)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"pf-state-{os.getpid()}"
    save_checkpoint(tmp, state)
    loaded, _ = load_checkpoint(tmp)
    third = pf.build_engine(config).load_state_dict(loaded)
    assert torch.equal(third.step().latents, rest[0])


def slots_of(policy) -> dict[str, list[tuple[int, int, int]]]:
    """Each tier's blocks as ``(block id, page, slot)``."""
    return {n: [(b.block_id, b.slot.page, b.slot.index) for b in policy.tier_blocks(n)] for n in policy.tier_names}


@pytest.mark.parametrize(
    "preset", ["full", "sliding_window", "sink_recent", "packforcing", "packforcing_tiered", "packforcing_4tier"]
)
def test_split_context_resume_is_bit_identical(tmp_path, preset):
    """A split context attends each tier's runs of adjacent slots where they are stored and sums
    the parts in page order; after 5 blocks the recent tiers have reused their slots out of time
    order. A checkpoint puts every block back in the slot it was saved in, so the resumed blocks
    are bit-identical (refilling in time order made other runs: differences of ~1e-6)."""
    import packforcing as pf
    from packforcing.core.checkpoint import load_checkpoint, save_checkpoint

    split = ["run.device=cpu", "sampler.steps=1", "backend={name: sdpa, split_context: true}"]
    engine = pf.build_engine(pf.load_config(preset, overrides=split))
    with engine.session(seed=1) as session:
        for _ in range(5):
            session.step()
        save_checkpoint(tmp_path, engine.state_dict())
        layout = slots_of(engine.policy)
        rest = [session.step().latents for _ in range(2)]
    state, _ = load_checkpoint(tmp_path)
    with engine.load_state_dict(state) as resumed:
        assert slots_of(engine.policy) == layout
        assert all(torch.equal(resumed.step().latents, x) for x in rest)


def test_existing_run_dir_is_refused_unless_overwrite(tmp_path, capsys):
    config = write_config(tmp_path, "full", blocks=1)
    out = tmp_path / "run"
    out.mkdir()
    (out / "video_1.mp4").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    argv = ["generate", "--config", str(config), "--out", str(out), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"error: {out}: already holds a run (video_1.mp4); pass --overwrite to replace it or --resume to continue it"
    )
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "video_1.mp4").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "report.json").read_text())["status"] == "complete"


def test_output_dir_is_checked_before_the_model_is_built(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = write_config(tmp_path, "full", blocks=1)
    started = time.perf_counter()
    assert main(["generate", "--config", str(config), "--out", str(blocker / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {blocker / 'run'}: cannot create the output directory"), err
    assert main(["generate", "--config", str(config), "--out", str(blocker), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {blocker}: exists and is not a directory"
    assert main(["generate", "--resume", str(tmp_path / "none")]) == 1
    assert "nothing to resume" in capsys.readouterr().err
    assert time.perf_counter() - started < 5


def test_a_run_that_fails_before_writing_leaves_no_empty_directory(tmp_path, monkeypatch, capsys):
    """A failure after the output directory is made but before anything is in it (the engine's
    build) removes the directory it made; one that was there already is left."""
    import packforcing.core.build as build

    def no_engine(*args: Any, **kwargs: Any) -> None:
        raise ValueError("model.weights: cannot be loaded")

    monkeypatch.setattr(build, "build_engine", no_engine)
    config = write_config(tmp_path, "full", blocks=1)
    out = tmp_path / "new" / "run"
    assert main(["generate", "--config", str(config), "--out", str(out), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == "error: model.weights: cannot be loaded"
    assert not out.exists()
    (tmp_path / "mine").mkdir()
    assert main(["generate", "--config", str(config), "--out", str(tmp_path / "mine"), "--no-progress"]) == 1
    assert (tmp_path / "mine").is_dir()


def test_failed_run_reports_failed_with_the_error(tmp_path):
    config = write_config(tmp_path, "full")
    out = tmp_path / "run"

    def boom(done: int) -> None:
        if done == 2:
            raise RuntimeError("disk on fire\nsecond line")

    with pytest.raises(RuntimeError):
        run_job(config, out, on_block=boom)
    report = json.loads((out / "report.json").read_text())
    assert (report["status"], report["blocks_done"], report["error"]) == ("failed", 2, "disk on fire second line")
    assert (out / "memory.png").stat().st_size > 0


def test_cuda_on_a_cpu_build_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this torch build has CUDA")
    config = write_config(tmp_path, "full", blocks=1)
    assert main(["generate", "--config", str(config), "--out", str(tmp_path / "o"), "--set", "run.device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --set: run.device: 'cuda': this torch build has no CUDA (use cpu or auto)"


def test_blocks_errors_are_labelled_blocks(tmp_path, capsys):
    config = write_config(tmp_path, "full")
    assert main(["generate", "--config", str(config), "--out", str(tmp_path / "o"), "--blocks", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --blocks: run.blocks: expected an integer >= 1, got 0"


# ---------------------------------------------------------------------- real signals
def _cli(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "packforcing", "generate", "--config", str(config), "--out", str(out)]
    return subprocess.Popen(
        [*cmd, "--no-progress", "--save-latents", *extra], env=env, stderr=subprocess.PIPE, text=True
    )


def _wait_for_blocks(out: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((out / "report.json").read_text())["blocks_done"] >= count:
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    raise AssertionError("the run did not get going")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_real_signals(tmp_path, uninterrupted, sig):
    config = write_config(tmp_path, "packforcing", blocks=400)
    out = tmp_path / "run"
    proc = _cli(config, out)
    _wait_for_blocks(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    report = json.loads((out / "report.json").read_text())
    done = report["blocks_done"]
    frames = frames_of(out / "video.mp4")  # playable whatever the signal
    assert len(frames) >= done * MODEL["frames_per_block"] and done >= 2
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and report["status"] == "running"
        return
    assert proc.returncode == 130
    assert err.strip() == (
        f"error: interrupted ({sig.name}) after {done} blocks; resume with: packforcing generate --resume {out}"
    )
    assert report["status"] == "interrupted" and (out / "memory.png").exists()
    assert len(frames) == done * MODEL["frames_per_block"]
    # resume (shortened to 6 blocks) gives the uninterrupted run's first blocks bit for bit
    if done < BLOCKS:
        assert main(["generate", "--resume", str(out), "--blocks", str(BLOCKS), "--no-progress"]) == 0
        latents, video = uninterrupted["packforcing"]
        assert load_file(str(out / "latents.safetensors"))["latents"].numpy().tobytes() == latents.numpy().tobytes()
        assert np.array_equal(frames_of(out / "video.mp4"), video)


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(tmp_path):
    """A background job of a shell script starts with SIGINT ignored (a Ctrl-C meant for the
    foreground must not stop it): ``generate`` leaves it so, where it took SIGINT for its own
    stop-after-this-block handler, and the run completes."""
    blocks = 30  # still running when the signals come
    config = write_config(tmp_path, "packforcing", blocks=blocks)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "packforcing", "generate", "--config", str(config), "--out", str(out), "--no-progress"]
    ignoring = {"preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, **ignoring)
    _wait_for_blocks(out, 1, proc)
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    report = json.loads((out / "report.json").read_text())
    assert (report["status"], report["blocks_done"]) == ("complete", blocks)


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    # enough blocks that the run cannot finish before the signal, however late a loaded machine
    # delivers it: the signal lands in start-up (importing torch, building the parser) or early on
    config = write_config(tmp_path, "sliding_window", blocks=100_000)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "packforcing", "generate", "--config", str(config), "--out", str(tmp_path / "o")]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.filterwarnings("ignore:dual_branch has no weights")
@pytest.mark.parametrize("policy", [*POLICIES, "dual_branch"])
def test_a_state_dict_is_a_snapshot_the_session_does_not_change(policy):
    """``engine.state_dict()`` taken mid-video is the video at that moment: stepping the session
    on (its slots reused, blocks compressed and archived) leaves it as it was, so loading it later
    continues from where it was taken. The latents a tier keeps for a compressor that needs
    them (``dual_branch``) were returned as views of the live slots, which later blocks overwrote."""
    import packforcing as pf

    config = {
        "model": {**MODEL, "latent_height": 8, "latent_width": 8},
        **POLICIES["packforcing" if policy == "dual_branch" else policy],
        "backend": "sdpa",
        "sampler": {"steps": 2},
        "run": {"device": "cpu"},
    }
    if policy == "dual_branch":
        config["compressor"] = {"name": "dual_branch", "hr_channels": [4, 8, 8, 16]}
    engine = pf.build_engine(config)
    with engine.session(seed=3) as session:
        for _ in range(3):
            session.step()
        state = engine.state_dict()
        saved = {name: tensor.clone() for name, tensor in state["tensors"].items()}
        rest = [session.step().latents for _ in range(5)]  # past every tier's capacity
    assert all(torch.equal(state["tensors"][name], tensor) for name, tensor in saved.items())
    if policy == "dual_branch":
        assert any(name.endswith(".latents") for name in saved)  # the case that aliased
    with pf.build_engine(config).load_state_dict(state) as resumed:
        again = [resumed.step().latents for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(rest, again, strict=True))


def test_state_dict_of_a_recache_session_round_trips():
    """A session re-caching at prompt switches keeps its blocks' latents: they are in the state."""
    import packforcing as pf

    config = {
        "model": {**MODEL, "num_conditions": 3},
        "policy": {"name": "sliding_window", "window_frames": 4},
        "backend": "sdpa",
        "sampler": {"steps": 2},
        "run": {"device": "cpu"},
    }
    schedule = [{"from_block": 0, "scene": 0}, {"from_block": 3, "scene": 2}, {"from_block": 5, "scene": 1}]
    engine = pf.build_engine(config)
    with engine.session(seed=2, conditions=schedule, recache=True) as session:
        for _ in range(2):
            session.step()
        state = engine.state_dict()
        assert any(name.startswith("session.latents.") for name in state["tensors"])
        rest = [session.step().latents for _ in range(4)]  # crosses both switches
    with pf.build_engine(config).load_state_dict(state) as resumed:
        again = [resumed.step().latents for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(rest, again, strict=True))


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_resume_with_fewer_blocks_than_done_is_refused_unchanged(tmp_path, capsys):
    config = write_config(tmp_path, "full")
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_job(config, out, on_block=stop_at(4))
    before = _tree(out)
    assert main(["generate", "--resume", str(out), "--blocks", "2", "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == "error: --blocks 2: the run already has 4 blocks"
    assert _tree(out) == before  # nothing changed: still the interrupted run, still resumable
    assert main(["generate", "--resume", str(out), "--blocks", "4", "--no-progress"]) == 0  # equal: just finishes
    assert json.loads((out / "report.json").read_text())["status"] == "complete"


def write_scenes_config(tmp_path: Path, blocks: int = 12) -> Path:
    """tiny_dit with scenes and no run.prompts: generate lays out its default scene schedule."""
    config = {
        "model": {**MODEL, "num_conditions": 3},
        **POLICIES["full"],
        "backend": "sdpa",
        "sampler": {"steps": 2},
        "run": {"device": "cpu", "blocks": blocks, "seed": 5},
    }
    path = tmp_path / "scenes.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_resumed_report_keeps_measuring_returns(tmp_path):
    """The per-return PSNR needs the last frame under each scene: it travels in the checkpoint."""
    config = write_scenes_config(tmp_path)
    whole = run_job(config, tmp_path / "whole")
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_job(config, out, on_block=stop_at(7))
    resumed = run_job(None, out, resume=True)
    assert [r["block"] for r in whole["returns"]] == [4, 10]  # one return before the stop, one after
    assert resumed["returns"] == whole["returns"]
    assert resumed["return_psnr_db"] == whole["return_psnr_db"]


def _spec_at(schedule: list[dict[str, Any]], block: int) -> dict[str, Any]:
    segment = [s for s in schedule if s["from_block"] <= block][-1]
    return {k: v for k, v in segment.items() if k != "from_block"}


def test_extended_run_continues_and_reports_its_own_schedule(tmp_path):
    """--blocks 16 on a 12-block run keeps the checkpoint's scene schedule (a fresh 16-block run
    would lay out another); report.json records the one the blocks were made with."""
    config = write_scenes_config(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_job(config, out, on_block=stop_at(7))
    started = json.loads((out / "report.json").read_text())["conditions"]
    report = run_job(None, out, resume=True, overrides=["run.blocks=16"])
    assert report["conditions"] == started
    assert [b["condition"] for b in report["blocks"]] == [_spec_at(started, i) for i in range(16)]


def test_extended_run_reports_its_new_length(tmp_path, monkeypatch):
    """report.json's video section is the resumed run's length, not the one it was started with."""
    import functools

    import packforcing.cli.generate as generate

    config = write_scenes_config(tmp_path)
    out = tmp_path / "run"
    started = generate.run_job
    monkeypatch.setattr(generate, "run_job", functools.partial(started, on_block=stop_at(7)))
    assert main(["generate", "--config", str(config), "--out", str(out), "--no-progress"]) == 130
    first = json.loads((out / "report.json").read_text())["video"]
    monkeypatch.setattr(generate, "run_job", started)
    assert main(["generate", "--resume", str(out), "--blocks", "16", "--no-progress"]) == 0
    video = json.loads((out / "report.json").read_text())["video"]
    frames = len(frames_of(out / "video.mp4"))
    assert first["blocks"] == 12 and first["seconds_requested"] is None
    assert video == {
        "seconds_requested": None,
        "blocks": 16,
        "latent_frames": 16 * MODEL["frames_per_block"],
        "pixel_frames": frames,
        "fps": first["fps"],
        "video_seconds": frames / first["fps"],
    }


def test_signals_after_the_last_block_leave_a_complete_run(tmp_path, monkeypatch):
    """Two Ctrl-Cs while a finished run writes its files: it ends complete, with all of them."""
    import packforcing.output.plot as plot

    config = write_config(tmp_path, "full")
    out = tmp_path / "run"
    draw = plot.plot_memory

    def interrupted_twice(report: dict[str, Any], path: Path, full: int) -> None:
        if report["status"] == "complete":
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        draw(report, path, full)

    monkeypatch.setattr(plot, "plot_memory", interrupted_twice)
    result = run_job(config, out, save_latents=True)
    report = json.loads((out / "report.json").read_text())
    assert result["status"] == report["status"] == "complete" and report["blocks_done"] == BLOCKS
    assert (out / "memory.png").stat().st_size > 0
    assert load_file(str(out / "latents.safetensors"))["latents"].shape[2] == BLOCKS * MODEL["frames_per_block"]
    assert not (out / "checkpoint").exists()


@pytest.mark.parametrize("full", ["video.mp4", "latents.safetensors", "memory.png"])
def test_full_disk_names_the_file_and_fails_the_report(tmp_path, monkeypatch, capsys, full):
    """ENOSPC while writing an output: one line naming the file, report.json says failed, no
    half-written file or temporary is left."""
    import errno

    import safetensors.torch

    import packforcing.core.checkpoint as checkpoint
    from packforcing.output.video import FragmentedMP4Writer

    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if full == "video.mp4":
        appended = FragmentedMP4Writer.append
        monkeypatch.setattr(
            FragmentedMP4Writer, "append", lambda w, frames: no_space() if w.frames else appended(w, frames)
        )
    elif full == "latents.safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    else:
        written = checkpoint.write_atomic
        monkeypatch.setattr(
            checkpoint, "write_atomic", lambda path, *a: no_space() if path.suffix == ".png" else written(path, *a)
        )
    config = write_config(tmp_path, "full")
    out = tmp_path / "run"
    assert main(["generate", "--config", str(config), "--out", str(out), "--save-latents", "--no-progress"]) == 1
    line = f"{out / full}: cannot write: no space left on device"
    assert capsys.readouterr().err.strip() == f"error: {line}"
    report = json.loads((out / "report.json").read_text())
    assert (report["status"], report["error"]) == ("failed", line)
    assert (out / "memory.png").exists() == (full != "memory.png")
    assert not list(out.glob(".*"))  # no temporaries


def test_a_failed_video_append_leaves_the_blocks_before_playable(tmp_path, monkeypatch):
    """A block whose fragment is written but not made durable (ENOSPC at fsync; the same for a
    short write) is cut off again: the MP4 holds exactly the blocks appended before, playable."""
    import errno

    from packforcing.output import video
    from packforcing.output.video import FragmentedMP4Writer

    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8) for _ in range(2)]
    writer = FragmentedMP4Writer(tmp_path / "video.mp4", fps=8)
    writer.append(blocks[0])
    size = writer.nbytes

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(video.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        writer.append(blocks[1])
    monkeypatch.undo()
    assert (tmp_path / "video.mp4").stat().st_size == size == writer.nbytes and writer.frames == 3
    assert len(frames_of(tmp_path / "video.mp4")) == 3
    writer.append(blocks[1])  # the writer goes on from the blocks the file holds
    assert len(frames_of(tmp_path / "video.mp4")) == 6


def test_full_disk_while_saving_the_checkpoint_fails_the_report(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    def no_space(tensors: Any, path: str, **kwargs: Any) -> None:
        Path(path).write_bytes(b"half")  # a part written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="checkpoint: cannot write: no space left on device"):
        run_job(write_config(tmp_path, "full"), out, on_block=stop_at(2))
    report = json.loads((out / "report.json").read_text())
    assert (report["status"], report["error"]) == (
        "failed",
        f"{out / 'checkpoint'}: cannot write: no space left on device",
    )
    assert (out / "memory.png").exists() and not list((out / "checkpoint").glob("*"))


TRAIN_CONFIG = {
    "model": {**MODEL, "latent_height": 8, "latent_width": 8, "num_conditions": 3},
    "policy": {"name": "full"},
    "compressor": {"name": "dual_branch", "hr_channels": [4, 8, 8, 16]},
    "backend": "sdpa",
    "sampler": {"steps": 2},
    "run": {"device": "cpu"},
}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda sig: sig.name)
@pytest.mark.parametrize(
    "verb",
    [
        ["train-model", "--batch-size", "1", "--train-blocks", "2", "--clips", "2", "--no-progress"],
        ["train-compressor", "--videos", "1", "--blocks", "2", "--batch", "1", "--batch-size", "2"],
    ],
    ids=lambda verb: verb[0],
)
def test_a_signal_stops_the_training_verbs_in_one_line(tmp_path, verb, sig):
    """SIGTERM outside ``generate`` is Ctrl-C too: exit 130 and one line, not a silent -15; the
    line names the signal, Ctrl-C's as SIGTERM's (``error: interrupted (SIGINT)``), as
    ``generate``'s does."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(TRAIN_CONFIG))
    out = tmp_path / "w.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "packforcing", *verb[:1], "--config", str(config), "--out", str(out)]
    cmd += [*verb[1:], "--steps", "1000000"]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: Ctrl-C's default action, even where this test runs with it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "step     0  loss ...": training is under way
    assert line.startswith("step"), line + (proc.stderr.read() if proc.stderr else "")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    lines = err.splitlines()
    assert proc.returncode == 130 and lines[-1] == f"error: interrupted ({sig.name})", err
    assert all(line.startswith("stopped: wrote ") for line in lines[:-1]), err  # train-model's note
    if verb[0] == "train-model":  # its weights are saved on the way out
        assert out.is_file()


# ---------------------------------------------------------------------- report rewrites
def test_report_rewrites_thin_out_so_a_block_costs_the_same_however_long_the_run():
    """``report.json`` holds every block's record, so rewriting it after every block would cost
    each block more the longer the run: it is rewritten after each of the first 128 blocks, then
    ever less often, lagging the run by at most 1/64 of its blocks, with a constant number of
    records serialised per block on average."""
    from packforcing.cli.run_files import REPORT_EVERY_BLOCK, report_due

    assert all(report_due(n) for n in range(1, 2 * REPORT_EVERY_BLOCK))
    due = [n for n in range(1, 100_001) if report_due(n)]
    # the report lags the run by at most 1/64 of its blocks (by none while each block is written)
    assert all(b - a <= max(1, b / REPORT_EVERY_BLOCK) for a, b in itertools.pairwise(due))
    for length in (1_000, 10_000, 100_000):
        records = sum(n for n in due if n <= length)  # what the rewrites serialise in all
        assert records / length <= 2 * REPORT_EVERY_BLOCK  # per block: bounded, not growing with length


def test_the_report_on_disk_follows_the_rewrite_rule_and_every_checkpoint(tmp_path, monkeypatch):
    """After each block report.json has every block when the rule says so (and at every
    checkpoint), else the blocks of its last rewrite; the run's end writes them all."""
    import packforcing.cli.run_files as run_files

    monkeypatch.setattr(run_files, "REPORT_EVERY_BLOCK", 2)  # from block 4 every 2nd, from block 8 every 4th
    out = tmp_path / "run"
    seen: list[tuple[int, int]] = []

    def on_block(done: int) -> None:
        seen.append((done, json.loads((out / "report.json").read_text())["blocks_done"]))

    blocks, every = 14, 5
    run_job(write_config(tmp_path, "packforcing", blocks=blocks, checkpoint_every=every), out, on_block=on_block)
    written = 0
    for done, on_disk in seen:
        if run_files.report_due(done) or done % every == 0:
            written = done
        assert on_disk == written, (done, on_disk)
    # the blocks after which the report lags (5 and 10 are not due, but a checkpoint writes them)
    assert [done for done, on_disk in seen if done != on_disk] == [7, 9, 11, 13, 14]
    report = json.loads((out / "report.json").read_text())
    assert (report["status"], report["blocks_done"], len(report["blocks"])) == ("complete", blocks, blocks)


@pytest.mark.parametrize("how", ["raise", "sigterm"])
@pytest.mark.parametrize(("at", "checkpoint_every"), [(3, None), (4, 2)])
def test_an_interrupted_run_writes_its_report_once_on_the_way_out(tmp_path, monkeypatch, how, at, checkpoint_every):
    """Stopped after block ``at`` (Ctrl-C landing between blocks, or SIGTERM: the block finishes
    first), the run saves its checkpoint and writes ``report.json`` once, ``interrupted`` with
    every block: the checkpoint's own rewrite (``running``, the same blocks) was a second one.
    Block 4 is also a ``run.checkpoint_every`` checkpoint's, which rewrote it before."""
    from packforcing.output.report import RunReport

    writes: list[tuple[str, int]] = []
    write = RunReport.write

    def counted(self: RunReport, path: Any) -> None:
        writes.append((self.status, len(self.blocks)))
        write(self, path)

    monkeypatch.setattr(RunReport, "write", counted)
    out = tmp_path / "run"
    stopped: list[int] = []

    def on_block(done: int) -> None:
        if done == at:
            stopped.append(len(writes))  # what the blocks wrote: the rule's rewrites, a checkpoint's
            if how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)

    config = write_config(tmp_path, "packforcing", checkpoint_every=checkpoint_every)
    with pytest.raises(Interrupted) as caught:
        run_job(config, out, on_block=on_block)
    assert caught.value.blocks_done == at and caught.value.resume_dir == out
    assert writes[: stopped[0]][-1] == ("running", at)  # block at's rewrite (the rule: every early block)
    assert writes[stopped[0] :] == [("interrupted", at)]
    report = json.loads((out / "report.json").read_text())
    assert (report["status"], report["blocks_done"], len(report["blocks"])) == ("interrupted", at, at)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["meta"]["blocks_done"] == at
    result = run_job(None, out, resume=True)
    assert (result["status"], result["blocks_done"], len(result["blocks"])) == ("complete", BLOCKS, BLOCKS)


# ---------------------------------------------------------------------- no redundant writes
@pytest.fixture
def written(monkeypatch) -> dict[str, list[Any]]:
    """What the run writes, in order: ``report``: ``(status, blocks)`` per report.json write;
    ``checkpoint``: the blocks of each checkpoint saved (its tensor file and state.json)."""
    import packforcing.core.checkpoint as checkpoint
    from packforcing.output.report import RunReport

    seen: dict[str, list[Any]] = {"report": [], "checkpoint": []}
    write, save = RunReport.write, checkpoint.save_checkpoint

    def counted_write(self: RunReport, path: Any) -> None:
        seen["report"].append((self.status, len(self.blocks)))
        write(self, path)

    def counted_save(directory: Path, state: Any, extra: Any = None) -> Path:
        seen["checkpoint"].append(int(state["meta"]["blocks_done"]))
        return save(directory, state, extra)

    monkeypatch.setattr(RunReport, "write", counted_write)
    monkeypatch.setattr(checkpoint, "save_checkpoint", counted_save)
    return seen


def assert_resumes_bit_identical(out: Path, uninterrupted: Any, policy: str = "packforcing") -> None:
    result = run_job(None, out, resume=True)
    assert (result["status"], result["blocks_done"]) == ("complete", BLOCKS)
    latents, frames = uninterrupted[policy]
    assert load_file(str(out / "latents.safetensors"))["latents"].numpy().tobytes() == latents.numpy().tobytes()
    assert np.array_equal(frames_of(out / "video.mp4"), frames)


@pytest.mark.parametrize("every", [None, 2])
def test_a_complete_run_writes_its_report_once_a_block_and_once_at_the_end(tmp_path, uninterrupted, written, every):
    """The last block's rewrite is the ``complete`` report (it was written ``running`` first),
    and a block that is checkpointed and due a rewrite writes the report once. The checkpoint
    kept (run.checkpoint_every) still resumes bit-exactly."""
    out = tmp_path / "run"
    result = run_job(write_config(tmp_path, "packforcing", checkpoint_every=every), out, save_latents=True)
    assert result["status"] == "complete"
    assert written["report"] == [*(("running", n) for n in range(BLOCKS)), ("complete", BLOCKS)]
    assert written["checkpoint"] == ([2, 4] if every else [])
    if every:
        assert_resumes_bit_identical(out, uninterrupted)


def test_a_stop_asked_during_a_block_leaves_that_blocks_report_to_the_interrupted_one(tmp_path, uninterrupted, written):
    """A first Ctrl-C while block 5 is made lets it finish; the run then stops, so block 5's
    rewrite (``running``) would be followed at once by the ``interrupted`` report."""
    out = tmp_path / "run"

    def wrap(kind: str, component: Any) -> Any:  # SIGINT while block 5's commit compresses block 3
        return InterruptingCompressor(component, at=3, how="signal") if kind == "compressor" else component

    with pytest.raises(Interrupted) as caught:
        run_job(write_config(tmp_path, "packforcing"), out, save_latents=True, wrap=wrap)
    assert caught.value.blocks_done == 5
    assert written["report"] == [*(("running", n) for n in range(5)), ("interrupted", 5)]
    assert_resumes_bit_identical(out, uninterrupted)


@pytest.mark.parametrize("every", [None, 4])
def test_a_stop_asked_during_the_last_block_completes_the_run(tmp_path, uninterrupted, written, capsys, every):
    """A first SIGINT while the last block is made lets it finish, and then nothing is left to
    resume: the run ends complete, with every file and the uninterrupted run's latents and
    frames, and writes no checkpoint for it (a kept ``run.checkpoint_every`` one stays as it
    was). It was ``interrupted``, with a full checkpoint whose resume only wrote the last files."""
    out = tmp_path / "run"

    def wrap(kind: str, component: Any) -> Any:  # SIGINT while block 6's commit compresses block 4
        return InterruptingCompressor(component, at=4, how="signal") if kind == "compressor" else component

    result = run_job(write_config(tmp_path, "packforcing", checkpoint_every=every), out, save_latents=True, wrap=wrap)
    assert (result["status"], result["blocks_done"]) == ("complete", BLOCKS)
    assert json.loads((out / "report.json").read_text())["status"] == "complete"
    assert written["report"] == [*(("running", n) for n in range(BLOCKS)), ("complete", BLOCKS)]
    assert written["checkpoint"] == ([4] if every else [])
    assert (out / "checkpoint").exists() == bool(every) and (out / "memory.png").stat().st_size > 0
    assert "SIGINT during the last block: the run is complete" in capsys.readouterr().err
    latents, frames = uninterrupted["packforcing"]
    assert load_file(str(out / "latents.safetensors"))["latents"].numpy().tobytes() == latents.numpy().tobytes()
    assert np.array_equal(frames_of(out / "video.mp4"), frames)


def test_a_resumed_run_with_no_blocks_left_writes_its_report_once(tmp_path, written):
    """``--resume --blocks N`` with N blocks made: the run completes at once, one report write."""
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_job(write_config(tmp_path, "full"), out, on_block=stop_at(4))
    del written["report"][:]
    result = run_job(None, out, resume=True, overrides=["run.blocks=4"])
    assert (result["status"], result["blocks_done"]) == ("complete", 4)
    assert written["report"] == [("complete", 4)]


@pytest.mark.parametrize(
    ("how", "every", "done", "saves"),
    [
        ("after", 2, 4, [2, 4]),  # Ctrl-C after block 4, which run.checkpoint_every has just saved
        ("after", 2, 5, [2, 4, 5]),  # block 5 was written after the checkpoint: saved again
        ("during", 5, 5, [5]),  # the first Ctrl-C lands while block 5 is made: that block finishes
        ("inside", 4, 4, [4]),  # a second Ctrl-C aborts block 5's commit: the state is block 4's again
        ("inside", 3, 4, [3, 4]),  # ... but block 4 was written after the checkpoint at 3
    ],
)
def test_a_stop_on_a_block_just_checkpointed_saves_the_checkpoint_once(
    tmp_path, uninterrupted, written, how, every, done, saves
):
    """An interrupt whose block ``run.checkpoint_every`` has just saved does not save the same
    checkpoint again (for a Wan run, gigabytes written just as the user wants to stop); one with
    anything written since (a block) does. Either way the checkpoint resumes bit-exactly."""
    out = tmp_path / "run"

    def wrap(kind: str, component: Any) -> Any:  # block 5's commit compresses block 3
        if kind != "compressor":
            return component
        return InterruptingCompressor(component, at=3, how="signal" if how == "during" else "raise")

    after = how == "after"
    config = write_config(tmp_path, "packforcing", checkpoint_every=every)
    with pytest.raises(Interrupted) as caught:
        run_job(config, out, save_latents=True, wrap=None if after else wrap, on_block=stop_at(done) if after else None)
    assert caught.value.blocks_done == done and caught.value.resume_dir == out
    assert written["checkpoint"] == saves
    assert json.loads((out / "checkpoint" / "state.json").read_text())["meta"]["blocks_done"] == done
    assert [p.name for p in (out / "checkpoint").glob("*.safetensors")] == [f"state-{done}.safetensors"]
    # report.json: written once per block at most, and the stop's block by the interrupted report
    # alone when the stop was asked before that block's rewrite
    assert written["report"][-1] == ("interrupted", done)
    assert len(set(written["report"])) == len(written["report"])
    if how == "during":
        assert ("running", done) not in written["report"]
    assert_resumes_bit_identical(out, uninterrupted)


def test_a_resumed_run_stopped_before_a_block_keeps_the_checkpoint_it_resumed(tmp_path, uninterrupted, written):
    """Stopped again before its first block is made (a second Ctrl-C inside it), a resumed run
    leaves the checkpoint it was resumed from, which holds exactly its state."""
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_job(write_config(tmp_path, "packforcing"), out, save_latents=True, on_block=stop_at(4))
    assert written["checkpoint"] == [4]

    def wrap(kind: str, component: Any) -> Any:  # a second Ctrl-C inside block 5's commit
        return InterruptingCompressor(component, at=3, how="raise") if kind == "compressor" else component

    index = (out / "checkpoint" / "state.json").read_bytes()
    with pytest.raises(Interrupted) as caught:
        run_job(None, out, resume=True, wrap=wrap)
    assert caught.value.blocks_done == 4 and caught.value.resume_dir == out
    assert written["checkpoint"] == [4]
    assert (out / "checkpoint" / "state.json").read_bytes() == index
    assert written["report"][-2:] == [("running", 4), ("interrupted", 4)]
    assert_resumes_bit_identical(out, uninterrupted)


def test_a_resumed_and_lengthened_run_stopped_before_a_block_saves_its_new_length(tmp_path, uninterrupted, written):
    """Resumed with another length (``run.blocks``, recorded in the checkpoint) and stopped
    before its first block, the run saves its checkpoint again: the next resume runs to the
    new length."""
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_job(write_config(tmp_path, "packforcing", blocks=5), out, save_latents=True, on_block=stop_at(4))

    def wrap(kind: str, component: Any) -> Any:
        return InterruptingCompressor(component, at=3, how="raise") if kind == "compressor" else component

    with pytest.raises(Interrupted):
        run_job(None, out, resume=True, overrides=[f"run.blocks={BLOCKS}"], wrap=wrap)
    assert_resumes_bit_identical(out, uninterrupted)  # runs to BLOCKS, as the resume before asked
    assert written["checkpoint"] == [4, 4]  # the same blocks, but the run is longer now
