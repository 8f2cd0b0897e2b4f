"""The one identity stack of fsr: embed faces with a face model, then compare embeddings.

Training uses it as F of Eq. 5 (differentiable ``raw`` / ``embed`` / ``features``);
evaluation (``fsr metrics``, ``verify-sweep``, ``verify``) uses ``embed_batched`` (no
gradients, fp32, batched on the compute device with out-of-memory back-off) and
``compare``. Both compare with the face model's own rules: ``similarity`` (cosine of
normalised embeddings; dlib's are centred first) and ``distance`` (Euclidean on raw
embeddings).

    embedder = IdentityEmbedder(create_face_model("dlib", compute=compute))
    emb = embedder.embed_batched(images (N, 3, H, W) in [0, 1], landmarks (N, 5, 2) | None)
    scores = embedder.compare(emb[a], emb[b])   # {"cosine": (P,), "distance": (P,) if Euclidean}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from fsr.core.batching import BatchSizer, run_batched
from fsr.core.device import Compute
from fsr.models.face.base import FaceModel

#: Decision thresholds of ``fsr verify`` when none is given. dlib: its documented Euclidean
#: rule (same when distance < 0.6). SphereFace / LightCNN: cosine similarity thresholds near
#: the LFW 10-fold optimum reported for these networks (same when cosine > t).
DEFAULT_THRESHOLDS = {"dlib": 0.6, "sphereface": 0.3, "lightcnn": 0.35}


class IdentityEmbedder(nn.Module):
    """A frozen face model (interface C) with the identity operations training and evaluation share.

    compute: where ``embed_batched`` runs and how many faces a batch holds; None -> the
    compute the face model was placed with (:func:`fsr.models.face.create_face_model`).
    """

    def __init__(self, model: FaceModel, compute: Compute | None = None) -> None:
        super().__init__()
        self.model = model.freeze()
        self.compute = compute if compute is not None else model.compute
        batch = self.compute.batch_size if self.compute is not None else 64
        self._sizer = BatchSizer(max(1, batch))

    def train(self, mode: bool = True) -> "IdentityEmbedder":
        """Frozen: always in eval mode."""
        return super().train(False)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def metric(self) -> str:
        """"euclidean" (dlib) or "cosine": the model's native comparison."""
        return self.model.metric

    @property
    def embedding_dim(self) -> int:
        return self.model.embedding_dim

    # ---- differentiable (training) -------------------------------------------------------
    def raw(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) float32 embeddings as the model outputs them (dlib: 128-D descriptors)."""
        return self.model(images, landmarks=landmarks).float()

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) unit vectors (``model.normalize``: dlib's are centred on the mean descriptor first)."""
        return self.model.normalize(self.raw(images, landmarks))

    def features(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The model's intermediate feature maps, shallow to deep (``--perceptual identity``)."""
        return list(self.model.features(images, landmarks=landmarks))

    def embed_and_features(self, images: torch.Tensor, landmarks: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(:meth:`embed`, :meth:`features`) from one forward pass: the identity (Eq. 5) and
        identity-feature perceptual (Eq. 6) losses of one step share it."""
        raw, feats = self.model.embedding_and_features(images, landmarks=landmarks)
        return self.model.normalize(raw), list(feats)

    # ---- batched, no gradients (evaluation) ----------------------------------------------
    @torch.inference_mode()
    def embed_batched(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """Raw embeddings (N, D) float32 on the CPU of images (N, 3, H, W) float in [0, 1] on any
        device, landmarks (N, 5, 2) pixels in the images' frame or None."""
        n = images.shape[0]
        if n == 0:
            return torch.empty((0, self.embedding_dim))
        device = self.model.device
        return run_batched(
            lambda index: self.raw(
                images[index].to(device, non_blocking=True).float(),
                None if landmarks is None else landmarks[index].to(device, non_blocking=True).float(),
            ),
            torch.arange(n), self._sizer, out_device="cpu",
        )

    def embed_photos(self, photos: Iterable[tuple[np.ndarray, np.ndarray]], chunk: int = 64,
                     on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """Raw embeddings (N, D) on the CPU of photos of any sizes, in input order.

        photos: (photo (H, W, 3) uint8 RGB, landmarks (5, 2) in its pixels) pairs, taken one at
        a time (a generator keeps only the pending photos in memory); photos of one size are
        embedded together, ``chunk`` at a time. ``on_batch(n)`` is called after each batch.
        """
        out: dict[int, torch.Tensor] = {}
        pending: dict[tuple, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for i, (photo, landmarks) in enumerate(photos):
            group = pending.setdefault(photo.shape, [])
            group.append((i, photo, landmarks))
            if len(group) >= chunk:
                self._embed_same_size(pending.pop(photo.shape), out, on_batch)
        for group in pending.values():
            self._embed_same_size(group, out, on_batch)
        return torch.stack([out[i] for i in range(len(out))]) if out else torch.empty((0, self.embedding_dim))

    def _embed_same_size(self, group: list[tuple[int, np.ndarray, np.ndarray]], out: dict[int, torch.Tensor],
                         on_batch: Callable[[int], None] | None) -> None:
        """Embed one batch of same-size photos into ``out[index]``."""
        images = torch.from_numpy(np.stack([photo for _, photo, _ in group])).permute(0, 3, 1, 2).float().div_(255.0)
        landmarks = torch.from_numpy(np.stack([np.asarray(lm, np.float32) for _, _, lm in group]))
        for (i, _, _), emb in zip(group, self.embed_batched(images, landmarks)):
            out[i] = emb
        if on_batch is not None:
            on_batch(len(group))

    # ---- comparison ------------------------------------------------------------------------
    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (N,) of normalised embeddings; higher = more likely the same person."""
        return self.model.similarity(a, b)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Euclidean distance (N,) between raw embeddings; lower = more likely the same person."""
        return self.model.distance(a, b)

    @torch.inference_mode()
    def compare(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, np.ndarray]:
        """Scores of embedding pairs (N, D) x (N, D) as float64 arrays: ``cosine`` always and, for a
        Euclidean model, ``distance``."""
        a, b = a.to(self.model.device), b.to(self.model.device)
        out = {"cosine": self.similarity(a, b).float().cpu().numpy().astype(np.float64)}
        if self.metric == "euclidean":
            out["distance"] = self.distance(a, b).float().cpu().numpy().astype(np.float64)
        return out
