"""The fixed errors of SR models side by side: the 4x4 sub-pixel pattern (``fsr.models.phase``)
and colour shift.

For each model: the peak-to-peak (grey levels, 0..255) of the 16 phase means of SR - bicubic on
flat grey LR images at 0.2 / 0.5 / 0.8 (0 for a model without a fixed pattern), and on a prepared
set of faces the peak-to-peak of the mean SR - HR pattern (real SR has none: HR - bicubic gives
about 0.06), the PSNR, the mean SR - HR per colour channel, and each face's colour shift
(:func:`fsr.evaluate.metrics.colour_shift`, mean and largest over the faces). Prints a table and
the machine; ``--json`` writes the figures.

Usage:
  python benchmarks/subpixel_pattern.py --data scratch/celeba_test_m0.25 \\
      --models default,fsr_deep,fsr_ipfsrgan,fsr_verify [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fsr.core.device import Compute, machine_description
from fsr.data.dataset import load_face_arrays
from fsr.evaluate.metrics import colour_shift, pixel_metrics
from fsr.models.phase import flat_field_range, peak_to_peak_grey_levels, phase_means
from fsr.models.systems import load_sr_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared set (fsr prepare folder) of faces with HR and LR")
    parser.add_argument("--models", default="default,fsr_deep,fsr_ipfsrgan", help="comma-separated names or paths")
    parser.add_argument("--faces", type=int, default=0, help="use the first N faces (0 = all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faces = load_face_arrays(args.data, with_lr=True, max_faces=args.faces)
    lr = torch.from_numpy(faces.lr).permute(0, 3, 1, 2).float() / 255
    hr = torch.from_numpy(faces.hr).permute(0, 3, 1, 2).float() / 255
    compute = Compute.create("cpu")
    rows = {}
    for spec in ["bicubic"] + [m for m in args.models.split(",") if m]:
        system = load_sr_system(spec, compute)
        sr = system.upscale(lr)
        pattern = phase_means(sr - hr)  # unclamped, as fsr.models.phase measures it
        sr = sr.clamp(0, 1)
        shift = colour_shift(sr, hr)
        rows[spec] = {
            "flat_field_range_grey_levels": [round(v, 3) for v in flat_field_range(system.upscale)],
            "face_pattern_peak_to_peak_grey_levels": round(peak_to_peak_grey_levels(pattern), 3),
            "psnr_rgb": round(float(pixel_metrics(sr, hr)["psnr_rgb"].mean()), 3),
            "mean_error_rgb_grey_levels": [round(float(v), 3) for v in (sr - hr).mean(dim=(0, 2, 3)) * 255],
            "colour_shift_grey_levels_mean_max": [round(float(shift.mean()), 3), round(float(shift.max()), 3)],
        }
    table = Table(title=f"fixed 4x4 sub-pixel pattern and colour ({len(lr)} faces of {args.data})")
    for column in ("model", "flat 0.2 / 0.5 / 0.8 (p-p)", "mean pattern on faces (p-p)", "PSNR (dB)",
                   "mean SR - HR, R / G / B", "colour shift per face, mean / max"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for spec, row in rows.items():
        table.add_row(spec, " / ".join(f"{v:.2f}" for v in row["flat_field_range_grey_levels"]),
                      f"{row['face_pattern_peak_to_peak_grey_levels']:.2f}", f"{row['psnr_rgb']:.3f}",
                      " / ".join(f"{v:+.2f}" for v in row["mean_error_rgb_grey_levels"]),
                      " / ".join(f"{v:.2f}" for v in row["colour_shift_grey_levels_mean_max"]))
    console = Console()
    console.print(table)
    machine = machine_description()
    console.print(f"machine: {machine}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "data": args.data, "faces": len(lr), "models": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
