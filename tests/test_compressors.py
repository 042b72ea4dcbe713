"""Compressors: ``dual_branch`` (grid formula, branches, K/V through the model, weights,
training) and ``pool`` (RoPE-aware pooling against an explicit oracle)."""

from __future__ import annotations

import warnings

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import packforcing as pf
from packforcing.compressors import DualBranchCompressor, DualBranchParams, PoolCompressor, PoolParams
from packforcing.compressors.dual_branch import (
    PACKAGE_WEIGHTS,
    UntrainedCompressorWarning,
    compressed_grid,
    resolve_weights,
)
from packforcing.core.build import BuildEnv
from packforcing.models.tiny_dit import TinyDiT, TinyDiTParams
from packforcing.plugins.manager import default_registry
from packforcing.training.compressor import train_compressor

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL = (4, 4, 8, 8)  # HR channels small enough for CPU tests
SHIPPED = "pkg:dual_branch_tiny.safetensors"


def tiny_model(height: int = 8, width: int = 8, frames: int = 4, hidden: int = 16, layers: int = 2) -> TinyDiT:
    return TinyDiT(
        TinyDiTParams(
            latent_height=height,
            latent_width=width,
            frames_per_block=frames,
            hidden_size=hidden,
            num_heads=2,
            num_layers=layers,
        )
    )


def dual_branch(model, **params) -> DualBranchCompressor:
    params.setdefault("hr_channels", SMALL)
    g = model.geometry
    return DualBranchCompressor(
        DualBranchParams(**params), hidden_size=model.hidden_size, latent_channels=g.latent_channels, patch=g.patch
    )


def stored_block(model, keys, values, latents=None, *, position=0.0, grid=None, t_stride=1.0, hw_stride=1.0):
    """A :class:`CachedBlock` holding per-layer ``keys``/``values``."""
    g = model.geometry
    return pf.CachedBlock.from_tensors(
        keys,
        values,
        latents=latents,
        block_id=0,
        start_frame=0,
        num_frames=g.frames_per_block,
        grid=grid or g.block_grid,
        position=position,
        temporal_stride=t_stride,
        hw_stride=hw_stride,
    )


def committed_block(model, batch: int = 1, position: float = 0.0, seed: int = 0):
    """A block as the cache stores it: clean K/V of random latents at ``position``."""
    g = model.geometry
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, g.latent_channels, g.frames_per_block, g.latent_height, g.latent_width, generator=gen)
    from packforcing.attention.backends import SdpaBackend
    from packforcing.core.context import EmptyContext

    keys, values = model.clean_kv(latents, EmptyContext(SdpaBackend(), position))
    return stored_block(model, keys, values, latents, position=position)


# ---------------------------------------------------------------------- dual_branch grid
@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        ((4, 30, 52), (2, 7, 13)),  # Wan 832x480, 4-frame block: 6,240 -> 182 tokens
        ((3, 30, 52), (1, 7, 13)),  # Self-Forcing's 3-frame blocks
        ((4, 4, 4), (2, 1, 1)),  # tiny_dit
        ((5, 15, 9), (2, 3, 2)),  # odd everywhere
        ((2, 7, 11), (1, 1, 2)),
    ],
)
def test_dual_branch_token_formula(grid, expected):
    assert compressed_grid(grid) == expected


def test_wan_block_is_182_tokens():
    t, h, w = compressed_grid((4, 30, 52))
    assert t * h * w == 182 and 4 * 30 * 52 == 6240


def test_grid_too_small_is_an_error():
    with pytest.raises(ValueError, match="too small"):
        compressed_grid((1, 4, 4))


@settings(max_examples=25)
@given(
    frames=st.integers(2, 5),
    height=st.sampled_from([8, 10, 14, 16, 18, 30]),
    width=st.sampled_from([8, 10, 12, 18, 22]),
    batch=st.integers(1, 2),
)
def test_network_output_matches_the_formula(frames, height, width, batch):
    """The real network (both branches) lands on the formula's grid, odd token grids included,
    and the compressed K/V come out on it."""
    model = tiny_model(height, width, frames)
    comp = dual_branch(model)
    g = model.geometry
    block = committed_block(model, batch, position=8.0)
    grid = comp.output_grid(g.block_grid)
    assert grid == compressed_grid(g.block_grid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedCompressorWarning)
        ckv = comp.compress(block, model)
    assert ckv.grid == grid
    assert ckv.num_tokens * comp.ratio <= block.num_tokens
    for k, v in zip(ckv.keys, ckv.values, strict=True):
        assert k.shape == v.shape == (batch, ckv.num_tokens, g.num_heads, g.head_dim)
    assert (ckv.temporal_stride, ckv.hw_stride, ckv.position) == (2.0, 4.0, 8.0)


def test_compressed_kv_come_from_the_models_projections_at_the_block_position():
    model = tiny_model()
    comp = dual_branch(model)
    block = committed_block(model, 2, position=12.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedCompressorWarning)
        ckv = comp.compress(block, model)
    grid = ckv.grid
    tokens = comp.net(block.latents, model.codec, grid).flatten(2).transpose(1, 2)
    keys, values = model.project_kv(tokens, grid, 12.0, 2.0, 4.0)
    for a, b in zip(ckv.keys, keys, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(ckv.values, values, strict=True):
        torch.testing.assert_close(a, b)
    # keys are rotated on the compressed grid at the block's position: undoing that rotation
    # gives the same un-rotated keys wherever the block sits
    moved = stored_block(model, block.keys, block.values, block.latents, position=40.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedCompressorWarning)
        far = comp.compress(moved, model)
    for a, b in zip(ckv.keys, far.keys, strict=True):
        raw_a = model.rope.unapply_grid(a, grid, 12.0, 2.0, 4.0)
        raw_b = model.rope.unapply_grid(b, grid, 40.0, 2.0, 4.0)
        torch.testing.assert_close(raw_a, raw_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("condition_tokens", [False, True])
def test_compressed_keys_carry_the_blocks_condition_when_the_model_keys_depend_on_it(condition_tokens):
    """A conditioned tiny_dit's keys depend on the scene; dual_branch encodes the block's recorded
    condition spec and projects under it, so a block committed under scene 2 is compressed
    exactly as ``project_kv(..., condition=2)``, and differently from scene 0."""
    model = TinyDiT(
        TinyDiTParams(hidden_size=16, num_heads=2, num_layers=2, num_conditions=3, condition_tokens=condition_tokens)
    )
    assert model.condition_in_keys
    comp = dual_branch(model)
    block = committed_block(model, 1, position=8.0)
    scene2 = attrs.evolve(block, condition={"scene": 2})
    scene0 = attrs.evolve(block, condition={"scene": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedCompressorWarning)
        two, zero = comp.compress(scene2, model), comp.compress(scene0, model)
    tokens = comp.net(block.latents, model.codec, two.grid).flatten(2).transpose(1, 2)
    keys, _ = model.project_kv(tokens, two.grid, 8.0, 2.0, 4.0, condition=torch.tensor(2))
    for a, b in zip(two.keys, keys, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(two.keys[0], zero.keys[0])
    # with the condition in the modulation (and the tokens), project_kv of the block's own embedded
    # tokens gives clean_kv's first-layer keys under that condition
    from packforcing.attention.backends import SdpaBackend
    from packforcing.core.context import EmptyContext

    clean_k, _ = model.clean_kv(block.latents, EmptyContext(SdpaBackend(), 8.0), condition=torch.tensor(2))
    embedded = model.patch_embed(block.latents).flatten(2).transpose(1, 2)
    projected, _ = model.project_kv(embedded, model.geometry.block_grid, 8.0, 1.0, 1.0, condition=torch.tensor(2))
    torch.testing.assert_close(projected[0], clean_k[0], atol=1e-5, rtol=1e-5)


def test_fusion_is_the_sum_of_the_branches_and_each_can_be_switched_off():
    model = tiny_model()
    latents = torch.randn(2, 16, 4, 8, 8)
    grid = (2, 1, 1)
    both = dual_branch(model).net(latents, model.codec, grid)
    hr = dual_branch(model, lr=False).net(latents, model.codec, grid)
    lr = dual_branch(model, hr=False).net(latents, model.codec, grid)
    torch.testing.assert_close(both, hr + lr)
    assert not hasattr(dual_branch(model, lr=False).net, "lr_embed")
    assert not hasattr(dual_branch(model, hr=False).net, "hr")
    with pytest.raises(ValueError, match="hr: at least one"):
        DualBranchParams(hr=False, lr=False)


def test_hr_branch_is_the_progressive_conv_stack():
    model = tiny_model(hidden=16)
    net = dual_branch(model, hr_channels=(3, 5, 7, 9), kernel=5, activation="gelu", proj_kernel=3).net
    convs = [m for m in net.hr if isinstance(m, torch.nn.Conv3d)]
    assert [c.stride for c in convs] == [(2, 1, 1), (1, 2, 2), (1, 2, 2), (1, 2, 2), (1, 1, 1)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(16, 3), (3, 5), (5, 7), (7, 9), (9, 16)]
    assert [c.kernel_size for c in convs] == [(5, 5, 5)] * 4 + [(3, 3, 3)]
    assert sum(isinstance(m, torch.nn.GELU) for m in net.hr) == 4


def test_plan_only_builds_no_network():
    registry = default_registry()
    from packforcing.models.geometry_only import GeometryOnlyModel, GeometryParams

    model = GeometryOnlyModel(
        GeometryParams(latent_height=60, latent_width=104, num_layers=30, num_heads=12, head_dim=128), "bfloat16"
    )
    env = BuildEnv(registry=registry, device=torch.device("cpu"), dtype=torch.bfloat16, plan_only=True)
    env.model, env.geometry = model, model.geometry
    comp = registry.factory("compressor", "dual_branch").build(DualBranchParams(), env)
    assert comp._net is None
    assert comp.output_grid(model.geometry.block_grid) == (2, 7, 13)


# ---------------------------------------------------------------------- weights
def test_shipped_weights_load_by_path_from_yaml():
    engine = pf.build_engine("configs/packforcing.yaml", registry=None)
    comp = engine.policy.tier_compressor("mid")
    assert isinstance(comp, DualBranchCompressor) and comp.trained
    assert comp.weights_path == PACKAGE_WEIGHTS / "dual_branch_world.safetensors"
    assert comp.weights_path.stat().st_size < 1_000_000
    # a plain path works too (beside the config file first, then in the working directory)
    config = pf.load_config(
        "configs/packforcing.yaml", overrides=[f"compressor.weights={comp.weights_path}", "run.device=cpu"]
    )
    assert pf.build_engine(config).policy.tier_compressor("mid").trained


def test_weights_errors_are_located():
    with pytest.raises(pf.ConfigError, match=r"weights: file not found: nowhere\.safetensors"):
        pf.build_engine(
            pf.load_config("configs/packforcing.yaml", overrides=["compressor.weights=nowhere.safetensors"])
        )
    with pytest.raises(pf.ConfigError, match=r"\S+/dual_branch_world\.safetensors was trained with hr_channels"):
        pf.build_engine(pf.load_config("configs/packforcing.yaml", overrides=["compressor.hr_channels=[4, 4, 8, 8]"]))


def test_resolve_relative_to_the_config_file(tmp_path):
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"x")
    assert resolve_weights("w.safetensors", str(tmp_path / "config.yaml")) == target
    assert resolve_weights(SHIPPED) == PACKAGE_WEIGHTS / "dual_branch_tiny.safetensors"


def test_untrained_compressor_warns_once():
    model = tiny_model()
    comp = dual_branch(model)
    block = committed_block(model)
    with pytest.warns(UntrainedCompressorWarning):
        comp.compress(block, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        comp.compress(block, model)


# ---------------------------------------------------------------------- training
TRAIN_CONFIG = {
    "model": {"name": "tiny_dit", "hidden_size": 32, "num_heads": 2, "num_layers": 2},
    "policy": {"name": "packforcing", "sink_frames": 4, "recent_frames": 4, "mid_capacity_blocks": 2},
    "compressor": {"name": "dual_branch", "hr_channels": [4, 8, 8, 16]},
    "selector": {"name": "topk", "k": 1},
    "backend": "sdpa",
    "sampler": {"steps": 2},
    "run": {"device": "cpu"},
}


def test_a_short_training_run_lowers_the_objective_and_saves_loadable_weights(tmp_path):
    out = tmp_path / "w.safetensors"
    summary: dict = {}
    losses = train_compressor(
        TRAIN_CONFIG, steps=40, lr=5e-3, out_path=out, seed=0, videos=2, blocks=4, batch=2, summary=summary
    )
    assert len(losses) == 40
    assert out.stat().st_mode & 0o777 == 0o644  # readable by others
    assert summary["held_out_after"] < summary["held_out_before"]
    assert sum(losses[-5:]) < sum(losses[:5])
    config = {**TRAIN_CONFIG, "compressor": {**TRAIN_CONFIG["compressor"], "weights": str(out)}}
    comp = pf.build_engine(config).policy.tier_compressor("mid")
    assert comp.trained
    trained_state = comp.net.state_dict()
    fresh_state = comp.new_net().state_dict()
    assert any(not torch.equal(trained_state[k], fresh_state[k]) for k in fresh_state)


def test_shipped_weights_beat_untrained_on_fresh_data():
    """Held-out attention-matching loss of the shipped weights (1.0 = dropping the block), on
    fresh clips of the world the default model and its compressor were trained on: training
    helps. (It does not beat the training-free ``pool`` on this model — 2 tokens per 64-token
    block, see the README's Fidelity section — so that is not claimed.)"""
    from packforcing.attention.backends import SdpaBackend
    from packforcing.core.sampler import FlowMatchSampler
    from packforcing.training.compressor import attention_loss, collect, dual_branch_kv, pool_kv, sample_batch
    from packforcing.training.model import render_clips, world_params_for

    engine = pf.build_engine(pf.load_config("configs/packforcing.yaml", overrides=["run.device=cpu"]))
    model = engine.model
    shipped = engine.policy.tier_compressor("mid")
    untrained = DualBranchCompressor(
        attrs.evolve(shipped.params, weights=None),
        hidden_size=model.hidden_size,
        latent_channels=16,
        patch=(1, 2, 2),
    )
    world = world_params_for(model)

    def clips(video: int):
        return render_clips(model, world, 4, [900_000 + 2 * video, 900_001 + 2 * video])

    data = collect(model, SdpaBackend(), FlowMatchSampler(steps=2), videos=1, blocks=4, batch=2, seed=123, clips=clips)
    batch = sample_batch(data, [0, 1], 64, torch.Generator().manual_seed(5), max_gap_blocks=4)
    with torch.no_grad():
        trained = float(attention_loss(model, batch, dual_branch_kv(shipped.net, model)))
        before = float(attention_loss(model, batch, dual_branch_kv(untrained.net, model)))
        pooled = float(attention_loss(model, batch, pool_kv(model)))
    assert trained < before and trained < 1.0 and pooled < 1.0


# ---------------------------------------------------------------------- pool
def test_pool_undoes_rope_pools_and_rotates_on_the_pooled_grid():
    """Oracle: un-rotate each key at its own position, average each window explicitly, rotate
    the average at the window's coarse position."""
    model = tiny_model(height=8, width=12, frames=4)
    rope = model.rope
    g = model.geometry  # block grid (4, 4, 6)
    comp = PoolCompressor(PoolParams(window=(2, 2, 2)))
    block = committed_block(model, 2, position=20.0)
    ckv = comp.compress(block, model)
    assert ckv.grid == (2, 2, 3) and ckv.temporal_stride == 2.0 and ckv.hw_stride == 2.0
    gt, gh, gw = g.block_grid
    for layer in range(g.num_layers):
        k, v = block.layer_kv(layer)
        raw = rope.unapply_grid(k, g.block_grid, 20.0).reshape(2, gt, gh, gw, g.num_heads, g.head_dim)
        vv = v.reshape(2, gt, gh, gw, g.num_heads, g.head_dim)
        exp_k, exp_v = [], []
        for t in range(2):
            for h in range(2):
                for w in range(3):
                    sl = (slice(None), slice(2 * t, 2 * t + 2), slice(2 * h, 2 * h + 2), slice(2 * w, 2 * w + 2))
                    exp_k.append(raw[sl].mean(dim=(1, 2, 3)))
                    exp_v.append(vv[sl].mean(dim=(1, 2, 3)))
        exp_k = rope.apply_grid(torch.stack(exp_k, 1), (2, 2, 3), 20.0, 2.0, 2.0)
        torch.testing.assert_close(ckv.keys[layer], exp_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ckv.values[layer], torch.stack(exp_v, 1), atol=1e-6, rtol=1e-6)


def test_pool_constant_keys_survive_exactly():
    """Keys equal before RoPE over a window pool back to the same key at the coarse position."""
    model = tiny_model()
    rope = model.rope
    g = model.geometry
    raw = torch.randn(1, 1, g.num_heads, g.head_dim).expand(1, g.tokens_per_block, -1, -1).contiguous()
    keys = [rope.apply_grid(raw, g.block_grid, 4.0)] * g.num_layers
    block = stored_block(model, keys, keys, position=4.0)
    ckv = PoolCompressor(PoolParams(window=(4, 4, 4))).compress(block, model)
    torch.testing.assert_close(ckv.keys[0], rope.apply_grid(raw[:, :1], (1, 1, 1), 4.0), atol=1e-5, rtol=0)


def test_pool_on_an_already_compressed_block_floors_the_grid():
    """The 4-tier far tier: pool the mid tier's (2, 3, 5) tokens (hw stride 4) by (1, 2, 2)."""
    model = tiny_model()
    g = model.geometry
    n = 2 * 3 * 5
    keys = [torch.randn(1, n, g.num_heads, g.head_dim) for _ in range(g.num_layers)]
    block = stored_block(model, keys, keys, position=8.0, grid=(2, 3, 5), t_stride=2.0, hw_stride=4.0)
    comp = PoolCompressor(PoolParams(window=(1, 2, 2)))
    ckv = comp.compress(block, model)
    assert ckv.grid == (2, 1, 2) and ckv.temporal_stride == 2.0 and ckv.hw_stride == 8.0
    with pytest.raises(ValueError, match=r"window: window \[1, 4, 4\] is larger"):
        PoolCompressor(PoolParams(window=(1, 4, 4))).output_grid((2, 3, 5))


class _RopeOnly:
    """The one part of a model ``pool`` uses: its RoPE."""

    def __init__(self, head_dim: int) -> None:
        self.rope = pf.core.rope.Rope3D(head_dim)


@settings(max_examples=60, deadline=None)
@given(
    grid=st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
    data=st.data(),
    t_stride=st.sampled_from([1.0, 2.0, 4.0]),
    hw_stride=st.sampled_from([1.0, 2.0, 4.0]),
    position=st.sampled_from([0.0, 3.0, 17.5]),
    batch=st.integers(1, 3),
    heads=st.integers(1, 2),
    head_dim=st.sampled_from([6, 8, 12]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_pool_matches_an_explicit_window_average_on_any_grid(
    grid, data, t_stride, hw_stride, position, batch, heads, head_dim, dtype
):
    """Oracle for any grid (trailing tokens that fill no window dropped), stored strides
    (already compressed blocks), batch, heads and dtype, with RoPE computed from scratch in
    float64 (:mod:`tests.context_oracle`): undo each key's rotation at its own position, average
    each window explicitly, rotate the average at the coarse token's position (``t_stride·w_t``,
    ``hw_stride·w_hw`` apart)."""
    from .context_oracle import rope_angles, rotate64

    hw = data.draw(st.integers(1, min(grid[1], grid[2])), label="window_hw")
    window = (data.draw(st.integers(1, grid[0]), label="window_t"), hw, hw)
    model = _RopeOnly(head_dim)
    gen = torch.Generator().manual_seed(sum(grid) + batch)
    n = grid[0] * grid[1] * grid[2]
    raw = torch.randn(batch, n, heads, head_dim, generator=gen, dtype=torch.float64)
    home = rope_angles(head_dim, 10000.0, grid, position, t_stride, hw_stride)
    keys = rotate64(raw, home).to(dtype)
    values = torch.randn(batch, n, heads, head_dim, generator=gen).to(dtype)
    block = pf.CachedBlock.from_tensors(
        [keys], [values], block_id=0, start_frame=0, num_frames=4, grid=grid, position=position,
        temporal_stride=t_stride, hw_stride=hw_stride,
    )  # fmt: skip
    ckv = PoolCompressor(PoolParams(window=window)).compress(block, model)
    coarse = tuple(g // w for g, w in zip(grid, window, strict=True))
    assert ckv.grid == coarse and ckv.position == position
    assert (ckv.temporal_stride, ckv.hw_stride) == (t_stride * window[0], hw_stride * hw)
    unrotated = rotate64(keys, -home).reshape(batch, *grid, heads, head_dim)  # the stored keys, un-rotated
    vv = values.double().reshape(batch, *grid, heads, head_dim)
    exp_k, exp_v = [], []
    for t in range(coarse[0]):
        for h in range(coarse[1]):
            for w in range(coarse[2]):
                at = (slice(None), *(slice(i * s, (i + 1) * s) for i, s in zip((t, h, w), window, strict=True)))
                exp_k.append(unrotated[at].mean(dim=(1, 2, 3)))
                exp_v.append(vv[at].mean(dim=(1, 2, 3)))
    at_coarse = rope_angles(head_dim, 10000.0, coarse, position, t_stride * window[0], hw_stride * hw)
    exp_k = rotate64(torch.stack(exp_k, 1), at_coarse)
    assert ckv.keys[0].dtype == ckv.values[0].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7  # float32 work, one rounding to bfloat16
    torch.testing.assert_close(ckv.keys[0].double(), exp_k, atol=tol, rtol=tol)
    torch.testing.assert_close(ckv.values[0].double(), torch.stack(exp_v, 1), atol=tol, rtol=tol)


def test_pool_parameters_are_validated():
    with pytest.raises(ValueError, match="window: height and width windows must be equal"):
        PoolParams(window=(1, 2, 3))
    with pytest.raises(pf.ConfigError, match=r"compressor\.window: expected three integers >= 1"):
        pf.load_config({**TRAIN_CONFIG, "compressor": {"name": "pool", "window": [0, 2, 2]}})


def test_train_compressor_requires_out(capsys):
    """It never writes over the packaged weights by default: ``--out`` is required."""
    from packforcing.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["train-compressor", "--config", "configs/packforcing.yaml", "--steps", "1"])
    assert caught.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err
