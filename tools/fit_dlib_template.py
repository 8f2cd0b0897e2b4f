"""Fit the MTCNN 5-point template that reproduces dlib's face chips (size 150, padding 0.25).

dlib aligns with its own 5 points (eye corners and nose base) and ``get_face_chip``; fsr's
detector gives MTCNN's 5 points (eye centres, nose tip, mouth corners). The reference data
has both for the same LFW images: ``dlib_reference.npz`` holds each chip's rectangle and
angle (every 132nd LFW image), ``mtcnn_reference.json`` MTCNN landmarks (every 44th, so a
superset). Each image's MTCNN landmarks are mapped into chip pixels through dlib's own
chip transform (dlib's ``get_mapping_to_chip``); the least-squares template is their mean.

Run: ``python -m tools.fit_dlib_template [--reference DIR]``; prints the template
(to paste into ``dlib_resnet.DLIB_MTCNN_TEMPLATE``) and the per-point residuals in chip pixels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DEFAULT_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "reference"


def dlib_chip_matrix(rect: np.ndarray, angle: float, size: int = 150) -> np.ndarray:
    """dlib's ``get_mapping_to_chip``: the 2x3 affine map image pixel -> chip pixel.

    rect: (left, top, right, bottom) of the chip rectangle before rotation by ``angle``
    (radians) about its centre; the rotated corners tl, tr, br land on (0, 0),
    (size-1, 0), (size-1, size-1).
    """
    left, top, right, bottom = rect
    centre = np.array([(left + right) / 2.0, (top + bottom) / 2.0])
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    corners = np.array([[left, top], [right, top], [right, bottom]])
    src = (corners - centre) @ rot.T + centre
    dst = np.array([[0.0, 0.0], [size - 1.0, 0.0], [size - 1.0, size - 1.0]])
    a = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(a, dst).T  # (2, 3)


def nearest_detection(detections: list[dict], rect: np.ndarray) -> dict | None:
    """The MTCNN detection whose box centre is nearest the dlib face rectangle's centre."""
    if not detections:
        return None
    centre = np.array([(rect[0] + rect[2]) / 2.0, (rect[1] + rect[3]) / 2.0])
    dists = [np.linalg.norm(np.array([(d["box"][0] + d["box"][2]) / 2, (d["box"][1] + d["box"][3]) / 2]) - centre) for d in detections]
    return detections[int(np.argmin(dists))]


def mtcnn_points_in_chips(reference: Path) -> tuple[np.ndarray, list[int]]:
    """(M, 5, 2) MTCNN landmarks mapped into dlib chip pixels, and the dlib sample indices used."""
    ref = np.load(reference / "dlib_reference.npz")
    mt = json.loads((reference / "mtcnn_reference.json").read_text())["detections"]
    points, used = [], []
    for i, key in enumerate(ref["paths"]):
        det = nearest_detection(mt.get(str(key), []), ref["rects"][i])
        if det is None:
            continue
        m = dlib_chip_matrix(ref["chip_rect"][i], float(ref["chip_angle"][i]))
        lm = np.asarray(det["landmarks"], dtype=np.float64)
        points.append(lm @ m[:, :2].T + m[:, 2])
        used.append(i)
    return np.stack(points), used


def fit_template(reference: Path = DEFAULT_REFERENCE) -> dict:
    """Least-squares template (mean of the mapped points) and residual statistics."""
    pts, used = mtcnn_points_in_chips(reference)
    template = pts.mean(axis=0)
    resid = np.linalg.norm(pts - template, axis=2)
    return {
        "template": template.round(4).tolist(),
        "images": len(used),
        "residual_rms_px": float(np.sqrt((resid**2).mean())),
        "residual_rms_per_point_px": np.sqrt((resid**2).mean(axis=0)).round(3).tolist(),
        "used_indices": used,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="shared/data/reference folder")
    args = parser.parse_args()
    result = fit_template(args.reference)
    print(f"images: {result['images']}, residual RMS {result['residual_rms_px']:.3f} px "
          f"(per point {result['residual_rms_per_point_px']})")
    print("DLIB_MTCNN_TEMPLATE = (")
    for x, y in result["template"]:
        print(f"    ({x:.4f}, {y:.4f}),")
    print(")")


if __name__ == "__main__":
    main()
