"""SR systems by name: the one path through which upscale, metrics and verify-sweep
super-resolve faces.

A system spec is ``bicubic``, ``default`` (the model shipped in ``weights/``), a model
name found in the weights folders (``NAME`` -> ``NAME.safetensors`` + ``NAME.json``),
or a path to an fsr export (``.safetensors`` with its ``.json`` model card beside it) or
to BasicSR-format RRDB x4 weights (``.pth``: ``params_ema``/``params``/plain state dict).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fsr.core.batching import BatchSizer, run_batched
from fsr.core.device import Compute
from fsr.core.weights import WeightsError, find_weights, load_safetensors, load_torch_checkpoint
from fsr.data.degrade import bicubic_up
from fsr.models.generators import build_generator
from fsr.models.rrdb import rrdb_args_from_state_dict

DEFAULT_MODEL_NAME = "fsr_default"


@dataclass
class SRSystem:
    """Something that turns LR faces into SR faces.

    ``upscale(lr)``: (N, 3, h, w) float in [0, 1] (any device) -> (N, 3, h*scale, w*scale)
    float32 in [0, 1] on the CPU. Batched on ``compute``'s device with OOM back-off.
    """

    name: str
    scale: int = 4
    model: nn.Module | None = None
    compute: Compute | None = None
    card: dict = field(default_factory=dict)
    _sizer: BatchSizer | None = None

    def __post_init__(self) -> None:
        if self.model is not None:
            compute = self.compute or Compute.create("cpu")
            self.compute = compute
            self.model = self.model.to(compute.device).eval()
            if compute.device.type == "cuda":
                self.model = self.model.to(memory_format=torch.channels_last)
            for p in self.model.parameters():
                p.requires_grad_(False)
            self._sizer = BatchSizer(compute.batch_size)

    @torch.inference_mode()
    def _forward(self, lr: torch.Tensor) -> torch.Tensor:
        assert self.compute is not None and self.model is not None
        x = lr.to(self.compute.device, non_blocking=True).float()
        if self.compute.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with self.compute.autocast():
            y = self.model(x)
        return y.float().clamp_(0, 1)

    def upscale(self, lr: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            return bicubic_up(lr.float().cpu(), self.scale)
        assert self._sizer is not None
        return run_batched(self._forward, lr, self._sizer, out_device="cpu")

    __call__ = upscale


def load_model_card(weights_path: Path) -> dict:
    """The JSON model card beside an fsr export (``NAME.json`` next to ``NAME.safetensors``)."""
    card_path = weights_path.with_suffix(".json")
    if not card_path.is_file():
        raise WeightsError(f"{weights_path}: model card {card_path.name} not found beside it")
    try:
        return json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{card_path}: invalid model card JSON ({exc})") from None


def load_generator_file(path: str | Path) -> tuple[nn.Module, dict]:
    """Build and load a generator from an fsr export or BasicSR RRDB weights."""
    path = Path(path)
    if path.suffix == ".safetensors":
        card = load_model_card(path)
        state = load_safetensors(path)
        arch = card.get("architecture", "rrdb")
        args = card.get("arch_args") or (rrdb_args_from_state_dict(state) if arch == "rrdb" else {})
    elif path.suffix in (".pth", ".pt"):
        ckpt = load_torch_checkpoint(path)
        state = ckpt
        if isinstance(ckpt, dict):
            for key in ("params_ema", "params", "state_dict"):
                if key in ckpt and isinstance(ckpt[key], dict):
                    state = ckpt[key]
                    break
        if not isinstance(state, dict) or "conv_first.weight" not in state:
            raise WeightsError(f"{path}: not a BasicSR-format RRDBNet state dict (no 'conv_first.weight')")
        arch, args = "rrdb", rrdb_args_from_state_dict(state)
        card = {"architecture": arch, "arch_args": args, "source": str(path), "scale": 4}
    else:
        raise WeightsError(f"{path}: unsupported model file (expected .safetensors with a .json card, or BasicSR .pth)")
    model = build_generator(arch, **args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{path}: weights do not fit architecture '{arch}' {args} "
            f"(missing {len(missing)} keys e.g. {missing[:2]}, unexpected {len(unexpected)} e.g. {unexpected[:2]})"
        )
    return model, card


def load_sr_system(spec: str, compute: Compute | None = None) -> SRSystem:
    """Resolve a system spec (``bicubic`` | ``default`` | NAME | PATH) to an :class:`SRSystem`."""
    if spec == "bicubic":
        return SRSystem(name="bicubic")
    if spec == "default":
        path = find_weights(f"{DEFAULT_MODEL_NAME}.safetensors")
        if path is None:
            raise WeightsError(
                f"default model {DEFAULT_MODEL_NAME}.safetensors not found in the weights folders "
                "(weights/, $FSR_WEIGHTS_DIR); pass --model PATH"
            )
        name = "default"
    else:
        candidate = Path(spec).expanduser()
        path = candidate if candidate.is_file() else find_weights(f"{spec}.safetensors")
        if path is None:
            raise WeightsError(f"{spec}: no such model file, and no {spec}.safetensors in the weights folders")
        name = candidate.stem if candidate.is_file() else spec
    model, card = load_generator_file(path)
    return SRSystem(name=name, scale=int(card.get("scale", 4)), model=model, compute=compute, card=card)
