"""Square face crops around a detector box (Sec. IV-B of the paper: square box, 128x128).

Margin convention: ``square_box(box, margin)`` returns the square of side
``max(w, h) * (1 + 2 * margin)`` centred on the box. The default margin 0.25 gives a
side of 1.5x the MTCNN box, the same context dlib's face chips use (padding 0.25 on
each side), so the whole face with hair line and chin fits in the 128x128 crop.

Coordinates: a crop (x0, y0, side) covers source pixels x0 .. x0 + side - 1 (integers);
a source point p maps to ``(p - x0 + 0.5) * size / side - 0.5`` in the resized crop.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

DEFAULT_MARGIN = 0.25


def square_box(box, margin: float = DEFAULT_MARGIN) -> tuple[int, int, int]:
    """(x1, y1, x2, y2) float box -> (x0, y0, side) integer square centred on it.

    side = round(max(w, h) * (1 + 2 * margin)), at least 1 pixel.
    """
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    side = max(1, int(round(max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin))))
    cx = (x1 + x2) / 2.0
    cy = (y1 + y2) / 2.0
    x0 = int(np.floor(cx - side / 2.0 + 0.5))
    y0 = int(np.floor(cy - side / 2.0 + 0.5))
    return x0, y0, side


def points_to_crop(points: np.ndarray, x0: int, y0: int, side: int, size: int) -> np.ndarray:
    """(..., 2) source pixel coordinates -> coordinates in the ``size`` x ``size`` crop."""
    points = np.asarray(points, dtype=np.float64)
    origin = np.array([x0, y0], dtype=np.float64)
    return ((points - origin + 0.5) * (size / side) - 0.5).astype(np.float32)


def extract_square(image: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """The (side, side, C) window at (x0, y0) of an (H, W, C) image, replicating edge pixels outside it."""
    h, w = image.shape[:2]
    rows = np.clip(np.arange(y0, y0 + side), 0, h - 1)
    cols = np.clip(np.arange(x0, x0 + side), 0, w - 1)
    inside = 0 <= x0 and 0 <= y0 and x0 + side <= w and y0 + side <= h
    if inside:
        return image[y0 : y0 + side, x0 : x0 + side]
    return image[rows[:, None], cols[None, :]]


def crop_square(image: np.ndarray, x0: int, y0: int, side: int, size: int = 128) -> np.ndarray:
    """Cut the square (x0, y0, side) from an (H, W, C) or (H, W) image and resize it to size x size.

    Outside the image the edge pixels are replicated. Resampling is PIL's antialiased
    bicubic (Keys a = -0.5, support widened when shrinking), so shrinking does not alias.
    uint8 images stay uint8; other dtypes are resampled in float32 per channel and
    returned in their own dtype (integers rounded and clipped to their range).
    """
    window = np.ascontiguousarray(extract_square(image, int(x0), int(y0), int(side)))
    if window.shape[0] == size and window.shape[1] == size:
        return window.copy()
    planar = window if window.ndim == 3 else window[..., None]
    if planar.dtype == np.uint8 and planar.shape[2] in (1, 3, 4):
        pil = Image.fromarray(planar[..., 0] if planar.shape[2] == 1 else planar)
        out = np.asarray(pil.resize((size, size), Image.BICUBIC))
        out = out if out.ndim == 3 else out[..., None]
    else:
        channels = [
            np.asarray(Image.fromarray(planar[..., c].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
            for c in range(planar.shape[2])
        ]
        out = np.stack(channels, axis=2)
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            out = np.clip(np.round(out), info.min, info.max)
        out = out.astype(image.dtype)
    return out if window.ndim == 3 else out[..., 0]
