"""Fixtures shared by the training and evaluation tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run as fast on one thread, and a single thread does not stall in OpenMP's
    busy-wait when the two cores are shared with other processes (10× slower otherwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
