"""``fsr upscale``: super-resolve face crops, or the faces inside whole photos.

Three modes, chosen per image:

* ``faces``: the image *is* a face crop (any size). It is centre-padded to a square by
  edge replication (no distortion), resized to the model's input (32x32 for fsr's x4
  128 model) by antialiased bicubic (:func:`fsr.data.degrade.resize_bicubic`, the one
  degradation path), super-resolved, resized to ``scale`` x the padded side and the
  padding cropped off: the output is exactly ``scale*H x scale*W``. Crops from many
  files are stacked and super-resolved together in batches on the device.
* ``photo``: the whole photo is upscaled by ``scale`` with a classical resampler
  (antialiased bicubic, computed in tiles so a 50-megapixel photo fits in memory), every
  face is found with fsr's MTCNN, and each face whose box is smaller than ``threshold``
  pixels (the paper's Fig. 2 routing) is cut as a square (``fsr.detect.crop``, margin
  0.25), resized to the model input, super-resolved, resized to its size in the output
  and pasted back with a feathered mask. Pixels outside the pasted squares are exactly
  the classical upscale.
* ``auto`` (default): an image whose long side is at most ``auto_face_max_side`` pixels
  (160) and whose aspect ratio is at most 1.25 is taken as a face crop; everything else
  is a photo.

The alpha channel, when present, is upscaled classically and kept. Outputs are written
atomically (:func:`fsr.core.io.write_image`); existing outputs are skipped unless
``overwrite``; an input file is never written over.
"""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
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
    list_image_files,
    output_collisions,
    read_image,
    remove_stale_temporaries,
    to_tensor,
    write_image,
)
from fsr.core.weights import WeightsError
from fsr.data.degrade import resize_bicubic
from fsr.models.systems import SRSystem, load_sr_system

MODES = ("auto", "faces", "photo")
FORMATS = ("same", "png", "jpg", "webp")
# Largest side each output format can hold (OpenCV encoders).
FORMAT_MAX_SIDE = {".webp": 16383, ".jpg": 65535, ".jpeg": 65535}
CLASSICAL = "classical"
MIN_INPUT_SIDE = 8  # px: anything smaller holds no face worth super-resolving


class UpscaleError(ValueError):
    """A request that cannot run at all (bad paths, unsafe output, missing model). One line."""


@dataclass
class UpscaleOptions:
    """What ``fsr upscale`` does; every field is one CLI option.

    threshold: faces whose detected box (longer side, input pixels) is smaller than this go
        through the model in photo mode; larger ones keep the classical upscale. 0 = all.
    margin: face crop margin around the detected box (fraction of the box side per side).
    tile: side, in input pixels, of the tiles the classical upscale is computed in.
    feather: width of the paste-back blend ramp as a fraction of the face square's side.
    detect_max_pixels: bigger photos are shrunk to this many pixels for face detection only.
    """

    mode: str = "auto"
    model: str = "default"
    scale: int = 4
    threshold: int = 64
    margin: float = 0.25
    detect_min_face: int = 20
    out_format: str = "same"
    suffix: str = ""
    quality: int = 95
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    tile: int = 512
    feather: float = 0.12
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
        if self.threshold < 0:
            raise UpscaleError(f"--threshold must be >= 0, got {self.threshold}")
        if not 0.0 <= self.margin <= 2.0:
            raise UpscaleError(f"--margin must be in [0, 2], got {self.margin}")
        if not 0.0 <= self.feather < 0.5:
            raise UpscaleError(f"feather must be in [0, 0.5), got {self.feather}")
        if self.tile < 16:
            raise UpscaleError(f"--tile must be at least 16 pixels, got {self.tile}")
        if any(c in self.suffix for c in "/\\"):
            raise UpscaleError(f"--suffix must not contain a path separator: '{self.suffix}'")


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
    seconds: float = 0.0
    model: str = ""


@dataclass
class UpscaleSummary:
    """Everything a run did: per-image results plus the run's settings and wall time."""

    results: list[ImageResult]
    model: str
    device: str
    seconds: float
    options: dict = field(default_factory=dict)

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
    if out_format == "same":
        return input_path.suffix.lower()
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


def _quantize(x: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, C) array of ``dtype`` (uint8 / uint16), rounded."""
    maxv = 65535.0 if dtype == np.uint16 else 255.0
    q = x.clamp(0, 1).mul_(maxv).round_()
    q = q.to(torch.int32 if dtype == np.uint16 else torch.uint8)
    return q.permute(1, 2, 0).numpy().astype(dtype, copy=False)


def _max_value(dtype: np.dtype) -> float:
    return 65535.0 if dtype == np.uint16 else 255.0


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
    maxv = _max_value(img.dtype)
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
            out[y0 * scale : y1 * scale, x0 * scale : x1 * scale] = _quantize(up, img.dtype)
    return out[..., 0] if squeeze else out


def feather_ramp(side: int, feather: float = 0.12) -> np.ndarray:
    """(side,) float32: 1 in the middle, a smoothstep ramp to 0 over the outer ``feather * side``
    pixels at both ends."""
    ramp_width = max(1.0, feather * side)
    coords = np.arange(side, dtype=np.float32) + 0.5
    dist = np.minimum(coords, side - coords)  # distance from the nearer edge
    t = np.clip(dist / ramp_width, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def feather_mask(side: int, feather: float = 0.12) -> np.ndarray:
    """(side, side) float32 paste-back blend weights: the outer product of two :func:`feather_ramp`."""
    ramp = feather_ramp(side, feather)
    return np.outer(ramp, ramp)


def resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) matrix M with ``M @ v`` = antialiased bicubic resize of ``v`` (the
    operator :func:`resize_bicubic` applies along one axis, obtained by resizing the identity)."""
    eye = torch.eye(size_in, dtype=torch.float32)[None, None]
    return resize_bicubic(eye, (size_out, size_in))[0, 0]


def paste_face(
    canvas: np.ndarray, face: torch.Tensor, x0: int, y0: int, out_side: int, feather: float = 0.12, band: int = 512
) -> None:
    """Resize a (3, s, s) [0, 1] SR face to ``out_side`` (antialiased bicubic) and blend it into
    ``canvas`` (H, W, 3 uint8/uint16, in place) at (x0, y0) with :func:`feather_mask`.

    Parts outside the canvas are dropped. The resize is applied as two matrix products and
    the blend is done ``band`` rows at a time, so even a face thousands of pixels wide in a
    huge output needs only a few ``band x out_side`` float buffers.
    """
    height, width = canvas.shape[:2]
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(width, x0 + out_side), min(height, y0 + out_side)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    maxv = _max_value(canvas.dtype)
    face = face.float().cpu()
    weights = resize_matrix(face.shape[-1], out_side)
    ramp = torch.from_numpy(feather_ramp(out_side, feather))
    cols = slice(cx0 - x0, cx1 - x0)
    face_cols = torch.einsum("chs,xs->chx", face, weights[cols])  # (3, s, columns in canvas)
    ramp_cols = ramp[cols]
    for r0 in range(cy0, cy1, band):
        r1 = min(cy1, r0 + band)
        rows = slice(r0 - y0, r1 - y0)
        sr = torch.einsum("ys,csx->yxc", weights[rows], face_cols).clamp_(0, 1)
        mask = (ramp[rows, None] * ramp_cols[None, :])[..., None]
        region = torch.from_numpy(canvas[r0:r1, cx0:cx1].astype(np.float32)).div_(maxv)
        blended = mask * sr + (1.0 - mask) * region
        canvas[r0:r1, cx0:cx1] = blended.clamp_(0, 1).mul_(maxv).round_().numpy().astype(canvas.dtype)


def model_input_size(system: SRSystem) -> int:
    """Side of the LR face the system expects (model card ``lr_size``; 32 for fsr's x4 128 model)."""
    card = system.card or {}
    return int(card.get("lr_size") or card.get("input_size") or 32)


@dataclass
class FaceInput:
    """A face crop ready for the model: (3, s, s) LR tensor plus what is needed to undo the padding."""

    lr: torch.Tensor
    height: int
    width: int
    pad_top: int
    pad_left: int
    alpha: np.ndarray | None
    dtype: np.dtype


def prepare_face_crop(image: LoadedImage, lr_size: int) -> FaceInput:
    """Centre-pad a face crop to a square by edge replication and resize it to ``lr_size``."""
    rgb = image.rgb
    height, width = rgb.shape[:2]
    side = max(height, width)
    pad_top, pad_left = (side - height) // 2, (side - width) // 2
    if side != height or side != width:
        rgb = np.pad(
            rgb, ((pad_top, side - height - pad_top), (pad_left, side - width - pad_left), (0, 0)), mode="edge"
        )
    lr = resize_bicubic(to_tensor(rgb)[None], lr_size)[0].clamp(0, 1)
    return FaceInput(lr, height, width, pad_top, pad_left, image.alpha, rgb.dtype)


def finish_face_crop(sr: torch.Tensor, face: FaceInput, scale: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(3, S, S) model output -> (scale*H, scale*W, 3) image of the input's dtype (+ upscaled alpha)."""
    side = max(face.height, face.width) * scale
    full = resize_bicubic(sr[None], side)[0]
    top, left = face.pad_top * scale, face.pad_left * scale
    crop = full[:, top : top + face.height * scale, left : left + face.width * scale]
    alpha = None if face.alpha is None else classical_upscale(face.alpha, scale)
    return _quantize(crop.contiguous(), face.dtype), alpha


# ----------------------------------------------------------------------------- photo mode


def _face_detector(compute: Compute):
    from fsr.detect.mtcnn import MTCNN  # imported lazily: faces-only runs need no detector

    return MTCNN.load(compute)


def detect_faces(detector, rgb8: np.ndarray, options: UpscaleOptions) -> np.ndarray:
    """(K, 4) x1, y1, x2, y2 face boxes in ``rgb8``'s pixels.

    Photos above ``detect_max_pixels`` are searched on a copy shrunk to that size (area
    averaging) and the boxes scaled back: the detector's memory grows faster than the
    pixel count, and faces small enough to be worth super-resolving stay above the
    detector's minimum size (20 px) after the shrink for photos up to ~50 MP.
    """
    height, width = rgb8.shape[:2]
    factor = 1.0
    if height * width > options.detect_max_pixels:
        factor = math.sqrt(options.detect_max_pixels / (height * width))
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        rgb8 = cv2.resize(rgb8, size, interpolation=cv2.INTER_AREA)
    detections = detector.detect([rgb8], min_face=options.detect_min_face)[0]
    boxes = np.asarray(detections.boxes, dtype=np.float64).reshape(-1, 4)
    return boxes / factor


def upscale_photo(
    image: LoadedImage, system: SRSystem, detector, options: UpscaleOptions
) -> tuple[np.ndarray, np.ndarray | None, int, int]:
    """Whole photo -> (rgb, alpha, faces found, faces super-resolved) at ``scale`` x the size.

    Classical tiled bicubic everywhere, then each face smaller than ``threshold`` is
    replaced by its super-resolved version, blended in with :func:`feather_mask`.
    """
    from fsr.detect.crop import crop_square, square_box

    scale = options.scale
    canvas = classical_upscale(image.rgb, scale, options.tile)
    alpha = None if image.alpha is None else classical_upscale(image.alpha, scale, options.tile)
    rgb8 = image.rgb_uint8()  # detection and face crops work on 8 bits (16-bit photos keep 16 elsewhere)
    boxes = detect_faces(detector, rgb8, options)
    chosen: list[tuple[int, int, int]] = []
    for box in boxes:
        face_side = max(box[2] - box[0], box[3] - box[1])
        if options.threshold and face_side >= options.threshold:
            continue
        chosen.append(square_box(box, margin=options.margin))  # integer (x0, y0, side)
    if chosen:
        lr_size = model_input_size(system)
        crops = [to_tensor(np.asarray(crop_square(rgb8, x0, y0, side, lr_size))) for x0, y0, side in chosen]
        lr = torch.stack(crops).clamp_(0, 1)
        sr = system.upscale(lr)
        for (x0, y0, side), face in zip(chosen, sr):
            paste_face(canvas, face, x0 * scale, y0 * scale, side * scale, options.feather)
    return canvas, alpha, len(boxes), len(chosen)


# ----------------------------------------------------------------------------- the run


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
    image: LoadedImage | None = None  # photo mode
    face: FaceInput | None = None  # faces mode
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


def _write(job: Job, rgb: np.ndarray, alpha: np.ndarray | None, quality: int) -> None:
    """Write one output atomically; a file-system failure becomes :class:`OutputWriteError`."""
    try:
        # only temporaries of this very output (``.NAME.xxxxxxxx.tmp``) that a killed run left
        remove_stale_temporaries(job.output.parent, lambda target: target == job.output.name)
        write_image(job.output, rgb, alpha, quality=quality)
    except OSError as exc:
        raise OutputWriteError(exc.errno, f"cannot write output {describe_os_error(exc)}") from None


def upscale_path(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    options: UpscaleOptions,
    compute: Compute,
    *,
    detector=None,
    system: SRSystem | None = None,
) -> UpscaleSummary:
    """Upscale one image file or every image under a folder into ``dst``.

    Returns the per-image results; raises :class:`UpscaleError` (one line) only when the
    run cannot start (bad paths, unsafe output, model not loadable). Bad images are
    recorded as ``failed`` and skipped.
    """
    started = time.perf_counter()
    options.validate()
    jobs = plan_jobs(src, dst, options)
    results: dict[Path, ImageResult] = {}
    pending: list[Job] = []
    for job in jobs:
        if job.error:
            results[job.input] = ImageResult(str(job.input), "", "failed", reason=job.error)
        elif job.output.exists() and not options.overwrite:
            results[job.input] = ImageResult(str(job.input), str(job.output), "skipped", reason="output exists")
        else:
            pending.append(job)

    model_name = options.model
    if pending and system is None:
        try:
            system = load_sr_system(options.model, compute)
        except (WeightsError, ValueError, OSError) as exc:
            raise UpscaleError(f"model '{options.model}': {exc}") from None
    if system is not None:
        model_name = system.name
        lr_size = model_input_size(system)
    detector_state: dict = {"detector": detector, "error": None}

    def get_detector():
        if detector_state["detector"] is None and detector_state["error"] is None:
            try:
                detector_state["detector"] = _face_detector(compute)
            except Exception as exc:  # noqa: BLE001 - reported per photo, one line
                detector_state["error"] = f"face detector unavailable ({exc.__class__.__name__}: {exc})"
        if detector_state["error"]:
            raise RuntimeError(detector_state["error"])
        return detector_state["detector"]

    def load(job: Job) -> _Loaded:
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
            if item.mode == "faces":
                item.face = prepare_face_crop(image, lr_size)
            else:
                item.image = image
        except ImageReadError as exc:
            item.error = exc.reason
        except MemoryError:
            item.error = "not enough memory to decode"
        item.seconds = time.perf_counter() - t0
        return item

    def record(item: _Loaded, status: str, **fields) -> None:
        results[item.job.input] = ImageResult(
            str(item.job.input), str(item.job.output), status, mode=item.mode, seconds=round(item.seconds, 4), **fields
        )

    chunk = max(16, 4 * compute.batch_size)
    window = max(8, min(chunk, 64))
    workers = max(2, min(8, os.cpu_count() or 2))
    progress = make_progress("img", disable=not options.show_progress)
    pool = ThreadPoolExecutor(max_workers=workers)  # reads ahead, encodes and writes in parallel
    try:
        with progress:
            task = progress.add_task("upscale", total=len(pending))
            face_queue: list[_Loaded] = []

            def flush_faces() -> None:
                if not face_queue:
                    return
                t0 = time.perf_counter()
                try:
                    sr = system.upscale(torch.stack([it.face.lr for it in face_queue]))
                except Exception as exc:  # noqa: BLE001 - e.g. OOM at batch 1: fail these, keep going
                    for it in face_queue:
                        record(it, "failed", reason=f"super-resolution failed ({exc.__class__.__name__}: {exc})")
                    progress.advance(task, len(face_queue))
                    face_queue.clear()
                    return
                share = (time.perf_counter() - t0) / len(face_queue)

                def finish(pair):
                    it, face_sr = pair
                    t1 = time.perf_counter()
                    rgb, alpha = finish_face_crop(face_sr, it.face, options.scale)
                    _write(it.job, rgb, alpha, options.quality)
                    return rgb.shape, time.perf_counter() - t1

                futures = [pool.submit(finish, (it, face_sr)) for it, face_sr in zip(face_queue, sr)]
                for it, fut in zip(face_queue, futures):
                    it.seconds += share
                    try:
                        shape, write_s = fut.result()
                    except OutputWriteError as exc:
                        if exc.disk_unusable:
                            raise
                        record(it, "unwritten", reason=exc.strerror)
                    except Exception as exc:  # noqa: BLE001
                        record(it, "failed", reason=f"{exc.__class__.__name__}: {exc}")
                    else:
                        it.seconds += write_s
                        record(
                            it, "done", width=it.face.width, height=it.face.height, out_width=shape[1],
                            out_height=shape[0], faces_found=1, faces_sr=1, model=model_name,
                        )
                    progress.advance(task)
                face_queue.clear()

            for item in _prefetch(load, pending, pool, window):
                if item.error:
                    record(item, "failed", reason=item.error)
                    progress.advance(task)
                    continue
                if item.mode == "faces":
                    face_queue.append(item)
                    if len(face_queue) >= chunk:
                        flush_faces()
                    continue
                image = item.image
                item.image = None
                try:
                    detector_now = get_detector()  # loaded once, before the clock starts
                    t0 = time.perf_counter()
                    rgb, alpha, found, sr_count = upscale_photo(image, system, detector_now, options)
                    _write(item.job, rgb, alpha, options.quality)
                except OutputWriteError as exc:
                    if exc.disk_unusable:
                        raise
                    record(item, "unwritten", reason=exc.strerror)
                except MemoryError:
                    record(item, "failed", reason="out of memory (use a smaller --scale or --tile)")
                except Exception as exc:  # noqa: BLE001 - one bad photo must not stop the run
                    reason = str(exc) if isinstance(exc, RuntimeError) and str(exc).startswith("face detector") else (
                        f"{exc.__class__.__name__}: {exc}"
                    )
                    record(item, "failed", reason=reason)
                else:
                    item.seconds += time.perf_counter() - t0
                    record(
                        item, "done", width=image.width, height=image.height, out_width=rgb.shape[1],
                        out_height=rgb.shape[0], faces_found=found, faces_sr=sr_count,
                        model=model_name if sr_count else CLASSICAL,
                    )
                progress.advance(task)
            flush_faces()
    except OutputWriteError as exc:  # disk full or read-only: stop, say what is kept
        pool.shutdown(wait=True, cancel_futures=True)
        kept = sum(r.status == "done" for r in results.values())
        raise UpscaleError(
            f"{exc.strerror}; stopped: {kept} outputs written now are kept, {len(pending) - kept} not done; "
            "free space (or fix the folder's permissions) and re-run the same command to continue"
        ) from None
    finally:  # on Ctrl-C / SIGTERM: drop queued reads; writes in flight finish (they are atomic)
        pool.shutdown(wait=True, cancel_futures=True)

    ordered = [results[job.input] for job in jobs]
    return UpscaleSummary(
        results=ordered,
        model=model_name,
        device=compute.describe(),
        seconds=time.perf_counter() - started,
        options={k: v for k, v in asdict(options).items() if k != "show_progress"},
    )


# ----------------------------------------------------------------------------- report


REPORT_FIELDS = [f.name for f in ImageResult.__dataclass_fields__.values()]


def write_report(path: str | os.PathLike, summary: UpscaleSummary) -> None:
    """Write the per-image results as JSON (with the run's settings) or CSV, by suffix, atomically."""
    import json

    path = Path(path)
    rows = [asdict(r) for r in summary.results]
    if path.suffix.lower() == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=REPORT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buf.getvalue())
        return
    payload = {
        "model": summary.model,
        "device": summary.device,
        "seconds": round(summary.seconds, 3),
        "done": summary.done,
        "skipped": summary.skipped,
        "failed": summary.failed,
        "faces_found": summary.faces_found,
        "faces_sr": summary.faces_sr,
        "options": summary.options,
        "images": rows,
    }
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def throughput(summary: UpscaleSummary) -> float:
    """Images per second over the run (done images only)."""
    return summary.done / summary.seconds if summary.seconds > 0 else math.nan
