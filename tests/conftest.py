"""Shared fixtures: where the real data lives (../shared/data beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FSR_SHARED_DATA", REPO.parent / "shared" / "data"))
LFW_DIR = SHARED_DATA / "lfw" / "lfw-deepfunneled"
WILD_DIR = SHARED_DATA / "wild"
CELEBA_DIR = SHARED_DATA / "celeba_train"
REFERENCE_DIR = SHARED_DATA / "reference"

# Two cores on CI: keep torch from oversubscribing when tests run.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set FSR_SHARED_DATA)")
    return SHARED_DATA
