"""VGG19 feature extractor for the perceptual loss (Eq. 6), from a user-supplied checkpoint.

No ImageNet VGG weights ship with fsr or any package it installs: pass a torchvision VGG19
state dict (``vgg19-dcbb9e9d.pth`` from torchvision's model zoo) with ``--vgg-weights``. It is
read with ``torch.load(weights_only=True)``; nothing is unpickled.

Layers are named ``convB_K`` / ``reluB_K`` / ``poolB`` (B block 1-5, K conv 1-4);
``conv5_4`` (before its ReLU) is ESRGAN's and the IP-FSRGAN public code's choice.
Input: (N, 3, H, W) RGB in [0, 1]; ImageNet mean/std normalisation is applied inside.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fsr.core.weights import WeightsError, load_torch_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BLOCK_CONVS = (2, 2, 4, 4, 4)


def vgg19_layer_names() -> list[str]:
    """Names of torchvision ``vgg19().features`` modules in order (conv1_1, relu1_1, ..., pool5)."""
    names: list[str] = []
    for block, convs in enumerate(_BLOCK_CONVS, start=1):
        for k in range(1, convs + 1):
            names += [f"conv{block}_{k}", f"relu{block}_{k}"]
        names.append(f"pool{block}")
    return names


MISSING_VGG_HELP = (
    "the VGG perceptual loss needs a torchvision VGG19 checkpoint (e.g. vgg19-dcbb9e9d.pth): "
    "pass --vgg-weights PATH, or choose --perceptual identity (identity-network features) "
    "or --perceptual none explicitly"
)


class VGG19Features(nn.Module):
    """Frozen VGG19 ``features`` up to the deepest requested layer.

    ``forward(x)`` -> list of feature maps, one per name in ``layers`` (in the order given).
    ``state_dict`` None builds random weights: for speed benchmarks and tests only.
    """

    def __init__(self, layers: tuple[str, ...] | list[str] = ("conv5_4",), state_dict: dict | None = None,
                 normalize_input: bool = True) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        names = vgg19_layer_names()
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise ValueError(f"unknown VGG19 layer(s) {unknown}; known: {', '.join(names)}")
        self.layers = tuple(layers)
        self._indices = [names.index(name) for name in self.layers]
        # torchvision's vgg19().features (config "E", no batch norm); the classifier is never built
        self.features = make_layers(cfgs["E"], batch_norm=False)[: max(self._indices) + 1]
        if state_dict is not None:
            # only the layers up to the deepest requested one are needed (and loaded)
            wanted = {k[len("features."):]: v for k, v in state_dict.items() if k.startswith("features.")}
            needed = set(self.features.state_dict())
            missing = sorted(needed - set(wanted))
            if missing:
                raise WeightsError(f"not a torchvision VGG19 state dict (missing features.{missing[0]} and {len(missing) - 1} more)")
            try:
                self.features.load_state_dict({k: wanted[k] for k in needed})
            except RuntimeError as exc:
                raise WeightsError(f"not a torchvision VGG19 state dict ({str(exc).splitlines()[-1].strip()})") from None
        # in-place ReLUs would overwrite a conv output that is requested "before ReLU"
        for module in self.features:
            if isinstance(module, nn.ReLU):
                module.inplace = False
        self.normalize_input = normalize_input
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | None, layers=("conv5_4",)) -> "VGG19Features":
        """Load from a torchvision VGG19 checkpoint; a one-line :class:`WeightsError` when missing/wrong."""
        if not path:
            raise WeightsError(MISSING_VGG_HELP)
        path = Path(path).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: VGG19 checkpoint not found; {MISSING_VGG_HELP}")
        state = load_torch_checkpoint(path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or "features.0.weight" not in state:
            raise WeightsError(f"{path}: not a torchvision VGG19 state dict (no 'features.0.weight')")
        try:
            return cls(layers, state_dict=state)
        except WeightsError as exc:
            raise WeightsError(f"{path}: {exc}") from None

    def train(self, mode: bool = True) -> "VGG19Features":  # always frozen, always eval
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.normalize_input:
            x = (x - self.mean) / self.std
        wanted = {index: i for i, index in enumerate(self._indices)}
        outputs: list[torch.Tensor | None] = [None] * len(self._indices)
        for index, module in enumerate(self.features):
            x = module(x)
            if index in wanted:
                outputs[wanted[index]] = x
        return outputs  # type: ignore[return-value]
