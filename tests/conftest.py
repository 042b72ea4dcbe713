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
import signal

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


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_as_in_a_terminal():
    """Ctrl-C (SIGINT) raises KeyboardInterrupt in the suite and in the programs it starts, as
    in a terminal's foreground, whoever started the suite. A shell starts a script's background
    job (``.ci/run > log &``, ``nohup``) with SIGINT ignored, and a program keeps a signal
    ignored (``generate`` does, as Python does): the tests that stop a run with SIGINT would
    then test nothing. Restored afterwards. (A program started by a test inherits the default
    action, since a handler is reset at ``exec``, and Python installs its own Ctrl-C on it.)"""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, previous)
