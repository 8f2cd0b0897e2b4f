"""Verify two photos with SR for small faces: the framework of Fig. 2.

photo -> MTCNN (most confident face) -> face box side < ``sr_threshold`` px ?
  yes: square crop (``square_box``, margin 0.25) resampled to 32x32 -> SR system -> 128x128 face
  no : square crop kept at its own resolution (at most 512 px) -> no SR ("SR models cannot
       add information to high-resolution faces", Sec. III)
-> face model embedding (aligned with the detected 5 landmarks) -> similarity and decision.

Decision: dlib is "same" when the Euclidean distance of raw descriptors < threshold (0.6 by
default, dlib's documented rule); SphereFace and LightCNN when the cosine > threshold
(``fsr.evaluate.identity.DEFAULT_THRESHOLDS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fsr.core.device import Compute
from fsr.core.io import ImageReadError, read_image
from fsr.evaluate.identity import DEFAULT_THRESHOLDS, FaceEmbedder, load_face_model

LR_SIZE = 32
MAX_DIRECT_SIZE = 512


class PairVerifyError(RuntimeError):
    """A photo that cannot be verified (unreadable, no face): ``path: reason``."""


@dataclass
class PhotoFace:
    """The face used from one photo: detector box (x1, y1, x2, y2), score, box side in px,
    whether it was super-resolved, and the face image (3, S, S) in [0, 1] with its landmarks (5, 2)."""

    path: str
    box: tuple[float, float, float, float]
    score: float
    side: float
    super_resolved: bool
    face: torch.Tensor
    landmarks: torch.Tensor
    n_faces: int


@dataclass
class PairVerdict:
    a: PhotoFace
    b: PhotoFace
    face_model: str
    score_name: str  # "distance" or "cosine"
    score: float
    cosine: float
    threshold: float
    same: bool
    system: str


def extract_face(path: str | Path, detector, system, sr_threshold: float, margin: float = 0.25) -> PhotoFace:
    """Detect the most confident face in a photo and make the face the recogniser sees.

    ``system``: a callable returning the SR system (loaded only when a face needs SR)."""
    from fsr.detect.crop import crop_square, points_to_crop, square_box

    try:
        rgb = np.array(read_image(path).rgb_uint8())
    except ImageReadError as exc:
        raise PairVerifyError(str(exc)) from None
    detections = detector.detect([rgb])[0]
    if len(detections) == 0:
        raise PairVerifyError(f"{path}: no face found")
    box = np.asarray(detections.boxes[0], dtype=np.float64)
    landmarks = np.asarray(detections.landmarks[0], dtype=np.float64)
    side_px = float(max(box[2] - box[0], box[3] - box[1]))
    x0, y0, side = square_box(box, margin=margin)
    small = side_px < sr_threshold
    size = LR_SIZE if small else int(min(MAX_DIRECT_SIZE, max(LR_SIZE, round(side))))
    crop = crop_square(rgb, x0, y0, side, size)
    face = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255.0
    if small:
        face = system().upscale(face[None])[0]
    out_size = face.shape[-1]
    lm = points_to_crop(landmarks, x0, y0, side, out_size)
    return PhotoFace(
        path=str(path),
        box=tuple(float(v) for v in box),
        score=float(detections.scores[0]),
        side=side_px,
        super_resolved=small,
        face=face.clamp(0, 1),
        landmarks=torch.from_numpy(lm.astype(np.float32)),
        n_faces=len(detections),
    )


def verify_photos(
    path_a: str | Path,
    path_b: str | Path,
    compute: Compute,
    system: str = "default",
    face_model: str = "dlib",
    face_weights: str | None = None,
    sr_threshold: float = 32.0,
    decision_threshold: float | None = None,
) -> PairVerdict:
    """Fig. 2: are the main faces of two photos the same person? See the module docstring."""
    from fsr.detect.mtcnn import MTCNN
    from fsr.models.systems import load_sr_system

    detector = MTCNN.load(compute)
    embedder = FaceEmbedder(load_face_model(face_model, face_weights, compute), compute)
    loaded: dict = {}

    def sr_system():
        if "system" not in loaded:
            loaded["system"] = load_sr_system(system, compute)
        return loaded["system"]

    faces = [extract_face(p, detector, sr_system, sr_threshold) for p in (path_a, path_b)]
    emb = [embedder.embed(f.face[None], f.landmarks[None]) for f in faces]
    scores = embedder.compare(emb[0], emb[1])
    score_name = "distance" if "distance" in scores else "cosine"
    value = float(scores[score_name][0])
    threshold = float(decision_threshold if decision_threshold is not None else DEFAULT_THRESHOLDS[face_model])
    same = value < threshold if score_name == "distance" else value > threshold
    name = loaded["system"].name if "system" in loaded else system
    return PairVerdict(faces[0], faces[1], face_model, score_name, value, float(scores["cosine"][0]), threshold, same, name)
