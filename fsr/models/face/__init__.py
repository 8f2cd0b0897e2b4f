"""Face recognition models behind one interface (interface C).

    from fsr.models.face import create_face_model, IdentityEmbedder
    model = create_face_model("dlib" | "sphereface" | "lightcnn", weights=None, compute=compute)
    emb = model(images (N, 3, H, W) RGB in [0, 1], landmarks (N, 5, 2) | None)  # (N, D) float32
    embedder = IdentityEmbedder(model)   # the identity stack of training and evaluation

``create_face_model`` is the one entry point by name; ``FACE_MODELS`` the one registry and
``FaceModelName`` its names as a type (the training config's ``loss.id_model``).

Each model is a frozen, eval-mode ``nn.Module`` on the compute core's device that aligns
faces to its own 5-point template (differentiably, so gradients reach ``images``), applies
its own colour order and value scaling, and returns raw embeddings. ``model.normalize``,
``model.similarity`` (cosine) and ``model.distance`` (Euclidean) compare them.

- ``dlib``: dlib's ResNet v1, shipped in ``weights/dlib_resnet_v1.safetensors`` (128-D,
  Euclidean; the offline default).
- ``sphereface``: sphere20a, user-supplied ``sphere20a_20171020.pth`` (512-D, cosine).
- ``lightcnn``: LightCNN-29v2, user-supplied ``LightCNN_29Layers_V2_checkpoint.pth.tar``
  (256-D, cosine).
User-supplied files are found by ``--weights PATH`` or by file name in ``$FSR_WEIGHTS_DIR``,
``weights/`` or ``~/.cache/fsr/weights``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal, get_args

from fsr.core.device import Compute
from fsr.core.weights import WeightsError, find_weights, load_safetensors, shipped_checksums
from fsr.models.face.base import (
    FaceModel,
    FaceModelSpec,
    FaceWeightsNotFoundError,
    load_user_checkpoint,
    missing_weights_message,
)
from fsr.models.face.dlib_resnet import DlibResNet
from fsr.models.face.identity import DEFAULT_THRESHOLDS, IdentityEmbedder
from fsr.models.face.lightcnn import LightCNN29v2
from fsr.models.face.sphereface import SphereFace20a

__all__ = [
    "DEFAULT_THRESHOLDS",
    "FACE_MODELS",
    "FaceModelError",
    "FaceModelName",
    "IdentityEmbedder",
    "FaceModel",
    "FaceModelSpec",
    "FaceWeightsNotFoundError",
    "create_face_model",
    "DlibResNet",
    "SphereFace20a",
    "LightCNN29v2",
]


FaceModelName = Literal["dlib", "sphereface", "lightcnn"]


class FaceModelError(ValueError):
    """An unknown face model name."""


def _load_dlib(model: DlibResNet, weights: str | os.PathLike | None) -> None:
    path = find_weights(model.spec.weights_file, weights)
    if path is None:
        raise FaceWeightsNotFoundError(
            missing_weights_message(model.spec, weights) + " (re-create it: python tools/convert_dlib.py)"
        )
    # the shipped digest applies wherever the file was found, unless a SHA256SUMS/card beside it records its own
    state = load_safetensors(path, fallback_sha256=shipped_checksums().get(model.spec.weights_file))
    expected = model.state_dict()
    if set(state) != set(expected) or any(tuple(state[k].shape) != tuple(v.shape) for k, v in expected.items()):
        raise WeightsError(f"{path}: not fsr's dlib ResNet v1 weights (keys or shapes differ)")
    model.load_state_dict(state, strict=True)
    model.fold_affines()


def _load_sphereface(model: SphereFace20a, weights: str | os.PathLike | None) -> None:
    load_user_checkpoint(model, weights, ignored_keys=("fc6.weight",))


def _load_lightcnn(model: LightCNN29v2, weights: str | os.PathLike | None) -> None:
    load_user_checkpoint(model, weights, ignored_keys=("fc2.weight", "fc2.bias"))


#: name -> (model class, weights loader)
FACE_MODELS: dict[str, tuple[type[FaceModel], Callable]] = {
    "dlib": (DlibResNet, _load_dlib),
    "sphereface": (SphereFace20a, _load_sphereface),
    "lightcnn": (LightCNN29v2, _load_lightcnn),
}
assert set(FACE_MODELS) == set(get_args(FaceModelName)), "FaceModelName must list the registry's names"


def create_face_model(
    name: str, weights: str | os.PathLike | None = None, compute: Compute | None = None
) -> FaceModel:
    """Build face model ``name`` with its weights, frozen, in eval mode, on ``compute.device``.

    weights: an explicit file (``--weights``); None -> the model's published file name looked
    up in $FSR_WEIGHTS_DIR, weights/, ~/.cache/fsr/weights. compute: None -> ``Compute.default()``.
    Raises :class:`FaceModelError` (a ValueError) for an unknown name, :class:`FaceWeightsNotFoundError` (a
    FileNotFoundError and WeightsError) for a missing file, WeightsError for a wrong one.
    """
    key = name.strip().lower()
    if key not in FACE_MODELS:
        raise FaceModelError(f"unknown face model '{name}' (expected {' | '.join(FACE_MODELS)})")
    cls, loader = FACE_MODELS[key]
    model = cls()
    loader(model, weights)
    return model.freeze().place(compute)
