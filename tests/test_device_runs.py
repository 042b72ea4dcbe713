"""Whole runs on each device: ``generate`` on CUDA as on the CPU (the same latents within float32
rounding, bit-exact resume), the archive in pinned host memory, and GPU memory that stays flat
once the tiers are full, for tiny_dit and for a tiny random Wan pipeline (text encoder, VAE).

The ``cpu`` cases run everywhere (they keep the tests' own logic checked); the ``cuda`` ones are
skipped without CUDA and run in ``benchmarks/wan_gpu_device.sh``'s test step.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import packforcing as pf
from packforcing.cli import main
from packforcing.cli.generate import Interrupted, run_job
from packforcing.output.video import pixel_frames

from .tiny_wan_io import write_tiny_pipeline

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FPB = 2
"""Latent frames per block of the tiny Wan runs."""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def latents_of(out: Path) -> torch.Tensor:
    """A run's latents ``[B, C, F, H, W]`` (``--save-latents``)."""
    return load_file(str(out / "latents.safetensors"))["latents"]


@pytest.fixture
def exact_float32(monkeypatch):
    """float32 convolutions and matmuls without TF32 on CUDA, so CUDA and CPU runs compare."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


# ---------------------------------------------------------------------- tiny_dit, the default model
PACKFORCING = [
    "policy.mid_capacity_blocks=3",
    "selector.k=2",
    "sampler.steps=2",
    "backend.name=sdpa",
    "run.dtype=float32",
]
"""The packforcing preset (shipped weights) with a small mid bank, so blocks reach the archive."""


@pytest.mark.parametrize("device", DEVICES)
def test_an_interrupted_run_resumes_bit_exactly(tmp_path, device):
    overrides = [*PACKFORCING, f"run.device={device}", "run.blocks=12"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    report = run_job("packforcing", whole, overrides=overrides, save_latents=True)
    assert report["archive_bytes"] > 0  # blocks went to the archive

    def stop(done: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        run_job("packforcing", resumed, overrides=overrides, save_latents=True, on_block=stop)
    run_job(None, resumed, resume=True)
    assert torch.equal(latents_of(whole), latents_of(resumed))


@needs_cuda
def test_cuda_generates_what_the_cpu_generates(tmp_path, exact_float32):
    runs = {}
    for device in ("cpu", "cuda"):
        run_job("packforcing", tmp_path / device, overrides=[*PACKFORCING, f"run.device={device}", "run.blocks=8"],
                save_latents=True)  # fmt: skip
        runs[device] = latents_of(tmp_path / device)
    assert rel_err(runs["cuda"], runs["cpu"]) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_the_archive_is_pinned_host_memory_and_device_memory_stays_flat(device):
    """archive_device: auto puts archived blocks in pinned host memory when the cache is on CUDA
    (copied back without a sync); once sink, mid and recent are full, what each block allocates
    on the GPU no longer grows with the video."""
    config = pf.load_config("packforcing", overrides=[*PACKFORCING, f"run.device={device}"])
    engine = pf.build_engine(config)
    cuda = device == "cuda"
    peaks = []
    with engine.session(seed=0, batch_size=1) as session:
        for _ in range(48):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            session.step()
            peaks.append(torch.cuda.max_memory_allocated() if cuda else 0)
    archived = engine.policy.archived
    assert len(archived) >= 30
    assert all(k.device.type == "cpu" for block in archived for k in block.keys)
    assert all(k.is_pinned() == cuda for block in archived for k in block.keys)
    full_after = 7  # the preset's tiers (2-block sink, 3-block mid here, 2-block recent) fill by then
    assert max(peaks[24:]) <= max(peaks[full_after:24])


# ---------------------------------------------------------------------- a tiny random Wan pipeline
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("wan") / "Wan2.1-tiny-Diffusers")


def wan_config(folder: Path, root: Path, device: str) -> Path:
    config = {
        "model": {"name": "wan", "path": str(root), "frames_per_block": FPB, "latent_height": 4, "latent_width": 6},
        "policy": {"name": "sink_recent", "sink_frames": FPB, "window_frames": 2 * FPB},
        "backend": "sdpa",
        "sampler": {"name": "self_forcing"},
        "text_encoder": {"max_length": 16, "device": device, "dtype": "float32"},
        "run": {"device": device, "dtype": "float32", "fps": 16},
    }
    path = folder / f"wan_{device}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("device", DEVICES)
def test_wan_text_to_video_with_flat_device_memory(tmp_path, pipeline, monkeypatch, device, exact_float32):
    """--prompt text encoded on the device, the transformer and the streaming VAE on it: the MP4
    has every frame, and each block's peak allocation stops growing once the cache is full (the
    VAE decodes block by block, its causal cache a constant size)."""
    import imageio.v2 as imageio

    import packforcing.cli.generate as generate

    cuda = device == "cuda"
    peaks: list[int] = []

    def measure(done: int) -> None:
        if cuda:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    monkeypatch.setattr(generate, "run_job", functools.partial(generate.run_job, on_block=measure))
    out = tmp_path / "out"
    argv = ["generate", "--config", str(wan_config(tmp_path, pipeline, device)), "--prompt", "a red fox"]
    assert main([*argv, "--blocks", "10", "--out", str(out), "--no-progress", "--save-latents"]) == 0
    reader = imageio.get_reader(str(out / "video.mp4"))
    assert sum(1 for _ in reader) == pixel_frames(10 * FPB, 4)
    reader.close()
    if cuda:
        assert max(peaks[5:]) <= max(peaks[2:5])  # the sink and the 2-block window hold by block 3
        cpu_out = tmp_path / "cpu"
        cpu_argv = ["generate", "--config", str(wan_config(tmp_path, pipeline, "cpu")), "--prompt", "a red fox"]
        assert main([*cpu_argv, "--blocks", "10", "--out", str(cpu_out), "--no-progress", "--save-latents"]) == 0
        assert rel_err(latents_of(out), latents_of(cpu_out)) < 1e-3
