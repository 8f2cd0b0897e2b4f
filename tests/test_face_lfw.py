"""End to end on real LFW photos: fsr's MTCNN -> alignment -> dlib ResNet, one fold's pairs.

The full 10-fold figure comes from ``benchmarks/lfw_dlib.py`` (too slow for a test).
"""

from __future__ import annotations

import numpy as np
import pytest

from fsr.core.device import Compute
from fsr.core.io import read_image
from fsr.evaluate.verification import read_pairs
from fsr.models.face import create_face_model
from fsr.models.face.pipeline import central_face_landmarks, embed_photos
from tests.conftest import LFW_DIR


@pytest.fixture(scope="module")
def fold_one_pairs():
    pairs = [p for p in read_pairs(LFW_DIR.parent / "pairs.txt") if p.fold == 1]
    same = [p for p in pairs if p.same][:30]
    different = [p for p in pairs if not p.same][:30]
    return same + different


def test_dlib_with_fsr_mtcnn_verifies_lfw_fold(fold_one_pairs):
    from fsr.detect.mtcnn import MTCNN

    compute = Compute.create("cpu", "fp32")
    detector = MTCNN.load(compute)
    model = create_face_model("dlib", compute=compute)
    keys = sorted({p.a for p in fold_one_pairs} | {p.b for p in fold_one_pairs})
    photos = [read_image(LFW_DIR / k).rgb_uint8() for k in keys]
    marks = central_face_landmarks(detector, photos, min_face=40, retry_min_face=20)
    assert marks.found.all()
    # the face nearest the centre of a 250x250 LFW photo: both eyes near the middle
    eyes = marks.landmarks[:, :2]
    assert np.abs(eyes.mean(axis=1) - 125).max() < 40
    emb = dict(zip(keys, embed_photos(model, photos, marks.landmarks)))
    dist = np.array([np.linalg.norm(emb[p.a] - emb[p.b]) for p in fold_one_pairs])
    same = np.array([p.same for p in fold_one_pairs])
    accuracy = float(np.mean((dist < 0.6) == same))  # dlib's documented threshold
    assert accuracy >= 0.95, f"accuracy {accuracy:.3f}"
    assert dist[same].mean() < 0.45 < dist[~same].mean()
