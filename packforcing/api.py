"""Everything a plugin reads or implements, importable from one place.

A plugin implements one of the interfaces below and returns the class from a hook::

    from packforcing.api import Compressor, hookimpl

    class MyPool(Compressor): ...

    @hookimpl
    def packforcing_compressors():
        return {"my_pool": MyPool}

Parameters
    A registered class's YAML parameters come from the class itself: an attrs class is its own
    parameters; otherwise its ``Params`` attribute, or the attrs class annotating the
    ``params`` argument of ``__init__``. A class that needs collaborators (the model, the
    geometry, the backend, …) defines ``from_env(cls, params, env)``, where ``env`` is a
    :class:`BuildEnv` holding everything built before it. The description shown by
    ``packforcing plugins`` is the first paragraph of the class docstring. A
    :class:`ComponentFactory` spells out ``(params class, build(params, env), description)``
    for the rare component that needs its own build function. A :class:`LazyFactory`
    (``"module:Class"`` and a description) registers a component without importing it, so
    ``packforcing plugins`` lists it without importing torch (also in :mod:`packforcing.plugins`).

Errors
    A parameter problem is a :class:`ParamError` carrying its key path, relative to the
    component (``ParamError("window", "expected ...")`` in a validator, ``from_env`` or
    ``validate(env)``) or absolute (``"selector.k"``); the user reads one line naming the file
    and the full key path (``configs/x.yaml: compressor.window: expected ...``). A validator
    may be composed from :mod:`attrs.validators` with :func:`explained`
    (``explained("an integer >= 1", attrs.validators.instance_of(int), attrs.validators.ge(1))``),
    which reports any failure of theirs as that ``ParamError``. A tuple field read from a YAML
    list takes ``converter=int_tuple`` (attrs' ``converter=tuple`` types the constructor's
    argument as ``Iterable[_T_co]``, which no argument matches under mypy).

Names
    The registry names a component by the key it was registered under: ``component.name`` is
    that key, and so is the ``fidelity`` recorded in every block a compressor produces.

Shapes
    Keys, values and queries are ``[B, N, H, D]`` (batch, tokens, heads, head dim); latents are
    ``[B, C, F, H, W]``; a token grid is ``(t, h, w)`` in t-major order.

RoPE positions (what a compressor must respect)
    A :class:`CachedBlock`'s keys are rotated at its home temporal ``position``: temporal
    token ``i`` at ``position + i * temporal_stride``, spatial token ``(j, l)`` at
    ``(j * hw_stride, l * hw_stride)``. A compressor returns a :class:`CompressedKV` whose keys
    are rotated at exactly the positions its own ``grid``, ``position``, ``temporal_stride`` and
    ``hw_stride`` declare, because realigners later rotate gathered copies from that home to the
    block's packed position (temporal band only); stored keys are never rotated in place.
    Subsampled tokens keep their rotation; averaged keys must be un-rotated first
    (``model.rope.unapply_grid``) and re-rotated on the coarse grid (``model.rope.apply_grid``).
    A compressor never writes to the block it is given and returns fresh tensors in the block's
    dtype and on its device. One that calls ``model.project_kv`` passes the block's encoded
    condition only where :func:`keys_take_condition` says the model's keys depend on it.

Checks held on the device
    A policy may check what stays on the device (indices, finite outputs) as flags and hold
    them in a :class:`DeferredChecks` for the whole block, reading them once in
    ``CachePolicy.settle()`` (which its ``commit`` calls before changing anything), so a
    block's forward passes are not separated by host reads.

Testing
    :mod:`packforcing.testing` holds the conformance checks (``check_compressor``,
    ``check_selector``, ``check_realigner``, ``check_policy``) that take the class (or factory)
    and parameters as YAML would give them.
"""

from __future__ import annotations

from packforcing.core.boundary import DeferredChecks
from packforcing.core.build import BuildEnv
from packforcing.core.errors import ConfigError, ParamError
from packforcing.core.geometry import Geometry, Grid
from packforcing.core.interfaces import (
    AttentionBackend,
    AttentionContext,
    BlockModel,
    CachePolicy,
    Compressor,
    LatentCodec,
    PositionalRealigner,
    Selector,
    condition_keys_of,
    keys_take_condition,
    num_scenes_of,
)
from packforcing.core.records import (
    FULL,
    BlockCommit,
    BlockQuery,
    CachedBlock,
    CacheStats,
    CompressedKV,
    MemoryPlan,
    TierStats,
)
from packforcing.core.rope import Rope3D
from packforcing.core.validators import explained, int_tuple
from packforcing.plugins.factory import ComponentFactory, LazyFactory, no_params
from packforcing.plugins.hookspecs import hookimpl

__all__ = [
    "FULL",
    "AttentionBackend",
    "AttentionContext",
    "BlockCommit",
    "BlockModel",
    "BlockQuery",
    "BuildEnv",
    "CachePolicy",
    "CacheStats",
    "CachedBlock",
    "ComponentFactory",
    "CompressedKV",
    "Compressor",
    "ConfigError",
    "DeferredChecks",
    "Geometry",
    "Grid",
    "LatentCodec",
    "LazyFactory",
    "MemoryPlan",
    "ParamError",
    "PositionalRealigner",
    "Rope3D",
    "Selector",
    "TierStats",
    "condition_keys_of",
    "explained",
    "hookimpl",
    "int_tuple",
    "keys_take_condition",
    "no_params",
    "num_scenes_of",
]
