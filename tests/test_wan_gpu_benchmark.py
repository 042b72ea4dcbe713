"""benchmarks/wan_gpu.py's code paths in its CPU ``--smoke`` mode (tiny random Wan); no timing asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wan_gpu_smoke_run_writes_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "benchmarks/wan_gpu.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "wan_gpu.json").read_text())
    sections = data["sections"]
    assert set(sections) == {"attention", "copy", "policies", "shares", "shares_per_pass", "shares_split"}
    copy = sections["copy"]  # attention over the stored pieces, merged by log-sum-exp, equals the gathered one
    assert copy["max_abs_diff"] < 1e-5 and copy["copy_ms"] > 0 and copy["attend_merged_ms"] > 0
    assert copy["split_max_abs_diff"] < 1e-5 and copy["attend_split_ms"] > 0
    assert all(copy[k] > 0 for k in ("split_query_move_ms", "split_copy_ms", "split_attend_ms", "split_merge_ms"))
    assert any(row["backend"] == "sdpa_math" and row["ms"] > 0 for row in sections["attention"]["rows"])
    # the engine's own call, with the kernel SDPA picks for it
    assert any(row["backend"].startswith("sdpa_default (") and row["ms"] > 0 for row in sections["attention"]["rows"])
    assert all("error" in row for row in sections["attention"]["rows"] if row["backend"] in ("xformers", "flash_attn"))
    runs = sections["policies"]
    assert set(runs) == {"packforcing", "sliding_window", "sink_recent", "full"}
    for name, run in runs.items():
        assert run["blocks"] > 0 and run["stopped"] == "max_blocks", name
        assert run["cache_equals_plan"], name  # the bytes held equal the plan after every block
    pf_rows = runs["packforcing"]["rows"]
    assert pf_rows[-1]["cache_bytes"] == pf_rows[-2]["cache_bytes"]  # flat once the tiers are full
    assert runs["full"]["rows"][-1]["context_tokens"] > runs["full"]["rows"][0]["context_tokens"]
    shares = sections["shares"]
    assert shares["timed_blocks"] > 0 and 0 < shares["cache_management_share"] < 1
    profiled = shares["profile"]  # one block under torch.profiler: the cache's operators show
    assert profiled["packforcing"]["operators"] > profiled["fixed_context"]["operators"] > 0
    per_pass = sections["shares_per_pass"]  # top-K once per forward pass: fewer operators per block
    assert per_pass["variant"] == {"selector": {"shared_across_layers": True}} and per_pass["timed_blocks"] > 0
    assert per_pass["profile"]["packforcing"]["operators"] < profiled["packforcing"]["operators"]
    split = sections["shares_split"]  # the context attended where it is stored, merged by log-sum-exp
    assert split["variant"] == {"backend": {"split_context": True}} and split["timed_blocks"] > 0
    assert 0 < split["cache_management_share"] < 1
    # the split engine attends in parts (sink, recent, picks + the block): more attention calls
    calls = split["profile"]["packforcing"]["attention_calls"]
    assert calls > profiled["packforcing"]["attention_calls"] == profiled["fixed_context"]["attention_calls"] > 0
    md = (tmp_path / "wan_gpu.md").read_text()
    assert "backend {'split_context': True}" in md
    assert "cache mgmt %" in md and "| packforcing |" in md and "x real time" in md and "copy share of a block" in md
    assert "merge by log-sum-exp ms/block" in md


def test_the_fixed_context_reference_attends_history_and_block_without_copying_the_history(monkeypatch):
    """The unperturbed share's reference: a fixed-size KV cache. Each call attends the ``T``
    history tokens and the block's own, written into the buffer's tail (the history is not
    copied), exactly as attention over the concatenation."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from wan_gpu import FixedContext

    from packforcing.attention.backends import SdpaBackend

    gen = torch.Generator().manual_seed(0)
    history, block = 7, 3
    keys = [torch.randn(2, history + block, 2, 8, generator=gen) for _ in range(2)]
    values = [torch.randn(2, history + block, 2, 8, generator=gen) for _ in range(2)]
    stored = [k[:, :history].clone() for k in keys], [v[:, :history].clone() for v in values]
    backend = SdpaBackend()
    ctx = FixedContext(backend, keys, values, 5.0, block)
    assert ctx.context_tokens == history and ctx.position == 5.0
    for layer in range(2):
        q, k, v = (torch.randn(2, block, 2, 8, generator=gen) for _ in range(3))
        out = ctx.attend(layer, q, k, v)
        expected = backend.attend(q, torch.cat([stored[0][layer], k], 1), torch.cat([stored[1][layer], v], 1))
        torch.testing.assert_close(out, expected)
        assert torch.equal(keys[layer][:, :history], stored[0][layer])  # the history is left as it was
