"""Verify two photos with SR for small faces: the framework of Fig. 2.

photo -> MTCNN -> the most confident real face (the face pipeline's one selection rule) ->
routing (:func:`fsr.models.face.pipeline.routes_to_sr`: by default the SR model's validated
LR face-size range; ``sr_threshold`` PX: faces below PX, the paper's rule)
  SR : the face square (margin 0.25) at the photo's own resolution -> SR system x4
  no : the face square kept at its own resolution (at most 512 px) -> no SR ("SR models
       cannot add information to high-resolution faces", Sec. III)
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
from fsr.detect.crop import crop_square, points_to_crop
from fsr.detect.mtcnn import MTCNN
from fsr.evaluate.identity import DEFAULT_THRESHOLDS, FaceEmbedder, load_face_model
from fsr.models.face.pipeline import (
    FaceFilter,
    face_square,
    face_window,
    find_faces,
    main_face,
    routes_to_sr,
    super_resolve_window,
)
from fsr.models.systems import SRSystem, load_sr_system

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


def extract_face(path: str | Path, detector, system: SRSystem, sr_threshold: float | None = None,
                 margin: float = 0.25, rule: FaceFilter = FaceFilter()) -> PhotoFace:
    """Find the photo's most confident real face and make the face the recogniser sees."""
    try:
        image = read_image(path)
    except ImageReadError as exc:
        raise PairVerifyError(str(exc)) from None
    rgb = np.array(image.rgb_uint8())
    faces = find_faces(detector, rgb, rule)
    face = main_face(faces)
    if face is None:
        reasons = "; ".join(sorted({f.rejected for f in faces}))
        height, width = rgb.shape[:2]
        raise PairVerifyError(f"{path}: no face found in the {width}x{height} px image"
                              + (f" (rejected: {reasons})" if reasons else ""))
    lr_range = None if system.card is None else system.card.lr_face_range
    window = face_window(face, margin)
    small = routes_to_sr(face.side, lr_range, sr_threshold)
    if small:
        pixels = face_square(super_resolve_window(system, image.rgb, window), window)
    else:
        size = int(min(MAX_DIRECT_SIZE, window.side))
        pixels = torch.from_numpy(np.array(crop_square(rgb, window.x0, window.y0, window.side, size))).permute(2, 0, 1) / 255.0
    landmarks = points_to_crop(face.landmarks, window.x0, window.y0, window.side, pixels.shape[-1])
    return PhotoFace(
        path=str(path), box=tuple(float(v) for v in face.box), score=face.score, side=face.side,
        super_resolved=small, face=pixels.float().clamp(0, 1),
        landmarks=torch.from_numpy(landmarks.astype(np.float32)), n_faces=sum(not f.rejected for f in faces),
    )


def verify_photos(
    path_a: str | Path,
    path_b: str | Path,
    compute: Compute,
    system: str = "default",
    face_model: str = "dlib",
    face_weights: str | None = None,
    sr_threshold: float | None = None,
    decision_threshold: float | None = None,
) -> PairVerdict:
    """Fig. 2: are the main faces of two photos the same person? See the module docstring."""
    detector = MTCNN.load(compute)
    embedder = FaceEmbedder(load_face_model(face_model, face_weights, compute), compute)
    sr_system = load_sr_system(system, compute)
    faces = [extract_face(p, detector, sr_system, sr_threshold) for p in (path_a, path_b)]
    emb = [embedder.embed(f.face[None], f.landmarks[None]) for f in faces]
    scores = embedder.compare(emb[0], emb[1])
    score_name = "distance" if "distance" in scores else "cosine"
    value = float(scores[score_name][0])
    threshold = float(decision_threshold if decision_threshold is not None else DEFAULT_THRESHOLDS[face_model])
    same = value < threshold if score_name == "distance" else value > threshold
    return PairVerdict(faces[0], faces[1], face_model, score_name, value, float(scores["cosine"][0]), threshold, same,
                       sr_system.name)
