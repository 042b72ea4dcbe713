"""Small builders shared by the test modules."""

from __future__ import annotations

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
