"""Fixtures for the UI tests: a small page configuration (tiny encoders, sample photos) built once.

The page runs with lipsim:cpu-tiny (random weights, 1-Lipschitz: certificates) against a small
standard CNN with random weights (no Lipschitz bound: no certificate), over the 19 sample photos,
with its demo and comparison indexes in a temporary cache directory.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

APP = Path(__file__).resolve().parents[1] / "ui" / "app.py"


@pytest.fixture(scope="session")
def ui_env(tmp_path_factory) -> dict[str, str]:
    """ROBRET_UI_* settings of the test page; the indexes are built on first use and then reused."""
    from encoder.standard import StandardConfig, StandardEncoder, save_standard

    root = tmp_path_factory.mktemp("ui")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cnn = StandardEncoder(StandardConfig(input_size=32, widths=(8, 16), embed_dim=32)).eval()
    ckpt = save_standard(cnn, root / "random-cnn.safetensors", provenance={"weights": "random (seed 0)"})
    return {
        "ROBRET_UI_CACHE_DIR": str(root / "cache"),
        "ROBRET_UI_DEMO_ENCODER": "lipsim:cpu-tiny",
        "ROBRET_UI_COMPARE": f"standard:{ckpt}",
        "ROBRET_UI_MAX_UPLOAD_MB": "1",
        "ROBRET_UI_MAX_STEPS": "50",
    }


@pytest.fixture
def page_env(ui_env, monkeypatch):
    for key, value in ui_env.items():
        monkeypatch.setenv(key, value)
    return ui_env


@pytest.fixture(scope="session")
def ui_engine(ui_env):
    """The page's engine for the test settings (what st.cache_resource holds in the page)."""
    from ui.config import UIConfig
    from ui.engine import Engine

    old = {k: os.environ.get(k) for k in ui_env}
    os.environ.update(ui_env)
    try:
        return Engine(UIConfig.from_env())
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
