"""One engine, one generation at a time — also across threads: of two threads starting a
generation on one engine together, exactly one runs and the other gets a clear error; the one
that runs gives exactly the single-threaded output."""

from __future__ import annotations

import threading

import pytest
import torch

from packforcing.core.engine import SessionError

from .helpers import engine_for, generate

pytestmark = pytest.mark.usefixtures("torch_single_thread")

POLICY = {"name": "sink_recent", "sink_frames": 4, "window_frames": 4}


def test_two_threads_on_one_engine():
    reference = [b.latents for b in generate(engine_for(POLICY), 4, seed=3)]
    engine = engine_for(POLICY)
    start = threading.Barrier(2)
    results: dict[str, list[torch.Tensor] | BaseException] = {}

    def worker(name: str) -> None:
        start.wait()
        try:
            stream = engine.generate(4, seed=3)
            results[name] = [next(stream).latents]
            start_second.wait()  # the other thread tries while this generation is alive
            results[name] += [b.latents for b in stream]
        except SessionError as exc:
            results[name] = exc
            start_second.wait()

    start_second = threading.Barrier(2)
    threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [r for r in results.values() if isinstance(r, BaseException)]
    ran = [r for r in results.values() if not isinstance(r, BaseException)]
    assert len(refused) == 1 and len(ran) == 1, results
    assert "another generation session is open on this engine" in str(refused[0])
    assert all(torch.equal(a, b) for a, b in zip(ran[0], reference, strict=True)) and len(ran[0]) == 4
