"""``fsr upscale``: super-resolve face crops, or the faces inside whole photos.

plan -> load -> run -> write, on the one face pipeline (:mod:`fsr.models.face.pipeline`)
and the typed SR model (:mod:`fsr.models.sr`). Modes, chosen per image:

* ``faces``: the image *is* a face crop (any size). The network runs on it at its own
  resolution (fully convolutional, in overlapping tiles when large): the output is exactly
  ``scale*H x scale*W``, and an input is never shrunk first.
* ``photo``: the whole photo is upscaled by ``scale`` with a classical resampler
  (antialiased bicubic, in tiles), every face is found with fsr's MTCNN and judged by the
  one selection rule (score, landmark geometry, minimum size); each real face the routing
  rule admits is cut as a square (margin 0.25) with some context, super-resolved at its own
  resolution and pasted back with a mask feathered over the context band. Pixels outside
  the pasted windows are exactly the classical upscale.
* ``auto`` (default): an image whose long side is at most ``auto_face_max_side`` pixels
  (160) and whose aspect ratio is at most 1.25 is taken as a face crop when the detector
  finds a face filling it (:func:`crop_face`); everything else is a photo, so noise or a
  small scene is never counted as a super-resolved face.

Routing (:func:`fsr.models.face.pipeline.routes_to_sr`): by default a face goes through the
model only when its size lies in the model card's validated ``lr_face_range``; the others
keep the classical upscale. Every SR face gets its identity drift (dlib distance between the
SR face and the classical upscale of the same input); above ``max_drift`` the classical
upscale is kept. The per-image report lists every detection with its route and reason.

The alpha channel, when present, is upscaled classically and kept. Outputs are written
atomically (:func:`fsr.core.io.write_image`); OUT records the run's settings and the
model's checksum (``.fsr-upscale.json``): finished outputs are skipped when a re-run uses
the same settings, and a re-run with other settings is refused unless ``overwrite``. An
input file is never written over.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fsr.core.batching import make_progress
from fsr.core.device import Compute
from fsr.core.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    UNSUPPORTED_IMAGE_EXTENSIONS,
    ImageReadError,
    LoadedImage,
    atomic_write_text,
    check_image_suffix,
    describe_os_error,
    grey_channel,
    list_image_files,
    output_collisions,
    pixel_max,
    read_image,
    remove_stale_temporaries,
    to_image_array,
    to_tensor,
    write_image,
)
from fsr.core.metadata import fits_output
from fsr.core.weights import WeightsError, find_weights
from fsr.core.resize import resize_bicubic
from fsr.detect.crop import extract_square
from fsr.detect.mtcnn import MTCNN
from fsr.models.face import create_face_model
from fsr.models.face.base import FaceModel
from fsr.models.face.pipeline import (
    DEFAULT_MAX_DRIFT,
    DEFAULT_MIN_FACE,
    DEFAULT_MIN_SCORE,
    DEFAULT_TILE,
    Face,
    FaceFilter,
    crop_face,
    face_square,
    face_window,
    find_faces,
    identity_drift,
    paste_face,
    routes_to_sr,
    super_resolve,
    super_resolve_window,
    window_feather,
    window_landmarks,
)
from fsr.models.systems import SRSystem, load_sr_system

MODES = ("auto", "faces", "photo")
FORMATS = ("same", "png", "jpg", "webp")
# Largest side each output format can hold (OpenCV encoders).
FORMAT_MAX_SIDE = {".webp": 16383, ".jpg": 65535, ".jpeg": 65535}
CLASSICAL = "classical"
SETTINGS_FILE = ".fsr-upscale.json"
DRIFT_FACE_MODEL = "dlib"
MIN_INPUT_SIDE = 8  # px: anything smaller holds no face worth super-resolving


class UpscaleError(ValueError):
    """A request that cannot run at all (bad paths, unsafe output, missing model). One line."""


@dataclass
class UpscaleOptions:
    """What ``fsr upscale`` does; every field is one CLI option.

    threshold: routing of faces to the model. None: the model card's validated LR face-size
        range; 0: every face; PX: faces whose detected box side is below PX (paper's Fig. 2).
    margin: face crop margin around the detected box (fraction of the box side per side).
    min_score, detect_min_face, check_landmarks: what counts as a real face (the face filter).
    max_drift: SR faces whose identity drift exceeds this keep the classical upscale (0 = off).
    tile: side, in input pixels, of the tiles the classical upscale is computed in.
    sr_tile: side, in input pixels, of the tiles the network runs on for large faces.
    detect_max_pixels: bigger photos are shrunk to this many pixels for face detection only.
    """

    mode: str = "auto"
    model: str = "default"
    scale: int = 4
    threshold: float | None = None
    margin: float = 0.25
    detect_min_face: int = DEFAULT_MIN_FACE
    min_score: float = DEFAULT_MIN_SCORE
    check_landmarks: bool = True
    max_drift: float = DEFAULT_MAX_DRIFT
    out_format: str = "same"
    suffix: str = ""
    quality: int = 95
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    tile: int = 512
    sr_tile: int = DEFAULT_TILE
    detect_max_pixels: int = 12_000_000
    auto_face_max_side: int = 160
    auto_face_max_aspect: float = 1.25
    show_progress: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UpscaleError(f"unknown mode '{self.mode}' (expected {'|'.join(MODES)})")
        if self.out_format not in FORMATS:
            raise UpscaleError(f"unknown format '{self.out_format}' (expected {'|'.join(FORMATS)})")
        if not 1 <= self.scale <= 16:
            raise UpscaleError(f"--scale must be an integer from 1 to 16, got {self.scale}")
        if self.threshold is not None and self.threshold < 0:
            raise UpscaleError(f"--threshold must be >= 0, got {self.threshold}")
        if not 0.0 <= self.margin <= 2.0:
            raise UpscaleError(f"--margin must be in [0, 2], got {self.margin}")
        if not 0.0 <= self.min_score <= 1.0:
            raise UpscaleError(f"--min-score must be in [0, 1], got {self.min_score}")
        if self.max_drift < 0:
            raise UpscaleError(f"--max-drift must be >= 0, got {self.max_drift}")
        if self.tile < 16 or self.sr_tile < 16:
            raise UpscaleError(f"--tile must be at least 16 pixels, got {min(self.tile, self.sr_tile)}")
        if any(c in self.suffix for c in "/\\"):
            raise UpscaleError(f"--suffix must not contain a path separator: '{self.suffix}'")

    def face_filter(self) -> FaceFilter:
        return FaceFilter(self.min_score, self.detect_min_face, self.check_landmarks)


@dataclass
class ImageResult:
    """One input's outcome, as written to the report (one row)."""

    input: str
    output: str
    status: str  # done | skipped | failed (bad input) | unwritten (output could not be written)
    mode: str = ""
    reason: str = ""
    width: int = 0
    height: int = 0
    out_width: int = 0
    out_height: int = 0
    faces_found: int = 0
    faces_sr: int = 0
    faces_rejected: int = 0
    seconds: float = 0.0
    model: str = ""
    jpeg_quality: int | None = None  # the input's JPEG quality (fsr.core.io.estimate_jpeg_quality); None: not a JPEG
    faces: list[dict] = field(default_factory=list)  # one record per detection (JSON report)


@dataclass
class UpscaleSummary:
    """Everything a run did: per-image results plus the run's settings and wall time."""

    results: list[ImageResult]
    model: str
    device: str
    seconds: float
    processing_seconds: float = 0.0
    output_root: str = ""
    options: dict = field(default_factory=dict)
    model_learned_jpeg: bool = False  # the SR model was trained on JPEG-compressed faces too

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def done(self) -> int:
        return self.count("done")

    @property
    def skipped(self) -> int:
        return self.count("skipped")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def unwritten(self) -> int:
        return self.count("unwritten")

    @property
    def modes(self) -> Counter:
        return Counter(r.mode for r in self.results if r.status == "done")

    @property
    def faces_found(self) -> int:
        return sum(r.faces_found for r in self.results)

    @property
    def faces_sr(self) -> int:
        return sum(r.faces_sr for r in self.results)

    @property
    def faces_rejected(self) -> int:
        return sum(r.faces_rejected for r in self.results)

    def compressed_inputs(self, max_quality: int) -> list[ImageResult]:
        """The inputs upscaled with at least one face through the model that were stored as JPEG at
        quality ``max_quality`` or lower."""
        return [r for r in self.results if r.status == "done" and r.faces_sr and r.jpeg_quality is not None
                and r.jpeg_quality <= max_quality]

    @property
    def succeeded(self) -> bool:
        """False only when every input failed (outputs already present count as successes)."""
        return self.done + self.skipped > 0 or self.failed + self.unwritten == 0


# ----------------------------------------------------------------------------- planning


@dataclass
class Job:
    input: Path
    output: Path
    error: str = ""  # set when listing already showed the input cannot be used


class OutputWriteError(OSError):
    """An output that could not be written (disk full, read-only, no permission): not a bad input."""

    @property
    def disk_unusable(self) -> bool:
        """The output disk cannot take more files: the run stops instead of failing every image."""
        return self.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def output_suffix(input_path: Path, out_format: str) -> str:
    """The output's suffix: the input's as it is spelt (``IMG_1.JPG`` stays ``.JPG``), or the format's."""
    if out_format == "same":
        return input_path.suffix
    return "." + out_format


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def plan_jobs(src: str | os.PathLike, dst: str | os.PathLike, options: UpscaleOptions) -> list[Job]:
    """Pair every input image with its output path; refuse anything that could overwrite an input.

    ``src`` a folder: walked recursively, its structure mirrored under ``dst`` (which must
    not be ``src`` or lie inside it). ``src`` a file: ``dst`` is the output file when it has
    an image suffix, else the folder to write into.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.exists():
        raise UpscaleError(f"{src}: no such file or folder")
    src_abs, dst_abs = src.resolve(), dst.resolve()
    jobs: list[Job] = []
    if src.is_dir():
        if dst_abs == src_abs or _is_within(dst_abs, src_abs):
            raise UpscaleError(
                f"{dst}: the output folder is the input folder or inside it; choose a folder outside {src}"
            )
        if dst.exists() and not dst.is_dir():
            raise UpscaleError(f"{dst}: exists and is not a folder (the input {src} is a folder)")
        listing = list_image_files(src)
        for path in listing.files:
            rel = path.relative_to(src)
            out = dst / rel.parent / f"{rel.stem}{options.suffix}{output_suffix(path, options.out_format)}"
            jobs.append(Job(path, out))
        if not jobs:
            raise UpscaleError(f"{src}: no image files found ({', '.join(IMAGE_EXTENSIONS)})")
        jobs += [Job(path, dst / path.relative_to(src), error=reason) for path, reason in listing.skipped]
    else:
        if dst.suffix.lower() in IMAGE_EXTENSIONS + UNSUPPORTED_IMAGE_EXTENSIONS and not dst.is_dir():
            out = dst if options.out_format == "same" else dst.with_suffix("." + options.out_format)
        else:
            out = dst / f"{src.stem}{options.suffix}{output_suffix(src, options.out_format)}"
        try:
            check_image_suffix(src)
            check_image_suffix(out, "output")
        except ImageReadError as exc:
            raise UpscaleError(str(exc)) from None
        jobs.append(Job(src, out))
    for first, second, output in output_collisions([(j.input, j.output) for j in jobs if not j.error]):
        raise UpscaleError(
            f"{first} and {second} would both be written to {output}; rename one of them or upscale them separately"
        )
    usable = [job for job in jobs if not job.error]  # a self-referencing link cannot even be resolved
    inputs = {job.input.resolve() for job in usable}
    for job in usable:
        if job.output.resolve() in inputs:
            raise UpscaleError(f"{job.output}: refusing to write over an input file; choose another output or --suffix")
    return jobs


def choose_mode(height: int, width: int, options: UpscaleOptions) -> str:
    """The ``auto`` rule: small, near-square images are face crops; anything else is a photo."""
    if options.mode != "auto":
        return options.mode
    long_side, short_side = max(height, width), max(1, min(height, width))
    if long_side <= options.auto_face_max_side and long_side / short_side <= options.auto_face_max_aspect:
        return "faces"
    return "photo"


# ----------------------------------------------------------------------------- pixel work


def classical_upscale(image: np.ndarray, scale: int, tile: int = 512) -> np.ndarray:
    """Upscale an (H, W) or (H, W, C) uint8/uint16 array by an integer ``scale`` with
    antialiased bicubic (PIL-compatible Keys kernel, a = -0.5), tile by tile.

    Each tile is resampled with a 4-pixel halo of its neighbours, so tiles join without
    seams; the peak extra memory is one tile's float32 output, (tile*scale)^2 * C * 4 bytes
    (50 MB for tile 512, x4, RGB), whatever the photo's size. Returns the same dtype.
    For scales 2 and 4 the result is bit-identical to resampling the whole image at once;
    other scales differ by at most one grey level on a few pixels per million (float
    rounding of the tile-relative coordinates).
    """
    squeeze = image.ndim == 2
    img = image[..., None] if squeeze else image
    height, width, channels = img.shape
    out = np.empty((height * scale, width * scale, channels), dtype=img.dtype)
    maxv = pixel_max(img.dtype)
    halo = 4
    for y0 in range(0, height, tile):
        y1 = min(height, y0 + tile)
        ya, yb = max(0, y0 - halo), min(height, y1 + halo)
        for x0 in range(0, width, tile):
            x1 = min(width, x0 + tile)
            xa, xb = max(0, x0 - halo), min(width, x1 + halo)
            patch = torch.from_numpy(np.ascontiguousarray(img[ya:yb, xa:xb]).astype(np.float32))
            patch = patch.permute(2, 0, 1)[None].div_(maxv)
            up = resize_bicubic(patch, ((yb - ya) * scale, (xb - xa) * scale))[0]
            up = up[:, (y0 - ya) * scale : (y1 - ya) * scale, (x0 - xa) * scale : (x1 - xa) * scale]
            out[y0 * scale : y1 * scale, x0 * scale : x1 * scale] = to_image_array(up, img.dtype)
    return out[..., 0] if squeeze else out


# ----------------------------------------------------------------------------- load and write helpers


def _available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_output_size(job: Job, height: int, width: int, channels: int, itemsize: int, scale: int) -> None:
    """Refuse (one line) outputs the format cannot hold or that cannot fit in memory."""
    out_h, out_w = height * scale, width * scale
    limit = FORMAT_MAX_SIDE.get(job.output.suffix.lower())
    if limit and max(out_h, out_w) > limit:
        raise ImageReadError(
            job.input, f"output {out_w}x{out_h} exceeds the {job.output.suffix} limit of {limit} px; use --format png or a smaller --scale"
        )
    # Measured peak: the input, the output array, its RGB->BGR copy made by the encoder, and
    # a few hundred MB (one tile, the face bands, the encoded file). 43 MP x4 -> 5.2 GB.
    needed = (height * width + 2 * out_h * out_w) * channels * itemsize + 512 * 2**20
    available = _available_memory_bytes()
    if available is not None and needed > available:
        raise ImageReadError(
            job.input,
            f"output {out_w}x{out_h} needs about {needed / 2**30:.1f} GiB of memory, "
            f"{available / 2**30:.1f} GiB available; use a smaller --scale",
        )


@dataclass
class _Loaded:
    job: Job
    mode: str = ""
    image: LoadedImage | None = None
    error: str = ""
    seconds: float = 0.0


def _prefetch(fn: Callable, items: Iterable, pool: ThreadPoolExecutor, window: int) -> Iterator:
    """``map(fn, items)`` in ``pool`` with at most ``window`` calls in flight, in order."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _write(job: Job, rgb: np.ndarray, alpha: np.ndarray | None, quality: int, image: LoadedImage) -> None:
    """Write one output atomically with its input's colour profile and EXIF: one grey channel for a grey
    input (``image.grey``) unless it carries an RGB profile (which only colour data may hold);
    a file-system failure becomes :class:`OutputWriteError`."""
    if image.grey and not (image.icc_profile is not None and fits_output(image.icc_profile, grey_output=False)):
        rgb = grey_channel(rgb)
    try:
        # only temporaries of this very output (``.NAME.xxxxxxxx.tmp``) that a killed run left
        remove_stale_temporaries(job.output.parent, lambda target: target == job.output.name)
        write_image(job.output, rgb, alpha, quality=quality, icc_profile=image.icc_profile, exif=image.exif)
    except OSError as exc:
        raise OutputWriteError(exc.errno, f"cannot write output {describe_os_error(exc)}") from None



# ----------------------------------------------------------------------------- the models a run uses


class RunModels:
    """The SR system, and the face detector and identity model loaded on first use.

    Loading errors of the detector / identity model are kept and raised per image as
    :class:`FaceToolError`, so one missing model fails the photos that need it, not the run.
    """

    def __init__(self, system: SRSystem, compute: Compute, detector=None, face_model=None, max_drift: float = 0.0) -> None:
        self.system = system
        self.max_drift = max_drift
        self.compute = compute
        self._detector = detector
        self._face_model = face_model
        self._errors: dict[str, str] = {}

    def _lazy(self, kind: str, make: Callable):
        if kind in self._errors:
            raise FaceToolError(self._errors[kind])
        try:
            return make()
        except Exception as exc:  # noqa: BLE001 - reported per image, one line
            self._errors[kind] = f"{kind} unavailable ({exc.__class__.__name__}: {exc})"
            raise FaceToolError(self._errors[kind]) from None

    def detector(self):
        if self._detector is None:
            self._detector = self._lazy("face detector", lambda: MTCNN.load(self.compute))
        return self._detector

    def face_model(self) -> FaceModel:
        if self._face_model is None:
            self._face_model = self._lazy("identity model", lambda: create_face_model(DRIFT_FACE_MODEL, compute=self.compute))
        return self._face_model

    @property
    def lr_face_range(self) -> tuple[float, float] | None:
        return None if self.system.card is None else self.system.card.lr_face_range


class FaceToolError(RuntimeError):
    """The face detector or identity model could not be loaded (one line, per image)."""


# ----------------------------------------------------------------------------- faces mode


def crop_face_side(height: int, width: int, margin: float) -> float:
    """Estimated detector-box side of the face in a crop cut with ``square_box`` margin ``margin``."""
    return max(height, width) / (1.0 + 2.0 * margin)


def upscale_crop(rgb: np.ndarray, models: RunModels, options: UpscaleOptions) -> tuple[np.ndarray, dict]:
    """One face crop (H, W, 3) -> (scale*H, scale*W, 3) of the same dtype and its face record
    (:func:`upscale_crops` on one crop)."""
    return upscale_crops([rgb], models, options)[0]


def upscale_crops(crops: list[np.ndarray], models: RunModels, options: UpscaleOptions) -> list[tuple[np.ndarray, dict]]:
    """Face crops at their own size -> their upscales (``scale`` x, same dtype) and face records.

    A crop whose estimated face size the routing admits (:func:`routes_to_sr`) goes through
    the network at its own resolution, crops of one size together in one batch; the others,
    and those whose identity drift exceeds ``max_drift``, keep the classical upscale.
    """
    out: list = [None] * len(crops)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, rgb in enumerate(crops):
        height, width = rgb.shape[:2]
        side = crop_face_side(height, width, options.margin)
        record = {"box": [0, 0, width, height], "side": round(side, 1), "route": CLASSICAL, "reason": "", "drift": None}
        out[k] = (classical_upscale(rgb, options.scale, options.tile), record)
        if routes_to_sr(side, models.lr_face_range, options.threshold):
            groups.setdefault(rgb.shape, []).append(k)
        else:
            record["reason"] = "outside the model's face-size range"
    for members in groups.values():
        sr = crops_through_model([crops[k] for k in members], models, options)
        drifts = face_drift(models, sr, torch.stack([to_tensor(out[k][0]) for k in members]), None)
        for k, face, drift in zip(members, sr, drifts):
            classical, record = out[k]
            record["drift"] = drift
            record["reason"] = drift_reason(drift, options.max_drift)
            if record["reason"]:
                continue
            record["route"] = "sr"
            out[k] = (to_image_array(face, crops[k].dtype), record)
    return out


def crops_through_model(crops: list[np.ndarray], models: RunModels, options: UpscaleOptions) -> torch.Tensor:
    """(N, 3, scale*H, scale*W) SR of N crops of one size: one batch, or tiles when large."""
    height, width = crops[0].shape[:2]
    if max(height, width) > options.sr_tile:
        sr = torch.stack([super_resolve(models.system, to_tensor(c), options.sr_tile) for c in crops])
    else:
        sr = models.system.upscale(torch.stack([to_tensor(c) for c in crops]))
    if models.system.scale != options.scale:
        sr = resize_bicubic(sr, (height * options.scale, width * options.scale))
    return sr


def drift_reason(drift: float | None, max_drift: float) -> str:
    """Why an SR face keeps the classical upscale for its identity drift: '' when it does not
    (drift not measured, at most ``max_drift``, or the check off: ``max_drift`` 0)."""
    if drift is not None and max_drift and drift > max_drift:
        return f"identity drift {drift:.3f} > {max_drift:g}"
    return ""


def face_drift(models: RunModels, sr: torch.Tensor, classical: torch.Tensor, landmarks: torch.Tensor | None) -> list:
    """Identity drift per face (None for the bicubic system, which cannot drift, and when
    the drift check is off: ``--max-drift 0``)."""
    if models.system.model is None or not models.max_drift:
        return [None] * sr.shape[0]  # `drift > max_drift` is then never asked
    drift = identity_drift(models.face_model(), sr, classical, landmarks)
    return [round(float(d), 4) for d in drift]


# ----------------------------------------------------------------------------- photo mode


@dataclass
class PhotoFaces:
    """Photo-mode outcome: the upscaled canvas and alpha, and one record per detection."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    faces: list[dict]


def face_record(face: Face) -> dict:
    return {"box": [round(float(v), 1) for v in face.box], "score": round(face.score, 4), "side": round(face.side, 1),
            "route": "rejected" if face.rejected else CLASSICAL, "reason": face.rejected, "drift": None}


def admitted_faces(faces: list[Face], records: list[dict], models: RunModels, options: UpscaleOptions) -> list[int]:
    """Indices of the real faces the routing rule sends to the model (others marked in ``records``)."""
    chosen = []
    for k, face in enumerate(faces):
        if face.rejected:
            continue
        if routes_to_sr(face.side, models.lr_face_range, options.threshold):
            chosen.append(k)
        else:
            records[k]["reason"] = "outside the model's face-size range"
    return chosen


#: ``on_face(done, total)``: progress of one photo's faces through the model
FaceProgress = Callable[[int, int], None]


def super_resolve_faces(image: LoadedImage, canvas: np.ndarray, faces: list[Face], chosen: list[int],
                        models: RunModels, options: UpscaleOptions,
                        on_face: FaceProgress | None = None) -> tuple[list[torch.Tensor], list]:
    """SR windows (3, scale*S, scale*S) of the chosen faces (square plus context), and the
    identity drift of each face square against the same square of the classical ``canvas``.
    ``on_face(done, total)`` is called before the first face and after each one."""
    scale, srs, drifts = options.scale, [], []
    if on_face is not None:
        on_face(0, len(chosen))
    for k in chosen:
        window = face_window(faces[k], options.margin)
        sr = super_resolve_window(models.system, image.rgb, window, options.sr_tile)
        out_side = window.outer[2] * scale
        if sr.shape[-1] != out_side:
            sr = resize_bicubic(sr[None], out_side)[0]
        if models.max_drift and models.system.model is not None:
            face_side = window.side * scale
            classical = extract_square(canvas, window.x0 * scale, window.y0 * scale, face_side)
            marks = torch.from_numpy(window_landmarks(faces[k], window, face_side))
            drifts += face_drift(models, face_square(sr, window)[None], to_tensor(np.ascontiguousarray(classical))[None],
                                 marks[None])
        else:
            drifts.append(None)
        srs.append(sr)
        if on_face is not None:
            on_face(len(srs), len(chosen))
    return srs, drifts


def upscale_photo(image: LoadedImage, models: RunModels, options: UpscaleOptions,
                  on_face: FaceProgress | None = None) -> PhotoFaces:
    """Whole photo -> classical upscale by ``scale`` with every admitted real face replaced by its
    SR version at its own resolution (feathered paste-back), plus the per-face records.
    ``on_face(done, total)`` follows the faces through the model (a group photo's take a while)."""
    scale = options.scale
    canvas = classical_upscale(image.rgb, scale, options.tile)
    alpha = None if image.alpha is None else classical_upscale(image.alpha, scale, options.tile)
    faces = find_faces(models.detector(), image.rgb_uint8(), options.face_filter(), options.detect_max_pixels)
    records = [face_record(face) for face in faces]
    chosen = admitted_faces(faces, records, models, options)
    srs, drifts = super_resolve_faces(image, canvas, faces, chosen, models, options, on_face)
    for k, sr, drift in zip(chosen, srs, drifts):
        records[k]["drift"] = drift
        records[k]["reason"] = drift_reason(drift, options.max_drift)
        if records[k]["reason"]:
            continue
        window = face_window(faces[k], options.margin)
        x0, y0, outer = window.outer
        paste_face(canvas, sr, x0 * scale, y0 * scale, outer * scale, window_feather(window))
        records[k]["route"] = "sr"
    return PhotoFaces(canvas, alpha, records)


# ----------------------------------------------------------------------------- settings record


def output_root(src: Path, dst: Path) -> Path:
    """The folder the outputs (and the settings record) go to."""
    if src.is_dir():
        return dst
    return dst.parent if dst.suffix.lower() in IMAGE_EXTENSIONS and not dst.is_dir() else dst


def run_settings(options: UpscaleOptions, system: SRSystem) -> dict:
    """Everything that decides the output pixels: options, model name and weights checksum."""
    skip = {"overwrite", "show_progress", "max_pixels", "detect_max_pixels", "suffix"}  # none changes pixels
    settings = {k: v for k, v in asdict(options).items() if k not in skip}
    settings["model"] = system.name
    settings["model_sha256"] = system.card.sha256 if system.card is not None else "bicubic"
    settings["self_ensemble"] = system.self_ensemble
    return settings


def settings_conflict(root: Path, settings: dict) -> str:
    """'' when OUT's recorded settings match ``settings`` (or none are recorded), else what differs."""
    path = root / SETTINGS_FILE
    try:
        recorded = json.loads(path.read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return ""
    same_weights = recorded.get("model_sha256") == settings["model_sha256"]  # `default` and `fsr_default` alike
    changed = [f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in settings.items()
               if recorded.get(key) != value and not (same_weights and key == "model")]
    return ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")


def record_settings(root: Path, settings: dict) -> None:
    """Write OUT/.fsr-upscale.json (atomically) so a later run can tell its outputs apart."""
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / SETTINGS_FILE, json.dumps({"settings": settings}, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- plan, load, run, write


@dataclass
class RunPlan:
    """What a run will do: every job, the ones to process, and the results already known."""

    jobs: list[Job]
    pending: list[Job]
    known: dict[Path, ImageResult]
    root: Path
    settings: dict


def plan_run(src: str | os.PathLike, dst: str | os.PathLike, jobs: list[Job], options: UpscaleOptions,
             system: SRSystem) -> RunPlan:
    """Skip finished outputs (``jobs`` from :func:`plan_jobs`) made with the same settings;
    refuse (one line naming --overwrite) to mix outputs of other settings."""
    root = output_root(Path(src).expanduser(), Path(dst).expanduser())
    settings = run_settings(options, system)
    existing = {job.output for job in jobs if not job.error and job.output.exists()}
    if existing and not options.overwrite:
        conflict = settings_conflict(root, settings)
        if conflict:
            raise UpscaleError(
                f"{root}: holds {len(existing)} output(s) made with other settings ({conflict}); "
                "re-run with --overwrite to re-do them, or choose another OUT"
            )
    known, pending = {}, []
    for job in jobs:
        if job.error:
            known[job.input] = ImageResult(str(job.input), "", "failed", reason=job.error)
        elif job.output in existing and not options.overwrite:
            known[job.input] = ImageResult(str(job.input), str(job.output), "skipped", reason="output exists")
        else:
            pending.append(job)
    return RunPlan(jobs, pending, known, root, settings)


def load_job(job: Job, options: UpscaleOptions) -> _Loaded:
    """Read one input and decide its mode (runs in the read-ahead pool)."""
    t0 = time.perf_counter()
    item = _Loaded(job)
    try:
        image = read_image(job.input, max_pixels=options.max_pixels)
        if min(image.height, image.width) < MIN_INPUT_SIDE:
            raise ImageReadError(job.input, f"too small to hold a face ({image.width}x{image.height} px; "
                                            f"at least {MIN_INPUT_SIDE} px a side)")
        item.mode = choose_mode(image.height, image.width, options)
        channels = 3 + (image.alpha is not None)
        _check_output_size(job, image.height, image.width, channels, image.rgb.itemsize, options.scale)
        item.image = image
    except ImageReadError as exc:
        item.error = exc.reason
    except MemoryError:
        item.error = "not enough memory to decode"
    item.seconds = time.perf_counter() - t0
    return item


def run_photo_job(item: _Loaded, models: RunModels, options: UpscaleOptions,
                  on_face: FaceProgress | None = None) -> ImageResult:
    """Upscale and write one photo; every failure becomes a ``failed`` result."""
    image = item.image
    item.image = None
    t0 = time.perf_counter()
    try:
        photo = upscale_photo(image, models, options, on_face)
        _write(item.job, photo.rgb, photo.alpha, options.quality, image)
    except OutputWriteError as exc:
        if exc.disk_unusable:
            raise
        return _result(item, "unwritten", reason=exc.strerror)
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
        return _result(item, "failed", reason=_failure_reason(exc))
    item.seconds += time.perf_counter() - t0
    return _result(item, "done", image=image, rgb=photo.rgb, faces=photo.faces, model=models.system.name)


def confirm_face_crop(item: _Loaded, models: RunModels, options: UpscaleOptions) -> bool:
    """``auto`` mode's check of an image it takes for a face crop: does a face fill it
    (:func:`crop_face`)? If not, the image is handled as a photo (no face: classical upscale).
    Always True when the user chose ``--mode faces``."""
    if options.mode != "auto":
        return True
    try:
        face = crop_face(models.detector(), item.image.rgb_uint8(), options.face_filter())
    except FaceToolError:  # the photo path reports the missing detector for this image
        face = None
    if face is None:
        item.mode = "photo"
    return face is not None


def run_crop_jobs(items: list[_Loaded], models: RunModels, options: UpscaleOptions) -> list[ImageResult]:
    """Upscale (batched by size) and write face crops; failures become ``failed`` results."""
    t0 = time.perf_counter()
    try:
        outputs = upscale_crops([item.image.rgb for item in items], models, options)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory at batch 1: fail these, keep going
        return [_result(item, "failed", reason=_failure_reason(exc)) for item in items]
    share = (time.perf_counter() - t0) / len(items)
    results = []
    for item, (rgb, record) in zip(items, outputs):
        image, t1 = item.image, time.perf_counter()
        item.image = None
        try:
            alpha = None if image.alpha is None else classical_upscale(image.alpha, options.scale, options.tile)
            _write(item.job, rgb, alpha, options.quality, image)
        except OutputWriteError as exc:
            if exc.disk_unusable:
                raise
            results.append(_result(item, "unwritten", reason=exc.strerror))
            continue
        except Exception as exc:  # noqa: BLE001
            results.append(_result(item, "failed", reason=f"{exc.__class__.__name__}: {exc}"))
            continue
        item.seconds += share + time.perf_counter() - t1
        results.append(_result(item, "done", image=image, rgb=rgb, faces=[record], model=models.system.name))
    return results


def _failure_reason(exc: Exception) -> str:
    """One line for a failed image, by the exception's type."""
    if isinstance(exc, MemoryError):
        return "out of memory (use a smaller --scale or --tile)"
    if isinstance(exc, FaceToolError):
        return str(exc)
    return f"{exc.__class__.__name__}: {exc}"


def _result(item: _Loaded, status: str, *, reason: str = "", image: LoadedImage | None = None,
            rgb: np.ndarray | None = None, faces: list[dict] | None = None, model: str = "") -> ImageResult:
    faces = faces or []
    sr = sum(f["route"] == "sr" for f in faces)
    return ImageResult(
        str(item.job.input), str(item.job.output), status, mode=item.mode, reason=reason,
        width=image.width if image else 0, height=image.height if image else 0,
        out_width=rgb.shape[1] if rgb is not None else 0, out_height=rgb.shape[0] if rgb is not None else 0,
        faces_found=sum(f["route"] != "rejected" for f in faces) if item.mode == "photo" else len(faces),
        faces_sr=sr, faces_rejected=sum(f["route"] == "rejected" for f in faces),
        seconds=round(item.seconds, 4), model=(model if sr else CLASSICAL) if status == "done" else "",
        jpeg_quality=image.jpeg_quality if image else None, faces=faces,
    )


class PhotoFacesBar:
    """A second progress line under the images' bar, "faces of NAME 12/46", shown while a photo
    with at least ``min_faces`` faces to super-resolve goes through the model."""

    def __init__(self, progress, min_faces: int = 2) -> None:
        self.progress = progress
        self.min_faces = min_faces
        self.task = progress.add_task("faces", total=1, visible=False, unit="face")

    def follow(self, name: str) -> FaceProgress:
        def on_face(done: int, total: int) -> None:
            if done == 0:  # a new photo: its own count, rate and ETA
                self.progress.reset(self.task, total=max(1, total), description=f"  faces of {name}",
                                    visible=total >= self.min_faces)
            else:
                self.progress.update(self.task, completed=done)
        return on_face

    def hide(self) -> None:
        self.progress.update(self.task, visible=False)


def run_pending(plan: RunPlan, models: RunModels, options: UpscaleOptions) -> tuple[dict[Path, ImageResult], float]:
    """Load ahead in a thread pool; upscale and write each photo, and face crops in batches.

    Returns the results and the seconds spent (the progress bar's clock)."""
    results = dict(plan.known)
    chunk = max(16, 4 * models.compute.batch_size)
    workers = max(2, min(8, os.cpu_count() or 2))
    progress = make_progress("img", disable=not options.show_progress)
    pool = ThreadPoolExecutor(max_workers=workers)  # reads ahead while the model runs
    started = time.perf_counter()
    crops: list[_Loaded] = []
    try:
        with progress:
            task = progress.add_task("upscale", total=len(plan.pending))
            faces = PhotoFacesBar(progress)
            for item in _prefetch(lambda job: load_job(job, options), plan.pending, pool, window=max(8, min(chunk, 64))):
                if item.error:
                    done = [_result(item, "failed", reason=item.error)]
                elif item.mode == "faces" and confirm_face_crop(item, models, options):
                    crops.append(item)
                    done, crops = (run_crop_jobs(crops, models, options), []) if len(crops) >= chunk else ([], crops)
                else:
                    done = [run_photo_job(item, models, options, faces.follow(item.job.input.name))]
                    faces.hide()
                results.update((Path(r.input), r) for r in done)
                progress.advance(task, len(done))
            if crops:
                done = run_crop_jobs(crops, models, options)
                results.update((Path(r.input), r) for r in done)
                progress.advance(task, len(done))
    except OutputWriteError as exc:  # disk full or read-only: stop, say what is kept
        pool.shutdown(wait=True, cancel_futures=True)
        kept = sum(r.status == "done" for r in results.values()) - sum(r.status == "done" for r in plan.known.values())
        raise UpscaleError(
            f"{exc.strerror}; stopped: {kept} outputs written now are kept, {len(plan.pending) - kept} not done; "
            "free space (or fix the folder's permissions) and re-run the same command to continue"
        ) from None
    finally:  # on Ctrl-C / SIGTERM: drop queued reads; writes in flight finish (they are atomic)
        pool.shutdown(wait=True, cancel_futures=True)
    return results, time.perf_counter() - started


def load_system(options: UpscaleOptions, compute: Compute) -> SRSystem:
    """The SR system named by ``--model``; one-line :class:`UpscaleError` when it cannot load."""
    try:
        return load_sr_system(options.model, compute)
    except (WeightsError, ValueError, OSError) as exc:
        raise UpscaleError(f"model '{options.model}': {exc}") from None


def upscale_path(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    options: UpscaleOptions,
    compute: Compute,
    *,
    detector=None,
    system: SRSystem | None = None,
    face_model: FaceModel | None = None,
) -> UpscaleSummary:
    """Upscale one image file or every image under a folder into ``dst``: plan, load, run, write.

    Returns the per-image results; raises :class:`UpscaleError` (one line) only when the
    run cannot start (bad paths, unsafe output, model not loadable, OUT made with other
    settings). Bad images are recorded as ``failed`` and skipped.
    """
    started = time.perf_counter()
    options.validate()
    jobs = plan_jobs(src, dst, options)  # path errors before the model loads
    system = system or load_system(options, compute)
    plan = plan_run(src, dst, jobs, options, system)
    if plan.pending:
        try:
            record_settings(plan.root, plan.settings)
        except OSError as exc:
            raise UpscaleError(f"{plan.root}: cannot record the run's settings ({describe_os_error(exc)})") from None
    results, processing = run_pending(plan, RunModels(system, compute, detector, face_model, options.max_drift), options)
    return UpscaleSummary(
        results=[results[job.input] for job in plan.jobs],
        model=system.name,
        model_learned_jpeg=system.card is not None and system.card.jpeg_augment > 0,
        device=compute.describe(),
        seconds=time.perf_counter() - started,
        processing_seconds=processing,
        output_root=str(plan.root),
        options={k: v for k, v in asdict(options).items() if k != "show_progress"},
    )

# ----------------------------------------------------------------------------- report


REPORT_FIELDS = [f.name for f in ImageResult.__dataclass_fields__.values()]


def write_upscale_report(path: str | os.PathLike, summary: UpscaleSummary) -> None:
    """Write the per-image results as JSON (with the run's settings) or CSV, by suffix, atomically.

    Each image lists its detections (``faces``: box, score, size, route sr | classical |
    rejected, the reason, and the identity drift of SR faces); in CSV as a JSON string."""
    path = Path(path)
    rows = [asdict(r) for r in summary.results]
    if path.suffix.lower() == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=REPORT_FIELDS)
        writer.writeheader()
        writer.writerows({**row, "faces": json.dumps(row["faces"])} for row in rows)
        atomic_write_text(path, buf.getvalue())
        return
    payload = {
        "model": summary.model,
        "device": summary.device,
        "outputs": summary.output_root,
        "seconds": round(summary.seconds, 3),
        "processing_seconds": round(summary.processing_seconds, 3),
        "done": summary.done,
        "skipped": summary.skipped,
        "failed": summary.failed,
        "faces_found": summary.faces_found,
        "faces_sr": summary.faces_sr,
        "faces_rejected": summary.faces_rejected,
        "options": summary.options,
        "images": rows,
    }
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


#: JPEG inputs at this quality or lower keep little of the gain of a model trained on lossless
#: faces only (benchmarks/jpeg_inputs.py); the run's summary then names a model that learned them.
JPEG_HINT_QUALITY = 90
JPEG_MODEL = "fsr_jpeg"


def jpeg_hint(summary: UpscaleSummary) -> str:
    """One line for the end of a run whose model never saw JPEG-compressed faces when some of its
    super-resolved faces came from JPEG files of quality ``JPEG_HINT_QUALITY`` or lower, naming
    ``JPEG_MODEL`` where it is installed; '' otherwise."""
    compressed = summary.compressed_inputs(JPEG_HINT_QUALITY)
    if summary.model_learned_jpeg or not compressed or find_weights(f"{JPEG_MODEL}.safetensors") is None:
        return ""
    qualities = sorted(r.jpeg_quality for r in compressed)
    span = f"{qualities[0]}" if qualities[0] == qualities[-1] else f"{qualities[0]}-{qualities[-1]}"
    return (f"note: {len(compressed)} of the images were stored as JPEG at quality {span}; --model {JPEG_MODEL}, "
            "trained on compressed faces, restores such faces with fewer block artifacts and keeps their identity better")


def throughput(summary: UpscaleSummary) -> float:
    """Images per second while processing (done, failed or unwritten, over the progress bar's clock): the
    rate the progress bar shows. Skipped outputs and model loading are not counted."""
    processed = summary.done + summary.failed + summary.unwritten
    return processed / summary.processing_seconds if summary.processing_seconds > 0 else math.nan
