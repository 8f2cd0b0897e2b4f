"""Identity embeddings for evaluation: the names evaluation code imports, over the one identity stack.

The stack itself lives in :mod:`fsr.models.face.identity` (:class:`IdentityEmbedder`) and the
registry in :mod:`fsr.models.face` (:func:`create_face_model`); training uses the same two.
"""

from __future__ import annotations

from typing import get_args

import torch

from fsr.core.device import Compute
from fsr.models.face import (
    DEFAULT_THRESHOLDS,
    FaceModel,
    FaceModelError,
    FaceModelName,
    IdentityEmbedder,
    create_face_model,
)

__all__ = ["DEFAULT_THRESHOLDS", "FACE_MODEL_CHOICES", "FaceEmbedder", "FaceModelError", "load_face_model"]

FACE_MODEL_CHOICES: tuple[str, ...] = get_args(FaceModelName)


def load_face_model(name: str, weights: str | None, compute: Compute) -> FaceModel:
    """:func:`fsr.models.face.create_face_model` with the argument order evaluation code uses."""
    return create_face_model(name, weights=weights, compute=compute)


class FaceEmbedder(IdentityEmbedder):
    """:class:`IdentityEmbedder` whose ``embed`` is the batched, gradient-free ``embed_batched``
    (raw (N, D) float32 on the CPU), the meaning evaluation callers of ``embed`` rely on."""

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed_batched(images, landmarks)
