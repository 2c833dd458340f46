"""The GPU stand-in of the tests of index/gpu_scan.py (registered in conftest.py's `pytest_plugins`)."""
import pytest


@pytest.fixture
def stand_in_device(monkeypatch):
    """torch's CPU device where a CUDA one would be: every line of `index.gpu_scan` runs, with torch's CPU matrix
    products in place of cuBLAS."""
    import torch

    import index.gpu_scan as gpu_scan

    monkeypatch.setattr(gpu_scan, "scan_device", lambda: torch.device("cpu"))
