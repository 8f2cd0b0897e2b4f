"""Detect -> align -> embed for whole photos (one face per photo: the one nearest the centre).

Used by ``benchmarks/lfw_dlib.py``, the conversion's mean descriptor and the tests. The
face is detected with fsr's MTCNN (interface A) and aligned from the ORIGINAL image by the
face model's own template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fsr.models.face.base import FaceModel


@dataclass
class PhotoLandmarks:
    """(N, 5, 2) landmarks of the chosen face per photo, and whether a face was found."""

    landmarks: np.ndarray
    found: np.ndarray


def central_face_landmarks(
    detector, photos: Sequence[np.ndarray], min_face: float = 20, retry_min_face: float | None = 20
) -> PhotoLandmarks:
    """MTCNN landmarks of the face nearest each photo's centre.

    photos: list of (H, W, 3) uint8 RGB. Photos without a detection at ``min_face`` are
    retried once at ``retry_min_face``; still none -> ``found`` False and NaN landmarks.
    """
    out = np.full((len(photos), 5, 2), np.nan, dtype=np.float32)
    found = np.zeros(len(photos), dtype=bool)

    def pick(indices: list[int], face_min: float) -> None:
        dets = detector.detect([photos[i] for i in indices], min_face=face_min)
        for i, det in zip(indices, dets):
            if len(det) == 0:
                continue
            h, w = photos[i].shape[:2]
            centres = (det.boxes[:, :2] + det.boxes[:, 2:]) / 2
            k = int(np.argmin(np.linalg.norm(centres - np.array([w / 2, h / 2]), axis=1)))
            out[i] = det.landmarks[k]
            found[i] = True

    pick(list(range(len(photos))), min_face)
    missing = [i for i in range(len(photos)) if not found[i]]
    if missing and retry_min_face is not None and retry_min_face < min_face:
        pick(missing, retry_min_face)
    return PhotoLandmarks(out, found)


def centre_crop_landmarks(model: FaceModel, height: int, width: int) -> np.ndarray:
    """Fallback landmarks for a photo without a detection: the model's template placed so
    that the crop is the centre of the photo at the template's own scale. (5, 2)."""
    th, tw = model.spec.input_size
    template = model.template.detach().cpu().numpy()
    return (template + np.array([(width - tw) / 2.0, (height - th) / 2.0])).astype(np.float32)


@torch.no_grad()
def embed_photos(model: FaceModel, photos: Sequence[np.ndarray], landmarks: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Embeddings (N, D) float32 of photos (uint8 RGB, any sizes) aligned by landmarks (N, 5, 2)."""
    emb = np.zeros((len(photos), model.embedding_dim), dtype=np.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(photos):
        groups.setdefault(p.shape, []).append(i)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            sel = idx[start : start + batch_size]
            x = torch.from_numpy(np.stack([photos[i] for i in sel])).permute(0, 3, 1, 2).float() / 255.0
            lm = torch.from_numpy(landmarks[sel])
            emb[sel] = model(x.to(model.device), lm.to(model.device)).cpu().numpy()
    return emb
