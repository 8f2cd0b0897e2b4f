"""Network interpolation of two generators (ESRGAN, Wang et al. 2018, Sec. 3.4).

    θ = (1 - t) · θ_A + t · θ_B

A and B must be fsr exports of the same architecture, typically one model fine-tuned from
the other (for example a PSNR-oriented L1 model and its identity-loss fine-tune): t trades
A's pixel fidelity for B's identity preservation (or GAN texture) without retraining.
The result is a normal fsr export (``NAME.safetensors`` + ``NAME.json``) whose card records
both inputs, their SHA-256 and t.

    python -m fsr.models.interpolate A.safetensors B.safetensors --weight 0.5 --out C.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fsr.core.weights import load_safetensors, sha256_file
from fsr.models.sr import ModelCard, export_sr_model, read_card


class InterpolationError(ValueError):
    """Two generators that cannot be interpolated (other architecture, keys or shapes)."""


def interpolate_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
    """(1 - weight) · a + weight · b for every floating-point tensor (computed in float32);
    other tensors (integer buffers) must be equal and are copied from ``a``."""
    if not 0.0 <= weight <= 1.0:
        raise InterpolationError(f"weight must be in [0, 1], got {weight}")
    if a.keys() != b.keys():
        only = sorted(set(a) ^ set(b))
        raise InterpolationError(f"the two generators have different parameters (e.g. {only[:2]})")
    out = {}
    for key, ta in a.items():
        tb = b[key]
        if ta.shape != tb.shape:
            raise InterpolationError(f"{key}: shapes differ ({tuple(ta.shape)} vs {tuple(tb.shape)})")
        if ta.is_floating_point():
            out[key] = ((1.0 - weight) * ta.float() + weight * tb.float()).to(ta.dtype).contiguous()
        elif torch.equal(ta, tb):
            out[key] = ta.clone()
        else:
            raise InterpolationError(f"{key}: integer tensors differ and cannot be interpolated")
    return out


def interpolate_exports(path_a: str | Path, path_b: str | Path, weight: float, out_path: str | Path) -> tuple[Path, Path]:
    """Interpolate two fsr exports into ``out_path`` (+ its card); returns (weights, card) paths."""
    path_a, path_b = Path(path_a), Path(path_b)
    card_a, card_b = read_card(path_a), read_card(path_b)
    for key in ("architecture", "arch_args", "scale"):
        if getattr(card_a, key) != getattr(card_b, key):
            raise InterpolationError(
                f"{key} differs: {getattr(card_a, key)} ({path_a.name}) vs {getattr(card_b, key)} ({path_b.name})"
            )
    state = interpolate_states(load_safetensors(path_a), load_safetensors(path_b), weight)
    interpolation = {
        "formula": "(1 - weight) * A + weight * B (ESRGAN network interpolation)",
        "weight": weight,
        "A": {"file": path_a.name, "sha256": sha256_file(path_a), "card": card_a.to_dict()},
        "B": {"file": path_b.name, "sha256": sha256_file(path_b), "card": card_b.to_dict()},
        "command": f"python -m fsr.models.interpolate {path_a} {path_b} --weight {weight:g} --out {out_path}",
    }
    card = ModelCard(
        card_a.architecture, card_a.arch_args, scale=card_a.scale, name=Path(out_path).stem,
        input_size=card_a.input_size, output_size=card_a.output_size, extra={"interpolation": interpolation},
    )
    return export_sr_model(state, out_path, card)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="first fsr export (.safetensors with its .json card): weight 0")
    parser.add_argument("b", type=Path, help="second fsr export of the same architecture: weight 1")
    parser.add_argument("--weight", type=float, default=0.5, help="t in [0, 1] (default 0.5)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors (its .json card is written beside it)")
    args = parser.parse_args(argv)
    try:
        weights, card = interpolate_exports(args.a, args.b, args.weight, args.out)
    except (InterpolationError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {weights} and {card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
