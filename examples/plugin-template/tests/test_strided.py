"""The plugin's own tests: packforcing's conformance kit, the registry and a short generation.

Run after installing the plugin (``pip install -e .``), so its entry point is visible.
"""

from __future__ import annotations

from pathlib import Path

import packforcing_strided
import pytest
import torch
from packforcing_strided import StridedCompressor

import packforcing as pf
from packforcing.plugins.manager import Registry
from packforcing.testing import check_compressor, check_policy

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "strided.yaml"


@pytest.mark.parametrize("stride", [[1, 2, 2], [2, 1, 1], [2, 3, 3]])
def test_conforms_to_the_compressor_contracts(stride):
    check_compressor(StridedCompressor, {"stride": stride})


def test_a_tiered_policy_with_it_conforms():
    policy = {"tiers": [{"name": "mid", "blocks": 2, "fidelity": "compressed"}, {"name": "recent", "blocks": 1}]}
    check_policy("tiered", policy, compressor=StridedCompressor)


def test_registered_through_the_entry_point():
    provided = Registry.create().get("compressor", "packforcing-strided:strided")
    assert provided.version == packforcing_strided.__version__
    assert provided.factory.component is StridedCompressor


def test_generates_from_yaml():
    engine = pf.build_engine(pf.load_config(CONFIG, ["run.blocks=6"]))
    blocks = list(engine.generate(6, seed=0))
    mid = engine.policy.tier_blocks("mid")
    assert mid and all(b.fidelity == "strided" and b.grid == (4, 2, 2) for b in mid)
    assert all(torch.isfinite(b.latents).all() for b in blocks)
    assert blocks[-1].stats.bytes == engine.policy.plan(6).bytes


def test_bad_stride_is_one_line_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {CONFIG}\ncompressor:\n  stride: [1, 2, 3]\n")
    with pytest.raises(pf.ConfigError) as info:
        pf.load_config(bad)
    message = str(info.value)
    assert message.endswith("bad.yaml: compressor.stride: height and width strides must be equal, got [1, 2, 3]")
    assert "\n" not in message
