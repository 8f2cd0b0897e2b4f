"""LightCNN-29 v2 (Wu et al. 2018) as published by AlfredXiangWu/LightCNN.

The identity network F of the paper's loss (Eq. 5). Weights are user-supplied:
``LightCNN_29Layers_V2_checkpoint.pth.tar`` (a dict whose ``state_dict`` keys carry a
``module.`` prefix; ``fc2.weight`` (80013, 256) is the training-only classifier, ignored).

Max-feature-map (mfm) units: a convolution to 2C channels, then the element-wise max of
the two halves. Blocks [1, 2, 3, 4]; each pooling is max_pool2d(2) + avg_pool2d(2);
``fc`` 8192 -> 256 gives the embedding. Input: grayscale 1x128x128 in [0, 1]
(ITU-R 601 luma, as ``cv2.imread(..., IMREAD_GRAYSCALE)`` in the public feature extractor).

Template: LightCNN's test faces are 128x128 with the eye midpoint at y = 40 and the
eye-midpoint-to-mouth-midpoint distance 48 (the repository's README), eyes horizontal.
fsr's 5-point template is SphereFace's published template, moved and scaled so that its
eye midpoint lands on (64, 40) and its mouth midpoint 48 px below, centred in x.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fsr.models.face.base import FaceModel, FaceModelSpec
from fsr.models.face.sphereface import SPHEREFACE_TEMPLATE

LIGHTCNN_WEIGHTS_FILE = "LightCNN_29Layers_V2_checkpoint.pth.tar"


def _lightcnn_template() -> tuple[tuple[float, float], ...]:
    """SphereFace's template mapped to eye midpoint (64, 40), eye-to-mouth distance 48."""
    pts = torch.tensor(SPHEREFACE_TEMPLATE, dtype=torch.float64)
    eye_mid = (pts[0] + pts[1]) / 2
    mouth_mid = (pts[3] + pts[4]) / 2
    scale = 48.0 / float(mouth_mid[1] - eye_mid[1])
    centre_x = float((eye_mid[0] + mouth_mid[0]) / 2)
    out = (pts - torch.tensor([centre_x, float(eye_mid[1])], dtype=torch.float64)) * scale
    out += torch.tensor([63.5, 40.0], dtype=torch.float64)  # x centre of a 128-px image
    return tuple((round(float(x), 4), round(float(y), 4)) for x, y in out)


LIGHTCNN_TEMPLATE = _lightcnn_template()


class MaxFeatureMap(nn.Module):
    """mfm: conv (or linear) to 2*out channels, then max of the two halves."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.out_channels = out_channels
        self.filter = nn.Conv2d(in_channels, 2 * out_channels, kernel_size, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.filter(x), self.out_channels, dim=1)
        return torch.maximum(a, b)


class MfmGroup(nn.Module):
    """1x1 mfm then kxk mfm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.conv_a = MaxFeatureMap(in_channels, in_channels, 1, 1, 0)
        self.conv = MaxFeatureMap(in_channels, out_channels, kernel_size, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv_a(x))


class MfmResBlock(nn.Module):
    """x + mfm(mfm(x)), 3x3 convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = MaxFeatureMap(channels, channels)
        self.conv2 = MaxFeatureMap(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2) + F.avg_pool2d(x, 2)


class LightCNN29v2(FaceModel):
    """LightCNN-29 v2: (N, 1, 128, 128) gray [0, 1] -> (N, 256) embedding (``fc``)."""

    spec = FaceModelSpec(
        name="lightcnn",
        input_size=(128, 128),
        colour="gray",
        value_scaling="0.299 R + 0.587 G + 0.114 B, in [0, 1]",
        template=LIGHTCNN_TEMPLATE,
        metric="cosine",
        embedding_dim=256,
        weights_file=LIGHTCNN_WEIGHTS_FILE,
        weights_source="AlfredXiangWu/LightCNN (https://github.com/AlfredXiangWu/LightCNN, README model links)",
        template_note="SphereFace's template moved/scaled to eye midpoint (64, 40) and eye-mouth distance 48",
    )

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = MaxFeatureMap(1, 48, 5, 1, 2)
        self.block1 = nn.Sequential(*[MfmResBlock(48) for _ in range(1)])
        self.group1 = MfmGroup(48, 96, 3, 1, 1)
        self.block2 = nn.Sequential(*[MfmResBlock(96) for _ in range(2)])
        self.group2 = MfmGroup(96, 192, 3, 1, 1)
        self.block3 = nn.Sequential(*[MfmResBlock(192) for _ in range(3)])
        self.group3 = MfmGroup(192, 128, 3, 1, 1)
        self.block4 = nn.Sequential(*[MfmResBlock(128) for _ in range(4)])
        self.group4 = MfmGroup(128, 128, 3, 1, 1)
        self.fc = nn.Linear(8 * 8 * 128, 256)
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, faces: torch.Tensor) -> torch.Tensor:
        """RGB [0, 1] -> luma (N, 1, H, W) in [0, 1]."""
        return (faces * self.luma).sum(dim=1, keepdim=True)

    def forward_network(self, x: torch.Tensor, return_features: bool = False):
        feats = []
        x = _pool(self.conv1(x))
        feats.append(x)
        x = _pool(self.group1(self.block1(x)))
        feats.append(x)
        x = _pool(self.group2(self.block2(x)))
        feats.append(x)
        x = self.group4(self.block4(self.group3(self.block3(x))))
        feats.append(x)
        x = _pool(x)
        emb = self.fc(x.flatten(1))
        return (emb, feats) if return_features else emb
