"""Identity embeddings for evaluation: one face model (interface C), batched on the compute device.

Used by ``fsr metrics`` (SR-vs-HR identity similarity, Table 2) and ``fsr verify-sweep`` /
``fsr verify`` (pair scores, Table 3). Embeddings are computed in fp32 (no autocast) so
that identity figures do not depend on ``--precision``; the SR systems use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fsr.core.batching import BatchSizer, run_batched
from fsr.core.device import Compute

FACE_MODEL_CHOICES = ("dlib", "sphereface", "lightcnn")

#: Decision thresholds used by ``fsr verify`` when none is given. dlib: its documented
#: Euclidean rule (same when distance < 0.6). SphereFace / LightCNN: cosine similarity
#: thresholds near the LFW 10-fold optimum reported for these networks (same when cosine > t).
DEFAULT_THRESHOLDS = {"dlib": 0.6, "sphereface": 0.3, "lightcnn": 0.35}


class FaceModelError(RuntimeError):
    """A face model that cannot be loaded (missing weights, unknown name)."""


def load_face_model(name: str, weights: str | None, compute: Compute):
    """Create a frozen face model by name through ``fsr.models.face.create_face_model``."""
    if name not in FACE_MODEL_CHOICES:
        raise FaceModelError(f"unknown face model '{name}' (expected {' | '.join(FACE_MODEL_CHOICES)})")
    try:
        from fsr.models.face import create_face_model
    except ImportError as exc:  # the face-models package is not in this build
        raise FaceModelError(f"face models are not available in this build ({exc})") from None
    from fsr.core.weights import WeightsError

    try:
        return create_face_model(name, weights=weights, compute=compute)
    except WeightsError as exc:
        raise FaceModelError(str(exc)) from None
    except FileNotFoundError as exc:
        raise FaceModelError(f"{name}: weights not found ({exc}); pass --weights PATH") from None


@dataclass
class FaceEmbedder:
    """Batched embeddings with one face model.

    ``embed(images (N,3,H,W) float in [0,1], landmarks (N,5,2) pixels in the images' frame
    or None) -> (N, D) float32 raw embeddings on the CPU``.
    """

    model: torch.nn.Module
    compute: Compute

    def __post_init__(self) -> None:
        self._sizer = BatchSizer(max(1, self.compute.batch_size))

    @property
    def name(self) -> str:
        return str(getattr(self.model, "name", "face"))

    @property
    def metric(self) -> str:
        return str(getattr(self.model, "metric", "cosine"))

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        device = self.compute.device
        n = images.shape[0]
        if n == 0:
            return torch.empty((0, int(getattr(self.model, "embedding_dim", 0))))

        def run(index: torch.Tensor) -> torch.Tensor:
            x = images[index].to(device, non_blocking=True).float()
            lm = None if landmarks is None else landmarks[index].to(device, non_blocking=True).float()
            return self.model(x, lm).float()

        return run_batched(run, torch.arange(n), self._sizer, out_device="cpu")

    @torch.inference_mode()
    def compare(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, np.ndarray]:
        """Scores of embedding pairs (N, D) x (N, D): ``cosine`` (model.similarity: cosine of
        normalised embeddings; dlib's are centred first) and, for a Euclidean model,
        ``distance`` (model.distance on raw embeddings)."""
        a = a.to(self.compute.device)
        b = b.to(self.compute.device)
        out = {"cosine": self.model.similarity(a, b).float().cpu().numpy().astype(np.float64)}
        if self.metric == "euclidean":
            out["distance"] = self.model.distance(a, b).float().cpu().numpy().astype(np.float64)
        return out
