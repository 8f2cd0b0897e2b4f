"""The one face pipeline: detect -> select -> square crop -> SR at the face's own
resolution -> paste back (``fsr upscale``) or embed (``fsr verify``).

* :func:`find_faces`: MTCNN boxes, scores and landmarks of a photo (shrunk for detection
  only when huge), each judged by the one selection rule :func:`judge_face` (detection
  score, landmark geometry, minimum size); rejected faces keep their reason.
* :func:`crop_face`: the face that fills a face crop (``fsr upscale --mode auto``'s check).
* :func:`routes_to_sr`: the one routing rule (the paper's Fig. 2, with the model card's
  validated LR face-size range as the default).
* :func:`face_window`: the face's square (``fsr.detect.crop.square_box``) with context
  around it, at the photo's own resolution, never resized.
* :func:`super_resolve`: the SR model applied fully convolutionally, in overlapping tiles
  when the face is large.
* :func:`paste_face` / :func:`identity_drift`: blend back with a feathered mask; identity
  distance between an SR face and the classical upscale of the same input.

Also the photo-level helpers used by ``benchmarks/lfw_dlib.py`` and the dlib conversion
(:func:`central_face_landmarks`, :func:`embed_photos`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch

from fsr.core.io import pixel_max, to_tensor
from fsr.core.resize import resize_bicubic
from fsr.detect.crop import extract_square, points_to_crop, square_box
from fsr.models.face.base import FaceModel

DEFAULT_MIN_SCORE = 0.9
DEFAULT_MIN_FACE = 16
DEFAULT_TILE = 128
DEFAULT_HALO = 16
# Identity drift (dlib distance, SR face vs classical upscale of the same input) above which
# fsr upscale keeps the classical face. Calibrated with benchmarks/photo_quality.py on the
# faces of held-out CelebA identities in x4 downscaled photos: with the default model the
# model's own faces drift at most 0.40 (38 faces), another person's face at least 0.52; with
# fsr_fast at most 0.35 and at least 0.54 (39 faces).
DEFAULT_MAX_DRIFT = 0.45


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


# ----------------------------------------------------------------------------- detect and select


@dataclass(frozen=True)
class FaceFilter:
    """The one face-selection rule: what counts as a real face.

    min_score: MTCNN O-Net probability. min_size: smallest box side (px) looked for and kept.
    check_landmarks: require plausible 5-point geometry (eyes above the mouth, inside the box).
    """

    min_score: float = DEFAULT_MIN_SCORE
    min_size: float = DEFAULT_MIN_FACE
    check_landmarks: bool = True


@dataclass
class Face:
    """One detection: box (x1, y1, x2, y2), score, landmarks (5, 2) in photo pixels, and
    ``rejected`` = why the selection rule refused it ("" = a real face)."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    rejected: str = ""

    @property
    def side(self) -> float:
        """Longer side of the detector box in pixels: the face size routing is decided on."""
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def landmark_problem(box: np.ndarray, landmarks: np.ndarray) -> str:
    """Why 5 MTCNN landmarks (eyes, nose, mouth corners) cannot be a face in ``box``; "" if they can."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    side = max(x2 - x1, y2 - y1)
    slack = 0.1 * side
    inside = ((landmarks[:, 0] >= x1 - slack) & (landmarks[:, 0] <= x2 + slack)
              & (landmarks[:, 1] >= y1 - slack) & (landmarks[:, 1] <= y2 + slack))
    if not inside.all():
        return "landmarks outside the box"
    eyes, nose, mouth = landmarks[:2], landmarks[2], landmarks[3:]
    if eyes[:, 1].mean() >= mouth[:, 1].mean():
        return "eyes not above the mouth"
    eye_gap = float(np.linalg.norm(eyes[1] - eyes[0]))
    if eye_gap < 0.15 * side:
        return "eyes too close together"
    if not eyes[:, 1].min() - slack <= nose[1] <= mouth[:, 1].max() + slack:
        return "nose not between eyes and mouth"
    return ""


def judge_face(face: Face, rule: FaceFilter) -> str:
    """The selection rule: "" for a real face, else the reason it is refused."""
    if face.score < rule.min_score:
        return f"score {face.score:.2f} < {rule.min_score:g}"
    if face.side < rule.min_size:
        return f"size {face.side:.0f} px < {rule.min_size:g}"
    if rule.check_landmarks:
        return landmark_problem(face.box, face.landmarks)
    return ""


def _detected_faces(det, factor: float, offset: float = 0.0) -> list[Face]:
    """One image's MTCNN detections as :class:`Face` objects in the source image's pixels: the
    searched copy was the source scaled by ``factor`` after ``offset`` px of padding per side."""
    boxes = np.asarray(det.boxes, dtype=np.float64).reshape(-1, 4) / factor - offset
    marks = np.asarray(det.landmarks, dtype=np.float64).reshape(-1, 5, 2) / factor - offset
    return [Face(box, float(score), lm) for box, score, lm in zip(boxes, np.asarray(det.scores).reshape(-1), marks)]


def find_faces(detector, rgb8: np.ndarray, rule: FaceFilter, max_pixels: int = 12_000_000) -> list[Face]:
    """Every detection in an (H, W, 3) uint8 photo, most confident first, judged by ``rule``.

    Photos above ``max_pixels`` are searched on a copy shrunk to that size (area averaging)
    and the boxes scaled back: the detector's memory grows faster than the pixel count.
    """
    height, width = rgb8.shape[:2]
    factor = 1.0
    if height * width > max_pixels:
        factor = math.sqrt(max_pixels / (height * width))
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        rgb8 = cv2.resize(rgb8, size, interpolation=cv2.INTER_AREA)
    faces = _detected_faces(detector.detect([rgb8], min_face=max(8.0, rule.min_size * factor))[0], factor)
    for face in faces:
        face.rejected = judge_face(face, rule)
    return faces


def crop_face(detector, rgb8: np.ndarray, rule: FaceFilter, pad: float = 0.5, min_side: int = 96,
              min_fraction: float = 0.3) -> Face | None:
    """The real face that fills a face crop (H, W, 3) uint8, or None: noise, a flat image, a
    scene. MTCNN misses faces that touch the border of a tight crop and faces under 12 px, so
    the search runs on a copy padded by ``pad`` of the side (edge pixels replicated) and enlarged
    to at least ``min_side`` px; the face must pass ``rule``'s score and landmark checks and be
    at least ``min_fraction`` of the crop's long side. Box and landmarks in crop pixels.

    Measured on held-out CelebA crops (margins 0.1-0.4): found in 30 of 30 at every size from
    24 to 160 px, 29 of 30 at 20 px, 25 of 30 at 16 px; found in none of 32 noise, 12 flat and
    90 background crops of 16-160 px.
    """
    height, width = rgb8.shape[:2]
    border = int(round(pad * max(height, width)))
    padded = cv2.copyMakeBorder(rgb8, border, border, border, border, cv2.BORDER_REPLICATE)
    factor = max(1.0, min_side / max(height, width))
    if factor > 1.0:
        padded = cv2.resize(padded, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
    faces = _detected_faces(detector.detect([padded], min_face=12)[0], factor, border)
    rule = replace(rule, min_size=min_fraction * max(height, width))  # the crop's own face, not a speck
    real = [f for f in faces if not judge_face(f, rule)]
    return max(real, key=lambda f: f.side) if real else None


def main_face(faces: Sequence[Face]) -> Face | None:
    """The face a one-face job (``fsr verify``) uses: the most confident real face."""
    real = [f for f in faces if not f.rejected]
    return max(real, key=lambda f: f.score) if real else None


def routes_to_sr(side: float, lr_face_range: tuple[float, float] | None, threshold: float | None = None) -> bool:
    """The one routing rule (Fig. 2): does an LR face of box side ``side`` px go through the model?

    threshold None: the model card's validated range (None = unmeasured: every face);
    0: every face; PX > 0: faces smaller than PX (the paper's rule).
    """
    if threshold is None:
        return lr_face_range is None or lr_face_range[0] <= side <= lr_face_range[1]
    return threshold == 0 or side < threshold


# ----------------------------------------------------------------------------- crop, SR, paste


@dataclass(frozen=True)
class FaceWindow:
    """A face square (x0, y0, side) and the window around it the network sees:
    ``context`` extra pixels on every side (at the photo's own resolution)."""

    x0: int
    y0: int
    side: int
    context: int

    @property
    def outer(self) -> tuple[int, int, int]:
        return self.x0 - self.context, self.y0 - self.context, self.side + 2 * self.context


def face_window(face: Face, margin: float = 0.25) -> FaceWindow:
    """The square crop of a face (``square_box``) with context of 1/8 of its side (>= 4 px)."""
    x0, y0, side = square_box(face.box, margin=margin)
    return FaceWindow(x0, y0, side, max(4, side // 8))


def window_pixels(rgb: np.ndarray, window: FaceWindow) -> torch.Tensor:
    """(3, S, S) float in [0, 1] of the window with its context (edge pixels replicated outside)."""
    x0, y0, side = window.outer
    return to_tensor(np.ascontiguousarray(extract_square(rgb, x0, y0, side)))


def super_resolve(system, image: torch.Tensor, tile: int = DEFAULT_TILE, halo: int = DEFAULT_HALO) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (3, s*H, s*W): the SR system at the image's own resolution.

    Images larger than ``tile + 2 * halo`` are cut into ``tile`` squares, each run with
    ``halo`` pixels of its neighbours (edges replicated) in one batch, and the centres joined.
    """
    _, height, width = image.shape
    if max(height, width) <= tile + 2 * halo:
        return system.upscale(image[None])[0]
    scale = system.scale
    rows, cols = math.ceil(height / tile), math.ceil(width / tile)
    padded = torch.nn.functional.pad(
        image[None], (halo, cols * tile - width + halo, halo, rows * tile - height + halo), mode="replicate"
    )[0]
    windows = [padded[:, r * tile : (r + 1) * tile + 2 * halo, c * tile : (c + 1) * tile + 2 * halo]
               for r in range(rows) for c in range(cols)]
    sr = system.upscale(torch.stack(windows))
    out = torch.empty(3, rows * tile * scale, cols * tile * scale)
    inner = slice(halo * scale, (halo + tile) * scale)
    for k, piece in enumerate(sr):
        r, c = divmod(k, cols)
        out[:, r * tile * scale : (r + 1) * tile * scale, c * tile * scale : (c + 1) * tile * scale] = piece[:, inner, inner]
    return out[:, : height * scale, : width * scale]


def super_resolve_window(system, rgb: np.ndarray, window: FaceWindow, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """(3, s*S, s*S) SR of the whole window (face square plus context), S = ``window.outer[2]``,
    from a photo at its own resolution."""
    return super_resolve(system, window_pixels(rgb, window), tile)


def face_square(sr_window: torch.Tensor, window: FaceWindow) -> torch.Tensor:
    """The face square (3, k*side, k*side) cut from a window's SR (3, k*S, k*S), context removed."""
    k = sr_window.shape[-1] / window.outer[2]
    cut, side = round(window.context * k), round(window.side * k)
    return sr_window[:, cut : cut + side, cut : cut + side]


def window_feather(window: FaceWindow) -> float:
    """Paste-back ramp for a window: over its context band only, so the face square itself is pure SR."""
    return window.context / window.outer[2]


def feather_ramp(side: int, feather: float = 0.12) -> np.ndarray:
    """(side,) float32: 1 in the middle, a smoothstep ramp to 0 over the outer ``feather * side``
    pixels at both ends."""
    ramp_width = max(1.0, feather * side)
    coords = np.arange(side, dtype=np.float32) + 0.5
    dist = np.minimum(coords, side - coords)  # distance from the nearer edge
    t = np.clip(dist / ramp_width, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def feather_mask(side: int, feather: float = 0.12) -> np.ndarray:
    """(side, side) float32 paste-back blend weights: the outer product of two :func:`feather_ramp`."""
    ramp = feather_ramp(side, feather)
    return np.outer(ramp, ramp)


def resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) matrix M with ``M @ v`` = antialiased bicubic resize of ``v``."""
    eye = torch.eye(size_in, dtype=torch.float32)[None, None]
    return resize_bicubic(eye, (size_out, size_in))[0, 0]


def paste_face(
    canvas: np.ndarray, face: torch.Tensor, x0: int, y0: int, out_side: int, feather: float = 0.12, band: int = 512
) -> None:
    """Resize a (3, s, s) [0, 1] SR face to ``out_side`` (antialiased bicubic; none when equal) and
    blend it into ``canvas`` (H, W, 3 uint8/uint16, in place) at (x0, y0) with :func:`feather_mask`.

    Parts outside the canvas are dropped; the blend runs ``band`` rows at a time.
    """
    height, width = canvas.shape[:2]
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(width, x0 + out_side), min(height, y0 + out_side)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    maxv = pixel_max(canvas.dtype)
    face = face.float().cpu()
    if face.shape[-1] != out_side:
        weights = resize_matrix(face.shape[-1], out_side)
        face = torch.einsum("ys,csx,zx->cyz", weights, face, weights)
    ramp = torch.from_numpy(feather_ramp(out_side, feather))
    cols = slice(cx0 - x0, cx1 - x0)
    for r0 in range(cy0, cy1, band):
        r1 = min(cy1, r0 + band)
        rows = slice(r0 - y0, r1 - y0)
        sr = face[:, rows, cols].permute(1, 2, 0).clamp(0, 1)
        mask = (ramp[rows, None] * ramp[cols][None, :])[..., None]
        region = torch.from_numpy(canvas[r0:r1, cx0:cx1].astype(np.float32)).div_(maxv)
        blended = mask * sr + (1.0 - mask) * region
        canvas[r0:r1, cx0:cx1] = blended.clamp_(0, 1).mul_(maxv).round_().numpy().astype(canvas.dtype)


# ----------------------------------------------------------------------------- embed


def window_landmarks(face: Face, window: FaceWindow, size: int) -> np.ndarray:
    """(5, 2) landmarks of ``face`` in its square resized to ``size`` x ``size``."""
    return points_to_crop(face.landmarks, window.x0, window.y0, window.side, size)


@torch.inference_mode()
def identity_drift(
    face_model: FaceModel, sr: torch.Tensor, classical: torch.Tensor, landmarks: torch.Tensor | None
) -> np.ndarray:
    """Identity-embedding distance (N,) between SR faces and the classical upscale of the same inputs.

    sr, classical: (N, 3, H, W) in [0, 1]; landmarks: (N, 5, 2) in those images' pixels, or
    None for face crops (the whole image is resized to the model's input).
    dlib: Euclidean distance of raw descriptors (0 = same face; ~0.6 = another person).
    """
    device = face_model.device
    lm = None if landmarks is None else landmarks.to(device, torch.float32)
    a = face_model(sr.to(device).float(), lm)
    b = face_model(classical.to(device).float(), lm)
    if face_model.metric == "euclidean":
        return face_model.distance(a, b).cpu().numpy()
    return (1.0 - face_model.similarity(a, b)).cpu().numpy()
