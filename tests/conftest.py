"""Shared pytest fixtures, registered once for every test module.

Here: small encoders and sample-photo folders built once per session, the one-thread fixture, a
network guard, and the terminal summary of what the audit tests measured. Area fixtures live in
tests/_<area>_fixtures.py and are registered below through `pytest_plugins`; test modules import
only plain helpers from those files, never fixtures.
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: with 2 cores and test subprocesses (index builds,
# the UI server) running beside the test process, spinning threads starve each other 10–20×.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from _report import MEASURED  # noqa: E402

pytest_plugins = ["_dreamsim_fixtures", "_ui_fixtures", "_postgres_fixtures", "_gpu_fixtures"]

# Two cores: keep torch from oversubscribing them when several processes run.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Property tests: new random examples on every local run (they find bugs, kept as @example), the same fixed set
# under CI (CI=true), so that a landing does not hang on a draw no earlier run made.
from hypothesis import settings as _hypothesis  # noqa: E402

_hypothesis.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    _hypothesis.load_profile("ci")


@pytest.fixture(scope="session")
def photo_index(tmp_path_factory, sample_folder, tiny_lipsim):
    """(folder, index_dir): the bundled photos indexed with lipsim:cpu-tiny, built once per session.
    Read-only: tests that change a gallery build their own."""
    from index import IngestOptions, build_index
    from _index_fixtures import copy_photos

    base = tmp_path_factory.mktemp("photo-index")
    folder = copy_photos(sample_folder, base / "photos")
    build_index(folder, base / "index", "lipsim:cpu-tiny", encoder=tiny_lipsim, options=IngestOptions(workers=2))
    return folder, base / "index"


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one intra-op thread (`pytestmark = pytest.mark.usefixtures("one_thread")`).

    Tiny models and tensors run as fast on one thread, and a single thread does not stall in
    OpenMP's synchronisation when the two cores are shared with other processes (10× slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection (a download, a hub query) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(scope="session")
def tiny_lipsim():
    """lipsim:cpu-tiny with random weights (32 px input, 33-d embedding), frozen."""
    from encoder import load_encoder

    return load_encoder("lipsim:cpu-tiny")


@pytest.fixture(scope="session")
def sample_folder(tmp_path_factory):
    """A folder with every bundled sample photo as a PNG (read-only use: copy before modifying)."""
    from encoder.samples import export_sample_photos

    folder = tmp_path_factory.mktemp("samples")
    export_sample_photos(folder)
    return folder


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Show the figures the audit and soundness tests recorded (tests/_report.py); their own
    assertions decide pass or fail."""
    if config.get_verbosity() < 0:
        return
    for section, table in MEASURED.items():
        terminalreporter.write_sep("-", section)
        for key in sorted(table):
            terminalreporter.write_line(f"{key}: {table[key]:.9f}")


def pytest_sessionfinish(session, exitstatus):
    """Under pytest-xdist, a worker sends what its tests recorded to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["measured"] = {section: dict(table) for section, table in MEASURED.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """Under pytest-xdist, the controller gathers each worker's figures for the terminal summary."""
    for section, table in getattr(node, "workeroutput", {}).get("measured", {}).items():
        MEASURED.setdefault(section, {}).update(table)
