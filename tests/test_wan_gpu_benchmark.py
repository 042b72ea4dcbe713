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
        [sys.executable, "benchmarks/wan_gpu.py", "--smoke", "--out", str(tmp_path), "--memory-gib", "0.5"],
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
    assert data["setup"]["memory_cap_bytes"] == 2**29 == runs["full"]["memory_cap_bytes"]  # recorded
    for name, run in runs.items():
        assert run["blocks"] > 0 and run["stopped"] == "max_blocks", name
        assert run["cache_equals_plan"], name  # the bytes held equal the plan after every block
        assert all({"block_peak", "max_allocated"} <= set(row) for row in run["rows"]), name
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


def _rows(blocks: int, page: int, per_page: int, transient, commit: int) -> list[dict]:
    """Rows as ``run_policy`` records them, from a known memory model: a page of ``page`` bytes
    every ``per_page`` blocks; block ``n``'s passes peak at the cache before it plus
    ``transient(n)``, its commit at the cache after it plus ``commit``."""

    def plan(n: int) -> int:
        return page * -(-n // per_page)

    return [
        {"block": n, "plan_bytes": plan(n + 1), "block_peak": max(plan(n) + transient(n), plan(n + 1) + commit)}
        for n in range(blocks)
    ], plan


def _first_overflow(usable: int, plan, transient, commit: int, start: int) -> int:
    n = start
    while max(plan(n) + transient(n), plan(n + 1) + commit) <= usable:
        n += 1
    return n


def test_predict_oom_finds_the_first_block_that_would_not_fit(monkeypatch):
    """The full cache's out-of-memory point from its measured blocks and its plan: the first
    block whose passes (cache before it + a transient growing with the context) or whose commit
    (the cache after it + a constant) would exceed the usable bytes, as a brute-force walk of the
    same memory model finds it; either one can be the one that overflows."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from wan_gpu import predict_oom

    def transient(n: int) -> int:  # weights + activations + the per-layer copy of the context
        return 6_000 + 30 * n

    rows, plan = _rows(80, page=3_450, per_page=4, transient=transient, commit=3_860)
    for usable in range(rows[-1]["block_peak"] + 1, rows[-1]["block_peak"] + 20_000, 37):
        expected = _first_overflow(usable, plan, transient, 3_860, start=80)
        assert predict_oom(rows, usable, plan) == expected, usable
    # a commit that dominates: the page allocation is what overflows first
    rows, plan = _rows(40, page=3_450, per_page=4, transient=lambda n: 100 + n, commit=5_000)
    usable = plan(45) + 5_000 - 1  # the block that takes the cache to plan(45) cannot commit
    assert predict_oom(rows, usable, plan) == _first_overflow(usable, plan, lambda n: 100 + n, 5_000, 40) == 44
    # a flat cache with a flat transient never runs out: no prediction
    flat_rows = [{"block": n, "plan_bytes": 1_000, "block_peak": 1_500} for n in range(20)]
    assert predict_oom(flat_rows, 10_000, lambda n: 1_000) is None
    assert predict_oom(flat_rows[:2], 10_000, lambda n: 1_000) is None  # too few blocks to fit a line


def test_the_policy_table_says_where_the_cache_ran_or_would_run_out_of_memory(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from wan_gpu import stopped_by, video_seconds

    observed = {"stopped": "OOM", "blocks": 89, "video_seconds": video_seconds(89)}
    assert stopped_by(observed) == "out of memory in block 90, after 89 blocks (66.6 s)"
    predicted = {"stopped": "time cap", "blocks": 80, "predicted_oom_blocks": 89}
    assert stopped_by(predicted) == "time cap (predicted out of memory after 89 blocks, 66.6 s)"
    assert stopped_by({"stopped": "max_blocks", "predicted_oom_blocks": None}) == "max_blocks"
    capped = {**observed, "memory_cap_bytes": int(79.2 * 2**30)}  # an H200 run as an 80 GB card
    assert stopped_by(capped) == "out of memory in block 90, after 89 blocks (66.6 s, allocator capped at 79.2 GiB)"


def test_a_memory_cap_must_be_positive_and_within_the_card(monkeypatch, capsys):
    import pytest

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from wan_gpu import SMOKE, main, memory_cap_problem

    assert memory_cap_problem(79.2, SMOKE) is None
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        assert memory_cap_problem(bad, SMOKE) == "expected a number of GiB > 0"
    with pytest.raises(SystemExit) as exit_:
        main(["--smoke", "--memory-gib", "0"])
    assert exit_.value.code == 2 and "--memory-gib 0: expected a number of GiB > 0" in capsys.readouterr().err


def test_run_policy_records_an_out_of_memory_block_as_the_result(monkeypatch):
    """The full cache's section ends in out of memory on the GPU: that is its result, recorded
    with the blocks completed before it, and the table says in which block it happened."""
    import types
    from contextlib import contextmanager

    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from wan_gpu import SMOKE, policy_table, run_policy

    class Session:
        def __init__(self) -> None:
            self.done = 0

        def step(self):
            if self.done == 5:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.21 GiB")
            self.done += 1
            stats = types.SimpleNamespace(bytes=100 * self.done)
            return types.SimpleNamespace(seconds=0.01, context_tokens=10 * self.done, stats=stats)

    class Engine:
        policy = types.SimpleNamespace(plan=lambda n: types.SimpleNamespace(bytes=100 * n))

        @contextmanager
        def session(self, **kwargs):
            yield Session()

    run = run_policy(Engine(), SMOKE, cap=60, max_blocks=50, conditions=[])
    assert run["stopped"] == "OOM" and run["blocks"] == 5 and run["cache_equals_plan"]
    assert "Tried to allocate 2.21 GiB" in run["error"] and run["predicted_oom_blocks"] is None
    assert "| out of memory in block 6, after 5 blocks (3.6 s) |" in policy_table({"full": run})


def test_the_device_script_cuts_the_budget_to_end_within_the_call_limit(tmp_path):
    """wan_gpu_device.sh cuts the benchmark's budget so the whole call ends within CALL_LIMIT,
    the before tree's run (its 100 s and a margin) included when .before/ is there (run with
    stand-ins for nvidia-smi and python3 that only record their arguments)."""
    import shutil
    import stat

    if shutil.which("bash") is None:
        import pytest

        pytest.skip("needs bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 81559\n")
    (bin_dir / "python3").write_text(f'#!/bin/sh\necho "$*" >> "{log}"\necho ran\n')
    for name in ("nvidia-smi", "python3"):
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALL_LIMIT": "300"}

    def budgets(before: bool) -> list[float]:
        work = tmp_path / ("with" if before else "without")
        work.mkdir()
        if before:
            (work / ".before").mkdir()
        log.write_text("")
        script = ROOT / "benchmarks" / "wan_gpu_device.sh"
        result = subprocess.run(
            ["bash", str(script), str(work / "out")], cwd=work, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        runs = [line.split() for line in log.read_text().splitlines() if "benchmarks/wan_gpu.py" in line]
        return [float(args[args.index("--budget") + 1]) for args in runs]

    alone = budgets(before=False)
    assert len(alone) == 1 and 280 <= alone[0] <= 300 - 15
    after, before = budgets(before=True)
    assert before == 100 and after + before <= 300 - 2 * 15 and after >= 150
