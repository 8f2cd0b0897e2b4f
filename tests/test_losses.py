"""Losses of Eq. 1-7 (fsr.train.losses) on hand-made inputs with known answers, and the VGG19
feature extractor's checkpoint loading."""

from __future__ import annotations

import math

import pytest
import torch

from fsr.core.weights import WeightsError
from fsr.train.losses import (
    LOSS_WEIGHT_PRESETS,
    identity_loss,
    perceptual_loss,
    pixel_loss,
    ragan_discriminator_loss,
    ragan_generator_loss,
    same_identity_matrix,
)


def _unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


def test_identity_loss_eq5_known_pairs_and_margin():
    # identities A, A, B, B; A at 0 deg, B at 60 deg: cos(A, B) = 0.5
    identities = torch.tensor([0, 0, 1, 1])
    same = same_identity_matrix(identities)
    assert same.tolist() == [[True, True, False, False], [True, True, False, False],
                             [False, False, True, True], [False, False, True, True]]
    hr = torch.tensor([_unit(0), _unit(0), _unit(60), _unit(60)])
    # SR faces equal to their HR: all positive pairs at cosine 1
    loss, parts = identity_loss(hr.clone(), hr, same, margin=0.2)
    assert float(parts["id_positive"]) == pytest.approx(0.0, abs=1e-6)
    # 8 negative pairs of 16, each max(0, 0.5 - 0.2) = 0.3 -> E_ij = 8 * 0.3 / 16
    assert float(parts["id_negative"]) == pytest.approx(8 * 0.3 / 16, abs=1e-6)
    assert float(loss) == pytest.approx(0.15, abs=1e-6)
    # margin above the negative cosine: the negative term vanishes
    loss, parts = identity_loss(hr.clone(), hr, same, margin=0.6)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)

    # rotate SR_0 by 90 deg: pairs (0,0), (0,1) positive with cos 0 -> 1 - 0 each;
    # pairs (0,2), (0,3) negative with cos(90 deg, 60 deg) = cos 30 = 0.866
    sr = hr.clone()
    sr[0] = torch.tensor(_unit(90))
    loss, parts = identity_loss(sr * 3.0, hr, same, margin=0.2)  # scale of embeddings must not matter
    expected_pos = 2 * (1 - 0.0) / 16
    expected_neg = (2 * (math.cos(math.radians(30)) - 0.2) + 6 * 0.3) / 16
    assert float(parts["id_positive"]) == pytest.approx(expected_pos, abs=1e-6)
    assert float(parts["id_negative"]) == pytest.approx(expected_neg, abs=1e-6)
    assert float(loss) == pytest.approx(expected_pos + expected_neg, abs=1e-6)
    assert float(parts["cos_positive"]) == pytest.approx((6 * 1.0 + 2 * 0.0) / 8, abs=1e-6)


def test_identity_loss_gradient_pulls_positives_and_pushes_negatives():
    torch.manual_seed(0)
    identities = torch.tensor([0, 0, 1, 1, 2, 2])
    same = same_identity_matrix(identities)
    centres = torch.randn(3, 16)
    hr = torch.nn.functional.normalize(centres[identities] + 0.2 * torch.randn(6, 16), dim=1)
    sr = torch.randn(6, 16, requires_grad=True)
    opt = torch.optim.Adam([sr], lr=0.05)
    _, before = identity_loss(sr, hr, same, margin=0.1)
    for _ in range(300):
        opt.zero_grad()
        loss, parts = identity_loss(sr, hr, same, margin=0.1)
        loss.backward()
        opt.step()
    sr_n = torch.nn.functional.normalize(sr.detach(), dim=1)
    cos = sr_n @ hr.t()
    assert float(parts["cos_positive"]) > float(before["cos_positive"])
    # SR_i vs HR_i (diagonal) pulled close to 1, every negative pair at or below the margin
    assert float(cos.diagonal().min()) > 0.9
    assert float(cos[~same].max()) <= 0.1 + 0.02
    assert float(parts["cos_negative"]) < 0.1


def test_identity_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        identity_loss(torch.zeros(3, 4), torch.zeros(3, 5), torch.eye(3, dtype=torch.bool))
    with pytest.raises(ValueError):
        identity_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.eye(2, dtype=torch.bool))


def test_ragan_losses_eq3_eq4_by_hand():
    real = torch.tensor([[2.0], [0.0]])
    fake = torch.tensor([[-1.0], [1.0]])
    # Eq. 2 inside: real - E[fake] = [2, 0]; fake - E[real] = [-2, 0]
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    d_real = [sig(2.0), sig(0.0)]
    d_fake = [sig(-2.0), sig(0.0)]
    expected_g = -sum(math.log(1 - d) for d in d_real) / 2 - sum(math.log(d) for d in d_fake) / 2
    expected_d = -sum(math.log(d) for d in d_real) / 2 - sum(math.log(1 - d) for d in d_fake) / 2
    assert float(ragan_generator_loss(real, fake)) == pytest.approx(expected_g, rel=1e-6)
    assert float(ragan_discriminator_loss(real, fake)) == pytest.approx(expected_d, rel=1e-6)
    # a discriminator that ranks real above fake has a lower loss than one that ranks them the other way
    assert float(ragan_discriminator_loss(real, fake)) < float(ragan_discriminator_loss(fake, real))
    # the generator's loss only needs gradients through the fake logits
    fake_g = fake.clone().requires_grad_(True)
    ragan_generator_loss(real, fake_g).backward()
    assert fake_g.grad is not None and float(fake_g.grad.abs().sum()) > 0


def test_perceptual_and_pixel_losses_eq6_eq7():
    torch.manual_seed(1)
    a = [torch.randn(2, 4, 5, 5), torch.randn(2, 8, 3, 3)]
    b = [torch.randn(2, 4, 5, 5), torch.randn(2, 8, 3, 3)]
    expected = sum(float(((x - y) ** 2).sum() / x.numel()) for x, y in zip(a, b))  # sum_j E[||.||^2/(CHW)]
    assert float(perceptual_loss(a, b)) == pytest.approx(expected, rel=1e-5)
    assert float(perceptual_loss(a, b, "l1")) == pytest.approx(sum(float((x - y).abs().mean()) for x, y in zip(a, b)), rel=1e-5)
    sr, hr = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.25)
    assert float(pixel_loss(sr, hr)) == pytest.approx(0.25)
    assert float(pixel_loss(sr, hr, "l2")) == pytest.approx(0.0625)


def test_weight_presets_follow_paper_and_public_code():
    paper = LOSS_WEIGHT_PRESETS["paper"]
    assert (paper.adversarial, paper.identity, paper.perceptual, paper.pixel) == (0.005, 10.0, 0.01, 1.0)
    public = LOSS_WEIGHT_PRESETS["public-code"]
    assert (public.perceptual, public.pixel) == (1.0, 0.01)


def test_vgg19_features_from_checkpoint(tmp_path):
    from torchvision.models import vgg19

    from fsr.models.vgg import VGG19Features

    with pytest.raises(WeightsError, match="--vgg-weights"):
        VGG19Features.from_checkpoint(None)
    with pytest.raises(WeightsError, match="not found"):
        VGG19Features.from_checkpoint(tmp_path / "missing.pth")
    # a torchvision-layout state dict (only the layers up to relu2_2 are needed for that layer)
    torch.manual_seed(0)
    reference = vgg19(weights=None).features[:9].eval()
    state = {f"features.{k}": v for k, v in reference.state_dict().items()}
    path = tmp_path / "vgg19_part.pth"
    torch.save(state, path)
    net = VGG19Features.from_checkpoint(path, layers=["conv2_2", "relu1_2"])
    x = torch.rand(2, 3, 32, 32)
    conv2_2, relu1_2 = net(x)
    normed = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(conv2_2, reference[:8](normed), atol=1e-5)  # before its ReLU
        assert torch.allclose(relu1_2, reference[:4](normed), atol=1e-5)
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(WeightsError, match="missing"):
        VGG19Features.from_checkpoint(path, layers=["conv5_4"])
    bad = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, bad)
    with pytest.raises(WeightsError, match="features.0.weight"):
        VGG19Features.from_checkpoint(bad)
