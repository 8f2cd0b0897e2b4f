"""SR systems by name: the one path through which upscale, metrics and verify-sweep
super-resolve faces.

A system spec is ``bicubic``, ``default`` (the model shipped in ``weights/``), a model
name found in the weights folders (``NAME`` -> ``NAME.safetensors`` + ``NAME.json``),
or a path to an fsr export (``.safetensors`` with its ``.json`` model card beside it) or
to BasicSR-format RRDB x4 weights (``.pth``: ``params_ema``/``params``/plain state dict).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fsr.core.batching import BatchSizer, run_batched
from fsr.core.device import Compute, channels_last_for_inference
from fsr.core.resize import bicubic_up
from fsr.core.weights import WeightsError, find_weights
from fsr.models.sr import ModelCard, load_sr_model, read_card

DEFAULT_MODEL_NAME = "fsr_default"
# ``--batch-size`` counts LR faces of 32 x 32 px: larger inputs go in batches of the same pixel count
BATCH_FACE_PIXELS = 32 * 32


@dataclass
class SRSystem:
    """Something that turns LR faces into SR faces.

    ``card`` is the model's :class:`~fsr.models.sr.ModelCard` (None for bicubic).
    ``upscale(lr)``: (N, 3, h, w) float in [0, 1] (any device) -> (N, 3, h*scale, w*scale)
    float32 in [0, 1] on the CPU. Batched on ``compute``'s device with OOM back-off; inputs larger
    than 32 x 32 go in batches of as many pixels as ``compute.batch_size`` faces of 32 x 32.
    """

    name: str
    scale: int = 4
    model: nn.Module | None = None
    compute: Compute | None = None
    card: ModelCard | None = None  # None for the bicubic system
    self_ensemble: bool = False  # average over the face and its mirror image (2x the work)
    _sizer: BatchSizer | None = None

    def __post_init__(self) -> None:
        if self.model is not None:
            compute = self.compute or Compute.create("cpu")
            self.compute = compute
            self.model = self.model.to(compute.device).eval()
            if self._channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
            for p in self.model.parameters():
                p.requires_grad_(False)
            self._sizer = BatchSizer(compute.batch_size)

    @property
    def _channels_last(self) -> bool:
        return self.compute is not None and channels_last_for_inference(self.compute.device)

    @torch.inference_mode()
    def _forward(self, lr: torch.Tensor) -> torch.Tensor:
        assert self.compute is not None and self.model is not None
        x = lr.to(self.compute.device, non_blocking=True).float()
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.compute.autocast():
            y = self_ensemble(self.model, x) if self.self_ensemble else self.model(x)
        return y.float().clamp_(0, 1)

    def upscale(self, lr: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            return bicubic_up(lr.float().cpu(), self.scale)
        assert self._sizer is not None
        pixels = lr.shape[-2] * lr.shape[-1]
        if pixels <= BATCH_FACE_PIXELS:
            return run_batched(self._forward, lr, self._sizer, out_device="cpu")
        # larger inputs (tiles of a big face): as many per batch as hold the pixels of a batch of faces
        per_batch = max(1, self._sizer.batch_size * BATCH_FACE_PIXELS // pixels)
        sizer = BatchSizer(per_batch)
        out = run_batched(self._forward, lr, sizer, out_device="cpu")
        if sizer.batch_size < per_batch:  # out of memory on the way: later faces go in smaller batches too
            self._sizer.batch_size = max(1, self._sizer.batch_size * sizer.batch_size // per_batch)
        return out

    __call__ = upscale


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th (0..7) of the 8 flips/rotations of (N, C, H, W) images: k % 4 quarter turns, mirrored for k >= 4."""
    y = torch.rot90(x, k % 4, dims=(-2, -1))
    return y.flip(-1) if k >= 4 else y


def undo_dihedral(y: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`dihedral`."""
    y = y.flip(-1) if k >= 4 else y
    return torch.rot90(y, -(k % 4), dims=(-2, -1))


#: The views of the face self-ensemble: the face and its mirror image (``dihedral`` k = 0, 4).
#: EDSR's 8-way ensemble also rotates by quarter turns; upright faces rotated that way are out
#: of the training distribution and made the held-out CelebA faces 0.03-0.04 dB worse, where
#: the mirror pair gains 0.03 dB (benchmarks/RESULTS.md).
SELF_ENSEMBLE_VIEWS = (0, 4)


def self_ensemble(model: nn.Module, x: torch.Tensor, views: tuple[int, ...] = SELF_ENSEMBLE_VIEWS) -> torch.Tensor:
    """Test-time self-ensemble: the mean of ``model`` over the ``views`` (indices of
    :func:`dihedral`) of ``x``, each turned back; ``len(views)`` forward passes."""
    return torch.stack([undo_dihedral(model(dihedral(x, k)), k).float() for k in views]).mean(0)


def load_model_card(weights_path: str | Path) -> ModelCard:
    """The card beside an fsr export (kept name; reads through :func:`fsr.models.sr.read_card`)."""
    return read_card(weights_path)


def load_generator_file(path: str | Path) -> tuple[nn.Module, ModelCard]:
    """Build and load a generator from an fsr export or BasicSR RRDB weights (:func:`fsr.models.sr.load_sr_model`)."""
    return load_sr_model(path)


def sr_weights_path(spec: str) -> Path | None:
    """The weights file an SR system spec names: ``default`` -> the default model, a PATH, or
    NAME.safetensors in the weights folders; None when there is no such file."""
    if spec == "default":
        return find_weights(f"{DEFAULT_MODEL_NAME}.safetensors")
    candidate = Path(spec).expanduser()
    return candidate if candidate.is_file() else find_weights(f"{spec}.safetensors")


def load_sr_system(spec: str, compute: Compute | None = None) -> SRSystem:
    """Resolve a system spec (``bicubic`` | ``default`` | NAME | PATH) to an :class:`SRSystem`.

    A trailing ``+`` (``default+``, ``fsr_l1+``) asks for the test-time self-ensemble."""
    if spec.endswith("+") and spec != "+":
        system = load_sr_system(spec[:-1], compute)
        if system.model is None:
            raise WeightsError(f"{spec}: the self-ensemble needs a model, not bicubic")
        system.name, system.self_ensemble = spec, True
        return system
    if spec == "bicubic":
        return SRSystem(name="bicubic")
    path = sr_weights_path(spec)
    if path is None and spec == "default":
        raise WeightsError(
            f"default model {DEFAULT_MODEL_NAME}.safetensors not found in the weights folders "
            "(weights/, $FSR_WEIGHTS_DIR); pass --model PATH"
        )
    if path is None:
        raise WeightsError(f"{spec}: no such model file, and no {spec}.safetensors in the weights folders")
    name = path.stem if spec != "default" and Path(spec).expanduser().is_file() else spec
    model, card = load_sr_model(path)
    return SRSystem(name=name, scale=card.scale, model=model, compute=compute, card=card)
