"""Shared pytest fixtures: small encoders and sample-photo folders, built once per session.

Area-specific fixtures live in their own test modules (or tests/_<area>_fixtures.py).
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: with 2 cores and test subprocesses (index builds,
# the UI server) running beside the test process, spinning threads starve each other 10–20×.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: keep torch from oversubscribing them when several processes run.
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
