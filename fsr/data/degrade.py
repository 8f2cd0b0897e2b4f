"""The one degradation path: antialiased bicubic resampling, used by prepare, train,
upscale and verify-sweep alike.

``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` uses the same
Keys cubic kernel (a = -0.5) with the support widened by the scale factor as PIL's
``Image.resize(..., BICUBIC)`` and MATLAB's ``imresize``; fsr's LR faces match PIL's
within one grey level (tests/test_degrade.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_bicubic(images: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """Antialiased bicubic resize of (N, C, H, W) float images to ``size`` (H, W).

    Values are not clamped (bicubic overshoots slightly); callers that quantise clamp.
    """
    if isinstance(size, int):
        size = (size, size)
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    squeeze = images.ndim == 3
    x = images[None] if squeeze else images
    dtype = x.dtype
    if dtype not in (torch.float32, torch.float64):
        x = x.float()
    out = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    out = out.to(dtype)
    return out[0] if squeeze else out


def bicubic_down(images: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """HR (N, C, H, W) in [0, 1] -> LR (N, C, H/scale, W/scale), antialiased bicubic, clamped."""
    h, w = images.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not divisible by the scale {scale}")
    return resize_bicubic(images, (h // scale, w // scale)).clamp(0, 1)


def bicubic_up(images: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """LR (N, C, h, w) -> (N, C, h*scale, w*scale) by bicubic interpolation, clamped (the 'bicubic' system)."""
    h, w = images.shape[-2:]
    return resize_bicubic(images, (h * scale, w * scale)).clamp(0, 1)


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
