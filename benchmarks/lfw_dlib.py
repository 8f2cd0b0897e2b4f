"""LFW pairs.txt 10-fold verification with fsr's own pipeline: MTCNN -> alignment -> dlib ResNet.

    python benchmarks/lfw_dlib.py [--device auto] [--min-face 40] [--out scratch/face/lfw_dlib]

Every image referenced by pairs.txt (7,701) is read at its original 250x250, MTCNN finds
the faces (fsr.detect.mtcnn), the one nearest the image centre is aligned from the
original image to the dlib template (fsr.models.face) and embedded. A photo without any
detection (also none at min_face 20) is aligned to a centre crop at the template's scale.
Pairs are scored by Euclidean distance (dlib's metric) and evaluated by
fsr.evaluate.verification.kfold_verification with the reference's threshold grid 0..2 step
0.0005, so the figure is comparable with ../shared/data/reference/lfw_dlib_anchor.json
(dlib's own pipeline: 0.9890). Cosine of centred descriptors is reported too.

Landmarks and descriptors are cached in OUT/cache.npz: an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fsr.core.batching import make_progress
from fsr.core.device import Compute, machine_description
from fsr.core.io import atomic_path, read_image, write_json
from fsr.detect.mtcnn import MTCNN
from fsr.evaluate.verification import kfold_verification, read_pairs
from fsr.models.face import create_face_model
from fsr.models.face.pipeline import central_face_landmarks, centre_crop_landmarks, embed_photos
from compute_args import add_compute_arguments

REPO = Path(__file__).resolve().parents[1]

DATA = REPO.parent / "shared" / "data"
ANCHOR = DATA / "reference" / "lfw_dlib_anchor.json"
GRID = np.round(np.arange(0, 4001) * 0.0005, 4)  # the reference protocol's threshold grid


def load_cache(path: Path) -> dict[str, tuple[np.ndarray, bool, np.ndarray]]:
    if not path.is_file():
        return {}
    data = np.load(path)
    return {
        str(k): (lm, bool(f), e)
        for k, lm, f, e in zip(data["keys"], data["landmarks"], data["found"], data["embeddings"])
    }


def save_cache(path: Path, cache: dict) -> None:
    keys = sorted(cache)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                keys=np.array(keys),
                landmarks=np.stack([cache[k][0] for k in keys]),
                found=np.array([cache[k][1] for k in keys]),
                embeddings=np.stack([cache[k][2] for k in keys]),
            )


def embed_lfw(keys: list[str], lfw_dir: Path, compute: Compute, min_face: float, cache_path: Path, chunk: int = 64):
    """Embeddings for LFW keys, resuming from the cache. Returns {key: (landmarks, found, emb)}."""
    cache = load_cache(cache_path)
    todo = [k for k in keys if k not in cache]
    if todo:
        detector = MTCNN.load(compute)
        model = create_face_model("dlib", compute=compute)
        with make_progress("img") as progress:
            task = progress.add_task("detect+embed", total=len(keys), completed=len(keys) - len(todo))
            for start in range(0, len(todo), chunk):
                batch = todo[start : start + chunk]
                photos = [read_image(lfw_dir / k).rgb_uint8() for k in batch]
                marks = central_face_landmarks(detector, photos, min_face=min_face, retry_min_face=20)
                lms = marks.landmarks.copy()
                for i, ok in enumerate(marks.found):
                    if not ok:
                        lms[i] = centre_crop_landmarks(model, *photos[i].shape[:2])
                emb = embed_photos(model, photos, lms, batch_size=compute.batch_size)
                for i, k in enumerate(batch):
                    cache[k] = (lms[i], bool(marks.found[i]), emb[i])
                if (start // chunk) % 10 == 9 or start + chunk >= len(todo):
                    save_cache(cache_path, cache)
                progress.advance(task, len(batch))
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lfw-dir", type=Path, default=DATA / "lfw" / "lfw-deepfunneled", help="LFW images")
    parser.add_argument("--pairs", type=Path, default=DATA / "lfw" / "pairs.txt", help="LFW pairs.txt")
    parser.add_argument("--out", type=Path, default=REPO / "scratch" / "face" / "lfw_dlib", help="output folder")
    parser.add_argument("--min-face", type=float, default=40, help="MTCNN minimum face (px); retried at 20")
    add_compute_arguments(parser, batch_size=64, batch_help="faces per embedding batch", threads=2, precision=None)
    args = parser.parse_args()

    compute = Compute.create(args.device, "fp32", batch_size=args.batch_size, threads=args.threads)
    print(machine_description())
    print(f"compute: {compute.describe()}")
    pairs = read_pairs(args.pairs)
    keys = sorted({p.a for p in pairs} | {p.b for p in pairs})
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cache = embed_lfw(keys, args.lfw_dir, compute, args.min_face, args.out / "cache.npz")
    elapsed = time.perf_counter() - t0

    model = create_face_model("dlib", compute=Compute.create("cpu", "fp32"))
    a = torch.from_numpy(np.stack([cache[p.a][2] for p in pairs]))
    b = torch.from_numpy(np.stack([cache[p.b][2] for p in pairs]))
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    dist = model.distance(a, b).numpy()
    cos = model.similarity(a, b).numpy()
    res_dist = kfold_verification(dist, same, folds, higher_is_same=False, grid=GRID)
    res_cos = kfold_verification(cos, same, folds, higher_is_same=True)
    anchor = json.loads(ANCHOR.read_text())["results"]["HR"] if ANCHOR.is_file() else {}
    not_found = [k for k in keys if not cache[k][1]]
    acc_06 = float(np.mean((dist < 0.6) == same))

    from rich.console import Console
    from rich.table import Table

    table = Table(title="LFW pairs.txt, 10 folds, dlib ResNet v1 (fsr: MTCNN + alignment)")
    for col in ("score", "accuracy mean", "std", "AUC", "TAR@FAR1e-3"):
        table.add_column(col)
    table.add_row("euclidean (grid 0..2)", f"{res_dist.accuracy_mean:.4f}", f"{res_dist.accuracy_std:.4f}",
                  f"{res_dist.auc:.4f}", f"{res_dist.tar_at_far_1e3:.4f}")
    table.add_row("cosine, centred", f"{res_cos.accuracy_mean:.4f}", f"{res_cos.accuracy_std:.4f}",
                  f"{res_cos.auc:.4f}", f"{res_cos.tar_at_far_1e3:.4f}")
    if anchor:
        table.add_row("dlib's own pipeline (anchor)", f"{anchor['mean_acc']:.4f}", f"{anchor['std_acc']:.4f}", "", "")
    Console().print(table)
    print(f"accuracy at dlib's threshold 0.6, all pairs: {acc_06:.4f}")
    print(f"images: {len(keys)}, without an MTCNN face: {len(not_found)} {not_found[:10]}")
    print(f"detect+embed time this run: {elapsed:.1f} s")
    write_json(
        args.out / "results.json",
        {
            "machine": machine_description(),
            "compute": compute.describe(),
            "min_face": args.min_face,
            "images": len(keys),
            "images_without_detection": not_found,
            "euclidean": res_dist.to_dict(),
            "cosine_centred": res_cos.to_dict(),
            "accuracy_at_0.6_all_pairs": acc_06,
            "anchor_dlib_own_pipeline": anchor.get("mean_acc"),
            "detect_embed_seconds_this_run": elapsed,
        },
    )
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
