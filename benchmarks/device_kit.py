"""Pack what the GPU checks need into one folder of at most 64 MiB, to copy to a GPU machine.

    python benchmarks/device_kit.py --prepared scratch/lfw --out device_kit     # here
    python benchmarks/device_kit.py --unpack device_kit                          # there

A GPU machine with a copy of the repository only (not ../shared) gets the data the
benchmarks read in the kit, which `benchmarks/device_checks.sh` then uses:

* ``data/``: a small copy of ``../shared/data`` for the prepare benchmark and
  ``tests/test_cuda.py`` (``FSR_SHARED_DATA=device_kit/data``): ``--images`` LFW photos
  (250x250 JPEG, spread evenly over the sorted list, the selection `benchmarks/prepare.py`
  makes), the photos of the LFW people those tests use, the LFW photos of the MTCNN parity
  subset and ``reference/mtcnn_reference.json``;
* ``lfw_pairs/``: the faces of every image LFW ``pairs.txt`` names, taken from a prepared set
  (``fsr prepare`` of LFW): the 32x32 LR faces byte for byte (so every SR curve of the sweep
  is exactly the one the full set gives), the manifest and ``pairs.txt``. The 128x128 HR
  faces do not fit (the repository itself is about 30 MiB): ``--unpack`` writes stand-ins
  there (bicubic x4 of the LR faces), which time the HR reference line exactly but make its
  accuracy meaningless;
* ``wheels/``: Python packages fsr needs that the device image lacks (piq), fetched with pip
  here when missing (``--wheels-from`` takes a folder of wheels instead).

``KIT.json`` lists the contents, their sizes and the sources. The kit folder is ignored by
git (``.gitignore``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from fsr.core.io import read_image, write_image
from fsr.data.manifest import read_manifest, write_manifest
from fsr.evaluate.sweep import match_records
from fsr.evaluate.verification import read_pairs

REPO = Path(__file__).resolve().parents[1]

SHARED = REPO.parent / "shared" / "data"
LIMIT_BYTES = 64 * 2**20
DEVICE_WHEELS = ("piq==0.8.0",)  # the device image has torch, typer, rich, opencv, safetensors, matplotlib


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def pack_data(shared: Path, out: Path, count: int) -> int:
    """The spread LFW photos, the test people's photos, the parity subset and its reference."""
    from tests.test_cuda import LFW_NAMES

    lfw = shared / "lfw" / "lfw-deepfunneled"
    files = sorted(lfw.glob("*/*.jpg"))
    step = max(1, len(files) // count)
    chosen = set(files[::step][:count])
    chosen |= {p for name in LFW_NAMES for p in (lfw / name).glob("*.jpg")}
    reference = shared / "reference" / "mtcnn_reference.json"
    keys = [k for k in sorted(json.loads(reference.read_text())["detections"]) if k.startswith("lfw/")]
    chosen |= {lfw / k[4:] for k in keys[::10]}
    for path in sorted(chosen):
        target = out / "lfw" / "lfw-deepfunneled" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    (out / "reference").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(reference, out / "reference" / reference.name)
    return len(chosen)


def pack_pairs(prepared: Path, pairs_path: Path, out: Path) -> tuple[int, int]:
    """The LR faces of every image ``pairs.txt`` names, their manifest rows and ``pairs.txt``."""
    pairs = read_pairs(pairs_path)
    keys = sorted({k for p in pairs for k in (p.a, p.b)})
    records = read_manifest(prepared)
    found, missing = match_records(keys, records)
    wanted = {rec.face_id for rec in found.values()}
    kept = [rec for rec in records if rec.face_id in wanted]
    out.mkdir(parents=True, exist_ok=True)
    for rec in kept:
        lr_target = out / rec.lr
        lr_target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(prepared / rec.lr, lr_target)
    write_manifest(out, kept)
    shutil.copyfile(pairs_path, out / "pairs.txt")
    return len(kept), len(missing)


def unpack(kit: Path) -> int:
    """Write the stand-in HR faces (bicubic x4 of each LR face, PNG) the kit's manifest names."""
    from fsr.core.io import to_tensor, to_uint8
    from fsr.data.degrade import bicubic_up

    pairs_dir = kit / "lfw_pairs"
    written = 0
    for rec in read_manifest(pairs_dir):
        target = pairs_dir / rec.hr
        if target.is_file():
            continue
        lr = to_tensor(read_image(pairs_dir / rec.lr).rgb_uint8())[None]
        target.parent.mkdir(parents=True, exist_ok=True)
        write_image(target, to_uint8(bicubic_up(lr, 4)[0]))
        written += 1
    return written


def repository_bytes() -> int:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())


def fetch_wheels(out: Path, source: Path | None) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    if source is not None:
        for wheel in source.glob("*.whl"):
            shutil.copyfile(wheel, out / wheel.name)
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(out), *DEVICE_WHEELS]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return sorted(p.name for p in out.glob("*.whl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=None, help="fsr prepare output of LFW (holding the pairs.txt faces)")
    parser.add_argument("--unpack", type=Path, default=None, help="on the device: write the stand-in HR faces into this kit")
    parser.add_argument("--pairs", type=Path, default=SHARED / "lfw" / "pairs.txt", help="LFW pairs.txt")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder (LFW photos, MTCNN reference)")
    parser.add_argument("--images", type=int, default=512, help="LFW photos in the kit")
    parser.add_argument("--wheels-from", type=Path, default=None, help="folder of wheels to copy instead of pip download")
    parser.add_argument("--out", type=Path, default=REPO / "device_kit", help="kit folder (replaced)")
    args = parser.parse_args()

    if args.unpack is not None:
        print(f"{args.unpack}: wrote {unpack(args.unpack)} stand-in HR faces")
        return
    if args.prepared is None:
        parser.error("--prepared is required to pack a kit")
    if args.out.exists():
        shutil.rmtree(args.out)
    n_images = pack_data(args.shared, args.out / "data", args.images)
    n_faces, n_missing = pack_pairs(args.prepared, args.pairs, args.out / "lfw_pairs")
    wheels = fetch_wheels(args.out / "wheels", args.wheels_from)
    sizes = {name: folder_bytes(args.out / name) for name in ("data", "lfw_pairs", "wheels")}
    kit = {
        "data": {"lfw_photos": n_images, "source": str(args.shared)},
        "lfw_pairs": {"faces": n_faces, "pair_images_without_face": n_missing, "source": str(args.prepared),
                      "lr": "byte-identical PNG", "hr": "not packed: --unpack writes bicubic x4 stand-ins (timing only)"},
        "wheels": wheels,
        "bytes": sizes,
        "total_mib": round(sum(sizes.values()) / 2**20, 1),
        "repository_mib": round(repository_bytes() / 2**20, 1),
    }
    (args.out / "KIT.json").write_text(json.dumps(kit, indent=1))
    print(json.dumps(kit, indent=1))
    if sum(sizes.values()) + repository_bytes() > LIMIT_BYTES - 4 * 2**20:
        raise SystemExit(f"{args.out}: {kit['total_mib']} MiB plus the repository's {kit['repository_mib']} MiB is too close "
                         "to the 64 MiB limit of the kit; lower --images")


if __name__ == "__main__":
    main()
