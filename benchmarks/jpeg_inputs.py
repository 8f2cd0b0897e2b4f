"""SR gain on LR faces stored as JPEG: PSNR, SSIM and dlib distance against bicubic, per quality.

Faces cut from JPEG photos carry 8x8 block and chroma artifacts at the face's own resolution.
For each JPEG quality this runs ``fsr metrics --data SET --lr-jpeg Q --system bicubic --system
MODEL...`` (quality 0: the LR faces as prepared, lossless) and reports each model's gain over
bicubic on the same compressed input: a model that learned only clean inputs sharpens the
blocks along with the face. Prints one table, writes JSON and Markdown (``--out``) and a PNG
plot of the PSNR gain against quality (``--plot``).

    python benchmarks/jpeg_inputs.py --set data/celeba_test_m0.25 --system default --system fsr_jpeg \\
        --quality 0,95,90,75,50,30 --threads 2 --out jpeg.json --plot jpeg.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fsr.core.device import machine_description
from heldout import gain_cells, gains, run_metrics, write_figures


def markdown(results: dict[int, dict]) -> str:
    lines = ["| JPEG quality of the LR face | system | PSNR (dB) | gain | SSIM | gain | dlib distance | change |",
             "|---|---|---|---|---|---|---|---|"]
    for quality, rows in results.items():
        for system, r in rows.items():
            lines.append(f"| {quality or 'lossless'} | {system} | {gain_cells(r)} |")
    return "\n".join(lines)


def plot(results: dict[int, dict], path: Path, title: str) -> None:
    """PSNR gain over bicubic against JPEG quality, one line per model (lossless at the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qualities = sorted(results, key=lambda q: q or 101)
    labels = [str(q) if q else "lossless" for q in qualities]
    systems = [s for s in results[qualities[0]] if s != "bicubic"]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for system in systems:
        ax.plot(range(len(qualities)), [results[q][system]["psnr_gain"] for q in qualities], marker="o", label=system)
    ax.axhline(0.0, color="black", linewidth=0.8, label="bicubic")
    ax.set_xticks(range(len(qualities)), labels)
    ax.set_xlabel("JPEG quality of the 32 px LR face")
    ax.set_ylabel("PSNR gain over bicubic (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", required=True, type=Path, help="prepared test set (fsr prepare output)")
    parser.add_argument("--system", action="append", default=[], help="SR model besides bicubic (repeatable)")
    parser.add_argument("--quality", default="0,95,90,75,50,30", help="JPEG qualities, 0 = the lossless LR faces")
    parser.add_argument("--limit", type=int, default=0, help="first N faces (0 = all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--work", default="jpeg_inputs_out", help="folder for the fsr metrics outputs")
    parser.add_argument("--out", default="", help="write the figures to this JSON file (and .md beside it)")
    parser.add_argument("--plot", default="", help="write the PSNR gain plot to this PNG file")
    args = parser.parse_args()
    print(f"machine: {machine_description()}")
    results: dict[int, dict] = {}
    for quality in (int(q) for q in args.quality.split(",")):
        summary = run_metrics(args.set, args.system, Path(args.work) / f"q{quality}", args.limit, args.threads,
                              lr_jpeg=quality)
        results[quality] = {s: gains(summary, s) for s in summary["systems"]}
        print(f"quality {quality or 'lossless'}: " + "; ".join(
            f"{s} {r['psnr_gain']:+.2f} dB" for s, r in results[quality].items() if s != "bicubic"), flush=True)
    table = markdown(results)
    print(table)
    if args.out:
        write_figures(Path(args.out), {str(q): rows for q, rows in results.items()}, table, set=str(args.set))
    if args.plot:
        plot(results, Path(args.plot), f"{args.set.name}, {next(iter(results.values()))['bicubic']['n']} faces")


if __name__ == "__main__":
    main()
