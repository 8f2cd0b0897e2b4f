"""The one degradation path, used by prepare, train, upscale and verify-sweep alike:
antialiased bicubic down-sampling (:mod:`fsr.core.resize`, re-exported here), the alpha
degradation of Sec. V and 8-bit rounding.
"""

from __future__ import annotations

import torch

from fsr.core.resize import bicubic_down, bicubic_up, resize_bicubic

__all__ = ["alpha_degrade", "bicubic_down", "bicubic_up", "degrade_through", "quantise_8bit", "resize_bicubic"]


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
