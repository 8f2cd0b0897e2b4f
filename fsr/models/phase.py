"""The fixed sub-pixel pattern of a pixel-shuffle generator, and its removal.

A x4 pixel-shuffle upsampler (``RRDBNet(upsampler="pixelshuffle")``) computes each of the 16
output phases (the pixel's position in its 4x4 cell) with its own filters and bias. A generator
trained with the identity (Eq. 5) or adversarial loss learns phases that differ by a constant:
every output then carries the same faint 4x4 grid (about 2 grey levels peak to peak for the
identity fine-tune, 4 for the GAN model, on real faces; more on flat areas), which the pixel loss
alone does not leave. Real 4x SR has no such pattern: averaged over many faces, HR minus the
bicubic upscale has phase means within 0.06 grey levels of each other.

:func:`phase_pattern` measures the pattern as the mean, per colour and phase, of SR - HR over a
set of faces (minus its mean over the phases); :func:`remove_phase_pattern` subtracts it from the
upsampler's bias, which shifts every output pixel of that phase and colour by the same amount
and leaves everything else as it was. ``python -m fsr.models.phase SRC OUT --data DIR...``
does both on a prepared training set and writes a new export whose card records the correction.
Better still, the pattern need not form: ``fsr train`` with ``loss.phase`` adds the mean square
of each batch's :func:`phase_means` to the generator loss (``fsr.train.step``).
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch

from fsr.core.device import Compute
from fsr.core.resize import bicubic_up
from fsr.core.weights import load_safetensors, sha256_file
from fsr.data.dataset import load_face_arrays
from fsr.models.sr import export_sr_model, read_card
from fsr.models.systems import load_sr_system

SCALE = 4
BIAS_KEY = "conv_up_ps.bias"


def phase_means(residual: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """(N, C, H, W) residuals -> (C, scale, scale): the mean over faces and cells at each phase,
    minus its mean over the phases (what a constant offset per phase would explain)."""
    n, c, h, w = residual.shape
    if h % scale or w % scale:
        raise ValueError(f"image side {h}x{w} is not a multiple of {scale}")
    cells = residual.reshape(n, c, h // scale, scale, w // scale, scale)
    means = cells.mean(dim=(0, 2, 4)).double()
    return (means - means.mean(dim=(1, 2), keepdim=True)).float()


def phase_pattern(upscale, lr: torch.Tensor, hr: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """(C, 4, 4) fixed pattern of ``upscale`` (LR (N, 3, h, w) in [0, 1] -> SR (N, 3, 4h, 4w)) on
    faces ``lr`` with ground truth ``hr``: :func:`phase_means` of SR - HR, in [0, 1] units."""
    total = None
    for i in range(0, lr.shape[0], batch):
        sr = upscale(lr[i:i + batch]).float().cpu()
        part = phase_means(sr - hr[i:i + batch].float()) * sr.shape[0]
        total = part if total is None else total + part
    return total / lr.shape[0]


def peak_to_peak_grey_levels(pattern: torch.Tensor) -> float:
    """Largest minus smallest value of a (C, 4, 4) pattern in [0, 1] units, in grey levels (0..255)."""
    return float((pattern.amax() - pattern.amin()) * 255)


def flat_field_range(upscale, levels: tuple[float, ...] = (0.2, 0.5, 0.8), side: int = 48) -> list[float]:
    """Peak-to-peak (grey levels, 0..255; the largest over the colours) of the phase means of
    SR - bicubic on flat grey LR images, one per level, away from the borders: 0 for a generator
    without a fixed pattern."""
    ranges = []
    for level in levels:
        flat = torch.full((1, 3, side, side), float(level))
        residual = upscale(flat).float().cpu() - bicubic_up(flat, SCALE)
        cells = phase_means(residual[:, :, 32:-32, 32:-32]) * 255
        ranges.append(float((cells.amax(dim=(1, 2)) - cells.amin(dim=(1, 2))).max()))
    return ranges


def remove_phase_pattern(state: dict[str, torch.Tensor], pattern: torch.Tensor) -> dict[str, torch.Tensor]:
    """A copy of a pixel-shuffle generator's state with ``pattern`` ((C, 4, 4), [0, 1] units)
    subtracted from its upsampler bias (output channel c * 16 + phase, PixelShuffle's order)."""
    if BIAS_KEY not in state:
        raise ValueError("not a pixel-shuffle generator (no conv_up_ps.bias): the phase correction applies to "
                         "RRDBNet(upsampler='pixelshuffle') only")
    bias = state[BIAS_KEY]
    if bias.numel() != pattern.numel():
        raise ValueError(f"pattern has {pattern.numel()} values, the upsampler bias {bias.numel()}")
    out = dict(state)
    out[BIAS_KEY] = (bias.float() - pattern.reshape(-1).to(bias.device)).to(bias.dtype)
    return out


def _training_faces(data: list[str], per_set: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    lrs, hrs = [], []
    for d in data:
        faces = load_face_arrays(d, with_lr=True, splits=("train",))
        idx = np.sort(np.random.default_rng(seed).permutation(len(faces))[:per_set])
        lrs.append(torch.from_numpy(faces.lr[idx]).permute(0, 3, 1, 2).float() / 255)
        hrs.append(torch.from_numpy(faces.hr[idx]).permute(0, 3, 1, 2).float() / 255)
    return torch.cat(lrs), torch.cat(hrs)


def correct_export(src: str | Path, out: str | Path, data: list[str], per_set: int = 600, seed: int = 0,
                   command: str = "") -> dict:
    """Measure ``src``'s pattern on ``per_set`` training faces of each prepared set in ``data``
    (their ``train`` split), subtract it, and write ``out`` (+ card: ``src``'s card with a
    ``phase_correction`` record). Returns that record."""
    src, out = Path(src), Path(out)
    lr, hr = _training_faces(data, per_set, seed)
    system = load_sr_system(str(src), Compute.create("cpu"))
    pattern = phase_pattern(system.upscale, lr, hr)
    before = flat_field_range(system.upscale)
    state = remove_phase_pattern(load_safetensors(src), pattern)
    card = read_card(src)
    record = {
        "what": "the mean 4x4 sub-pixel pattern of SR - HR on training faces (per colour and phase, minus its "
                "phase mean), subtracted from the upsampler bias (fsr.models.phase)",
        "uncorrected_sha256": sha256_file(src),
        "faces": int(lr.shape[0]),
        "data": [f"{d} (train split, {per_set} faces, seed {seed})" for d in data],
        "pattern_grey_levels": [[[round(float(v) * 255, 3) for v in row] for row in colour] for colour in pattern],
        "pattern_peak_to_peak_grey_levels": round(peak_to_peak_grey_levels(pattern), 3),
        "flat_field_range_before": [round(v, 3) for v in before],
        "date": date.today().isoformat(),
        "command": command,
    }
    system.model.load_state_dict(state)  # the corrected generator, measured before it is written
    record["flat_field_range_after"] = [round(v, 3) for v in flat_field_range(system.upscale)]
    export_sr_model(state, out, card.with_changes(extra={**card.extra, "phase_correction": record}))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsr.models.phase", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="an fsr export (.safetensors with its .json card), pixel-shuffle RRDB")
    parser.add_argument("out", help="where to write the corrected export (.safetensors; its card beside it)")
    parser.add_argument("--data", nargs="+", required=True, help="prepared training sets (fsr prepare folders or .npz)")
    parser.add_argument("--faces", type=int, default=600, help="training faces per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if Path(args.out).resolve() == Path(args.src).resolve():
        print(f"error: {args.out}: would overwrite the input", file=sys.stderr)
        return 2
    command = "python -m fsr.models.phase " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        record = correct_export(args.src, args.out, args.data, args.faces, args.seed, command)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: pattern {record['pattern_peak_to_peak_grey_levels']:.2f} grey levels peak to peak removed; "
          f"flat-field range {record['flat_field_range_before']} -> {record['flat_field_range_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
