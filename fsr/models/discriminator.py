"""The "VGG 128" discriminator of ESRGAN, used by IP-FSRGAN (Sec. III-A).

Ten 3x3/4x4 convolutions with batch norm (all but the first) and LeakyReLU 0.2 take a
(N, 3, 128, 128) face down to (N, 512, 4, 4); two linear layers (8192 -> 100 -> 1) give the
raw score D~(y) before the sigmoid (Eq. 2 applies the sigmoid to differences of these).
Layer names follow BasicSR's ``VGGStyleDiscriminator`` (conv0_0 ... conv4_1, bn0_1 ...,
linear1, linear2), so BasicSR discriminator weights load for initialisation.
"""

from __future__ import annotations

import torch
from torch import nn


class VGGStyleDiscriminator(nn.Module):
    """ESRGAN's VGG-128 discriminator.

    Input: (N, 3, input_size, input_size) RGB in [0, 1] (128 by default; must be 128 or 256).
    Output: (N, 1) raw logits D~(y).
    """

    def __init__(self, in_ch: int = 3, nf: int = 64, input_size: int = 128) -> None:
        super().__init__()
        if input_size not in (128, 256):
            raise ValueError(f"VGG-style discriminator needs 128 or 256 px input, got {input_size}")
        self.arch_args = {"in_ch": in_ch, "nf": nf, "input_size": input_size}
        self.input_size = input_size
        widths = [nf, nf * 2, nf * 4, nf * 8, nf * 8]
        self.conv0_0 = nn.Conv2d(in_ch, nf, 3, 1, 1, bias=True)
        self.conv0_1 = nn.Conv2d(nf, nf, 4, 2, 1, bias=False)
        self.bn0_1 = nn.BatchNorm2d(nf, affine=True)
        prev = nf
        for level in range(1, 5):
            width = widths[level]
            setattr(self, f"conv{level}_0", nn.Conv2d(prev, width, 3, 1, 1, bias=False))
            setattr(self, f"bn{level}_0", nn.BatchNorm2d(width, affine=True))
            setattr(self, f"conv{level}_1", nn.Conv2d(width, width, 4, 2, 1, bias=False))
            setattr(self, f"bn{level}_1", nn.BatchNorm2d(width, affine=True))
            prev = width
        if input_size == 256:
            self.conv5_0 = nn.Conv2d(prev, prev, 3, 1, 1, bias=False)
            self.bn5_0 = nn.BatchNorm2d(prev, affine=True)
            self.conv5_1 = nn.Conv2d(prev, prev, 4, 2, 1, bias=False)
            self.bn5_1 = nn.BatchNorm2d(prev, affine=True)
        self.linear1 = nn.Linear(prev * 4 * 4, 100)
        self.linear2 = nn.Linear(100, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"discriminator expects {self.input_size}x{self.input_size} input, got {tuple(x.shape[-2:])}")
        feat = self.lrelu(self.conv0_0(x))
        feat = self.lrelu(self.bn0_1(self.conv0_1(feat)))
        levels = 6 if self.input_size == 256 else 5
        for level in range(1, levels):
            feat = self.lrelu(getattr(self, f"bn{level}_0")(getattr(self, f"conv{level}_0")(feat)))
            feat = self.lrelu(getattr(self, f"bn{level}_1")(getattr(self, f"conv{level}_1")(feat)))
        feat = feat.flatten(1)
        return self.linear2(self.lrelu(self.linear1(feat)))
