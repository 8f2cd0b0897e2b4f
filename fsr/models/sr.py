"""The typed SR model: a generator network plus its frozen :class:`ModelCard`.

An fsr export is ``NAME.safetensors`` (the weights) with ``NAME.json`` (the card) beside
it. Every reader and writer of cards goes through this module: :func:`read_card`,
:func:`load_sr_model` and :func:`export_sr_model`. BasicSR-format RRDB x4 weights
(``.pth``) load too, with a card made from their state dict.

The card's ``lr_face_range`` is the measured range of LR face sizes (the detector box's
longer side, in input pixels) on which the model beats the classical bicubic upscale;
``fsr upscale`` and ``fsr verify`` send faces outside it to the classical upscale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsr.core.io import atomic_write_text, write_json
from fsr.core.weights import (
    WeightsError,
    load_safetensors,
    load_torch_checkpoint,
    save_safetensors,
    sha256_file,
)
from fsr.models.generators import build_generator
from fsr.models.rrdb import rrdb_args_from_state_dict

# Card keys read from older cards, and the field they fill.
OLD_KEYS = {"data": "training_data", "lr_size": "input_size"}


@dataclass(frozen=True)
class ModelCard:
    """What an SR export is: architecture, scale, validated face sizes, data, metrics, checksum.

    architecture / arch_args: the generator (``fsr.models.generators``) and its arguments.
    scale: output side / input side. input_size / output_size: the training crop sides.
    lr_face_range: (min, max) LR face box side in pixels where the model was measured to
        beat bicubic; None = never measured (every face is sent to the model).
    training_data, metrics: free-form records. sha256: of the weights file.
    extra: every other key of the JSON card, kept on a round trip.
    """

    architecture: str
    arch_args: dict[str, Any]
    scale: int = 4
    name: str = ""
    input_size: int | None = None
    output_size: int | None = None
    lr_face_range: tuple[float, float] | None = None
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str = "") -> "ModelCard":
        """A card from its JSON form; old keys (``data``, ``lr_size``) are read as their new fields."""
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {key: value for key, value in data.items() if key in known}
        consumed = {old for old, target in OLD_KEYS.items() if old in data and target not in values}
        values.update({OLD_KEYS[old]: data[old] for old in consumed})
        extra = {key: value for key, value in data.items() if key not in known and key not in consumed}
        if "architecture" not in values or "arch_args" not in values:
            raise WeightsError("model card lacks 'architecture' or 'arch_args'")
        if values.get("lr_face_range") is not None:
            low, high = (float(v) for v in values["lr_face_range"])
            if not 0 <= low < high:
                raise WeightsError(f"model card lr_face_range must be [min, max] with 0 <= min < max, got {values['lr_face_range']}")
            values["lr_face_range"] = (low, high)
        values["scale"] = int(values.get("scale", 4))
        values.setdefault("name", name)
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the fields (None / empty ones left out) followed by ``extra``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None or value == {} or value == "":
                continue
            out[f.name] = list(value) if f.name == "lr_face_range" else value
        return {**out, **{k: v for k, v in self.extra.items() if k not in out}}

    def with_changes(self, **changes: Any) -> "ModelCard":
        """A copy with some fields replaced (the card itself is frozen)."""
        return replace(self, **changes)

    @property
    def jpeg_augment(self) -> float:
        """The fraction of training LR faces that were JPEG-compressed (``data.jpeg_augment`` of the
        recipe in the card; 0 for a model trained on lossless faces only, or a card without it)."""
        config = self.extra.get("config") or {}
        return float((config.get("data") or {}).get("jpeg_augment", 0.0) or 0.0)

    def admits(self, face_side: float) -> bool:
        """Whether an LR face of box side ``face_side`` px lies in the validated range."""
        if self.lr_face_range is None:
            return True
        low, high = self.lr_face_range
        return low <= face_side <= high


def card_path_for(weights_path: str | Path) -> Path:
    """``NAME.safetensors`` -> ``NAME.json``."""
    return Path(weights_path).with_suffix(".json")


def read_card(weights_path: str | Path) -> ModelCard:
    """The card beside an fsr export; a one-line :class:`WeightsError` when missing or invalid."""
    weights_path = Path(weights_path)
    card_path = card_path_for(weights_path)
    if not card_path.is_file():
        raise WeightsError(f"{weights_path}: model card {card_path.name} not found beside it")
    try:
        data = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{card_path}: invalid model card JSON ({exc})") from None
    try:
        return ModelCard.from_dict(data, name=weights_path.stem)
    except WeightsError as exc:
        raise WeightsError(f"{card_path}: {exc}") from None


def update_card(weights_path: str | Path, **changes: Any) -> ModelCard:
    """Set fields of the card beside an fsr export (e.g. a measured ``lr_face_range``) in place.

    The card keeps its key order and indentation (new keys go last); written atomically.
    """
    card_path = card_path_for(weights_path)
    text = card_path.read_text()
    data = json.loads(text)
    merged = {**data, **{k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}}
    card = ModelCard.from_dict(merged, name=Path(weights_path).stem)
    indent = 1 if text.startswith('{\n "') else 2
    atomic_write_text(card_path, json.dumps(merged, indent=indent, ensure_ascii=False) + "\n")
    return card


def _basicsr_state(path: Path) -> dict[str, torch.Tensor]:
    """The RRDBNet state dict inside a BasicSR checkpoint (``params_ema`` / ``params`` / plain)."""
    ckpt = load_torch_checkpoint(path)
    state = ckpt
    if isinstance(ckpt, dict):
        for key in ("params_ema", "params", "state_dict"):
            if key in ckpt and isinstance(ckpt[key], dict):
                state = ckpt[key]
                break
    if not isinstance(state, dict) or "conv_first.weight" not in state:
        raise WeightsError(f"{path}: not a BasicSR-format RRDBNet state dict (no 'conv_first.weight')")
    return state


def load_sr_model(path: str | Path) -> tuple[nn.Module, ModelCard]:
    """Build and load a generator from an fsr export or BasicSR RRDB weights, with its card."""
    path = Path(path)
    if path.suffix == ".safetensors":
        card = read_card(path)
        state = load_safetensors(path)
        if not card.arch_args and card.architecture == "rrdb":
            card = card.with_changes(arch_args=rrdb_args_from_state_dict(state))
        if not card.sha256:  # a hand-written card: the checksum identifies the weights in records
            card = card.with_changes(sha256=sha256_file(path))
    elif path.suffix in (".pth", ".pt"):
        state = _basicsr_state(path)
        card = ModelCard("rrdb", rrdb_args_from_state_dict(state), scale=4, name=path.stem,
                         sha256=sha256_file(path), extra={"source": str(path)})
    else:
        raise WeightsError(f"{path}: unsupported model file (expected .safetensors with a .json card, or BasicSR .pth)")
    model = build_generator(card.architecture, **card.arch_args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{path}: weights do not fit architecture '{card.architecture}' {card.arch_args} "
            f"(missing {len(missing)} keys e.g. {missing[:2]}, unexpected {len(unexpected)} e.g. {unexpected[:2]})"
        )
    return model, card


def export_sr_model(tensors: dict[str, torch.Tensor], out_path: str | Path, card: ModelCard) -> tuple[Path, Path]:
    """Write ``NAME.safetensors`` + ``NAME.json``; the card gets the weights' SHA-256.

    The weights are written first and the card last, both atomically. Returns both paths.
    """
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        out_path = out_path.with_name(out_path.name + ".safetensors")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    digest = save_safetensors(tensors, out_path, metadata={"format": "pt", "architecture": card.architecture},
                              record_digest=True)
    card_path = card_path_for(out_path)
    write_json(card_path, card.with_changes(sha256=digest).to_dict())
    return out_path, card_path
