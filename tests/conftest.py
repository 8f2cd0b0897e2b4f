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


def lfw_centre_face(path: Path) -> torch.Tensor:
    """(3, 128, 128) in [0, 1]: the centre 160 px of a 250x250 deep-funneled LFW photo (where
    its face sits, about fsr's crop), resized to 128 by fsr's bicubic."""
    from fsr.core.io import read_image, to_tensor
    from fsr.data.degrade import resize_bicubic

    return resize_bicubic(to_tensor(read_image(path).rgb[45:205, 45:205])[None], 128).clamp(0, 1)[0]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set FSR_SHARED_DATA)")
    return SHARED_DATA
