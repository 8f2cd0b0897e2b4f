"""Face quality of `fsr upscale` on whole photos and face crops, against bicubic.

* ``photos``: whole images (LFW photos of pairs.txt identities, CelebA crops of held-out
  identities, wild/ photos), each cropped to a multiple of 4, downscaled x4 (fsr's
  antialiased bicubic) and upscaled x4 by photo mode (:func:`fsr.upscale.upscale_photo`)
  and by the classical bicubic. Face regions = the squares (margin 0.25) of the faces MTCNN
  finds in the original; PSNR of each region against the original, per LR face-size bucket
  (the box side / 4). Also the identity drift of every SR face (genuine) and of each SR face
  against another identity's classical face (impostor), for calibrating ``--max-drift``.
* ``crops``: face squares resized to 4n (n = 24, 32, 48, 64), downscaled to n, upscaled by
  faces mode and by bicubic: PSNR against the 4n crop.
* ``sharp``: a sharp 128 px crop upscaled x4 in faces mode and scaled back down: PSNR
  against the input.

``--lr-jpeg Q`` stores each x4-downscaled photo as JPEG at quality Q before it is upscaled (faces
cut from JPEG photos).

Held-out CelebA identities: those listed in fsr/data/splits/celeba_test_identities.txt when
it exists, else the last 40 identity folders of celeba_train in sorted order.

    python benchmarks/photo_quality.py --per-source 8 --threshold 0 --json /tmp/pq.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch

from fsr.core.device import Compute
from fsr.core.io import LoadedImage, read_image, to_tensor, to_uint8
from fsr.core.resize import resize_bicubic
from fsr.data.degrade import jpeg_degrade
from fsr.detect.crop import extract_square, points_to_crop, square_box
from fsr.detect.mtcnn import MTCNN
from fsr.models.face import create_face_model
from fsr.models.face.pipeline import FaceFilter, find_faces
from fsr.models.sr import update_card
from fsr.models.systems import load_sr_system, sr_weights_path
from fsr.upscale import RunModels, UpscaleOptions, classical_upscale, upscale_crop, upscale_photo

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BUCKETS = [(16, 24), (24, 40), (40, 64), (64, 96), (96, 160)]
SPLIT_FILE = REPO / "fsr" / "data" / "splits" / "celeba_test_identities.txt"


def held_out_celeba(root: Path, count: int = 40) -> list[Path]:
    """Identity folders held out from training (the split file, else the last ``count`` sorted)."""
    if SPLIT_FILE.is_file():
        names = [line.strip() for line in SPLIT_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
        return [root / n for n in names if (root / n).is_dir()]
    return sorted(p for p in root.iterdir() if p.is_dir())[-count:]


def photo_sources(per_source: int, data: Path) -> list[tuple[str, str, Path]]:
    """(source, identity, path) of the whole images: LFW, held-out CelebA, wild."""
    lfw = sorted((data / "lfw" / "lfw-deepfunneled").iterdir())[::97][:per_source]
    out = [("lfw", p.name, sorted(p.glob("*.jpg"))[0]) for p in lfw]
    out += [("celeba", p.name, sorted(p.glob("*.jpg"))[0]) for p in held_out_celeba(data / "celeba_train")[:per_source]]
    wild = sorted((data / "wild").glob("img*.jpg"))[::3][:per_source]
    return out + [("wild", p.stem, p) for p in wild]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def downscale(rgb: np.ndarray, factor: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(HR cropped to a multiple of ``factor``, LR) uint8."""
    h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
    hr = rgb[:h, :w]
    lr = to_uint8(resize_bicubic(to_tensor(hr)[None], (h // factor, w // factor))[0].clamp(0, 1))
    return hr, lr


def measure_photo(path: Path, models: RunModels, options: UpscaleOptions, detector, lr_jpeg: int = 0) -> list[dict]:
    """Face-region PSNR of photo mode and bicubic for one image (downscaled x4 first; with ``lr_jpeg``,
    the downscaled photo stored as JPEG at that quality, its block grid from the photo's corner)."""
    hr, lr = downscale(read_image(path).rgb_uint8())
    if lr_jpeg:
        lr = to_uint8(jpeg_degrade(to_tensor(lr)[None], [lr_jpeg])[0])
    faces = [f for f in find_faces(detector, hr, FaceFilter(min_size=48)) if not f.rejected]
    if not faces:
        return []
    photo = upscale_photo(LoadedImage(lr, None, str(path)), models, options)
    bicubic = classical_upscale(lr, 4)
    rows = []
    for face in faces:
        x0, y0, side = square_box(face.box)
        x0, y0 = max(0, x0), max(0, y0)
        region = (slice(y0, min(hr.shape[0], y0 + side)), slice(x0, min(hr.shape[1], x0 + side)))
        routed = [r for r in photo.faces if abs(r["box"][0] * 4 - face.box[0]) < 0.1 * side]
        rows.append({"image": str(path), "lr_side": face.side / 4, "psnr_sr": psnr(photo.rgb[region], hr[region]),
                     "psnr_bicubic": psnr(bicubic[region], hr[region]),
                     "route": routed[0]["route"] if routed else "not found", "drift": routed[0]["drift"] if routed else None})
    return rows


def bucket_table(rows: list[dict]) -> list[dict]:
    """Mean PSNR of SR and bicubic per LR face-size bucket, and over all faces."""
    table = []
    for low, high in BUCKETS + [(0, 10**6)]:
        sel = [r for r in rows if low <= r["lr_side"] < high]
        if not sel:
            continue
        sr = float(np.mean([r["psnr_sr"] for r in sel]))
        bic = float(np.mean([r["psnr_bicubic"] for r in sel]))
        table.append({"bucket": "all" if high == 10**6 else f"{low}-{high}", "faces": len(sel),
                      "sr_through_model": sum(r["route"] == "sr" for r in sel),
                      "psnr_sr": round(sr, 2), "psnr_bicubic": round(bic, 2), "gain_db": round(sr - bic, 2)})
    return table


def measured_range(table: list[dict], crops: list[dict] = (), margin: float = 0.25,
                   min_faces: int = 2) -> tuple[float, float] | None:
    """The LR face sizes where SR was measured at or above bicubic: the run of photo buckets from
    the smallest one with at least ``min_faces`` faces and gain >= 0, up to the first that is not;
    extended down by the faces-mode crops (face side = crop side / (1 + 2 margin)), from the
    largest crop down to the first that is not ahead (small faces are rare in the photos)."""
    run = []
    for row in table:
        if row["bucket"] == "all":
            continue
        low, high = (float(v) for v in row["bucket"].split("-"))
        if row["faces"] >= min_faces and row["gain_db"] >= 0:
            run.append((low, high))
        elif run:
            break
    if not run:
        return None
    low = run[0][0]
    for row in sorted(crops, key=lambda r: -r["crop"]):
        if row["faces"] < min_faces or row["gain_db"] < 0:
            break
        low = min(low, float(math.floor(row["crop"] / (1 + 2 * margin))))
    return (low, run[-1][1])


def crop_sizes(paths: list[Path], models: RunModels, options: UpscaleOptions, detector) -> list[dict]:
    """Faces mode on crops of 24/32/48/64 px made by bicubic /4 from larger face squares."""
    rows = []
    for n in (24, 32, 48, 64):
        sr_p, bic_p = [], []
        for path in paths:
            rgb = read_image(path).rgb_uint8()
            faces = [f for f in find_faces(detector, rgb, FaceFilter(min_size=48)) if not f.rejected]
            for face in faces[:1]:
                x0, y0, side = square_box(face.box)
                if side < 2 * n:
                    continue
                square = to_tensor(np.ascontiguousarray(extract_square(rgb, x0, y0, side)))[None]
                hr = to_uint8(resize_bicubic(square, 4 * n)[0].clamp(0, 1))
                lr = to_uint8(resize_bicubic(to_tensor(hr)[None], n)[0].clamp(0, 1))
                sr, _ = upscale_crop(lr, models, options)
                sr_p.append(psnr(sr, hr))
                bic_p.append(psnr(classical_upscale(lr, 4), hr))
        if sr_p:
            rows.append({"crop": n, "faces": len(sr_p), "psnr_sr": round(float(np.mean(sr_p)), 2),
                         "psnr_bicubic": round(float(np.mean(bic_p)), 2),
                         "gain_db": round(float(np.mean(sr_p) - np.mean(bic_p)), 2)})
    return rows


def sharp_crop(path: Path, models: RunModels, options: UpscaleOptions, detector) -> float:
    """PSNR of a sharp 128 px face crop against itself after x4 in faces mode and back down."""
    rgb = read_image(path).rgb_uint8()
    face = [f for f in find_faces(detector, rgb, FaceFilter()) if not f.rejected][0]
    x0, y0, side = square_box(face.box)
    crop = to_uint8(resize_bicubic(to_tensor(np.ascontiguousarray(extract_square(rgb, x0, y0, side)))[None], 128)[0].clamp(0, 1))
    up, _ = upscale_crop(crop, models, options)
    back = to_uint8(resize_bicubic(to_tensor(up)[None], 128)[0].clamp(0, 1))
    return psnr(back, crop)


@torch.inference_mode()
def drift_rates(rows: list[dict], identities: dict[str, str], models: RunModels, detector, options) -> dict:
    """Genuine drift (SR face vs its own classical upscale) and impostor drift (SR face vs the
    classical upscale of another identity's face), on the held-out CelebA faces."""
    face_model = models.face_model()
    embed_sr, embed_cl, owners = [], [], []
    for path, identity in identities.items():
        hr, lr = downscale(read_image(path).rgb_uint8())
        photo_faces = [f for f in find_faces(detector, lr, options.face_filter()) if not f.rejected][:1]
        for face in photo_faces:
            x0, y0, side = square_box(face.box)
            window = extract_square(lr, x0, y0, side)
            sr = models.system.upscale(to_tensor(np.ascontiguousarray(window))[None])
            cl = to_tensor(classical_upscale(np.ascontiguousarray(window), 4))[None]
            lm = torch.from_numpy(points_to_crop(face.landmarks, x0, y0, side, side * 4))[None]
            embed_sr.append(face_model(sr, lm))
            embed_cl.append(face_model(cl, lm))
            owners.append(identity)
    sr_e, cl_e = torch.cat(embed_sr), torch.cat(embed_cl)
    dist = torch.cdist(sr_e, cl_e).numpy()
    genuine = np.diag(dist)
    other = np.array([[owners[i] != owners[j] for j in range(len(owners))] for i in range(len(owners))])
    impostor = dist[other]
    return {"faces": len(owners), "genuine": genuine.tolist(), "impostor": impostor.tolist(),
            "genuine_quantiles": {q: float(np.quantile(genuine, q)) for q in (0.5, 0.9, 0.99, 1.0)},
            "impostor_quantiles": {q: float(np.quantile(impostor, q)) for q in (0.0, 0.01, 0.1, 0.5)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--per-source", type=int, default=8, help="images per source (LFW, CelebA, wild)")
    parser.add_argument("--threshold", type=float, default=None, help="routing: default = the card's range; 0 = all faces")
    parser.add_argument("--max-drift", type=float, default=None, help="default: fsr upscale's default")
    parser.add_argument("--drift-faces", type=int, default=40, help="held-out CelebA faces for the drift calibration")
    parser.add_argument("--skip-crops", action="store_true", help="only the whole-photo table")
    parser.add_argument("--write-card", action="store_true",
                        help="store the measured range as lr_face_range in the model's card (run with --threshold 0)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--lr-jpeg", type=int, default=0, metavar="Q",
                        help="store each x4-downscaled photo as JPEG at quality Q before upscaling it (0 = lossless)")
    args = parser.parse_args()
    compute = Compute.create("cpu", "fp32", batch_size=8)
    options = replace(UpscaleOptions(threshold=args.threshold, show_progress=False),
                      **({} if args.max_drift is None else {"max_drift": args.max_drift}))
    detector = MTCNN.load(compute)
    models = RunModels(load_sr_system(args.model, compute), compute, detector, create_face_model("dlib", compute=compute), 1e9)
    rows = []
    sources = photo_sources(args.per_source, args.data)
    for source, _, path in sources:
        rows += [{**r, "source": source} for r in measure_photo(path, models, options, detector, args.lr_jpeg)]
    photos = bucket_table(rows)
    print("| LR face px | faces | through model | SR dB | bicubic dB | gain dB |\n|---|---|---|---|---|---|")
    for r in photos:
        print(f"| {r['bucket']} | {r['faces']} | {r['sr_through_model']} | {r['psnr_sr']:.2f} | {r['psnr_bicubic']:.2f} | {r['gain_db']:+.2f} |")
    crops, sharp, drift = [], None, None
    if not args.skip_crops:
        crops = crop_sizes([p for s, _, p in sources if s != "lfw"], models, options, detector)
        print("\n| crop px | faces | SR dB | bicubic dB | gain dB |\n|---|---|---|---|---|")
        for r in crops:
            print(f"| {r['crop']} | {r['faces']} | {r['psnr_sr']:.2f} | {r['psnr_bicubic']:.2f} | {r['gain_db']:+.2f} |")
        sharp = sharp_crop(args.data / "wild" / "img1.jpg", models, options, detector)
        print(f"\nsharp 128 px crop, x4 and back: {sharp:.2f} dB")
    found = measured_range(photos, crops, options.margin)
    print(f"\nmeasured range (LR face box side, px): {found}")
    if args.write_card and found is not None:
        weights = sr_weights_path(args.model)
        update_card(weights, lr_face_range=found, lr_face_range_measurement={
            "what": "LR face sizes (detector box side, px) where SR beat bicubic on face regions of x4-downscaled "
                    "photos, extended down by face crops in faces mode (face side = crop side / 1.5)",
            "command": " ".join(["python", *sys.argv]),
            "buckets": photos, "crops": crops, "date": date.today().isoformat()})
        print(f"wrote lr_face_range {found} to {weights.with_suffix('.json')}")
    if args.drift_faces:
        held = held_out_celeba(args.data / "celeba_train")
        faces = {p: d.name for d in held for p in sorted(d.glob("*.jpg"))[:2]}
        drift = drift_rates(rows, dict(list(faces.items())[: args.drift_faces]), models, detector, options)
        limit = options.max_drift
        print(f"\ndrift on {drift['faces']} held-out CelebA faces: genuine quantiles {drift['genuine_quantiles']}, "
              f"impostor quantiles {drift['impostor_quantiles']}; genuine above {limit:g}: "
              f"{np.mean(np.array(drift['genuine']) > limit):.1%}, impostors above: "
              f"{np.mean(np.array(drift['impostor']) > limit):.1%}")
    if args.json:
        args.json.write_text(json.dumps({"options": vars(args) | {"data": str(args.data), "json": str(args.json)},
                                         "photos": photos, "faces": rows, "crops": crops, "sharp_128_db": sharp,
                                         "drift": drift}, indent=1, default=str))


if __name__ == "__main__":
    main()
