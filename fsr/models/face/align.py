"""Differentiable face alignment: 5-point similarity transform + ``grid_sample``.

Coordinates are pixel coordinates with pixel centres on integers (the convention of
MTCNN's and dlib's landmarks): pixel (i, j) of an image covers [j - 0.5, j + 0.5] in x.
Everything here is plain torch, so gradients flow to the images (and to the landmarks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transform (rotation, uniform scale, translation) from src to dst.

    Umeyama's estimate without reflection; in 2-D it has the closed form below
    (x' = a x - b y + tx, y' = b x + a y + ty minimising sum |x' - dst|^2).

    src: (N, K, 2) points; dst: (K, 2) or (N, K, 2) points. Returns (N, 2, 3) matrices M with
    dst ~ M @ [x, y, 1]. Differentiable w.r.t. both.
    """
    if src.ndim != 3 or src.shape[-1] != 2:
        raise ValueError(f"landmarks must be (N, K, 2), got {tuple(src.shape)}")
    dst = dst.to(src.dtype).expand_as(src)
    src_mean = src.mean(dim=1, keepdim=True)
    dst_mean = dst.mean(dim=1, keepdim=True)
    s = src - src_mean
    d = dst - dst_mean
    norm = (s**2).sum(dim=(1, 2)).clamp_min(1e-12)
    a = (s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1]).sum(dim=1) / norm
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(dim=1) / norm
    rot = torch.stack([torch.stack([a, -b], dim=-1), torch.stack([b, a], dim=-1)], dim=1)  # (N,2,2)
    t = dst_mean.squeeze(1) - (rot @ src_mean.transpose(1, 2)).squeeze(-1)
    return torch.cat([rot, t.unsqueeze(-1)], dim=2)


def apply_transform(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply (N, 2, 3) affine matrices to (N, K, 2) points."""
    return points @ matrix[:, :, :2].transpose(1, 2) + matrix[:, :, 2].unsqueeze(1)


def _homogeneous(matrix: torch.Tensor) -> torch.Tensor:
    bottom = torch.zeros_like(matrix[:, :1, :])
    bottom[:, 0, 2] = 1.0
    return torch.cat([matrix, bottom], dim=1)


def warp_affine(images: torch.Tensor, matrix: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Warp images so that output pixel q shows input point p where q = M p.

    images: (N, C, H, W); matrix: (N, 2, 3) image->output pixel map; out_size (H_out, W_out).
    Bilinear ``grid_sample`` with border padding; returns (N, C, H_out, W_out).
    """
    n, _, h, w = images.shape
    out_h, out_w = out_size
    m = _homogeneous(matrix.to(images.dtype))
    inv = torch.linalg.inv(m)  # output pixel -> input pixel
    # normalised output -> output pixel
    sx_o, sy_o = out_w / 2.0, out_h / 2.0
    from_norm_out = images.new_tensor([[sx_o, 0.0, sx_o - 0.5], [0.0, sy_o, sy_o - 0.5], [0.0, 0.0, 1.0]])
    # input pixel -> normalised input
    to_norm_in = images.new_tensor(
        [[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]]
    )
    theta = (to_norm_in @ inv @ from_norm_out)[:, :2, :]
    grid = F.affine_grid(theta, [n, images.shape[1], out_h, out_w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def align_faces(
    images: torch.Tensor,
    landmarks: torch.Tensor,
    template: torch.Tensor,
    out_size: tuple[int, int],
    antialias: bool = True,
) -> torch.Tensor:
    """Align faces to a 5-point template by a similarity transform (differentiable).

    images: (N, C, H, W) float; landmarks: (N, 5, 2) pixel coordinates in the images' frame;
    template: (5, 2) in output pixels; out_size (H_out, W_out). When a face is shrunk by 2x
    or more, the image is first box-filtered by the integer factor (as dlib's chip extraction
    does with its pyramid) so that bilinear sampling does not alias.
    Returns (N, C, H_out, W_out).
    """
    matrix = similarity_transform(landmarks.to(images.dtype), template.to(images.device, images.dtype))
    if not antialias:
        return warp_affine(images, matrix, out_size)
    scale = torch.sqrt(torch.linalg.det(matrix[:, :, :2]).abs()).detach()
    factors = torch.clamp(torch.floor(1.0 / scale.clamp_min(1e-6)), min=1).long().tolist()
    if all(f < 2 for f in factors):
        return warp_affine(images, matrix, out_size)
    out = images.new_empty((images.shape[0], images.shape[1], *out_size))
    for factor in sorted(set(factors)):
        idx = [i for i, f in enumerate(factors) if f == factor]
        sel = torch.tensor(idx, device=images.device)
        imgs, mats = images[sel], matrix[sel]
        if factor >= 2:
            imgs = F.avg_pool2d(imgs, factor, stride=factor, ceil_mode=False)
            # pooled pixel x' sits at input pixel factor * x' + (factor - 1) / 2
            up = mats.new_tensor([[factor, 0.0, (factor - 1) / 2.0], [0.0, factor, (factor - 1) / 2.0]])
            mats = mats @ _homogeneous(up.expand(len(idx), 2, 3))
        out = out.index_copy(0, sel, warp_affine(imgs, mats, out_size))
    return out


def resize_faces(images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Resize already-cropped faces (N, C, H, W) to out_size, bilinear with antialiasing."""
    if tuple(images.shape[-2:]) == tuple(out_size):
        return images
    return F.interpolate(images, size=out_size, mode="bilinear", align_corners=False, antialias=True)
