"""The dual_branch compressor on Wan: its LR branch runs through the Wan VAE; ``lr_branch: none``
drops it (and is what a model without a VAE must use)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import packforcing as pf
from packforcing.core.errors import ConfigError

from .tiny_wan_io import write_tiny_vae
from .wan_fixtures import tiny_transformer, write_diffusers

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("wan")
    with_vae, without_vae = base / "with_vae", base / "without_vae"
    for root in (with_vae, without_vae):
        write_diffusers(tiny_transformer(), root, pipeline=True)
    write_tiny_vae(with_vae, pipeline=True)
    return with_vae, without_vae


def engine(root: Path, **compressor):
    model = {"name": "wan", "path": str(root), "frames_per_block": 2, "latent_height": 8, "latent_width": 8}
    return pf.build_engine(
        {
            "model": model,
            "policy": {"name": "packforcing", "sink_frames": 2, "recent_frames": 2, "mid_capacity_blocks": 2},
            "compressor": {"name": "dual_branch", "hr_channels": [4, 8, 8, 8], "weights": None, **compressor},
            "selector": {"name": "topk", "k": 1},
            "realigner": {"name": "temporal_rope_shift"},
            "backend": "sdpa",
            "sampler": {"name": "self_forcing"},
            "run": {"device": "cpu", "dtype": "float32"},
        }
    )


def mid_after(engine, blocks: int = 4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the compressor is untrained here
        with engine.session(seed=0) as session:
            for _ in range(blocks):
                session.step()
    return engine.policy.tier_blocks("mid")


def test_the_lr_branch_decodes_and_reencodes_through_the_wan_vae(roots, monkeypatch):
    e = engine(roots[0])
    codec = e.model.codec
    calls = {"decode": 0, "encode": 0}
    for name in calls:
        original = getattr(codec, name)

        def counted(x, name=name, original=original):
            calls[name] += 1
            return original(x)

        monkeypatch.setattr(codec, name, counted)
    mid = mid_after(e)
    assert mid and all(b.fidelity == "dual_branch" for b in mid)
    assert calls["decode"] == calls["encode"] == len(mid)  # one LR pass per compressed block
    assert all(torch.isfinite(k).all() for b in mid for k in b.keys)
    # the LR tokens come from the VAE: another VAE changes them, the HR branch does not see it
    net = e.policy.tier_compressor("mid").net
    latents = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    grid = (1, 1, 1)
    low = net.lr_branch(latents, codec, grid)
    with torch.no_grad():
        codec.vae.decoder.conv_out.weight.mul_(2.0)
    assert not torch.allclose(net.lr_branch(latents, codec, grid), low)


def test_lr_branch_none_drops_it_and_runs_without_a_vae(roots):
    hr_only = engine(roots[1], lr_branch="none")
    assert hr_only.model.codec is None and hr_only.policy.tier_compressor("mid").params.lr is False
    mid = mid_after(hr_only)
    assert mid and all(torch.isfinite(k).all() for b in mid for k in b.keys)
    # the same tokens as the lr: false ablation
    ablation = engine(roots[1], lr=False)
    for a, b in zip(mid, mid_after(ablation), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.keys, b.keys, strict=True))


def test_an_lr_branch_without_a_vae_is_refused_up_front(roots):
    with pytest.raises(ConfigError, match=r"compressor\.lr_branch: .*set model\.vae.*lr_branch: none"):
        engine(roots[1])
