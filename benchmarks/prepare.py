"""Speed of `fsr prepare` on LFW: images per second, detection alone and end to end.

    python benchmarks/prepare.py [--device auto|cpu|cuda] [--images 1024] [--batch-size 64]

* detect: MTCNN on decoded 250x250 LFW images, batches of --batch-size (decoding not timed);
* prepare: the whole ``prepare_dataset`` pipeline (decode in --workers threads, detect,
  crop, bicubic LR, two PNG writes per face, journal) into a temporary folder.

Targets: >= 60 images/s on a 2-core CPU, >= 2,000 images/s on an H100/H200.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from fsr.core.device import Compute, machine_description, synchronize
from fsr.core.io import read_image
from fsr.data.prepare import PrepareConfig, prepare_dataset
from fsr.detect.mtcnn import MTCNN
from compute_args import add_compute_arguments

REPO = Path(__file__).resolve().parents[1]

LFW = REPO.parent / "shared" / "data" / "lfw" / "lfw-deepfunneled"


def bench_detect(files: list[Path], compute: Compute, repeats: int) -> tuple[float, float]:
    detector = MTCNN.load(compute)
    images = [read_image(p).rgb_uint8() for p in files]
    batch = compute.batch_size
    detector.detect(images[:batch])  # warm-up (cuDNN autotune, allocator)
    synchronize(compute.device)
    best, cpu_per_image = 0.0, float("inf")
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(0, len(images), batch):
            detector.detect(images[i : i + batch])
        synchronize(compute.device)
        best = max(best, len(images) / (time.perf_counter() - start))
        cpu_per_image = min(cpu_per_image, (time.process_time() - cpu_start) / len(images))
    return best, cpu_per_image


def bench_prepare(files: list[Path], compute: Compute, workers: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="fsr-bench-") as tmp:
        src = Path(tmp) / "src"
        for path in files:
            link = src / path.parent.name / path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
        start, cpu_start = time.perf_counter(), time.process_time()
        summary = prepare_dataset(src, Path(tmp) / "out", PrepareConfig(workers=workers, split="test"), compute, progress=False)
        seconds = time.perf_counter() - start
        return len(files) / seconds, (time.process_time() - cpu_start) / len(files), summary.yield_fraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_compute_arguments(parser, batch_size=None, batch_help="images per detection batch (default 64 CPU, 1024 GPU)", precision=None)
    parser.add_argument("--images", type=int, default=1024, help="number of LFW images (sorted list, spread evenly)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode/write threads for the prepare pipeline")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of the detection benchmark (best kept)")
    parser.add_argument("--mode", choices=("both", "detect", "prepare"), default="both")
    parser.add_argument("--lfw", type=Path, default=LFW, help="folder of LFW images (Name/Name_000N.jpg); default ../shared/data/lfw/lfw-deepfunneled")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    device_probe = Compute.create(args.device)
    batch = args.batch_size or (1024 if device_probe.device.type == "cuda" else 64)
    compute = Compute.create(args.device, "fp32", batch_size=batch, threads=args.threads or None)
    all_files = sorted(args.lfw.glob("*/*.jpg"))
    if not all_files:
        raise SystemExit(f"{args.lfw}: no LFW images (Name/Name_000N.jpg)")
    step = max(1, len(all_files) // args.images)
    files = all_files[::step][: args.images]

    print(f"machine: {machine_description()}")
    print(f"compute: {compute.describe()}, batch {batch}, workers {args.workers}, {len(files)} LFW images (250x250)")
    figures: dict = {"machine": machine_description(), "compute": compute.describe(), "batch": batch, "workers": args.workers, "images": len(files)}
    if args.mode in ("both", "detect"):
        rate, cpu = bench_detect(files, compute, args.repeats)
        figures.update(detect_images_per_s=rate, detect_cpu_ms_per_image=1000 * cpu)
        print(f"detect  (MTCNN only, decoded images): {rate:8.1f} images/s  ({1000 * cpu:.1f} CPU-ms per image)")
    if args.mode in ("both", "prepare"):
        rate, cpu, yield_fraction = bench_prepare(files, compute, args.workers)
        figures.update(prepare_images_per_s=rate, prepare_cpu_ms_per_image=1000 * cpu, prepare_yield=yield_fraction)
        print(f"prepare (end to end, decode..PNG):     {rate:8.1f} images/s  ({1000 * cpu:.1f} CPU-ms per image, yield {100 * yield_fraction:.2f}%)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end: {load:.1f} on {os.cpu_count()} cores (wall-clock rates need an idle machine;")
    print("  CPU-ms per image stays meaningful when it is shared: cores * 1000 / CPU-ms bounds an idle machine's rate)")
    print("targets: >= 60 images/s on a 2-core CPU; >= 2,000 images/s on an H100/H200")


if __name__ == "__main__":
    main()
