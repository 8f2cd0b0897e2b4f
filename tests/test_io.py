"""Image reading on real photos and on the bad inputs a user's folder can hold."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from PIL import Image

from fsr.core.metadata import upright_exif, usable_profile
from fsr.core.io import ImageReadError, encode_image, iter_image_files, read_image, write_image
from tests.conftest import LFW_DIR, WILD_DIR

def make_declared_huge_png(path, width: int, height: int) -> None:
    """A tiny PNG file whose header declares width x height pixels (a decompression bomb's shape)."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    path.write_bytes(bytes(data))


FACE = LFW_DIR / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg"


@pytest.fixture(scope="module")
def face_rgb() -> np.ndarray:
    return np.asarray(Image.open(FACE).convert("RGB"))


def test_reads_real_jpeg_as_rgb_uint8(face_rgb):
    image = read_image(FACE)
    assert image.rgb.dtype == np.uint8 and image.rgb.shape == (250, 250, 3)
    assert image.alpha is None
    np.testing.assert_array_equal(image.rgb, face_rgb)


def test_jpeg_quality_is_read_from_the_files_own_table(tmp_path, face_rgb):
    """read_image names the quality a JPEG was written at, whichever libjpeg build wrote it
    (Pillow's, OpenCV's, fsr's own writer), from the file's luminance table; other formats: None."""
    for quality in (10, 35, 50, 75, 88, 92, 100):
        Image.fromarray(face_rgb).save(tmp_path / "pil.jpg", quality=quality)
        cv2.imwrite(str(tmp_path / "cv2.jpg"), face_rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        write_image(tmp_path / "fsr.jpg", face_rgb, quality=quality)
        for name in ("pil.jpg", "cv2.jpg", "fsr.jpg"):
            assert read_image(tmp_path / name).jpeg_quality == quality, (name, quality)
    write_image(tmp_path / "face.png", face_rgb)
    assert read_image(tmp_path / "face.png").jpeg_quality is None
    # the shared data: LFW's deep-funneled photos were stored at 75, the wild photos at 92
    assert read_image(LFW_DIR / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg").jpeg_quality == 75
    assert read_image(WILD_DIR / "img1.jpg").jpeg_quality == 92


def test_exif_rotation_is_applied():
    path = WILD_DIR / "img102.jpg"  # EXIF orientation 6 (rotate 90 degrees clockwise)
    with Image.open(path) as pil:
        assert pil.getexif().get(0x0112) == 6
        stored = np.asarray(pil.convert("RGB"))
    image = read_image(path)
    assert image.rgb.shape == (stored.shape[1], stored.shape[0], 3)
    np.testing.assert_array_equal(image.rgb, np.rot90(stored, k=-1))


def test_made_exif_rotated_photo(tmp_path, face_rgb):
    crop = face_rgb[:, :200]  # not square, so a wrong rotation shows in the shape
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 8  # display = stored rotated 90 degrees counter-clockwise
    Image.fromarray(crop).save(path, quality=98, exif=exif)
    image = read_image(path)
    assert image.rgb.shape == (200, 250, 3)
    expected = np.rot90(np.asarray(Image.open(path).convert("RGB")), k=1)
    np.testing.assert_array_equal(image.rgb, expected)


def test_grayscale_rgba_cmyk_and_16bit(tmp_path, face_rgb):
    gray = np.asarray(Image.fromarray(face_rgb).convert("L"))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    assert image.rgb.shape == (250, 250, 3) and image.grey
    np.testing.assert_array_equal(image.rgb[..., 0], gray)
    np.testing.assert_array_equal(image.rgb[..., 2], gray)
    # a grey picture saved as RGB holds no colour either; a colour photo does
    Image.fromarray(gray).convert("RGB").save(tmp_path / "gray_rgb.png")
    assert read_image(tmp_path / "gray_rgb.png").grey and not read_image(FACE).grey

    alpha = np.tile(np.linspace(0, 255, 250).astype(np.uint8), (250, 1))
    Image.fromarray(np.dstack([face_rgb, alpha])).save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    assert not image.grey
    np.testing.assert_array_equal(image.rgb, face_rgb)
    np.testing.assert_array_equal(image.alpha, alpha)

    Image.fromarray(face_rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    image = read_image(tmp_path / "cmyk.jpg")
    assert image.rgb.shape == (250, 250, 3) and image.rgb.dtype == np.uint8
    assert np.abs(image.rgb.astype(int) - face_rgb.astype(int)).mean() < 8

    rgb16 = face_rgb.astype(np.uint16) * 257 + 100
    cv2.imwrite(str(tmp_path / "deep.png"), cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    image = read_image(tmp_path / "deep.png")
    assert image.rgb.dtype == np.uint16
    np.testing.assert_array_equal(image.rgb, rgb16)
    assert np.abs(image.rgb_uint8().astype(int) - face_rgb.astype(int)).max() <= 1


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("this is not a picture\n"), "not an image"),
        (lambda p: p.write_bytes(FACE.read_bytes()[:3000]), "cannot decode"),
    ],
    ids=["zero-byte", "text-named-jpg", "truncated-jpeg"],
)
def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path, make, reason):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": ")
    assert reason in message and "\n" not in message


def test_huge_declared_size_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    make_declared_huge_png(path, 40000, 40000)  # 1.6 gigapixels declared, ~70 bytes on disk
    with pytest.raises(ImageReadError, match="declared size 40000x40000 .* exceeds the limit"):
        read_image(path)
    with pytest.raises(ImageReadError, match="exceeds the limit"):
        read_image(FACE, max_pixels=250 * 249)  # the limit applies to ordinary files too
    assert read_image(FACE, max_pixels=250 * 250).rgb.shape == (250, 250, 3)


def test_write_image_is_lossless_png_and_leaves_no_temporaries(tmp_path, face_rgb):
    out = tmp_path / "sub" / "face.png"
    write_image(out, face_rgb)
    np.testing.assert_array_equal(read_image(out).rgb, face_rgb)
    assert sorted(os.listdir(out.parent)) == ["face.png"]
    assert [p.name for p in iter_image_files(tmp_path)] == ["face.png"]


def srgb_profile() -> bytes:
    """A real ICC profile (littlecms's sRGB, as Pillow's ImageCms builds it)."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_colour_profile_is_read_and_carried_into_every_format_that_holds_one(tmp_path, face_rgb):
    """A photo's ICC profile comes back byte for byte in PNG, JPEG, WebP and TIFF outputs (also
    one over 64 KB, which JPEG splits into segments), with pixels identical to the output
    without it; BMP holds none; a CMYK profile (data fsr turns into RGB) is not carried."""
    import io

    profile = srgb_profile()
    Image.fromarray(face_rgb).save(tmp_path / "tagged.jpg", quality=95, icc_profile=profile)
    assert read_image(tmp_path / "tagged.jpg").icc_profile == profile
    assert read_image(FACE).icc_profile is None
    large = bytearray(profile + bytes(150_000))
    large[:4] = len(large).to_bytes(4, "big")
    alpha = np.tile(np.linspace(0, 255, 250).astype(np.uint8), (250, 1))
    for suffix in (".png", ".jpg", ".webp", ".tif"):
        for icc in (profile, bytes(large)):
            for transparency in ((None,) if suffix == ".jpg" else (None, alpha)):
                for quality in (95, 100):  # WebP at 100 is lossless: another bitstream
                    tagged = encode_image("x" + suffix, face_rgb, transparency, quality=quality, icc_profile=icc)
                    plain = encode_image("x" + suffix, face_rgb, transparency, quality=quality)
                    with Image.open(io.BytesIO(tagged)) as image, Image.open(io.BytesIO(plain)) as reference:
                        assert image.info.get("icc_profile") == icc, (suffix, len(icc), transparency is None, quality)
                        np.testing.assert_array_equal(np.asarray(image), np.asarray(reference))
                    decoded = cv2.imdecode(np.frombuffer(tagged, np.uint8), cv2.IMREAD_UNCHANGED)
                    assert np.array_equal(decoded, cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_UNCHANGED))
    with Image.open(io.BytesIO(encode_image("x.bmp", face_rgb, icc_profile=profile))) as image:
        assert "icc_profile" not in image.info
    cmyk = profile[:16] + b"CMYK" + profile[20:]
    assert usable_profile(cmyk) is None and usable_profile(b"short") is None
    # a grey profile is only written into grey output, an RGB one only into colour output
    grey_profile = profile[:16] + b"GRAY" + profile[20:]
    grey = face_rgb[..., 1]
    with Image.open(io.BytesIO(encode_image("x.png", grey, icc_profile=grey_profile))) as image:
        assert image.mode == "L" and image.info.get("icc_profile") == grey_profile
    with Image.open(io.BytesIO(encode_image("x.png", face_rgb, icc_profile=grey_profile))) as image:
        assert "icc_profile" not in image.info
    with Image.open(io.BytesIO(encode_image("x.png", grey, icc_profile=profile))) as image:
        assert "icc_profile" not in image.info


def test_exif_is_carried_upright_into_jpeg_png_and_webp(face_rgb):
    """A camera photo's EXIF (here a real one that says "rotate 90 degrees") comes back in JPEG,
    PNG and WebP outputs with every byte the same but the orientation, now upright, because the
    pixels are written turned, and the link to its thumbnail, which shows the photo unturned;
    TIFF and BMP outputs hold none."""
    import io

    from PIL import ExifTags

    photo = WILD_DIR / "img102.jpg"
    with Image.open(photo) as source:
        raw = source.info["exif"]
        assert source.getexif()[0x0112] == 6 and source.getexif().get_ifd(ExifTags.IFD.IFD1)
    loaded = read_image(photo)
    assert loaded.exif == upright_exif(raw) and loaded.rgb.shape[:2] == (1024, 769)
    tiff = raw[6:]  # without the "Exif\0\0" prefix
    changed = [k for k in range(len(tiff)) if tiff[k] != loaded.exif[k]]
    # the orientation's low byte (IFD0 at 8, its one entry from 10) and the thumbnail link after it
    assert len(loaded.exif) == len(tiff) and changed == [19, 25], changed
    assert upright_exif(b"not exif") is None and upright_exif(None) is None
    # the EXIF of a photo stored upright is kept byte for byte
    upright = Image.Exif()
    upright.load(raw)
    upright[0x0112] = 1
    assert upright_exif(upright.tobytes()) == upright.tobytes()[6:]
    for suffix in (".jpg", ".png", ".webp"):
        data = encode_image("x" + suffix, face_rgb, quality=90, exif=loaded.exif)
        with Image.open(io.BytesIO(data)) as image, Image.open(io.BytesIO(encode_image("x" + suffix, face_rgb, quality=90))) as plain:
            assert image.getexif()[0x0112] == 1 and not image.getexif().get_ifd(ExifTags.IFD.IFD1), suffix
            assert image.info["exif"].removeprefix(b"Exif\x00\x00") == loaded.exif, suffix
            np.testing.assert_array_equal(np.asarray(image), np.asarray(plain))
    for suffix in (".tif", ".bmp"):
        with Image.open(io.BytesIO(encode_image("x" + suffix, face_rgb, exif=loaded.exif))) as image:
            assert 0x0112 not in image.getexif() and "exif" not in image.info, suffix


def test_alpha_is_flattened_on_white_where_the_format_has_none(tmp_path, face_rgb):
    """A cut-out portrait (transparent background over black pixels) written as JPEG or BMP
    shows on white, as it does on screen, not on the black under its transparent pixels."""
    yy, xx = np.mgrid[:250, :250]
    alpha = np.where((yy - 125) ** 2 + (xx - 125) ** 2 < 90**2, 255, 0).astype(np.uint8)
    alpha[:, :10] = 128  # a half-transparent strip
    cutout = np.where(alpha[..., None] > 0, face_rgb, 0).astype(np.uint8)
    for suffix in (".jpg", ".bmp"):
        write_image(tmp_path / f"flat{suffix}", cutout, alpha, quality=95)
        flat = read_image(tmp_path / f"flat{suffix}")
        assert flat.alpha is None
        assert flat.rgb[alpha == 0].mean() > 250, suffix  # white, not black
        inside = alpha == 255
        inside[:, :20] = False
        assert np.abs(flat.rgb[inside].astype(int) - face_rgb[inside]).mean() < 3, suffix
        half = flat.rgb[5:245, 3:7].astype(int)
        expected = np.round(face_rgb[5:245, 3:7] * (128 / 255) + 255 * (127 / 255))
        assert np.abs(half - expected).mean() < 4, suffix
    write_image(tmp_path / "kept.png", cutout, alpha)  # PNG keeps the alpha and the pixels under it
    kept = read_image(tmp_path / "kept.png")
    np.testing.assert_array_equal(kept.alpha, alpha)
    np.testing.assert_array_equal(kept.rgb, cutout)
