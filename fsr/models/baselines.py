"""Baseline generators of the paper's Table 1: SRCNN and SRResNet (the SRGAN generator).

ESRGAN is the RRDB generator (``fsr.models.rrdb``) trained without the identity loss.
All take LR faces (N, 3, h, w) in [0, 1] and return (N, 3, 4h, 4w), not clamped.
"""

from __future__ import annotations

import torch
from torch import nn

from fsr.core.resize import resize_bicubic


class SRCNN(nn.Module):
    """SRCNN (Dong et al. 2014, 9-1-5) applied to the bicubic-upsampled LR face.

    The network's input is ``bicubic_up(lr)`` (done inside ``forward``), so it maps
    (N, 3, h, w) LR -> (N, 3, 4h, 4w) like every other fsr generator. It predicts the
    image directly (not a residual), as in the original paper; padding keeps the size.
    """

    scale = 4

    def __init__(self, in_ch: int = 3, out_ch: int = 3, n1: int = 64, n2: int = 32, scale: int = 4) -> None:
        super().__init__()
        self.arch_args = {"in_ch": in_ch, "out_ch": out_ch, "n1": n1, "n2": n2, "scale": scale}
        self.scale = scale
        self.conv1 = nn.Conv2d(in_ch, n1, 9, 1, 4)
        self.conv2 = nn.Conv2d(n1, n2, 1, 1, 0)
        self.conv3 = nn.Conv2d(n2, out_ch, 5, 1, 2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        up = resize_bicubic(x, (h * self.scale, w * self.scale))
        return self.conv3(self.relu(self.conv2(self.relu(self.conv1(up)))))


class _ResidualBlockBN(nn.Module):
    """conv3 - BN - PReLU - conv3 - BN, plus the input (SRGAN's residual block)."""

    def __init__(self, nf: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(nf) if batch_norm else nn.Identity()
        self.act = nn.PReLU(nf)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(nf) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class SRResNet(nn.Module):
    """SRResNet, the generator of SRGAN (Ledig et al. 2017): 9x9 head, ``nb`` residual blocks
    with batch norm, a long skip, two pixel-shuffle x2 stages with PReLU, 9x9 tail.

    Args: nf feature channels (64), nb residual blocks (16), batch_norm (True as in SRGAN).
    """

    scale = 4

    def __init__(self, in_ch: int = 3, out_ch: int = 3, nf: int = 64, nb: int = 16, batch_norm: bool = True) -> None:
        super().__init__()
        self.arch_args = {"in_ch": in_ch, "out_ch": out_ch, "nf": nf, "nb": nb, "batch_norm": batch_norm}
        self.conv_first = nn.Conv2d(in_ch, nf, 9, 1, 4)
        self.act_first = nn.PReLU(nf)
        self.body = nn.Sequential(*[_ResidualBlockBN(nf, batch_norm) for _ in range(nb)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.bn_body = nn.BatchNorm2d(nf) if batch_norm else nn.Identity()
        self.upsample = nn.Sequential(
            nn.Conv2d(nf, nf * 4, 3, 1, 1), nn.PixelShuffle(2), nn.PReLU(nf),
            nn.Conv2d(nf, nf * 4, 3, 1, 1), nn.PixelShuffle(2), nn.PReLU(nf),
        )
        self.conv_last = nn.Conv2d(nf, out_ch, 9, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.act_first(self.conv_first(x))
        feat = head + self.bn_body(self.conv_body(self.body(head)))
        return self.conv_last(self.upsample(feat))
