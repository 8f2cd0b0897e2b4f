"""Wall time of short `fsr` commands, where start-up (imports, model loading) is most of the work.

Times each command as a user runs it (a new process through the installed ``fsr`` entry point),
``--repeats`` times, and prints the median and the range beside the machine:

* ``fsr --help``;
* ``fsr upscale`` of one 32 px face crop, ``--mode faces`` (the crop goes straight to the model);
* ``fsr upscale`` of the same crop in the default ``--mode auto`` (MTCNN confirms the face first);
* ``fsr upscale`` of one photo (``--mode photo``: detection, SR of its faces, pasting back).

Also reports which heavy modules a bare ``import fsr.cli`` loads (torch costs about 1.2 s of
start-up on a 2-core CPU, and torchvision, piq and ``torch._dynamo`` about 1.5 s more; the
command line imports torch only for a subcommand, and none of the others at start-up). Usage:

    python benchmarks/startup.py --repeats 5 [--json startup.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fsr.core.device import machine_description

REPO = Path(__file__).resolve().parents[1]
CROP = REPO / "examples" / "faces" / "img1_32.png"
PHOTO = REPO / "examples" / "photos"


def fsr_executable() -> str:
    """The ``fsr`` entry point beside this Python (the installed command a user runs)."""
    found = Path(sys.executable).with_name("fsr")
    return str(found) if found.exists() else shutil.which("fsr") or "fsr"


def time_command(args: list[str], repeats: int, out: Path) -> list[float]:
    """Wall seconds of ``repeats`` fresh runs of ``args`` (``out`` is emptied before each)."""
    seconds = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True, timeout=600)
        seconds.append(time.perf_counter() - start)
    return seconds


def heavy_modules_at_start() -> list[str]:
    """Which of torch, torchvision, piq and torch._dynamo ``import fsr.cli`` loads."""
    probe = ("import sys, fsr.cli; "
             "print(','.join(m for m in ('torch', 'torchvision', 'piq', 'torch._dynamo') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    return [name for name in loaded.stdout.strip().split(",") if name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--photo", type=Path, default=None, help="photo for the photo-mode run (default: the first example photo)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    photo = args.photo or sorted(p for p in PHOTO.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[0]
    fsr = fsr_executable()
    print(machine_description())
    print(f"import fsr.cli loads: {', '.join(heavy_modules_at_start()) or 'none of torch, torchvision, piq, torch._dynamo'}")
    results = {}
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "out"
        commands = {
            "fsr --help": [fsr, "--help"],
            "fsr upscale CROP (--mode faces)": [fsr, "upscale", str(CROP), str(out), "--mode", "faces", "--no-progress"],
            "fsr upscale CROP (--mode auto)": [fsr, "upscale", str(CROP), str(out), "--no-progress"],
            f"fsr upscale {photo.name} (--mode photo)": [fsr, "upscale", str(photo), str(out), "--mode", "photo", "--no-progress"],
        }
        for name, command in commands.items():
            seconds = time_command(command, args.repeats, out)
            results[name] = seconds
            print(f"{name:48s} median {statistics.median(seconds):5.2f} s  "
                  f"(range {min(seconds):.2f}-{max(seconds):.2f} s, {args.repeats} runs)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_description(), "seconds": results}, indent=1))


if __name__ == "__main__":
    main()
