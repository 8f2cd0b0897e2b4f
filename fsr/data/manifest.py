"""The prepared-data manifest: one row per face, written by ``fsr prepare``.

Layout of a prepared folder DST::

    DST/hr/<rel>.png      HR face crops, size x size (128), lossless
    DST/lr/<rel>.png      LR faces, bicubic x1/scale of the HR crop (32x32)
    DST/manifest.csv      one row per face (written atomically when the run completes)
    DST/rejects.csv       source, reason: images that gave no face
    DST/prepare.json      the settings the folder was made with

``source`` is the image's path relative to the source folder (LFW: ``Name/Name_0001.jpg``,
the keys pairs.txt uses); with several source folders it is prefixed by the folder's
name. Coordinates (box, crop, landmarks) are source pixels of the upright image (EXIF
orientation applied). Landmark order: left eye, right eye, nose, mouth left, mouth right.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fsr.core.io import atomic_write_text, read_image
from fsr.detect.crop import points_to_crop

MANIFEST_FILE = "manifest.csv"
REJECTS_FILE = "rejects.csv"
SPLITS = ("train", "val", "test")

LANDMARK_COLUMNS = [f"{name}_{axis}" for name in ("le", "re", "nose", "ml", "mr") for axis in ("x", "y")]
COLUMNS = (
    ["face_id", "source", "identity", "split", "score", "box_x1", "box_y1", "box_x2", "box_y2", "crop_x0", "crop_y0", "crop_side"]
    + LANDMARK_COLUMNS
    + ["hr", "lr"]
)


class ManifestError(ValueError):
    """A manifest.csv that is not fsr's or is truncated. ``str()`` is one line naming the file."""


@dataclass
class FaceRecord:
    """One prepared face.

    box: (x1, y1, x2, y2) MTCNN box; crop: (x0, y0, side) the square cut from the source;
    landmarks: (5, 2) float32 source pixels; hr / lr: paths relative to the prepared folder.
    """

    face_id: str
    source: str
    identity: str
    split: str
    score: float
    box: tuple[float, float, float, float]
    crop: tuple[int, int, int]
    landmarks: np.ndarray
    hr: str
    lr: str
    extra: dict = field(default_factory=dict, repr=False)

    def landmarks_in_crop(self, size: int = 128) -> np.ndarray:
        """(5, 2) float32 landmarks in the pixels of the size x size HR crop."""
        x0, y0, side = self.crop
        return points_to_crop(self.landmarks, x0, y0, side, size)

    def load_hr(self, prepared_dir: str | os.PathLike) -> np.ndarray:
        """HR crop as (H, W, 3) uint8."""
        return read_image(Path(prepared_dir) / self.hr).rgb_uint8()

    def load_lr(self, prepared_dir: str | os.PathLike) -> np.ndarray:
        """LR face as (h, w, 3) uint8."""
        return read_image(Path(prepared_dir) / self.lr).rgb_uint8()

    def to_row(self) -> list[str]:
        lm = np.asarray(self.landmarks, dtype=np.float64).reshape(-1)
        return (
            [self.face_id, self.source, self.identity, self.split, f"{float(self.score):.6f}"]
            + [_fmt(v) for v in self.box]
            + [str(int(v)) for v in self.crop]
            + [_fmt(v) for v in lm]
            + [self.hr, self.lr]
        )

    @classmethod
    def from_row(cls, row: dict[str, str]) -> "FaceRecord":
        landmarks = np.array([float(row[c]) for c in LANDMARK_COLUMNS], dtype=np.float32).reshape(5, 2)
        return cls(
            face_id=row["face_id"],
            source=row["source"],
            identity=row["identity"],
            split=row["split"],
            score=float(row["score"]),
            box=tuple(float(row[c]) for c in ("box_x1", "box_y1", "box_x2", "box_y2")),  # type: ignore[arg-type]
            crop=tuple(int(row[c]) for c in ("crop_x0", "crop_y0", "crop_side")),  # type: ignore[arg-type]
            landmarks=landmarks,
            hr=row["hr"],
            lr=row["lr"],
        )


def _fmt(value: float) -> str:
    """Floats written with 4 decimals (sub-pixel precision, stable text)."""
    return f"{float(value):.4f}"


def manifest_text(records: list[FaceRecord]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for record in records:
        writer.writerow(record.to_row())
    return buf.getvalue()


def write_manifest(prepared_dir: str | os.PathLike, records: list[FaceRecord]) -> Path:
    """Write ``manifest.csv`` atomically (rows in the given order)."""
    path = Path(prepared_dir) / MANIFEST_FILE
    atomic_write_text(path, manifest_text(records))
    return path


def read_manifest(prepared_dir: str | os.PathLike) -> list[FaceRecord]:
    """All faces of a prepared folder (``DST/manifest.csv``), in manifest order."""
    path = Path(prepared_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (run `fsr prepare` first, or it has not finished)")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: not an fsr manifest (missing columns {', '.join(missing)})")
        records = []
        for row in reader:
            try:
                empty = [c for c in COLUMNS if row.get(c) in (None, "")]
                if empty:
                    raise ValueError(f"no value for {', '.join(empty[:3])}")
                records.append(FaceRecord.from_row(row))
            except (TypeError, ValueError, KeyError) as exc:
                raise ManifestError(
                    f"{path}:{reader.line_num}: truncated or malformed row ({exc.__class__.__name__}: {exc}); "
                    "re-run fsr prepare to rewrite the manifest"
                ) from None
        return records


def write_rejects(prepared_dir: str | os.PathLike, rejects: list[tuple[str, str]]) -> Path:
    """Write ``rejects.csv`` (source, reason) atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["source", "reason"])
    writer.writerows(rejects)
    path = Path(prepared_dir) / REJECTS_FILE
    atomic_write_text(path, buf.getvalue())
    return path


def read_rejects(prepared_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """(source, reason) pairs from ``DST/rejects.csv``."""
    path = Path(prepared_dir) / REJECTS_FILE
    with open(path, newline="", encoding="utf-8") as fh:
        return [(row["source"], row["reason"]) for row in csv.DictReader(fh)]
