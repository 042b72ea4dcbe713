"""Conformance checks for plugin components, run by a plugin's own test suite.

Each check builds the component (as the registry would, with the defaults or the ``params``
you give, as YAML would) on many small random geometries and blocks (Hypothesis), and asserts
the contracts the built-in components are held to::

    from packforcing.testing import check_compressor, check_policy
    from my_plugin import StridedCompressor

    def test_conforms():
        check_compressor(StridedCompressor)                        # the class the hook returns
        check_compressor(StridedCompressor, {"stride": [2, 2, 2]})
        check_policy("tiered", {"tiers": [...]}, compressor=StridedCompressor)

The component may be given as its class, a registered name (``"tiered"``), a
:class:`~packforcing.plugins.factory.ComponentFactory` or a registry entry.

Each contract is a named function in the kind's module (:mod:`.compressor`, :mod:`.selector`,
:mod:`.realigner`, :mod:`.policy`, :mod:`.model`), e.g. ``leaves_the_block_untouched``. A violation raises
:class:`ConformanceError` (an ``AssertionError``) naming the component, the offending value and,
last, the contract (``[contract: leaves_the_block_untouched]``, also ``exc.contract``);
Hypothesis shrinks it to a small example first. The number of examples is ``max_examples``
or, by default, a fifth of the active Hypothesis profile's (at least 5): each example builds a
model. ``hypothesis_settings`` replaces the active
profile as the base settings (e.g. ``settings(phases=[Phase.generate])`` to skip shrinking).

Contracts
---------
Compressor
    ``name`` a non-empty string other than ``"full"``; ``needs_latents`` a bool;
    ``output_grid(grid)`` three positive ints, deterministic, no more tokens than ``grid``;
    ``compress(block, model)`` returns a :class:`CompressedKV` on exactly that grid with one
    ``[B, N', H, D]`` key and value tensor per layer in the block's dtype and on its device,
    finite, with a positive temporal stride and every temporal token inside the block's time
    span; it works without latents unless ``needs_latents``; it leaves the block untouched, is
    deterministic (also across fresh builds) and treats batch items independently.
Selector
    ``budget(n)`` in ``[0, n]``, ``budget(0) == 0``, non-decreasing; ``select`` returns int64
    indices ``[B, budget(n)]`` on the queries' device, strictly increasing (time order) and in
    range, for every layer; no mutation; deterministic; one row per batch item (a row does not
    depend on the other items).
Realigner
    ``assign`` returns one finite position per span, in time order without overlaps, all before
    the query, and a query position that depends only on how many blocks are in the context;
    ``realign`` keeps shape, dtype and device, preserves per-head key norms (a rotation), leaves
    keys at their home position unchanged, accepts a per-item ``[B]`` target, does not mutate
    its input and (``exact_rope=True``) equals the model's temporal RoPE shift.
Model (:func:`check_model`, on a built model)
    ``geometry``, ``rope`` (of the geometry's head dim), ``hidden_size``, ``codec``,
    ``encode_condition(None) is None``; ``denoise`` returns a finite velocity shaped like the
    latents (one block, and several with per-frame timesteps) and calls ``context.attend`` once
    per layer, in order, with ``[B, N, H, D]`` tensors; ``clean_kv`` returns the keys and values
    the block attends with at timestep 0; moving ``context.position`` by Δ moves the keys by
    ``rope.shift_temporal(keys, Δ)`` and leaves the values; batch items are independent; with
    the ``full`` policy the engine generates what :func:`~packforcing.testing.reference_generate`
    does.
Policy
    Attention outputs ``[B, N, H, D]`` in dtype/device, finite; commits leave the committed
    tensors untouched; the live ``stats()`` peaks equal ``plan(n)`` per tier (blocks, tokens,
    bytes) and the archive count; context tokens never exceed the plan's; a block with NaN/Inf
    keys is refused (``ValueError``) and leaves the cache as it was; ``reset()`` empties the
    cache and a replay is bit-identical; two fresh builds agree bit for bit.
"""

from __future__ import annotations

from packforcing.testing.checks._common import ConformanceError
from packforcing.testing.checks.compressor import check_compressor
from packforcing.testing.checks.model import check_model
from packforcing.testing.checks.policy import check_policy
from packforcing.testing.checks.realigner import check_realigner
from packforcing.testing.checks.selector import check_selector

__all__ = ["ConformanceError", "check_compressor", "check_model", "check_policy", "check_realigner", "check_selector"]
