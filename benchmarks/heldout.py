"""Quality of SR models on faces they never saw: PSNR, SSIM and dlib identity distance vs bicubic.

Runs ``fsr metrics --data SET --system bicubic --system MODEL...`` on each prepared test set
(by default fsr's held-out CelebA identities prepared at margins 0.1, 0.25 and 0.4, see
``fsr/data/splits/celeba_test_identities.txt``) and prints one table: per set and model, the
PSNR and SSIM gain over bicubic and the change of the mean dlib SR-HR distance, with the
paper's Table 1 rows (CelebA, 32 -> 128) beside it. Writes the figures as JSON and Markdown.

The held-out sets, one per margin M:
  fsr prepare ../shared/data/celeba_train data/celeba_test_mM --only-identities fsr:celeba-test \\
      --split test --margin M

Usage:
  python benchmarks/heldout.py --set celeba_m0.1=data/celeba_test_m0.1 \\
      --set celeba_m0.25=data/celeba_test_m0.25 --set celeba_m0.4=data/celeba_test_m0.4 \\
      --system default --system fsr_l1 --out benchmarks/heldout.json [--write-cards]

``--write-cards`` stores each model's rows (and the paper's Table 1) as ``heldout`` in the
model card beside its weights, so the card carries its figures on unseen faces.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

from fsr.core.device import machine_description
from fsr.models.sr import update_card
from fsr.models.systems import sr_weights_path

#: IP-FSRGAN paper, Table 1 (32 -> 128): PSNR (dB), SSIM of LR (bicubic), SRCNN, SRGAN, ESRGAN, IP-FSRGAN.
PAPER_TABLE1 = {
    "CelebA": {"bicubic": (25.32, 0.778), "SRCNN": (27.49, 0.81), "SRGAN": (27.77, 0.812), "ESRGAN": (26.82, 0.799),
               "IP-FSRGAN": (28.91, 0.845)},
    "LFW": {"bicubic": (26.13, 0.804), "SRCNN": (31.12, 0.893), "SRGAN": (30.66, 0.875), "ESRGAN": (29.05, 0.855),
            "IP-FSRGAN": (32.58, 0.908)},
}


def run_metrics(data: Path, systems: list[str], out: Path, limit: int, threads: int, grid: int = 0,
                lr_jpeg: int = 0) -> dict:
    """One ``fsr metrics`` run (``lr_jpeg``: its ``--lr-jpeg``); returns its metrics_summary.json."""
    cmd = [sys.executable, "-m", "fsr.cli", "metrics", "--data", str(data), "--system", "bicubic",
           *[a for s in systems for a in ("--system", s)], "--out", str(out), "--limit", str(limit),
           "--threads", str(threads), "--grid", str(grid), "--lr-jpeg", str(lr_jpeg)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics_summary.json").read_text())


def gains(summary: dict, system: str) -> dict:
    """A system's figures and its differences to bicubic (dB, SSIM points, relative distance)."""
    ours, base = summary["summary"][system], summary["summary"]["bicubic"]
    row = {"n": ours["n_images"], "psnr": ours["psnr_rgb"], "ssim": ours["ssim"],
           "psnr_gain": ours["psnr_rgb"] - base["psnr_rgb"], "ssim_gain": ours["ssim"] - base["ssim"]}
    if "id_distance" in ours:
        row["id_distance"] = ours["id_distance"]
        row["id_distance_change"] = ours["id_distance"] / base["id_distance"] - 1
    return row


def gain_cells(r: dict) -> str:
    """A row of :func:`gains` as Markdown cells: PSNR, gain, SSIM, gain, dlib distance, change."""
    dist = f"{r['id_distance']:.3f} | {100 * r['id_distance_change']:+.1f}%" if "id_distance" in r else "- | -"
    return f"{r['psnr']:.2f} | {r['psnr_gain']:+.2f} | {r['ssim']:.3f} | {r['ssim_gain']:+.3f} | {dist}"


def markdown(results: dict) -> str:
    lines = ["| set | system | faces | PSNR (dB) | gain | SSIM | gain | dlib distance | change |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for system, r in rows.items():
            lines.append(f"| {name} | {system} | {r['n']} | {gain_cells(r)} |")
    for dataset, rows in PAPER_TABLE1.items():
        base_psnr, base_ssim = rows["bicubic"]
        for system, (psnr, ssim) in rows.items():
            lines.append(f"| {dataset} (paper, Table 1) | {system} | - | {psnr:.2f} | {psnr - base_psnr:+.2f} | "
                         f"{ssim:.3f} | {ssim - base_ssim:+.3f} | - | - |")
    return "\n".join(lines)


def write_figures(out: Path, results: dict, table: str, **context) -> None:
    """The figures as JSON (with the machine and any ``context``) at ``out`` and the Markdown table
    beside it (.md)."""
    out.write_text(json.dumps({"machine": machine_description(), **context, "results": results}, indent=2))
    out.with_suffix(".md").write_text(table + "\n")


def write_cards(results: dict, specs: dict[str, str], command: str) -> list[Path]:
    """Store every model's held-out rows, with bicubic's and the paper's Table 1, in its card.
    ``specs``: the system names fsr metrics reported -> the spec each was given as."""
    written = []
    systems = {s for rows in results.values() for s in rows if s != "bicubic"}
    for system in sorted(systems):
        path = sr_weights_path(specs.get(system, system))
        if path is None:
            print(f"{system}: no weights file found; card not updated", file=sys.stderr)
            continue
        record = {
            "date": date.today().isoformat(), "machine": machine_description(), "command": command,
            "sets": {name: {"model": rows[system], "bicubic": rows["bicubic"]}
                     for name, rows in results.items() if system in rows},
            "paper_table1_psnr_ssim": PAPER_TABLE1,
        }
        update_card(path, heldout=record)
        written.append(path.with_suffix(".json"))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", required=True, help="NAME=PREPARED_DIR (repeatable)")
    parser.add_argument("--system", action="append", default=[], help="SR model besides bicubic (repeatable)")
    parser.add_argument("--limit", type=int, default=0, help="first N faces of each set (0 = all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--work", default="heldout_out", help="folder for the per-set fsr metrics outputs")
    parser.add_argument("--out", default="", help="write the figures to this JSON file (and .md beside it)")
    parser.add_argument("--grid", type=int, default=0, help="also write each set's comparison.png of N faces")
    parser.add_argument("--write-cards", action="store_true", help="store each model's rows in its model card")
    args = parser.parse_args()
    print(f"machine: {machine_description()}")
    results: dict[str, dict] = {}
    specs: dict[str, str] = {}
    for spec in args.set:
        name, _, folder = spec.partition("=")
        summary = run_metrics(Path(folder), args.system, Path(args.work) / name, args.limit, args.threads, args.grid)
        results[name] = {s: gains(summary, s) for s in summary["systems"]}  # the names fsr metrics gave them
        specs.update(summary["source"].get("systems", {}))
        print(f"{name}: " + "; ".join(f"{s} {r['psnr_gain']:+.2f} dB, SSIM {r['ssim_gain']:+.3f}"
                                      for s, r in results[name].items() if s != "bicubic"), flush=True)
    table = markdown(results)
    print(table)
    if args.out:
        write_figures(Path(args.out), results, table)
    if args.write_cards:
        for card in write_cards(results, specs, " ".join(["python", *sys.argv])):
            print(f"card updated: {card}")


if __name__ == "__main__":
    main()
