"""The model contracts, one function each, and :func:`check_model` that runs them all.

A :class:`~packforcing.core.interfaces.BlockModel` is checked as built (on the CPU, in float32,
is best: the tolerances are float32's), on random latents of its own geometry: what it returns
and how it attends, that the keys it hands the cache are the ones it attends with, rotated at
the context's position by its own ``rope`` (what realigners and compressors rely on), that batch
items are independent, and that generation through the engine with a full cache equals the
cache-free reference (:func:`packforcing.testing.reference_generate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from packforcing.core.context import EmptyContext
from packforcing.core.geometry import Geometry
from packforcing.core.interfaces import AttentionBackend, BlockModel
from packforcing.core.rope import Rope3D
from packforcing.testing.checks._common import contract, describe, fail

KIND = "model"


class RecordingContext(EmptyContext):
    """No history (the block attends only to itself, through ``backend``) at ``position``; every
    ``attend`` call is recorded as ``(layer, q, k, v)``."""

    def __init__(self, backend: AttentionBackend, position: float = 0.0) -> None:
        super().__init__(backend, position)
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.calls.append((layer, q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return super().attend(layer, q, k, v)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    scale = float(b.double().norm())
    return a.shape == b.shape and float((a.double() - b.double()).norm()) <= rtol * max(scale, 1e-12)


@contract
def has_the_protocol(model: Any) -> None:
    """``geometry`` (a :class:`Geometry`), ``rope`` (a :class:`Rope3D` of the geometry's head
    dim), ``hidden_size`` (an int > 0), ``codec`` (``None`` or with ``encode``/``decode``), the
    methods ``encode_condition``, ``denoise``, ``clean_kv``, ``project_kv``; and
    ``encode_condition(None)`` is ``None``."""
    g = getattr(model, "geometry", None)
    if not isinstance(g, Geometry):
        fail(KIND, model, f"geometry must be a Geometry, got {type(g).__name__}")
    rope = getattr(model, "rope", None)
    if not isinstance(rope, Rope3D):
        fail(KIND, model, f"rope must be a Rope3D, got {type(rope).__name__}")
    if rope.head_dim != g.head_dim:
        fail(KIND, model, f"rope.head_dim = {rope.head_dim}, but geometry.head_dim = {g.head_dim}")
    size = getattr(model, "hidden_size", None)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        fail(KIND, model, f"hidden_size must be an int > 0, got {size!r}")
    codec = getattr(model, "codec", None)
    if codec is not None and not (
        callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))
    ):
        fail(KIND, model, f"codec must be None or have encode() and decode(), got {type(codec).__name__}")
    for method in ("encode_condition", "denoise", "clean_kv", "project_kv"):
        if not callable(getattr(model, method, None)):
            fail(KIND, model, f"has no method {method}()")
    if model.encode_condition(None) is not None:
        fail(KIND, model, "encode_condition(None) must be None (a block without a condition)")


@contract
def denoises_in_shape(model: BlockModel, out: Any, latents: torch.Tensor) -> None:
    """``denoise`` returns a finite velocity shaped, typed and placed like the latents."""
    if not isinstance(out, torch.Tensor) or out.shape != latents.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        fail(KIND, model, f"denoise() returned {shape}, expected the latents' shape {tuple(latents.shape)}")
    if out.dtype != latents.dtype or out.device != latents.device:
        fail(
            KIND, model, f"denoise() returned {out.dtype} on {out.device}, expected {latents.dtype} on {latents.device}"
        )
    if not bool(torch.isfinite(out).all()):
        fail(KIND, model, "denoise() returned non-finite values")


@contract
def attends_every_layer_once_in_order(model: BlockModel, calls: list[tuple], tokens: int, batch: int) -> None:
    """A forward pass calls ``context.attend(layer, q, k, v)`` once per layer, layers in order,
    with ``q, k, v [B, N, H, D]`` over the pass's own tokens (``N`` = frames × tokens per frame)."""
    g = model.geometry
    layers = [layer for layer, *_ in calls]
    if layers != list(range(g.num_layers)):
        fail(KIND, model, f"attended layers {layers}, expected each of 0..{g.num_layers - 1} once, in order")
    expected = (batch, tokens, g.num_heads, g.head_dim)
    for layer, q, k, v in calls:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if tuple(x.shape) != expected:
                fail(KIND, model, f"layer {layer} attended {name} of shape {tuple(x.shape)}, expected {expected}")


@contract
def caches_the_keys_it_attends_with(
    model: BlockModel, kv: Any, calls: list[tuple], rtol: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``clean_kv(latents, context)`` returns per layer the ``K, V [B, N, H, D]`` the block
    attends with in ``denoise`` at timestep 0 (what the cache stores is what the cache-free
    model would recompute)."""
    g = model.geometry
    if not (isinstance(kv, tuple) and len(kv) == 2 and all(isinstance(x, list | tuple) for x in kv)):
        fail(KIND, model, f"clean_kv() must return (keys, values), two lists, got {type(kv).__name__}")
    keys, values = list(kv[0]), list(kv[1])
    if len(keys) != g.num_layers or len(values) != g.num_layers:
        fail(KIND, model, f"clean_kv() returned {len(keys)} keys / {len(values)} values, expected {g.num_layers}")
    for layer, (k, v, (_, _, k_seen, v_seen)) in enumerate(zip(keys, values, calls, strict=True)):
        if not _close(k, k_seen, rtol) or not _close(v, v_seen, rtol):
            fail(
                KIND,
                model,
                f"layer {layer}: clean_kv() keys/values differ from those the block attends with at timestep 0 "
                f"(shapes {tuple(k.shape)} / {tuple(k_seen.shape)})",
            )
    return keys, values


@contract
def rotates_keys_at_the_context_position(
    model: BlockModel, at_zero: tuple[list, list], moved: tuple[list, list], delta: float, rtol: float
) -> None:
    """Keys are rotated by the model's own ``rope`` at ``context.position``: moving the context
    by ``delta`` frames moves every layer's keys by ``rope.shift_temporal(keys, delta)`` and
    leaves the values alone (realigners and compressors move stored keys this way)."""
    for layer, (k0, k1, v0, v1) in enumerate(zip(at_zero[0], moved[0], at_zero[1], moved[1], strict=True)):
        if not _close(v1, v0, rtol):
            fail(KIND, model, f"layer {layer}: the values depend on context.position")
        if not _close(k1, model.rope.shift_temporal(k0, delta).to(k1.dtype), rtol):
            fail(
                KIND,
                model,
                f"layer {layer}: keys at context.position {delta:g} are not the keys at 0 moved by "
                f"rope.shift_temporal(keys, {delta:g}): the model does not rotate its keys with its rope at the "
                "context's position",
            )


@contract
def treats_batch_items_independently(
    model: BlockModel, alone: torch.Tensor, in_batch: torch.Tensor, rtol: float
) -> None:
    """A batch item's velocity does not depend on the other items."""
    if not _close(in_batch, alone, rtol):
        fail(KIND, model, "denoise() of a batch item changes with the other items of the batch")


@contract
def generates_like_the_cache_free_reference(
    model: BlockModel, cached: list[torch.Tensor], reference: list[torch.Tensor], rtol: float
) -> None:
    """Generation through the engine with the ``full`` policy equals
    :func:`~packforcing.testing.reference_generate` (the model over the whole sequence, a block
    mask, no cache), block for block."""
    for i, (c, r) in enumerate(zip(cached, reference, strict=True)):
        if not _close(c, r, rtol):
            err = float((c.double() - r.double()).norm() / max(float(r.double().norm()), 1e-12))
            fail(
                KIND,
                model,
                f"block {i}: cached generation differs from the cache-free reference (rel. error {err:.2e})",
            )


UNDER_CHECK = "model-under-check"
"""The key the model is registered under for the engine :func:`check_model` builds around it."""


def _engine(model: BlockModel, device: torch.device, steps: int) -> Any:
    """An engine around ``model`` itself, with the full cache. The model is registered through a
    factory that does not name what it builds, so it is checked as it is: it is neither renamed
    nor given a ``name`` (the registry names a component by its key), and any ``name`` it has
    need not be a valid registry key. PyTorch's CPU threads are left as they are."""
    import packforcing as pf
    from packforcing.plugins import ComponentFactory, hookimpl
    from packforcing.plugins.factory import EmptyParams
    from packforcing.plugins.manager import Registry

    @attrs.frozen
    class AsItIs(ComponentFactory):
        def create(self, params: Any, env: Any) -> Any:
            return self.build(params, env)

    class ThisModel:
        @hookimpl
        def packforcing_models(self) -> Mapping[str, Any]:
            return {UNDER_CHECK: AsItIs(EmptyParams, lambda params, env: model, "the model under check")}

    registry = Registry.create(entry_points=False, extra_plugins=[(ThisModel(), "check-model")])
    config = {
        "model": {"name": f"check-model:{UNDER_CHECK}"},
        "policy": {"name": "full"},
        "backend": {"name": "sdpa"},
        "sampler": {"steps": steps},
        "run": {"device": str(device), "dtype": model.geometry.dtype, "threads": torch.get_num_threads()},
    }
    return pf.build_engine(config, registry=registry)


@torch.no_grad()
def check_model(
    model: BlockModel,
    *,
    condition: Mapping[str, Any] | None = None,
    batch_size: int = 2,
    blocks: int = 3,
    steps: int = 2,
    seed: int = 0,
    rtol: float | None = None,
) -> None:
    """Check a built ``model`` against every model contract (see :mod:`packforcing.testing.checks`).

    ``condition``: a condition spec the model takes (``{"scene": 1}``), used for every pass;
    ``None``: unconditioned. ``blocks`` blocks of ``steps`` sampler steps are generated for the
    reference comparison. ``rtol``: the relative (norm) tolerance of every comparison; by
    default 1e-4 for a float32 model and 2e-2 for a 16-bit one (its geometry's dtype). The
    model's device is that of its first parameter or buffer (the CPU without any). A violation
    raises :class:`ConformanceError` naming the contract.
    """
    from packforcing.attention.backends import SdpaBackend
    from packforcing.testing.reference import reference_generate

    has_the_protocol(model)
    g = model.geometry
    backend = SdpaBackend()
    try:
        encoded = model.encode_condition(condition)
    except Exception as exc:
        fail(KIND, model, f"encode_condition({condition!r}) raised {describe(exc)}")
    tensors = [*getattr(model, "parameters", lambda: [])(), *getattr(model, "buffers", lambda: [])()]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = g.torch_dtype
    if rtol is None:
        rtol = 1e-4 if dtype == torch.float32 else 2e-2
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, g.latent_channels, g.frames_per_block, g.latent_height, g.latent_width)
    latents = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    t = torch.full((batch_size,), 500.0, device=device)

    # one block, then two blocks at once (the reference's whole-sequence passes, per-frame timesteps)
    for frames in (g.frames_per_block, 2 * g.frames_per_block):
        x = latents if frames == g.frames_per_block else torch.cat([latents, latents.flip(0)], dim=2)
        steps_ = t if frames == g.frames_per_block else torch.full((batch_size, frames), 500.0, device=device)
        ctx = RecordingContext(backend)
        try:
            out = model.denoise(x, steps_, ctx, condition=encoded)
        except Exception as exc:
            fail(KIND, model, f"denoise() of {frames} frames raised {describe(exc)}")
        denoises_in_shape(model, out, x)
        attends_every_layer_once_in_order(
            model, ctx.calls, frames // g.frames_per_block * g.tokens_per_block, batch_size
        )

    delta = 3.0 * g.frames_per_block
    at_zero, moved = (
        caches_the_keys_it_attends_with(
            model,
            model.clean_kv(latents, RecordingContext(backend, position), condition=encoded),
            _calls_at(model, latents, backend, position, encoded),
            rtol,
        )
        for position in (0.0, delta)
    )
    rotates_keys_at_the_context_position(model, at_zero, moved, delta, rtol)

    in_batch = model.denoise(latents, t, RecordingContext(backend), condition=encoded)[:1]
    alone = model.denoise(latents[:1], t[:1], RecordingContext(backend), condition=encoded)
    treats_batch_items_independently(model, alone, in_batch, rtol)

    engine = _engine(model, device, steps)
    spec = [{"from_block": 0, **condition}] if condition else None
    cached = [b.latents for b in engine.generate(blocks, seed=seed, conditions=spec)]
    reference = reference_generate(
        model, engine.backend, blocks, range, sampler=engine.sampler, seed=seed, device=device, dtype=dtype,
        condition=encoded,
    )  # fmt: skip
    generates_like_the_cache_free_reference(model, cached, reference, rtol)


def _calls_at(
    model: BlockModel, latents: torch.Tensor, backend: AttentionBackend, position: float, condition: Any
) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The ``attend`` calls of ``denoise`` at timestep 0 with the context at ``position``."""
    ctx = RecordingContext(backend, position)
    model.denoise(latents, torch.zeros(latents.shape[0], device=latents.device), ctx, condition=condition)
    return ctx.calls
