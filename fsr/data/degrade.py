"""The one degradation path, used by prepare, train, upscale and verify-sweep alike:
antialiased bicubic down-sampling (:mod:`fsr.core.resize`, re-exported here), the alpha
degradation of Sec. V, JPEG compression of the LR face and 8-bit rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from fsr.core.resize import bicubic_down, bicubic_up, resize_bicubic

__all__ = ["alpha_degrade", "bicubic_down", "bicubic_up", "degrade_through", "jpeg_degrade", "quantise_8bit",
           "resize_bicubic"]

#: Side of a JPEG minimum coded unit with 4:2:0 chroma (OpenCV's and most cameras' default):
#: a face cut from a JPEG photo has its block grid at an offset in [0, JPEG_BLOCK) on each axis.
JPEG_BLOCK = 16


def quantise_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round float images to the 8-bit grid, clamped to [0, 1] (what saving them as PNG does);
    same shape and device. :func:`fsr.core.io.to_uint8` gives the uint8 array itself."""
    return images.clamp(0, 1).mul(255.0).round().div(255.0)


def alpha_degrade(lr: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sec. V of the paper: further downsample the LR face by ``alpha`` in (0, 1].

    fsr's reading: the (N, C, h, w) LR face is resized to round(alpha * h) x round(alpha * w)
    (at least 1x1) by antialiased bicubic and brought back to h x w by bicubic, so every
    system always receives a face of the same input size; alpha = 1 changes nothing.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if alpha == 1.0:
        return lr
    h, w = lr.shape[-2:]
    return degrade_through(lr, (max(1, round(alpha * h)), max(1, round(alpha * w))))


def degrade_through(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N, C, h, w) to ``size`` by antialiased bicubic and back to h x w, clamped to [0, 1]
    (the operation behind :func:`alpha_degrade` and training's alpha augmentation)."""
    h, w = lr.shape[-2:]
    small = resize_bicubic(lr, size).clamp(0, 1)
    return resize_bicubic(small, (h, w)).clamp(0, 1)


def jpeg_degrade(images: torch.Tensor, qualities: Sequence[int],
                 offsets: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """JPEG-compress each RGB image of an (N, 3, h, w) batch in [0, 1] at its quality (1-100; 0
    leaves that image as it is) and decode it again, as a face stored in a JPEG file reaches
    ``fsr upscale``; same shape and device, float32 (the compressed images on the 8-bit grid).

    OpenCV's encoder with its defaults (baseline, 4:2:0 chroma, the IJG tables scaled by
    quality). ``offsets`` (dy, dx) in [0, ``JPEG_BLOCK``) place the 8x8 / 16x16 block grid as in
    a face cut from a larger JPEG: the image is padded by that many reflected rows and columns
    at the top and left before encoding, and cut out again after decoding.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"jpeg_degrade expects (N, 3, h, w) RGB images, got {tuple(images.shape)}")
    if len(qualities) != images.shape[0]:
        raise ValueError(f"{len(qualities)} qualities for {images.shape[0]} images")
    chosen = [i for i, quality in enumerate(qualities) if quality]
    if not chosen:
        return images
    pixels = images.detach().index_select(0, torch.tensor(chosen, device=images.device))
    rgb = pixels.clamp(0, 1).mul(255).round().to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
    out = images.clone().float()
    h, w = images.shape[-2:]
    for row, index in enumerate(chosen):
        quality = int(qualities[index])
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        dy, dx = (min(int(v), side - 1) for v, side in zip(offsets[index], (h, w))) if offsets is not None else (0, 0)
        bgr = np.ascontiguousarray(rgb[row, :, :, ::-1])
        if dy or dx:
            bgr = cv2.copyMakeBorder(bgr, dy, 0, dx, 0, cv2.BORDER_REFLECT_101)
        ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[dy:dy + h, dx:dx + w, ::-1]
        out[index] = torch.from_numpy(np.ascontiguousarray(decoded)).permute(2, 0, 1).to(out.device).float().div_(255)
    return out
