"""packforcing.testing: the built-ins pass the conformance checks, and the checks catch breakage."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import packforcing as pf
from packforcing.core.geometry import Geometry
from packforcing.core.interfaces import AttentionContext, Compressor, PositionalRealigner, Selector
from packforcing.core.records import CompressedKV
from packforcing.plugins import ComponentFactory, no_params
from packforcing.plugins.manager import Registry
from packforcing.policies.presets import FullParams, preset_builder
from packforcing.positional import TemporalRopeShift
from packforcing.testing import (
    ConformanceError,
    check_compressor,
    check_policy,
    check_realigner,
    check_selector,
    strategies,
)
from packforcing.testing.blocks import make_block

BUILTINS = Registry.create(entry_points=False)
FAST = {"max_examples": 6}
NO_SHRINK = settings(phases=[Phase.explicit, Phase.generate])  # broken fakes: find, do not minimise
TIERED_COMPRESSED = {
    "tiers": [
        {"name": "sink", "frames": 4, "pinned": True},
        {"name": "mid", "blocks": 3, "fidelity": "compressed", "select": True},
        {"name": "recent", "blocks": 1},
    ],
    "overflow": "archive",
}


# ---------------------------------------------------------------------- the built-ins pass
SMALL = {"dual_branch": {"hr_channels": [4, 8, 8, 16]}}  # the paper's 2048 channels are slow on a CPU


@pytest.mark.parametrize("name", BUILTINS.names("compressor"))
def test_builtin_compressors_conform(name):
    check_compressor(BUILTINS.factory("compressor", name), SMALL.get(name))


@pytest.mark.parametrize("name", BUILTINS.names("selector"))
@pytest.mark.parametrize("params", [None, {"k": 1}, {"k": 3}], ids=["default", "k1", "k3"])
def test_builtin_selectors_conform(name, params):
    check_selector(BUILTINS.factory("selector", name), params)


@pytest.mark.parametrize("name", BUILTINS.names("realigner"))
def test_builtin_realigners_conform(name):
    check_realigner(BUILTINS.factory("realigner", name))


POLICIES = [
    ("full", None, {}),
    ("sliding_window", {"window_frames": 8}, {}),
    ("sink_recent", {"sink_frames": 4, "window_frames": 8}, {}),
    ("tiered", TIERED_COMPRESSED, {"compressor": "pool", "selector": "topk"}),
    ("tiered", TIERED_COMPRESSED, {"compressor": "dual_branch", "selector": "recency"}),
    (
        "packforcing",
        {"sink_frames": 4, "recent_frames": 4, "mid_capacity_blocks": 3},
        {"compressor": "pool", "selector": "topk"},
    ),
]


@pytest.mark.parametrize(("name", "params", "parts"), POLICIES, ids=lambda v: v if isinstance(v, str) else None)
def test_builtin_policies_conform(name, params, parts):
    built = {}
    if "compressor" in parts:
        factory = BUILTINS.factory("compressor", parts["compressor"])
        small = {"pool": {"window": [1, 2, 2]}, **SMALL}
        built["compressor"] = (factory, small.get(parts["compressor"]))
    if "selector" in parts:
        built["selector"] = (BUILTINS.factory("selector", parts["selector"]), {"k": 2})
    check_policy(BUILTINS.factory("policy", name), params, **built)


def test_realigner_parameters_are_passed():
    check_realigner(BUILTINS.factory("realigner", "temporal_rope_shift"), {"anchor": "window"}, **FAST)


# ---------------------------------------------------------------------- a correct plugin, then broken ones
@attrs.frozen
class KeepParams:
    frames: int = 1


class KeepFirstFrames(Compressor):
    """Keeps the first temporal token(s) of a block: a small, correct compressor."""

    name = "keep_first"

    def __init__(self, params: KeepParams = KeepParams()) -> None:
        self.params = params

    def output_grid(self, grid):
        t, h, w = grid
        return min(self.params.frames, t), h, w

    def _cut(self, x, grid):
        t, h, w = grid
        b, _, heads, dim = x.shape
        keep = min(self.params.frames, t)
        return x.reshape(b, t, h * w, heads, dim)[:, :keep].reshape(b, keep * h * w, heads, dim).clone()

    def compress(self, block, model):
        keys = [self._cut(k, block.grid) for k in block.keys]
        values = [self._cut(v, block.grid) for v in block.values]
        return CompressedKV(self.output_grid(block.grid), block.temporal_stride, block.position, keys, values)


def factory_of(cls, params=KeepParams):
    return ComponentFactory(params, lambda p, env: cls(p))


def test_a_correct_compressor_passes():
    check_compressor(factory_of(KeepFirstFrames), **FAST)
    check_compressor(factory_of(KeepFirstFrames), {"frames": 2}, **FAST)


class MutatesInput(KeepFirstFrames):
    def compress(self, block, model):
        out = super().compress(block, model)
        block.layer_kv(0)[0].mul_(2)
        return out


class WrongDtype(KeepFirstFrames):
    def compress(self, block, model):
        out = super().compress(block, model)
        return attrs.evolve(out, keys=[k.double() for k in out.keys])


class WrongGrid(KeepFirstFrames):
    def output_grid(self, grid):
        _, h, w = grid
        return 1, h, max(1, w - 1)


class ClaimsAnotherGrid(KeepFirstFrames):
    def compress(self, block, model):
        out = super().compress(block, model)
        t, h, w = out.grid
        return attrs.evolve(out, grid=(t, w, h))


class Noisy(KeepFirstFrames):
    def compress(self, block, model):
        out = super().compress(block, model)
        return attrs.evolve(out, values=[v + torch.rand(()) for v in out.values])


class MixesBatch(KeepFirstFrames):
    def compress(self, block, model):
        out = super().compress(block, model)
        return attrs.evolve(out, values=[v + v.mean(dim=0, keepdim=True) for v in out.values])


class OutsideTheBlock(KeepFirstFrames):
    def compress(self, block, model):
        return attrs.evolve(super().compress(block, model), position=block.position + block.num_frames)


class Bigger(KeepFirstFrames):
    def output_grid(self, grid):
        t, h, w = grid
        return t + 1, h, w


class ReturnsViews(KeepFirstFrames):
    def _cut(self, x, grid):  # no clone: the first frames are views of the cache's own slots
        t, h, w = grid
        return x[:, : min(self.params.frames, t) * h * w]


class ClaimsSparserTokens(KeepFirstFrames):
    def compress(self, block, model):  # says its tokens are 2 apart, on the block's own grid
        return attrs.evolve(super().compress(block, model), hw_stride=2.0)


class NeedsLatentsQuietly(KeepFirstFrames):
    def compress(self, block, model):
        assert block.latents is not None
        return super().compress(block, model)


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (MutatesInput, "modified the block"),
        (WrongDtype, "dtype torch.float64"),
        (WrongGrid, "expected shape"),
        (ClaimsAnotherGrid, "but output_grid() said"),
        (Noisy, "not deterministic"),
        (MixesBatch, "depends on the other items"),
        (OutsideTheBlock, "outside the block's span"),
        (Bigger, "more tokens than its input"),
        (ReturnsViews, "returned views of the block's own tensors"),
        (ClaimsSparserTokens, "hw_stride does not match the grid"),
        (NeedsLatentsQuietly, "failed on a block without latents (blocks carry latents only when the"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_broken_compressors_are_caught(cls, message):
    with pytest.raises(ConformanceError) as info:
        check_compressor(factory_of(cls), max_examples=20, hypothesis_settings=NO_SHRINK)
    assert str(info.value).startswith("compressor 'keep_first': ")
    assert message in str(info.value)


def test_a_class_is_named_by_its_class_name_not_the_interface_default():
    """A class checked directly (no registry key) is named by its own ``name`` or, when it only
    inherits the interface's placeholder, by its class name: never ``'abstract'``."""

    @attrs.frozen
    class Unnamed(Compressor):
        def output_grid(self, grid):
            return grid

        def compress(self, block, model):
            block.keys[0].mul_(2)  # broken: writes to the cache
            return CompressedKV(block.grid, block.temporal_stride, block.position, block.keys, block.values)

    with pytest.raises(ConformanceError) as info:
        check_compressor(Unnamed, max_examples=2, hypothesis_settings=NO_SHRINK)
    assert str(info.value).startswith("compressor 'Unnamed': ")
    with pytest.raises(ConformanceError, match=r"^compressor 'keep_first': "):
        check_compressor(MutatesInput, max_examples=2, hypothesis_settings=NO_SHRINK)  # its own name


@pytest.mark.parametrize(
    ("cls", "contract"),
    [
        (MutatesInput, "leaves_the_block_untouched"),
        (WrongDtype, "returns_the_declared_kv"),
        (Noisy, "is_deterministic"),
        (MixesBatch, "treats_batch_items_independently"),
        (Bigger, "output_grid_is_valid"),
        (NeedsLatentsQuietly, "works_without_latents"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_a_failure_names_its_contract(cls, contract):
    """Each contract is a named function of packforcing.testing.checks.compressor; a failure names it."""
    from packforcing.testing.checks import compressor

    with pytest.raises(ConformanceError) as info:
        check_compressor(factory_of(cls), max_examples=20, hypothesis_settings=NO_SHRINK)
    assert info.value.contract == contract
    assert str(info.value).endswith(f"[contract: {contract}]")
    assert callable(getattr(compressor, contract))


@attrs.frozen
class KParams:
    k: int = 2


class Newest(Selector):
    name = "newest"

    def __init__(self, params: KParams = KParams()) -> None:
        self.params = params

    def budget(self, n: int) -> int:
        return min(self.params.k, n)

    def select(self, queries, candidates: Sequence, layer: int) -> torch.Tensor:
        n = len(candidates)
        row = torch.arange(n - self.budget(n), n, dtype=torch.int64)
        return row.expand(queries.shape[0], -1).clone()


class Unsorted(Newest):
    def select(self, queries, candidates, layer):
        return super().select(queries, candidates, layer).flip(-1)


class Int32(Newest):
    def select(self, queries, candidates, layer):
        return super().select(queries, candidates, layer).int()


class OverBudget(Newest):
    def budget(self, n):
        return n + 1 if n else 0


class BatchCoupled(Newest):
    """Picks by the batch's mean score: item 0's choice depends on item 1."""

    def select(self, queries, candidates, layer):
        scores = torch.stack([c.keys[layer].float().mean(dim=(1, 2, 3)) for c in candidates], dim=1)  # [B, n]
        shared = scores.mean(dim=0, keepdim=True).expand_as(scores)
        k = self.budget(len(candidates))
        return shared.topk(k, dim=1).indices.sort(dim=1).values


def test_a_correct_selector_passes():
    check_selector(factory_of(Newest, KParams), **FAST)


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (Unsorted, "strictly increasing"),
        (Int32, "int64"),
        (OverBudget, "budget(1) must be an int in [0, 1]"),
        (BatchCoupled, "selects"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_broken_selectors_are_caught(cls, message):
    with pytest.raises(ConformanceError, match=r"^selector 'newest': ") as info:
        check_selector(factory_of(cls, KParams), max_examples=30, hypothesis_settings=NO_SHRINK)
    assert message in str(info.value)


class ClaimsSharedAcrossLayers(Newest):
    """Declares one choice for every layer, but picks by layer (the context would reuse layer 0's)."""

    shared_across_layers = True

    def select(self, queries, candidates, layer):
        n, k = len(candidates), self.budget(len(candidates))
        start = min(layer, n - k)
        return torch.arange(start, start + k, dtype=torch.int64).expand(queries.shape[0], -1).clone()


def test_a_selector_whose_shared_across_layers_flag_does_not_hold_is_caught():
    two_layers = Geometry(num_layers=2, num_heads=1, head_dim=8, latent_height=8, latent_width=8)
    with pytest.raises(ConformanceError) as info:
        check_selector(
            factory_of(ClaimsSharedAcrossLayers, KParams),
            {"k": 1},
            geometries=two_layers,
            max_examples=10,
            hypothesis_settings=NO_SHRINK,
        )
    assert "shared_across_layers" in str(info.value) and info.value.contract == "selects_at_every_layer"
    check_selector(factory_of(Newest, KParams), {"k": 1}, geometries=two_layers, max_examples=3)  # no flag: fine


class Shrinks(PositionalRealigner):
    name = "shrinks"

    def assign(self, spans, query):
        return [home for home, _ in spans], float(query.start_frame)

    def realign(self, keys, block, target, rope):
        return keys * 0.5


class SelectionDependentQuery(Shrinks):
    def assign(self, spans, query):
        return [home for home, _ in spans], float(sum(home for home, _ in spans)) + query.start_frame

    def realign(self, keys, block, target, rope):
        return PositionalRealigner.realign(self, keys, block, target, rope)


class Reversed(SelectionDependentQuery):
    def assign(self, spans, query):
        return [home for home, _ in reversed(spans)], float(query.start_frame)


class _IdentityClaimingFrames(PositionalRealigner):
    """Targets are the home positions, yet it claims they depend only on frame counts."""

    name = "claims_frames"
    targets_from_frames = True

    def assign(self, spans, query):
        return [home for home, _ in spans], float(query.start_frame)


class _PackerClaimingNoRotation(PositionalRealigner):
    """Packs blocks against the query (it moves them), yet claims it never rotates."""

    name = "claims_still"
    rotates = False

    def assign(self, spans, query):
        end = float(query.start_frame)
        targets = []
        for _, n in reversed(spans):
            end -= n
            targets.append(end)
        return targets[::-1], float(query.start_frame)


class _ShiftsTheQueryTheWrongWay(TemporalRopeShift):
    """``temporal_rope_shift`` whose query shifter moves the query by +Δ (the keys' way)."""

    name = "wrong_way"

    def query_shifter(self, delta, rope):
        return lambda q: rope.shift_temporal_tokens(q, delta)


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (_ShiftsTheQueryTheWrongWay, "declares shifts_query, but the query moved by"),
        (Shrinks, "must be a rotation"),
        (SelectionDependentQuery, "depends on which blocks are selected"),
        (Reversed, "out of time order"),
        (_IdentityClaimingFrames, "declares targets_from_frames"),
        (_PackerClaimingNoRotation, "declares rotates = False"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_broken_realigners_are_caught(cls, message):
    with pytest.raises(ConformanceError) as info:
        check_realigner(no_params(lambda env, cls=cls: cls()), max_examples=40, hypothesis_settings=NO_SHRINK)
    assert message in str(info.value)


def full_policy(wrap):
    """The ``full`` preset with its policy object passed through ``wrap``."""
    build = preset_builder("full")
    return ComponentFactory(FullParams, lambda p, env: wrap(build(p, env)))


def lying_plan(policy):
    original = policy.plan
    policy.plan = lambda n, batch_size=1: attrs.evolve(original(n, batch_size), tiers={})
    return policy


def ignores_nan(policy):
    """Silently skips a block with non-finite keys instead of refusing it."""
    original = policy.commit
    policy.commit = lambda c: original(c) if all(torch.isfinite(k).all() for k in c.keys) else None
    return policy


def mutates_commits(policy):
    original = policy.commit

    def commit(c):
        original(c)
        c.keys[0].zero_()

    policy.commit = commit
    return policy


@pytest.mark.parametrize(
    ("wrap", "message"),
    [
        (lying_plan, "missing from plan()"),
        (ignores_nan, "accepted a block with NaN keys"),
        (mutates_commits, "modified the tensors it was given"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_broken_policies_are_caught(wrap, message):
    check_policy(full_policy(lambda p: p), **FAST)  # the unbroken preset passes
    with pytest.raises(ConformanceError, match=r"^policy 'full': ") as info:
        check_policy(full_policy(wrap), **FAST, hypothesis_settings=NO_SHRINK)
    assert message in str(info.value)


# ---------------------------------------------------------------------- strategies
@settings(max_examples=15, deadline=None)
@given(config=strategies.configs())
def test_generated_configs_load_build_and_plan_what_the_cache_holds(config):
    loaded = pf.load_config(config)
    engine = pf.build_engine(loaded)
    blocks = list(engine.generate(loaded.run.blocks, seed=loaded.run.seed, batch_size=loaded.run.batch_size))
    planned = engine.policy.plan(loaded.run.blocks, batch_size=loaded.run.batch_size)
    assert max(b.stats.bytes for b in blocks) == planned.bytes


@settings(max_examples=10, deadline=None)
@given(
    config=strategies.configs(compressor={"name": "pool", "window": [1, 2, 2]}, selector={"name": "recency", "k": 1})
)
def test_generated_configs_with_plugins_are_valid(config):
    from packforcing.core.build import check_config

    assert check_config(config).components["compressor"].name == "pool"


@settings(max_examples=30, deadline=None)
@given(block=strategies.cached_blocks(compressed=None))
def test_cached_blocks_are_consistent(block):
    t, h, w = block.grid
    for k, v in zip(block.keys, block.values, strict=True):
        assert k.shape == v.shape and k.shape[1] == t * h * w
        assert torch.isfinite(k).all()
    assert block.latents is not None and block.latents.shape[2] == block.num_frames
    assert block.position == block.start_frame


@settings(max_examples=30, deadline=None)
@given(g=strategies.geometries(), data=st.data())
def test_geometries_build_the_reference_model(g, data):
    from packforcing.testing.blocks import tiny_model

    model = tiny_model(g)
    assert model.geometry == g
    spans, start = data.draw(strategies.spans(g.frames_per_block))
    assert all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert not spans or spans[-1][0] + spans[-1][1] <= start


def test_make_block_is_seeded():
    g = Geometry(latent_height=4, latent_width=4, num_layers=2, num_heads=1, head_dim=8)
    a, b = make_block(g, seed=3), make_block(g, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.keys, b.keys, strict=True))
    assert not torch.equal(a.keys[0], make_block(g, seed=4).keys[0])


# ---------------------------------------------------------------------- models
TINY_DIT = {"name": "tiny_dit", "hidden_size": 32, "num_heads": 2, "num_layers": 2, "latent_height": 4,
            "latent_width": 4, "frames_per_block": 2}  # fmt: skip


def tiny_dit_model(**model):
    return pf.build_engine({"model": {**TINY_DIT, **model}, "policy": "full", "run": {"device": "cpu"}}).model


def test_builtin_models_conform():
    from packforcing.testing import check_model

    model = tiny_dit_model()
    check_model(model)
    assert model.name == "tiny_dit"  # checked as it is
    shipped = pf.build_engine(pf.load_config("packforcing", overrides=["run.device=cpu"])).model
    check_model(shipped, condition={"scene": 1})  # the default model, scene-conditioned keys


class _Context(AttentionContext):
    """A context seen through a broken model: at ``position``, layers in ``skip`` bypassed."""

    def __init__(self, inner, position=None, skip=()):
        self.inner, self._position, self.skip = inner, position, skip

    @property
    def position(self):
        return self.inner.position if self._position is None else self._position

    def attend(self, layer, q, k, v):
        if layer in self.skip:
            return torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(
                1, 2
            )
        return self.inner.attend(layer, q, k, v)


class Delegating:
    """A model that is ``inner`` (tiny_dit) with one thing broken by a subclass."""

    def __init__(self, inner):
        self.inner = inner
        self.geometry, self.rope, self.hidden_size, self.codec = inner.geometry, inner.rope, inner.hidden_size, None

    def encode_condition(self, spec):
        return self.inner.encode_condition(spec)

    def denoise(self, latents, timesteps, context, condition=None):
        return self.inner.denoise(latents, timesteps, context, condition)

    def clean_kv(self, latents, context, condition=None):
        return self.inner.clean_kv(latents, context, condition)

    def project_kv(self, *args, **kwargs):
        return self.inner.project_kv(*args, **kwargs)

    def parameters(self):
        return self.inner.parameters()


class IgnoresPosition(Delegating):  # rotates its keys at 0 wherever the context is
    def denoise(self, latents, timesteps, context, condition=None):
        return self.inner.denoise(latents, timesteps, _Context(context, 0.0), condition)

    def clean_kv(self, latents, context, condition=None):
        return self.inner.clean_kv(latents, _Context(context, 0.0), condition)


class CachesOtherKeys(Delegating):
    def clean_kv(self, latents, context, condition=None):
        keys, values = self.inner.clean_kv(latents, context, condition)
        return [k * 1.01 for k in keys], values


class SkipsALayer(Delegating):
    def denoise(self, latents, timesteps, context, condition=None):
        return self.inner.denoise(latents, timesteps, _Context(context, skip=(1,)), condition)


class MixesTheBatch(Delegating):
    def denoise(self, latents, timesteps, context, condition=None):
        out = self.inner.denoise(latents, timesteps, context, condition)
        return out + 0.1 * out.mean(dim=0, keepdim=True)


class DropsAFrame(Delegating):
    def denoise(self, latents, timesteps, context, condition=None):
        return self.inner.denoise(latents, timesteps, context, condition)[:, :, :-1]


class LongSequencesDiffer(Delegating):  # what the cache-free reference runs is not what the engine runs
    def denoise(self, latents, timesteps, context, condition=None):
        out = self.inner.denoise(latents, timesteps, context, condition)
        return out * 1.05 if latents.shape[2] > 2 * self.geometry.frames_per_block else out


@pytest.mark.parametrize(
    ("cls", "contract"),
    [
        (IgnoresPosition, "rotates_keys_at_the_context_position"),
        (CachesOtherKeys, "caches_the_keys_it_attends_with"),
        (SkipsALayer, "attends_every_layer_once_in_order"),
        (MixesTheBatch, "treats_batch_items_independently"),
        (DropsAFrame, "denoises_in_shape"),
        (LongSequencesDiffer, "generates_like_the_cache_free_reference"),
    ],
)
def test_broken_models_are_caught(cls, contract):
    from packforcing.testing import check_model

    check_model(Delegating(tiny_dit_model()))  # the wrapper itself conforms
    with pytest.raises(ConformanceError) as info:
        check_model(cls(tiny_dit_model()))
    assert info.value.contract == contract, str(info.value)
    assert str(info.value).startswith(f"model '{cls.__name__}': ")


def test_check_model_leaves_the_model_and_the_process_as_they_were():
    """The engine check_model builds around the model neither names it (the registry names what
    it builds by its key) nor trips over a name that is no registry key, and PyTorch's CPU
    threads (which building an engine sets from run.threads) are as the caller left them."""
    from packforcing.testing import check_model

    unnamed = Delegating(tiny_dit_model())
    named = Delegating(tiny_dit_model())
    named.name = "my-org:my model"
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        check_model(unnamed)
        check_model(named)
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
    assert not hasattr(unnamed, "name") and named.name == "my-org:my model"


def test_a_bfloat16_model_is_checked_at_bfloat16_tolerance():
    from packforcing.testing import check_model

    model = pf.build_engine({"model": TINY_DIT, "policy": "full", "run": {"device": "cpu", "dtype": "bfloat16"}}).model
    check_model(model)  # the default tolerance follows the model's dtype (float32's fails bf16 rounding)
    with pytest.raises(ConformanceError):
        check_model(model, rtol=1e-6)
