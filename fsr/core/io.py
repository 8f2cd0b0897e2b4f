"""Image reading and atomic writing, used by every subcommand.

Reading: JPEG, PNG, WebP, BMP, TIFF; EXIF orientation applied; grayscale, palette,
CMYK and RGBA inputs become RGB (+ alpha kept separately), and an image without colour is
marked ``grey`` so that its output can be grey again; 16-bit PNG/TIFF keep 16 bits; an RGB or
grey ICC colour profile and the EXIF metadata are kept with the pixels for the output
(:mod:`fsr.core.metadata`);
a declared size above ``max_pixels`` is refused before decoding (decompression bombs);
a corrupt, truncated, empty or non-image file raises :class:`ImageReadError`, whose
message is one line naming the file and the reason.

Writing: every output goes to a temporary file in the destination folder and is then
renamed over the target, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fsr.core.metadata import embed_metadata, fits_output, upright_exif, usable_profile

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Image formats fsr does not read: reported (not silently ignored) when found in an input folder.
UNSUPPORTED_IMAGE_EXTENSIONS = (
    ".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".svg", ".ico", ".psd", ".tga",
    ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf",
)
# 50 MP: a x4 upscale of it peaks near 5 GB, well under a laptop's memory; every phone and
# most camera photos fit. Checked on the declared size, before decoding. Raise with --max-pixels.
DEFAULT_MAX_PIXELS = 50_000_000

_UMASK = os.umask(0)
os.umask(_UMASK)

# We do our own bomb check with a clear message; PIL's must not fire first.
Image.MAX_IMAGE_PIXELS = None


class ImageReadError(Exception):
    """An input image that cannot be used. ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def pixel_max(dtype: np.dtype) -> float:
    """The value of a full-intensity pixel of an integer image: 65535 for uint16, else 255."""
    return 65535.0 if dtype == np.uint16 else 255.0


@dataclass
class LoadedImage:
    """A decoded image in display orientation.

    rgb: (H, W, 3) uint8 or uint16, RGB order. alpha: (H, W) of the same dtype, or None.
    grey: the file holds no colour (one grey channel, or three equal ones); models still see
    three channels, and :func:`grey_channel` turns their output back into one.
    icc_profile: the file's RGB or grey ICC colour profile (bytes), or None (then sRGB is meant).
    exif: the file's EXIF (a TIFF structure) with its orientation set upright, or None.
    jpeg_quality: for a JPEG file, the quality (1-100) its luminance table was made with
        (:func:`estimate_jpeg_quality`); None for other formats.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    path: str
    grey: bool = False
    icc_profile: bytes | None = None
    exif: bytes | None = None
    jpeg_quality: int | None = None

    @property
    def max_value(self) -> int:
        return int(pixel_max(self.rgb.dtype))

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    def rgb_uint8(self) -> np.ndarray:
        """(H, W, 3) uint8 (16-bit images rounded down to 8 bits)."""
        if self.rgb.dtype == np.uint8:
            return self.rgb
        return np.round(self.rgb.astype(np.float32) / 257.0).astype(np.uint8)


def _exif_orientation(pil: Image.Image) -> int:
    try:
        return int(pil.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - broken EXIF must not reject a good image
        return 1


def apply_exif_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip an (H, W, ...) array as EXIF orientation 1..8 prescribes."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return np.swapaxes(array, 0, 1)
    if orientation == 6:
        return np.rot90(array, k=-1)
    if orientation == 7:
        return np.rot90(array, k=1)[::-1]  # transverse
    if orientation == 8:
        return np.rot90(array, k=1)
    return array


def _pil_to_arrays(pil: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    mode = pil.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.asarray(pil, dtype=np.int64)
        gray = np.clip(gray, 0, 65535).astype(np.uint16)
        return np.repeat(gray[..., None], 3, axis=2), None
    if mode == "F":
        gray = np.clip(np.asarray(pil, dtype=np.float32), 0.0, 1.0 if np.asarray(pil).max() <= 1 else 255.0)
        scale = 65535.0 if gray.max() <= 1.0 else 257.0
        gray16 = np.round(gray * scale).astype(np.uint16)
        return np.repeat(gray16[..., None], 3, axis=2), None
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in pil.info)
    if has_alpha:
        rgba = np.asarray(pil.convert("RGBA"))
        return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])
    return np.asarray(pil.convert("RGB")), None


def _read_16bit_cv2(data: np.ndarray) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Decode with OpenCV keeping 16 bits; None when the file is not 16-bit colour."""
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16:
        return None
    if decoded.ndim == 2:
        return np.repeat(decoded[..., None], 3, axis=2), None
    if decoded.shape[2] == 4:
        rgb = cv2.cvtColor(decoded[..., :3], cv2.COLOR_BGR2RGB)
        return rgb, np.ascontiguousarray(decoded[..., 3])
    return cv2.cvtColor(decoded[..., :3], cv2.COLOR_BGR2RGB), None


def read_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read one image file, upright, as RGB (+ alpha).

    Raises :class:`ImageReadError` (one line: file and reason) for anything unusable.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file ({exc.strerror or exc})") from None
    if size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pil = Image.open(path)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (unrecognised format)") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot open image ({exc})") from None
    with pil:
        width, height = pil.size
        if width <= 0 or height <= 0:
            raise ImageReadError(path, f"invalid image size {width}x{height}")
        if width * height > max_pixels:
            raise ImageReadError(
                path,
                f"declared size {width}x{height} ({width * height / 1e6:.0f} MP) exceeds the "
                f"limit of {max_pixels / 1e6:.0f} MP (possible decompression bomb; see --max-pixels)",
            )
        orientation = _exif_orientation(pil)
        is_jpeg = pil.format in ("JPEG", "MPO")  # MPO: the multi-picture JPEG of many phones and cameras
        jpeg_quality = estimate_jpeg_quality(getattr(pil, "quantization", None) or {}) if is_jpeg else None
        icc_profile = usable_profile(pil.info.get("icc_profile"))
        exif = upright_exif(pil.info.get("exif"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pil.load()
        except (OSError, SyntaxError, ValueError) as exc:
            reason = str(exc) or exc.__class__.__name__
            if "truncated" in reason.lower():
                reason = "truncated or corrupt image data"
            raise ImageReadError(path, f"cannot decode image ({reason})") from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad input
            raise ImageReadError(path, f"cannot decode image ({exc.__class__.__name__}: {exc})") from None
        fmt = (pil.format or "").upper()
        arrays = None
        if fmt in ("PNG", "TIFF"):
            arrays = _read_16bit_cv2(np.fromfile(path, dtype=np.uint8))
        if arrays is None:
            try:
                arrays = _pil_to_arrays(pil)
            except Exception as exc:  # noqa: BLE001
                raise ImageReadError(path, f"unsupported pixel format {pil.mode} ({exc})") from None
    rgb, alpha = arrays
    grey = bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))
    if orientation != 1:
        rgb = np.ascontiguousarray(apply_exif_orientation(rgb, orientation))
        if alpha is not None:
            alpha = np.ascontiguousarray(apply_exif_orientation(alpha, orientation))
    return LoadedImage(rgb=rgb, alpha=alpha, path=str(path), grey=grey, icc_profile=icc_profile, exif=exif,
                       jpeg_quality=jpeg_quality)


#: The luminance quantisation table of the JPEG standard (ITU T.81, Annex K.1), row by row: the
#: table that libjpeg, and with it most cameras, phones and image libraries, scale by quality.
JPEG_LUMINANCE_TABLE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
])


def jpeg_luminance_table(quality: int) -> np.ndarray:
    """The (64,) luminance table libjpeg writes at ``quality`` (1-100), row by row."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((JPEG_LUMINANCE_TABLE * scale + 50) // 100, 1, 255)


@functools.cache
def _jpeg_luminance_tables() -> np.ndarray:
    """(100, 64): :func:`jpeg_luminance_table` of qualities 1 to 100, made once."""
    return np.stack([jpeg_luminance_table(quality) for quality in range(1, 101)])


def estimate_jpeg_quality(tables: dict) -> int | None:
    """The quality (1-100) whose libjpeg luminance table is nearest (sum of absolute differences)
    to table 0 of ``tables`` (Pillow's ``Image.quantization``, row by row); exact for files that
    libjpeg and its descendants wrote, the nearest equivalent for others; None without a table."""
    table = tables.get(0)
    if table is None or len(table) != 64:
        return None
    errors = np.abs(_jpeg_luminance_tables() - np.asarray(table, dtype=np.int64)).sum(axis=1)
    return 1 + int(np.argmin(errors))


def grey_channel(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8/uint16 -> (H, W) of the same dtype: the mean of the three channels, for the
    output of a grey input (an RGB model leaves faint colour on a grey face)."""
    mean = rgb.astype(np.float32).mean(axis=2)
    return np.round(mean).astype(rgb.dtype)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8/uint16/float array -> (C, H, W) float32 tensor in [0, 1]."""
    if not array.flags.writeable:
        array = np.array(array)  # torch refuses read-only buffers without a warning
    if array.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(array)).float().div_(255.0)
    elif array.dtype == np.uint16:
        t = torch.from_numpy(array.astype(np.float32)).div_(65535.0)
    else:
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if t.ndim == 2:
        t = t[..., None]
    return t.permute(2, 0, 1).contiguous()


def to_image_array(tensor: torch.Tensor, dtype: np.dtype = np.uint8) -> np.ndarray:
    """(C, H, W) float tensor in [0, 1] -> (H, W, C) array of ``dtype`` (uint8 or uint16),
    rounded and clamped: the pixels a saved image holds."""
    t = tensor.detach().float().clamp(0, 1).mul(pixel_max(dtype)).round()
    t = t.to(torch.int32 if dtype == np.uint16 else torch.uint8)
    return t.permute(1, 2, 0).cpu().numpy().astype(dtype, copy=False)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """(C, H, W) float tensor in [0, 1] -> (H, W, C) uint8 array (rounded, clamped)."""
    return to_image_array(tensor, np.uint8)


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 (and some writers, e.g. safetensors, recreate the file that way):
        # the output gets the usual permissions, set just before the rename
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: object) -> None:
    """Write JSON atomically, pretty-printed."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")



def flatten_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8/uint16 colour over (H, W) alpha of the same dtype -> the image as it
    shows on a white page (a format without alpha would otherwise show what lies under the
    transparent pixels, often black)."""
    top = pixel_max(rgb.dtype)
    weight = alpha.astype(np.float32) / top
    if rgb.ndim == 3:
        weight = weight[..., None]
    flat = rgb.astype(np.float32) * weight + top * (1.0 - weight)
    return np.round(flat).astype(rgb.dtype)


def encode_image(path: str | os.PathLike, rgb: np.ndarray, alpha: np.ndarray | None = None, *, quality: int = 95,
                 icc_profile: bytes | None = None, exif: bytes | None = None) -> bytes:
    """Encode (H, W, 3) RGB or (H, W) grey, uint8/uint16 (+ alpha), in the format named by
    ``path``'s suffix. Grey with alpha is written as RGBA with three equal channels; JPEG and
    BMP, which hold no alpha, get the image flattened on white.
    ``icc_profile`` (an input's colour profile) is embedded when it fits the written channels
    (an RGB profile in colour output, a grey one in grey output) and the format carries one;
    so is ``exif`` (an input's EXIF from :func:`fsr.core.metadata.upright_exif`)."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise ValueError(f"{path}: unsupported output format '{suffix}' (use one of {', '.join(IMAGE_EXTENSIONS)})")
    if alpha is not None and suffix in (".jpg", ".jpeg", ".bmp"):
        rgb, alpha = flatten_on_white(rgb, alpha), None  # these formats have no alpha channel
    if rgb.ndim == 2 and (alpha is not None or suffix == ".webp"):  # OpenCV's WebP is colour only
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    bgr = np.ascontiguousarray(rgb) if rgb.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    if alpha is not None:
        bgr = np.dstack([bgr, alpha.astype(bgr.dtype)])
    if bgr.dtype == np.uint16 and suffix not in (".png", ".tif", ".tiff"):
        bgr = np.round(bgr.astype(np.float32) / 257.0).astype(np.uint8)
    params: list[int] = []
    if suffix in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif suffix == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
    elif suffix == ".png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode(suffix, bgr, params)
    if not ok:
        raise ValueError(f"{path}: could not encode image")
    if icc_profile is not None and not fits_output(icc_profile, grey_output=bgr.ndim == 2):
        icc_profile = None
    return embed_metadata(buf.tobytes(), suffix, icc_profile=icc_profile, exif=exif,
                          width=bgr.shape[1], height=bgr.shape[0], has_alpha=alpha is not None)


def write_image(path: str | os.PathLike, rgb: np.ndarray, alpha: np.ndarray | None = None, *, quality: int = 95,
                icc_profile: bytes | None = None, exif: bytes | None = None) -> None:
    """Write an image atomically; the format follows the suffix (PNG is lossless); an
    ``icc_profile`` and ``exif`` are embedded as :func:`encode_image` says."""
    atomic_write_bytes(path, encode_image(path, rgb, alpha, quality=quality, icc_profile=icc_profile, exif=exif))


@dataclass
class ImageListing:
    """What :func:`list_image_files` found: image files to read, and everything skipped with why.

    files: sorted image paths. skipped: (path, one-line reason) for unsupported image
    formats, folders named like images, broken links, symlink loops and unreadable folders.
    """

    files: list[Path]
    skipped: list[tuple[Path, str]]


def _skip_reason(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in UNSUPPORTED_IMAGE_EXTENSIONS:
        return f"unsupported format {suffix[1:].upper()} (fsr reads {', '.join(e[1:] for e in IMAGE_EXTENSIONS)})"
    if suffix in IMAGE_EXTENSIONS and path.is_symlink() and not path.exists():
        return "broken symbolic link"
    return None


def list_image_files(root: str | os.PathLike, *, skip_dirs: Callable[[Path], bool] | None = None) -> ImageListing:
    """All image files under ``root`` (recursively, following links, sorted), and what was skipped.

    ``root`` itself when it is a file. ``skip_dirs(folder)`` True leaves a folder out
    silently (e.g. a command's own outputs). A symbolic link back into a folder already
    being walked is a loop: reported, not followed.
    """
    root = Path(root)
    if root.is_file():
        return ImageListing([root], [])
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    _walk(root, (), files, skipped, skip_dirs)
    return ImageListing(sorted(files), sorted(skipped))


def _walk(folder: Path, ancestors: tuple, files: list, skipped: list, skip_dirs) -> None:
    try:
        real = folder.stat()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        skipped.append((folder, f"cannot list folder ({exc.strerror or exc})"))
        return
    here = (*ancestors, (real.st_dev, real.st_ino))
    for entry in entries:
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir()  # follows links
        except OSError as exc:
            skipped.append((path, f"cannot read ({exc.strerror or exc})"))
            continue
        if not is_dir:
            reason = _skip_reason(path)
            if reason:
                skipped.append((path, reason))
            elif path.suffix.lower() in IMAGE_EXTENSIONS and entry.is_file():
                files.append(path)
            continue
        if skip_dirs is not None and skip_dirs(path):
            continue
        try:
            st = path.stat()
        except OSError as exc:
            skipped.append((path, f"cannot read ({exc.strerror or exc})"))
            continue
        if (st.st_dev, st.st_ino) in here:
            skipped.append((path, "symbolic link loop (points back to a folder above it); not followed"))
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            skipped.append((path, "a folder, not an image file (its contents are listed)"))
        _walk(path, here, files, skipped, skip_dirs)


def iter_image_files(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursively, sorted); ``root`` itself if it is a file."""
    return list_image_files(root).files


def check_image_suffix(path: str | os.PathLike, what: str = "input") -> None:
    """Raise :class:`ImageReadError` when ``path``'s suffix is not a format fsr reads and writes."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        shown = suffix[1:].upper() if suffix else "no suffix"
        raise ImageReadError(
            path, f"unsupported {what} format {shown} (fsr reads and writes {', '.join(e[1:] for e in IMAGE_EXTENSIONS)})"
        )


def output_collisions(pairs: list[tuple[Path, Path]]) -> list[tuple[Path, Path, Path]]:
    """(first input, second input, shared output) for inputs whose outputs would be the same file.

    Output paths are compared case-insensitively (``b.jpg`` and ``b.JPG`` are one file on macOS
    and Windows, and look like one to a person).
    """
    seen: dict[str, Path] = {}
    clashes = []
    for source, output in pairs:
        key = os.path.normpath(os.path.abspath(output)).casefold()
        if key in seen:
            clashes.append((seen[key], source, output))
        else:
            seen[key] = source
    return clashes


# ----------------------------------------------------------------------------- temporaries and disk errors

_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def temporary_target(name: str) -> str | None:
    """The output file name a temporary written by :func:`atomic_path` was for, else None."""
    match = _TEMP_NAME.match(name)
    return match.group("target") if match else None


def remove_stale_temporaries(folder: Path, is_ours: Callable[[str], bool]) -> int:
    """Delete temporaries a killed run left in ``folder`` (not recursive) for outputs
    ``is_ours(output name)`` accepts; any other file is left alone. Returns how many."""
    removed = 0
    if not folder.is_dir():
        return 0
    for path in folder.glob(".*.tmp"):
        target = temporary_target(path.name)
        if target is not None and is_ours(target) and path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def describe_os_error(exc: OSError) -> str:
    """``"<path>: <reason>"`` for a file-system error, one line (``No space left on device``)."""
    reason = exc.strerror or str(exc) or exc.__class__.__name__
    where = exc.filename if exc.filename is not None else ""
    return f"{where}: {reason}" if where else reason


def is_disk_error(exc: BaseException) -> bool:
    """True for errors of the output disk itself (full, read-only, no permission, quota)."""
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS
