"""Hypothesis profiles: ``ci`` (the default, used by CI) and ``long`` (deep runs).

Choose with ``HYPOTHESIS_PROFILE=long`` or pytest's ``--hypothesis-profile=long``.
``ci`` is derandomized (the same examples every run, no example database) so CI is
reproducible; ``long`` draws fresh random examples and many more of them. ``ci`` is sized so
the whole suite stays within ~3 minutes on two idle cores: the stateful policy machines
(``tests/test_stateful.py``, each example 25 steps) run 50 examples each under ``ci`` and the
profile's 2000 under ``long`` (``HYPOTHESIS_PROFILE=long pytest tests/test_stateful.py``).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tiny-tensor tests on one intra-op thread (restored afterwards).

    With tensors this small, extra threads only add synchronisation, and on a loaded 2-core
    machine OpenMP's spinning threads slow such tests down by an order of magnitude.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
