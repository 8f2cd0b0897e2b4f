"""What a larger input buys: bicubic from the HR face shrunk to S px, beside the SR models.

For each prepared set (``fsr prepare`` output; 128x128 HR faces, 32x32 LR), every HR face is
shrunk to S x S px (antialiased bicubic, rounded to 8 bits) and brought back to 128 px by
bicubic; the SR models run on the set's 32 px LR faces as in ``fsr metrics --data``. All are
scored the same way as ``fsr metrics --data``: PSNR and SSIM on RGB, and the dlib SR-HR
distance on faces aligned with the prepared landmarks. The rows read as "an SR model from a
32 px face is worth a bicubic upscale from an S px face" in pixels and, separately, in identity.

Usage:
  python benchmarks/larger_input.py --set celeba_m0.25=data/celeba_test_m0.25 \\
      --system default --system fsr_deep --sizes 40,48,56,64 --out larger_input.json
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch

from fsr.core.device import Compute, machine_description
from fsr.core.resize import resize_bicubic
from fsr.data.degrade import quantise_8bit
from fsr.evaluate.identity import FaceEmbedder, load_face_model
from fsr.evaluate.metrics import Chunk, evaluate_chunks, prepared_chunks, select_records
from fsr.models.systems import load_sr_system
from heldout import gains, write_figures  # benchmarks/ is on sys.path when this script runs


def bicubic_from(hr: torch.Tensor, size: int) -> torch.Tensor:
    """HR (N, 3, H, W) in [0, 1] -> shrunk to ``size`` px, 8-bit, bicubic back to H x W, 8-bit."""
    small = quantise_8bit(resize_bicubic(hr, size).clamp(0, 1))
    return quantise_8bit(resize_bicubic(small, tuple(hr.shape[-2:])).clamp(0, 1))


def with_larger_inputs(chunks: Iterator[Chunk], sizes: list[int]) -> Iterator[Chunk]:
    """The prepared set's chunks (the SR systems already run on their LR faces) with the
    bicubic-from-S-px references added beside them."""
    for chunk in chunks:
        chunk.outputs.update({f"bicubic from {s} px": bicubic_from(chunk.hr, s) for s in sizes})
        yield chunk


def measure_set(data: Path, systems: dict, sizes: list[int], embedder: FaceEmbedder, limit: int = 0) -> dict:
    """name -> PSNR, SSIM, dlib distance and their change against bicubic from the 32 px LR
    (rows as :func:`heldout.gains` makes them)."""
    records = select_records(data, limit=limit)
    chunks = with_larger_inputs(prepared_chunks(data, records, systems, 128, skipped=[]), sizes)
    names = list(systems) + [f"bicubic from {s} px" for s in sizes]
    report = evaluate_chunks(chunks, names, len(records), embedder, show_progress=False)
    summary = {"summary": report.summary()}
    return {name: gains(summary, name) for name in names}


def markdown(results: dict) -> str:
    lines = ["| set | system | PSNR (dB) | gain | SSIM | gain | dlib distance | change |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for system, r in rows.items():
            lines.append(f"| {name} | {system} | {r['psnr']:.2f} | {r['psnr_gain']:+.2f} | {r['ssim']:.3f} | "
                         f"{r['ssim_gain']:+.3f} | {r['id_distance']:.3f} | {100 * r['id_distance_change']:+.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", required=True, help="NAME=PREPARED_DIR (repeatable)")
    parser.add_argument("--system", action="append", default=[], help="SR model besides bicubic (repeatable)")
    parser.add_argument("--sizes", default="40,48,56,64", help="input sides S (px) of the bicubic references")
    parser.add_argument("--limit", type=int, default=0, help="first N faces of each set (0 = all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="", help="write the figures to this JSON file (and .md beside it)")
    args = parser.parse_args()
    compute = Compute.create("cpu", "fp32", threads=args.threads or None)
    print(f"machine: {machine_description()}")
    systems = {spec: load_sr_system(spec, compute) for spec in ["bicubic", *args.system]}
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    embedder = FaceEmbedder(load_face_model("dlib", None, compute), compute)
    results = {}
    for spec in args.set:
        name, _, folder = spec.partition("=")
        results[name] = measure_set(Path(folder), systems, sizes, embedder, args.limit)
        print(f"{name}: done", flush=True)
    table = markdown(results)
    print(table)
    if args.out:
        write_figures(Path(args.out), results, table)


if __name__ == "__main__":
    main()
