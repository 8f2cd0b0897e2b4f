"""The face-recognition model interface shared by dlib ResNet, SphereFace and LightCNN.

Every model takes RGB images in [0, 1] (optionally with 5 landmarks per face), aligns them to
its own template, converts them to the colour order and value scaling its weights were
trained with, and returns raw embeddings. Those facts live beside the weights, in a
:class:`FaceModelSpec`, never in the caller (timm's ``default_cfgs`` idea).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fsr.core.device import Compute, channels_last_for_inference
from fsr.core.weights import WeightsError, find_weights, load_torch_checkpoint, search_dirs, state_dict_mismatch
from fsr.models.face.align import align_faces, resize_faces


@dataclass(frozen=True)
class FaceModelSpec:
    """What a face model expects and produces.

    input_size: (H, W) of the network input; colour: "rgb" | "bgr" | "gray";
    value_scaling: how [0, 255] pixel values become network input (documentation; the
    model's ``preprocess`` implements it); template: 5 (x, y) points in network-input
    pixels, MTCNN order (left eye, right eye, nose, mouth left, mouth right);
    metric: "euclidean" | "cosine"; weights_file: the file name fsr looks for;
    weights_source: where that file is published (for user-supplied weights).
    """

    name: str
    input_size: tuple[int, int]
    colour: str
    value_scaling: str
    template: tuple[tuple[float, float], ...]
    metric: str
    embedding_dim: int
    weights_file: str
    weights_source: str
    template_note: str = ""


class FaceModel(nn.Module):
    """Base class: frozen, eval-mode face embedder with differentiable alignment.

    Subclasses define the network layers (with the published state-dict key names),
    ``preprocess`` and ``forward_network``. Use :func:`fsr.models.face.create_face_model`.
    """

    spec: FaceModelSpec

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer(
            "template", torch.tensor(self.spec.template, dtype=torch.float32), persistent=False
        )
        self.compute: Compute | None = None

    # ---- facts -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def embedding_dim(self) -> int:
        return self.spec.embedding_dim

    @property
    def metric(self) -> str:
        return self.spec.metric

    @property
    def input_size(self) -> tuple[int, int]:
        return self.spec.input_size

    @property
    def device(self) -> torch.device:
        return self.template.device

    # ---- to be provided by each model ----------------------------------------------------
    def preprocess(self, faces: torch.Tensor) -> torch.Tensor:
        """Aligned RGB faces (N, 3, H, W) in [0, 1] -> the network's input tensor."""
        raise NotImplementedError

    def forward_network(self, x: torch.Tensor, return_features: bool = False):
        """Network input -> (N, D) embedding, or (embedding, list of feature maps)."""
        raise NotImplementedError

    # ---- shared behaviour ----------------------------------------------------------------
    def train(self, mode: bool = True) -> "FaceModel":
        """Face models are frozen: they always stay in eval mode."""
        return super().train(False)

    def freeze(self) -> "FaceModel":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def place(self, compute: Compute | None) -> "FaceModel":
        """Move to the compute core's device (weights stay fp32; autocast gives the precision).

        None -> :meth:`Compute.default` (the CPU in fp32)."""
        self.compute = compute or Compute.default()
        return self.to(self.compute.device)

    def align(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """Crop faces to the network's input size.

        images: (N, 3, H, W) RGB in [0, 1] (or (N, 1, H, W) gray); landmarks: (N, 5, 2)
        pixel coordinates in the images' own frame (MTCNN order) -> similarity alignment to
        ``spec.template``; None -> the whole image resized (already-cropped faces).
        Returns (N, C, h, w) with (h, w) = ``spec.input_size``; differentiable.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 3, H, W) RGB in [0, 1], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
        images = images.to(self.device, torch.float32)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if landmarks is None:
            return resize_faces(images, self.spec.input_size)
        landmarks = torch.as_tensor(landmarks, dtype=torch.float32, device=self.device)
        if landmarks.shape != (images.shape[0], 5, 2):
            raise ValueError(
                f"landmarks must be (N, 5, 2) = ({images.shape[0]}, 5, 2), got {tuple(landmarks.shape)}"
            )
        return align_faces(images, landmarks, self.template, self.spec.input_size)

    def _run(self, images: torch.Tensor, landmarks, return_features: bool):
        x = self.preprocess(self.align(images, landmarks))
        if not torch.is_grad_enabled() and channels_last_for_inference(x.device):
            x = x.contiguous(memory_format=torch.channels_last)
        compute = self.compute
        if compute is not None and compute.dtype != torch.float32:
            with compute.autocast():
                return self.forward_network(x, return_features)
        return self.forward_network(x, return_features)

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """Raw embeddings (N, D) float32 of RGB images (N, 3, H, W) in [0, 1].

        With landmarks (N, 5, 2) the faces are aligned first; gradients flow to ``images``.
        """
        return self._run(images, landmarks, False).float()

    def features(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Intermediate feature maps (for a perceptual-style loss), shallow to deep."""
        return self.embedding_and_features(images, landmarks)[1]

    def embedding_and_features(self, images: torch.Tensor, landmarks: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Raw embeddings (N, D) and the feature maps of :meth:`features` from one forward pass."""
        embedding, feats = self._run(images, landmarks, True)
        return embedding.float(), [f.float() for f in feats]

    def normalize(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) -> unit vectors for cosine comparison."""
        return F.normalize(embeddings.float(), dim=-1)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (N,) of normalised embeddings; higher = more likely the same person."""
        return (self.normalize(a) * self.normalize(b)).sum(dim=-1)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Euclidean distance (N,) between raw embeddings; lower = more likely the same person."""
        return (a.float() - b.float()).norm(dim=-1)

    def extra_repr(self) -> str:
        s = self.spec
        return f"name={s.name}, input={s.input_size}, colour={s.colour}, dim={s.embedding_dim}, metric={s.metric}"


# ---- user-supplied PyTorch checkpoints -------------------------------------------------------


class FaceWeightsNotFoundError(WeightsError, FileNotFoundError):
    """A face model's weights file is not where fsr looks; the message says where to get it."""


def missing_weights_message(spec: FaceModelSpec, explicit: str | os.PathLike | None) -> str:
    """One line: which file is missing, where it is published and where fsr looked."""
    if explicit:
        return (
            f"{explicit}: {spec.name} weights file not found "
            f"(expected {spec.weights_file}, published by {spec.weights_source})"
        )
    looked = ", ".join(str(d) for d in search_dirs())
    return (
        f"{spec.weights_file}: {spec.name} weights not found; fsr looked in {looked} "
        f"(set FSR_WEIGHTS_DIR or pass --weights PATH); the file is published by {spec.weights_source}"
    )


def load_user_checkpoint(
    model: FaceModel,
    explicit: str | os.PathLike | None,
    ignored_keys: tuple[str, ...] = (),
) -> Path:
    """Find ``model.spec.weights_file`` (or ``explicit``), load it with weights_only=True and
    copy its tensors into ``model``; raise :class:`WeightsError` with a clear line otherwise.

    Accepts a plain state dict or a dict with ``state_dict``; a ``module.`` prefix
    (DataParallel) is removed; ``ignored_keys`` (classifier heads) may be present or not.
    """
    spec = model.spec
    path = find_weights(spec.weights_file, explicit)
    if path is None:
        raise FaceWeightsNotFoundError(missing_weights_message(spec, explicit))
    checkpoint = load_torch_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a {spec.name} checkpoint (no state dict of tensors inside)")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    expected = model.state_dict()
    problems = state_dict_mismatch(expected, state, ignored_keys)
    if problems:
        raise WeightsError(
            f"{path}: not a {spec.name} checkpoint ({problems}); expected {spec.weights_file} "
            f"from {spec.weights_source}"
        )
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    return path
