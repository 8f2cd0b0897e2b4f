"""Rebuild examples/ from ../shared/data/wild (MIT licence, see LICENSE-wild).

    .venv/bin/python examples/make_examples.py [--wild ../shared/data/wild]

photos/: a few wild photos downscaled (antialiased bicubic) so that their faces are small,
         the case photo mode is for (faces below the 64 px routing threshold).
faces/:  32x32 face crops cut with fsr's own MTCNN + square crop (margin 0.25) from the
         full-resolution photos, exactly as `fsr prepare` cuts LR faces, and one small
         non-square crop (40x48) to show the padding rule of faces mode.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from fsr.core.device import Compute
from fsr.core.io import read_image, to_tensor, to_uint8
from fsr.data.degrade import resize_bicubic
from fsr.detect.crop import crop_square, square_box
from fsr.detect.mtcnn import MTCNN

HERE = Path(__file__).resolve().parent
# photo -> long side after downscaling
PHOTOS = {"img54.jpg": 420, "img38.jpg": 400, "img59.jpg": 450, "couple.jpg": 160}
FACE_SOURCES = ["img1.jpg", "img10.jpg", "img12.jpg", "img25.jpg", "img46.jpg"]


def downscale(rgb: np.ndarray, long_side: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    factor = long_side / max(height, width)
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    return to_uint8(resize_bicubic(to_tensor(rgb)[None], size)[0].clamp(0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wild", type=Path, default=HERE.parents[1] / "shared" / "data" / "wild")
    args = parser.parse_args()
    (HERE / "photos").mkdir(exist_ok=True)
    (HERE / "faces").mkdir(exist_ok=True)
    shutil.copyfile(args.wild / "LICENSE", HERE / "LICENSE-wild")
    for name, long_side in PHOTOS.items():
        small = downscale(read_image(args.wild / name).rgb, long_side)
        Image.fromarray(small).save(HERE / "photos" / name, quality=92)
    detector = MTCNN.load(Compute.create("cpu"))
    for name in FACE_SOURCES:
        rgb = read_image(args.wild / name).rgb
        box = detector.detect([rgb])[0].boxes[0]
        x0, y0, side = square_box(box, margin=0.25)
        crop = crop_square(rgb, int(round(x0)), int(round(y0)), int(round(side)), 32)
        Image.fromarray(np.asarray(crop, dtype=np.uint8)).save(HERE / "faces" / f"{Path(name).stem}_32.png")
        if name == FACE_SOURCES[0]:  # a non-square crop: the face's box, 40 wide x 48 high
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            tall = to_tensor(rgb[y1:y2, x1:x2])[None]
            Image.fromarray(to_uint8(resize_bicubic(tall, (48, 40))[0].clamp(0, 1))).save(
                HERE / "faces" / f"{Path(name).stem}_40x48.png"
            )


if __name__ == "__main__":
    main()
