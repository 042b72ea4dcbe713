"""Small builders shared by the test modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import packforcing as pf

TINY_MODEL = {
    "name": "tiny_dit",
    "hidden_size": 32,
    "num_heads": 2,
    "num_layers": 2,
    "latent_height": 4,
    "latent_width": 6,
}


def engine_for(policy: dict[str, Any], *, model: dict[str, Any] | None = None, steps: int = 3, **sections: Any):
    """An engine on the CPU in float32 with the SDPA backend."""
    config = {
        "model": model or TINY_MODEL,
        "policy": policy,
        "backend": "sdpa",
        "sampler": {"steps": steps},
        "run": {"device": "cpu", "dtype": "float32"},
        **sections,
    }
    return pf.build_engine(config)


def generate(engine, num_blocks: int, seed: int = 0, batch_size: int = 1):
    return list(engine.generate(num_blocks, seed=seed, batch_size=batch_size))


FULL_PACKFORCING_BLOCKS = 13
"""Blocks after which configs/packforcing.yaml's sink (2), mid (8) and recent (2) tiers are full."""


def packforcing_engine(*overrides: str):
    """configs/packforcing.yaml on the CPU with SDPA, then ``overrides`` (e.g. ``run.device=cuda``)."""
    return pf.build_engine(
        pf.load_config("configs/packforcing.yaml", overrides=["run.device=cpu", "backend.name=sdpa", *overrides])
    )


@contextlib.contextmanager
def full_packforcing_session(*overrides: str, batch_size: int = 2) -> Iterator[tuple[Any, Any]]:
    """:func:`packforcing_engine` in an open session whose cache holds
    :data:`FULL_PACKFORCING_BLOCKS` blocks of ``batch_size`` items (two pick differently):
    yields ``(engine, session)``."""
    engine = packforcing_engine(*overrides)
    with engine.session(seed=0, batch_size=batch_size) as session:
        for _ in range(FULL_PACKFORCING_BLOCKS):
            session.step()
        yield engine, session


def full_packforcing_engine():
    """:func:`full_packforcing_session`'s engine, its session closed (the cache stays full)."""
    with full_packforcing_session() as (engine, _):
        return engine


def layer_qkv(engine, seed: int, batch_size: int = 2) -> list[tuple[Any, Any, Any]]:
    """Random per-layer ``(q, k, v)`` ``[B, N, H, D]`` for one forward pass of ``engine``."""
    import torch

    g = engine.geometry
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, g.tokens_per_block, g.num_heads, g.head_dim)
    return [tuple(torch.randn(shape, generator=gen) for _ in range(3)) for _ in range(g.num_layers)]


def syncs_of_a_pass(policy, query, layers) -> dict[str, Any]:
    """Host syncs (:class:`~packforcing.core.instrument.HostSyncCounter`) of one forward pass of
    ``policy``'s context for ``query`` over ``layers`` (``(q, k, v)`` per layer): of its first
    layer, of its other layers, and of the policy's :meth:`settle` after it."""
    from packforcing.core.instrument import HostSyncCounter

    ctx = policy.context(query)
    with HostSyncCounter() as first:
        ctx.attend(0, *layers[0])
    with HostSyncCounter() as rest:
        for layer in range(1, len(layers)):
            ctx.attend(layer, *layers[layer])
    with HostSyncCounter() as settle:
        policy.settle()
    return {"first": first, "rest": rest, "settle": settle, "context": ctx}


def assert_one_read_per_block(syncs: dict[str, Any]) -> None:
    """What :func:`syncs_of_a_pass` counted is the device-side path's: the pass's layout copied
    to the device on the first layer (asynchronously on CUDA), nothing read during the pass,
    and its checks read once, by ``settle``."""
    first, rest, settle = syncs["first"], syncs["rest"], syncs["settle"]
    assert sum(first.reads.values()) == 0 and first.total <= 2, (dict(first.reads), dict(first.writes))
    assert rest.total == 0, (dict(rest.reads), dict(rest.writes))
    assert dict(settle.reads) == {"__bool__": 1} and settle.total == 1, (dict(settle.reads), dict(settle.writes))


def selector_blocks(k: int) -> list[dict[str, Any]]:
    """The selector config blocks the randomized oracle tests draw from, each picking ``k``:
    top-K per layer, top-K once per pass over half the heads, and recency."""
    return [
        {"name": "topk", "k": k, "min_queries": 2},
        {"name": "topk", "k": k, "shared_across_layers": True, "head_fraction": 0.5},
        {"name": "recency", "k": k},
    ]


def recorded_loads(monkeypatch, cls) -> list:
    """Weak references to every model ``cls.from_pretrained(..., output_loading_info=True)``
    loads from now on (diffusers' and transformers' loaders return ``(model, info)`` then)."""
    import weakref

    loaded: list[weakref.ref] = []
    load = cls.from_pretrained

    def recorded(*args: Any, **kwargs: Any) -> Any:
        result = load(*args, **kwargs)
        loaded.append(weakref.ref(result[0]))
        return result

    monkeypatch.setattr(cls, "from_pretrained", recorded)
    return loaded
