"""Shared test fixtures. Tests never download: tiny random models, assets in tests/assets/, and
../shared/data when it exists (tests that need it skip cleanly where it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never touch a hub; lm-eval, datasets and transformers read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)  # one thread per xdist worker: the workers already fill the cores

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (real tokenizer, offline benchmark splits); skips the test where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
