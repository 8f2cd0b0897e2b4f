"""Image metadata carried from an input into its output: the ICC colour profile and EXIF.

A photo from a phone or a camera is often encoded in a wide-gamut space (Display P3, Adobe RGB)
and says so with an embedded ICC profile. The pixel values mean nothing without it: written
back without the profile, a colour-managed viewer shows the upscale as sRGB, duller and shifted
against the original. fsr reads the profile with the image (:func:`usable_profile`) and puts the
same bytes into the encoded output (:func:`embed_metadata`), so the output looks like its
input; the pixel data are not touched. EXIF (camera, capture time, place, ...) is carried the
same way (:func:`upright_exif`), with its orientation set to upright because fsr writes the
pixels already turned.

Formats: PNG (``iCCP`` and ``eXIf`` chunks), JPEG (``APP2 ICC_PROFILE`` segments, split at
65,519 bytes, and an ``APP1 Exif`` segment), WebP (``ICCP`` and ``EXIF`` chunks in the extended
``VP8X`` layout) and classic TIFF (the profile as tag 34675; no EXIF). BMP and BigTIFF outputs
are written without either.
"""

from __future__ import annotations

import struct
import zlib

ICC_HEADER_BYTES = 128
RGB_SPACE = b"RGB "
GREY_SPACE = b"GRAY"
_JPEG_ICC_TAG = b"ICC_PROFILE\x00"
_JPEG_SEGMENT_DATA = 65535 - 2 - len(_JPEG_ICC_TAG) - 2  # length field, tag, sequence number and count
_TIFF_ICC_TAG = 34675
_TIFF_UNDEFINED = 7


def colour_space(profile: bytes) -> bytes:
    """The data colour space a profile describes (header bytes 16-19): b"RGB ", b"GRAY", b"CMYK"..."""
    return bytes(profile[16:20])


def usable_profile(profile: object) -> bytes | None:
    """The profile an input carries, when fsr can carry it into an output: an RGB or grey ICC
    profile (a CMYK one describes data fsr converts to RGB, so it no longer applies); else None."""
    if not isinstance(profile, (bytes, bytearray)) or len(profile) < ICC_HEADER_BYTES:
        return None
    profile = bytes(profile)
    return profile if colour_space(profile) in (RGB_SPACE, GREY_SPACE) else None


def fits_output(profile: bytes, grey_output: bool) -> bool:
    """An RGB profile fits colour output, a grey profile fits one-channel grey output."""
    return colour_space(profile) == (GREY_SPACE if grey_output else RGB_SPACE)


def embed_metadata(data: bytes, suffix: str, *, icc_profile: bytes | None, exif: bytes | None,
                   width: int, height: int, has_alpha: bool) -> bytes:
    """Encoded image ``data`` (as OpenCV writes it, format by ``suffix``, ``width`` x ``height``)
    -> the same image carrying ``icc_profile`` and ``exif`` (from :func:`upright_exif`) where the
    format holds them (see the module's list); the pixel data are not touched."""
    size = {"width": width, "height": height, "has_alpha": has_alpha}
    for payload, writers in ((icc_profile, _PROFILE_WRITERS), (exif, _EXIF_WRITERS)):
        writer = writers.get(suffix.lower())
        if payload is not None and writer is not None:
            data = writer(data, payload, **size)
    return data


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """A PNG file's chunks as (kind, whole chunk bytes), or None when ``data`` is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        chunks.append((data[pos + 4 : pos + 8], data[pos:end]))
        pos = end
    return chunks if chunks and chunks[0][0] == b"IHDR" else None


def _embed_png(data: bytes, profile: bytes, **_size) -> bytes:
    """Insert an ``iCCP`` chunk after ``IHDR``; drop ``sRGB``/``iCCP`` chunks that would contradict it."""
    chunks = _png_chunks(data)
    if chunks is None:
        return data
    iccp = _png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(profile, 9))
    kept = [whole for kind, whole in chunks[1:] if kind not in (b"sRGB", b"iCCP")]
    return data[:8] + chunks[0][1] + iccp + b"".join(kept)


def _jpeg_segments_at(data: bytes) -> int:
    """Where new APP segments go in a JPEG: after SOI, and after a JFIF ``APP0`` segment (which
    must stay first)."""
    pos = 2
    if data[pos : pos + 2] == b"\xff\xe0":
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        pos += 2 + length
    return pos


def _embed_jpeg(data: bytes, profile: bytes, **_size) -> bytes:
    """Insert ``APP2 ICC_PROFILE`` segments after SOI (and after a JFIF ``APP0`` segment)."""
    if data[:2] != b"\xff\xd8":
        return data
    count = -(-len(profile) // _JPEG_SEGMENT_DATA)
    if count > 255:  # the format's limit (about 16 MB)
        return data
    pos = _jpeg_segments_at(data)
    segments = []
    for k in range(count):
        part = profile[k * _JPEG_SEGMENT_DATA : (k + 1) * _JPEG_SEGMENT_DATA]
        body = _JPEG_ICC_TAG + bytes((k + 1, count)) + part
        segments.append(b"\xff\xe2" + struct.pack(">H", len(body) + 2) + body)
    return data[:pos] + b"".join(segments) + data[pos:]


def _riff_chunk(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) % 2 else b"")


def _webp_extended(data: bytes, *, width: int, height: int, has_alpha: bool) -> tuple[bytes, int] | None:
    """A WebP file in the extended layout (a ``VP8X`` chunk first): (chunks after the RIFF
    header, offset of the end of ``VP8X`` in them); None when ``data`` is not WebP."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    body = data[12:]
    if body[:4] != b"VP8X":
        flags = 0x10 if has_alpha else 0
        canvas = struct.pack("<I", width - 1)[:3] + struct.pack("<I", height - 1)[:3]
        body = _riff_chunk(b"VP8X", bytes((flags, 0, 0, 0)) + canvas) + body
    (size,) = struct.unpack("<I", body[4:8])
    return body, 8 + size + (size % 2)


def _webp_file(body: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def _embed_webp(data: bytes, profile: bytes, *, width: int, height: int, has_alpha: bool) -> bytes:
    """Put an ``ICCP`` chunk right after ``VP8X`` (flag 0x20)."""
    extended = _webp_extended(data, width=width, height=height, has_alpha=has_alpha)
    if extended is None:
        return data
    body, vp8x_end = extended
    body = body[:8] + bytes((body[8] | 0x20,)) + body[9:vp8x_end] + _riff_chunk(b"ICCP", profile) + body[vp8x_end:]
    return _webp_file(body)


def _tiff_header(data: bytes | bytearray) -> tuple[str, int] | None:
    """A classic TIFF structure's byte order (struct prefix) and first IFD offset; None for
    anything else (BigTIFF included)."""
    order = {b"II": "<", b"MM": ">"}.get(bytes(data[:2]))
    if order is None or len(data) < 8 or struct.unpack(order + "H", data[2:4])[0] != 42:
        return None
    return order, struct.unpack(order + "I", data[4:8])[0]


def _embed_tiff(data: bytes, profile: bytes, **_size) -> bytes:
    """Append the profile and a copy of the first IFD with tag 34675 added; point the header at it."""
    header = _tiff_header(data)
    if header is None:
        return data
    order, ifd = header
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    entries = [data[ifd + 2 + 12 * k : ifd + 14 + 12 * k] for k in range(count)]
    next_ifd = data[ifd + 2 + 12 * count : ifd + 6 + 12 * count]
    out = bytearray(data)
    if len(out) % 2:
        out += b"\x00"
    profile_at = len(out)
    out += profile
    if len(out) % 2:
        out += b"\x00"
    if len(out) + 2 + 12 * (count + 1) + 4 >= 2**32:
        return data
    entries = [e for e in entries if struct.unpack(order + "H", e[:2])[0] != _TIFF_ICC_TAG]
    entries.append(struct.pack(order + "HHII", _TIFF_ICC_TAG, _TIFF_UNDEFINED, len(profile), profile_at))
    entries.sort(key=lambda e: struct.unpack(order + "H", e[:2])[0])
    new_ifd = len(out)
    out += struct.pack(order + "H", len(entries)) + b"".join(entries) + next_ifd
    out[4:8] = struct.pack(order + "I", new_ifd)
    return bytes(out)


# ----------------------------------------------------------------------------- EXIF

_EXIF_PREFIX = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112
_JPEG_APP1_MAX = 65535 - 2 - len(_EXIF_PREFIX)


def upright_exif(exif: object) -> bytes | None:
    """An input's raw EXIF (a TIFF structure, with or without the ``Exif\\0\\0`` prefix) -> the
    same bytes with the orientation tag set to 1 (upright: fsr writes the pixels turned), or None
    when there is none or it is not a TIFF structure fsr can read. When the photo was turned, the
    link to the embedded thumbnail (stored unturned, for the old orientation) is cut, so that no
    file browser shows it on its side."""
    if not isinstance(exif, (bytes, bytearray)):
        return None
    tiff = bytearray(exif[len(_EXIF_PREFIX):] if exif[: len(_EXIF_PREFIX)] == _EXIF_PREFIX else exif)
    header = _tiff_header(tiff)
    if header is None or header[1] + 2 > len(tiff):
        return None
    order, ifd = header
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    if ifd + 2 + 12 * count > len(tiff):
        return None
    turned = False
    for k in range(count):
        entry = ifd + 2 + 12 * k
        tag, kind = struct.unpack(order + "HH", tiff[entry : entry + 4])
        if tag == _ORIENTATION_TAG and kind == 3:  # SHORT, held in the entry itself
            turned = struct.unpack(order + "H", tiff[entry + 8 : entry + 10])[0] not in (0, 1)
            tiff[entry + 8 : entry + 10] = struct.pack(order + "H", 1)
    next_ifd = ifd + 2 + 12 * count
    if turned and next_ifd + 4 <= len(tiff):
        tiff[next_ifd : next_ifd + 4] = bytes(4)  # IFD1, the thumbnail's, is no longer linked
    return bytes(tiff)


def _embed_webp_exif(data: bytes, exif: bytes, *, width: int, height: int, has_alpha: bool) -> bytes:
    """Append an ``EXIF`` chunk (flag 0x08 in ``VP8X``)."""
    extended = _webp_extended(data, width=width, height=height, has_alpha=has_alpha)
    if extended is None:
        return data
    body, _ = extended
    return _webp_file(body[:8] + bytes((body[8] | 0x08,)) + body[9:] + _riff_chunk(b"EXIF", exif))


def _embed_png_exif(data: bytes, exif: bytes, **_size) -> bytes:
    """Insert an ``eXIf`` chunk before the first ``IDAT``."""
    chunks = _png_chunks(data)
    if chunks is None:
        return data
    first_idat = next((k for k, (kind, _) in enumerate(chunks) if kind == b"IDAT"), None)
    if first_idat is None:
        return data
    wholes = [whole for _, whole in chunks]
    return data[:8] + b"".join(wholes[:first_idat]) + _png_chunk(b"eXIf", exif) + b"".join(wholes[first_idat:])


def _embed_jpeg_exif(data: bytes, exif: bytes, **_size) -> bytes:
    """Insert an ``APP1 Exif`` segment after SOI (and after a JFIF ``APP0`` segment)."""
    if data[:2] != b"\xff\xd8" or len(exif) > _JPEG_APP1_MAX:
        return data
    pos = _jpeg_segments_at(data)
    body = _EXIF_PREFIX + exif
    return data[:pos] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + data[pos:]


# which writer puts a profile / EXIF into which output format (suffix)
_PROFILE_WRITERS = {".png": _embed_png, ".jpg": _embed_jpeg, ".jpeg": _embed_jpeg, ".webp": _embed_webp,
                    ".tif": _embed_tiff, ".tiff": _embed_tiff}
_EXIF_WRITERS = {".png": _embed_png_exif, ".jpg": _embed_jpeg_exif, ".jpeg": _embed_jpeg_exif, ".webp": _embed_webp_exif}
