"""IP-FSRGAN losses, Eq. 1-7 of the paper (Sec. III).

G_loss = λ·L_adv,G + γ·L_id + η·L_p + ξ·L_1 and D_loss = L_adv,D (Eq. 1).

Weights presets (``LOSS_WEIGHT_PRESETS``):
- ``paper``: λ=0.005, γ=10, η=0.01 (perceptual), ξ=1 (L1): Sec. IV-B as written.
- ``public-code``: the authors' public code (ESRGAN's convention): pixel 0.01,
  perceptual 1, adversarial 0.005, identity 10.

All image tensors are (N, 3, H, W) RGB in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsr.models.face.identity import IdentityEmbedder


@dataclass(frozen=True)
class LossWeights:
    """λ (adversarial), γ (identity), η (perceptual), ξ (pixel L1) of Eq. 1."""

    adversarial: float
    identity: float
    perceptual: float
    pixel: float


LOSS_WEIGHT_PRESETS: dict[str, LossWeights] = {
    "paper": LossWeights(adversarial=0.005, identity=10.0, perceptual=0.01, pixel=1.0),
    "public-code": LossWeights(adversarial=0.005, identity=10.0, perceptual=1.0, pixel=0.01),
}


# --- Eqs. 2-4: relativistic average GAN -----------------------------------------------------

def relativistic_logits(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 before the sigmoid: (D~(y) - E[D~(G(x))], D~(G(x)) - E[D~(y)]), each (N, 1)."""
    return real_logits - fake_logits.mean(), fake_logits - real_logits.mean()


def ragan_generator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 3: L_adv,G = -E[log(1 - D(y, G(x)))] - E[log D(G(x), y)] (BCE with logits).

    The paper prints the first term as ``1 - log(D(y, G(x)))``; the relativistic GAN it cites
    (and ESRGAN) uses ``log(1 - D(y, G(x)))``, which is what is computed here. Like the
    equation, the two expectations are summed (BasicSR averages them: half this value).
    ``real_logits`` may be detached: only the fake branch must carry gradients to G.
    """
    real_rel, fake_rel = relativistic_logits(real_logits, fake_logits)
    return (F.binary_cross_entropy_with_logits(real_rel, torch.zeros_like(real_rel))
            + F.binary_cross_entropy_with_logits(fake_rel, torch.ones_like(fake_rel)))


def ragan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 4: L_adv,D = -E[log D(y, G(x))] - E[log(1 - D(G(x), y))] (BCE with logits)."""
    real_rel, fake_rel = relativistic_logits(real_logits, fake_logits)
    return (F.binary_cross_entropy_with_logits(real_rel, torch.ones_like(real_rel))
            + F.binary_cross_entropy_with_logits(fake_rel, torch.zeros_like(fake_rel)))


def vanilla_generator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Standard (non-relativistic) GAN loss for G, as in SRGAN: -E[log σ(D~(G(x)))]."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def vanilla_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Standard GAN loss for D: -E[log σ(D~(y))] - E[log(1 - σ(D~(G(x))))]."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


GAN_LOSSES = {
    "ragan": (ragan_generator_loss, ragan_discriminator_loss),
    "vanilla": (vanilla_generator_loss, vanilla_discriminator_loss),
}


# --- Eq. 5: identity-preserving loss --------------------------------------------------------

def same_identity_matrix(identities: torch.Tensor) -> torch.Tensor:
    """I_{i,j} of Eq. 5: (N,) integer identity labels -> (N, N) bool, True where same identity."""
    return identities[:, None] == identities[None, :]


def identity_loss(sr_embeddings: torch.Tensor, hr_embeddings: torch.Tensor, same: torch.Tensor,
                  margin: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 5 over all (i, j) pairs of the batch.

    L_id = E_ij[I_ij (1 - cos(F(G(x_i)), F(y_j)))] + E_ij[(1 - I_ij) max(0, cos(F(G(x_i)), F(y_j)) - m)]

    Args:
        sr_embeddings: (N, D) identity features F(G(x_i)) (any scale; cosine is taken here).
        hr_embeddings: (N, D) identity features F(y_j).
        same: (N, N) bool, I_ij (the diagonal, SR_i vs HR_i, is always a positive pair).
        margin: m; negative pairs are pushed below cosine m.
    Returns (loss, parts) with parts ``positive``/``negative`` (the two expectations, each a
    mean over all N^2 pairs as in the equation) and the mean cosine of positive/negative pairs.
    """
    if sr_embeddings.shape != hr_embeddings.shape or sr_embeddings.ndim != 2:
        raise ValueError(f"embeddings must both be (N, D), got {tuple(sr_embeddings.shape)} and {tuple(hr_embeddings.shape)}")
    n = sr_embeddings.shape[0]
    if same.shape != (n, n):
        raise ValueError(f"identity matrix must be ({n}, {n}), got {tuple(same.shape)}")
    sr = F.normalize(sr_embeddings.float(), dim=1)
    hr = F.normalize(hr_embeddings.float(), dim=1)
    cosine = sr @ hr.t()  # (N, N): cos(F(G(x_i)), F(y_j))
    positive_mask = same.to(cosine.dtype)
    negative_mask = 1.0 - positive_mask
    positive = (positive_mask * (1.0 - cosine)).mean()
    negative = (negative_mask * torch.clamp(cosine - margin, min=0.0)).mean()
    with torch.no_grad():
        pos_cos = (cosine * positive_mask).sum() / positive_mask.sum().clamp(min=1)
        neg_cos = (cosine * negative_mask).sum() / negative_mask.sum().clamp(min=1)
    parts = {"id_positive": positive.detach(), "id_negative": negative.detach(),
             "cos_positive": pos_cos, "cos_negative": neg_cos}
    return positive + negative, parts


# --- Eq. 6 and 7 ----------------------------------------------------------------------------

def perceptual_loss(sr_features: list[torch.Tensor], hr_features: list[torch.Tensor],
                    criterion: str = "l2") -> torch.Tensor:
    """Eq. 6: sum over layers j of E[||φ_j(G(x)) - φ_j(y)||_2^2 / (C_j H_j W_j)].

    ``criterion="l1"`` uses the mean absolute difference instead (the public code and ESRGAN).
    """
    if len(sr_features) != len(hr_features) or not sr_features:
        raise ValueError("perceptual loss needs the same non-empty list of feature maps for SR and HR")
    total = sr_features[0].new_zeros((), dtype=torch.float32)
    for a, b in zip(sr_features, hr_features):
        diff = a.float() - b.float()
        total = total + (diff.square().mean() if criterion == "l2" else diff.abs().mean())
    return total


def pixel_loss(sr: torch.Tensor, hr: torch.Tensor, criterion: str = "l1") -> torch.Tensor:
    """Eq. 7: L_1 = E[||y - G(x)||_1], as the mean absolute error per pixel and channel.

    ``criterion="l2"``: mean squared error (SRCNN's training loss).
    """
    diff = hr.float() - sr.float()
    return diff.abs().mean() if criterion == "l1" else diff.square().mean()


# --- feature networks -----------------------------------------------------------------------

#: F of Eq. 5: the one identity stack (``embed`` -> (N, D) unit vectors, ``raw``, ``features``).
IdentityFeatures = IdentityEmbedder


class PerceptualFeatures(nn.Module):
    """φ of Eq. 6: wraps VGG19 features or the identity network's features under one call."""

    def __init__(self, kind: str, network: nn.Module) -> None:
        super().__init__()
        if kind not in ("vgg", "identity"):
            raise ValueError(f"unknown perceptual network '{kind}' (vgg | identity)")
        self.kind = kind
        self.network = network

    def train(self, mode: bool = True) -> "PerceptualFeatures":
        return super().train(False)

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> list[torch.Tensor]:
        if self.kind == "vgg":
            return self.network(images)
        return self.network.features(images, landmarks)
