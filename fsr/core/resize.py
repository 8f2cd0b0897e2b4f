"""Antialiased bicubic resampling: the one resize kernel of fsr (models, degradation, upscale).

``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` uses the same
Keys cubic kernel (a = -0.5) with the support widened by the scale factor as PIL's
``Image.resize(..., BICUBIC)`` and MATLAB's ``imresize``; fsr's LR faces match PIL's
within one grey level.
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
