"""`fsr upscale`: faces mode, photo mode with paste-back, auto mode, safety and resumability.

Everything runs on real images from ../shared/data with a small random-initialised RRDB
exported the way `fsr train` exports (safetensors + JSON card), or the bicubic system.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fsr.cli import app
from fsr.core.device import Compute
from fsr.core.io import read_image, to_tensor, to_uint8
from fsr.core.metadata import upright_exif
from fsr.core.weights import save_safetensors
from fsr.data.degrade import bicubic_down, resize_bicubic
from fsr.models.rrdb import RRDBNet
from fsr.models.systems import load_sr_system
from fsr.models.face.pipeline import FaceFilter, feather_mask, find_faces, super_resolve
from fsr.upscale import (
    UpscaleError,
    UpscaleOptions,
    choose_mode,
    classical_upscale,
    plan_jobs,
    upscale_path,
    write_upscale_report,
)
from tests.conftest import LFW_DIR, REPO, SHARED_DATA, WILD_DIR

SHARED_PAIRS = SHARED_DATA / "lfw" / "pairs.txt"

FSR = [sys.executable, "-m", "fsr.cli"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random-initialised RRDB (nf=8, nb=1, gc=8) exported as safetensors + model card."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    net = RRDBNet(nf=8, nb=1, gc=8)
    path = folder / "rrdb_tiny.safetensors"
    save_safetensors(net.state_dict(), path)
    (folder / "rrdb_tiny.json").write_text(json.dumps({"architecture": "rrdb", "arch_args": net.arch_args, "scale": 4}))
    return path


@pytest.fixture(scope="module")
def compute() -> Compute:
    return Compute.create("cpu", "fp32", batch_size=8, threads=2)


def lfw_faces(n: int) -> list[Path]:
    people = sorted(p for p in LFW_DIR.iterdir() if p.is_dir())[:n]
    return [sorted(p.glob("*.jpg"))[0] for p in people]


def centre_crop(path: Path, side: int, box: tuple[int, int, int, int] = (61, 61, 189, 189)) -> np.ndarray:
    """The face in the middle of an LFW image (128 px square), resized to ``side``."""
    hr = to_tensor(read_image(path).rgb[box[1] : box[3], box[0] : box[2]])[None]
    return to_uint8(resize_bicubic(hr, side)[0].clamp(0, 1))


def options(**kw) -> UpscaleOptions:
    """Test options: no progress bar, and no identity-drift check (the tiny model is random)."""
    kw.setdefault("show_progress", False)
    kw.setdefault("max_drift", 0.0)
    return UpscaleOptions(**kw)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([*FSR, "upscale", *args, "--threads", "2", "--no-progress", "--max-drift", "0"],
                          capture_output=True, text=True, cwd=REPO, env=full_env, timeout=300)


# ----------------------------------------------------------------------------- faces mode


def test_faces_mode_runs_the_network_at_the_crops_own_resolution(tmp_path, tiny_model, compute):
    """Crops of any size go through the network as they are (never shrunk to 32 px first)."""
    src = tmp_path / "in"
    (src / "nested").mkdir(parents=True)
    paths = lfw_faces(4)
    for i, p in enumerate(paths):
        Image.fromarray(centre_crop(p, (24, 32, 48, 64)[i])).save(src / ("nested" if i % 2 else ".") / f"face{i}.png")
    Image.fromarray(centre_crop(paths[0], 48)[:, 4:44]).save(src / "wide_48x40.png")  # non-square
    summary = upscale_path(src, tmp_path / "out", options(mode="faces", model=str(tiny_model)), compute)
    assert summary.done == 5 and summary.failed == 0 and summary.faces_sr == 5
    assert {r.mode for r in summary.results} == {"faces"}
    system = load_sr_system(str(tiny_model), compute)
    for result in summary.results:
        out = read_image(result.output).rgb
        image = read_image(result.input)
        assert out.shape == (image.height * 4, image.width * 4, 3)
        assert Path(result.output).relative_to(tmp_path / "out") == Path(result.input).relative_to(src)
        direct = to_uint8(system.upscale(to_tensor(image.rgb)[None])[0])
        assert np.abs(direct.astype(int) - out.astype(int)).max() <= 1, result.input


def test_large_faces_run_in_overlapping_tiles_that_join(compute):
    """The default model on a 200 px face in 64 px tiles (16 px halo) equals one pass within 2 grey levels."""
    system = load_sr_system("default", compute)
    face = to_tensor(np.ascontiguousarray(read_image(WILD_DIR / "img1.jpg").rgb[150:350, 250:450]))
    whole = system.upscale(face[None])[0]
    tiled = super_resolve(system, face, tile=64, halo=16)
    assert tiled.shape == whole.shape == (3, 800, 800)
    diff = (tiled - whole).abs()[:, 64:-64, 64:-64] * 255  # the borders differ: zero vs replicated padding
    assert diff.max() < 2.0 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_inputs_larger_than_a_face_go_in_batches_of_the_same_pixels(tiny_model):
    """--batch-size counts 32 px faces: tiles of a big face (here 96 px, 9 faces' pixels) go 7 to
    a batch, not 64, so a large face takes no more memory per batch than 64 faces do (64 tiles of
    160 px in one batch made a 2-core CPU page)."""
    system = load_sr_system(str(tiny_model), Compute.create("cpu", "fp32", batch_size=64, threads=2))
    seen: list[int] = []
    forward = system._forward
    system._forward = lambda lr: (seen.append(lr.shape[0]), forward(lr))[1]
    faces = torch.rand(100, 3, 32, 32)
    tiles = torch.rand(10, 3, 96, 96)
    out = system.upscale(tiles)
    assert seen == [7, 3] and out.shape == (10, 3, 384, 384)
    torch.testing.assert_close(out[8:], forward(tiles[8:]).cpu())
    seen.clear()
    system.upscale(faces)
    assert seen == [64, 36]


def test_faces_mode_bicubic_system_recovers_the_face(tmp_path, compute):
    """The bicubic system on a real 32x32 LR face gives back something close to its 128x128 HR."""
    src = tmp_path / "in"
    src.mkdir()
    hrs = {}
    for i, p in enumerate(lfw_faces(3)):
        hr = centre_crop(p, 128)
        hrs[f"f{i}.png"] = hr
        lr = to_uint8(bicubic_down(to_tensor(hr)[None], 4)[0])
        Image.fromarray(lr).save(src / f"f{i}.png")
    summary = upscale_path(src, tmp_path / "out", options(mode="faces", model="bicubic"), compute)
    assert summary.done == 3
    for name, hr in hrs.items():
        sr = read_image(tmp_path / "out" / name).rgb.astype(np.float64)
        psnr = 10 * np.log10(255.0**2 / np.mean((sr - hr) ** 2))
        assert 22.0 < psnr < 45.0, (name, psnr)


def test_auto_mode_rule():
    opts = options()
    assert choose_mode(32, 32, opts) == "faces"
    assert choose_mode(150, 130, opts) == "faces"
    assert choose_mode(250, 250, opts) == "photo"
    assert choose_mode(100, 160, opts) == "photo"  # too far from square
    assert choose_mode(32, 32, options(mode="photo")) == "photo"


# ----------------------------------------------------------------------------- classical upscale


def test_classical_upscale_tiles_join_exactly():
    image = np.ascontiguousarray(read_image(WILD_DIR / "img38.jpg").rgb[100:340, 300:660])  # 240x360, a face
    for scale in (2, 3, 4):
        size = (image.shape[0] * scale, image.shape[1] * scale)
        whole = to_uint8(resize_bicubic(to_tensor(image)[None], size)[0].clamp(0, 1))
        tiled = classical_upscale(image, scale, tile=50)
        assert tiled.shape == whole.shape and tiled.dtype == np.uint8
        diff = np.abs(tiled.astype(int) - whole.astype(int))
        if scale in (2, 4):  # power-of-two scales: tiling is bit-exact
            assert diff.max() == 0, scale
        else:  # other scales: float rounding of tile-relative coordinates, rarely 1 grey level
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-4, scale
    sixteen = (image.astype(np.uint16) * 257)[:200, :300]
    up16 = classical_upscale(sixteen, 2, tile=64)
    assert up16.dtype == np.uint16 and up16.shape == (400, 600, 3)
    assert np.abs(up16.astype(int) // 257 - classical_upscale(image[:200, :300], 2).astype(int)).max() <= 1


def test_feather_mask_is_smooth_and_zero_at_the_edge():
    mask = feather_mask(200, 0.12)
    assert mask.shape == (200, 200)
    assert mask[100, 100] == 1.0 and mask[0, 0] < 1e-3 and mask[0, 100] < 0.01
    assert np.abs(np.diff(mask, axis=0)).max() < 0.1  # no step anywhere


# ----------------------------------------------------------------------------- photo mode


def _outside_squares(shape, squares, pad: int) -> np.ndarray:
    keep = np.ones(shape[:2], bool)
    for x0, y0, side in squares:
        keep[max(0, y0 - pad) : max(0, y0 + side + pad), max(0, x0 - pad) : max(0, x0 + side + pad)] = False
    return keep


def test_photo_mode_replaces_every_face_and_keeps_the_rest(tmp_path, tiny_model, compute):
    from fsr.detect.mtcnn import MTCNN
    from fsr.models.face.pipeline import face_window

    src = tmp_path / "in"
    src.mkdir()
    names = ["img38.jpg", "couple.jpg"]
    for name in names:
        (src / name).write_bytes((WILD_DIR / name).read_bytes())
    detector = MTCNN.load(compute)
    opts = options(mode="photo", model=str(tiny_model), scale=2, threshold=0, out_format="png")
    summary = upscale_path(src, tmp_path / "out", opts, compute, detector=detector)
    assert summary.done == 2
    for result in summary.results:
        image = read_image(result.input)
        out = read_image(result.output).rgb
        assert result.mode == "photo"
        assert out.shape == (image.height * 2, image.width * 2, 3)
        classical = classical_upscale(image.rgb, 2)
        faces = [f for f in find_faces(detector, image.rgb, FaceFilter()) if not f.rejected]
        assert len(faces) >= 2 and result.faces_found == len(faces) and result.faces_sr == len(faces)
        squares = []
        for face in faces:
            x0, y0, side = face_window(face).outer  # the face square and its context
            squares.append((x0 * 2, y0 * 2, side * 2))
            # the face itself (its detected box, in output pixels) is the model's output, not bicubic
            bx0, by0, bx1, by1 = (np.clip(face.box, 0, None) * 2).astype(int)
            diff = np.abs(out[by0:by1, bx0:bx1].astype(int) - classical[by0:by1, bx0:bx1].astype(int))
            assert diff.mean() > 5, (result.input, face.box)
        far = _outside_squares(out.shape, squares, pad=0)
        assert far.mean() > 0.05  # big faces in couple.jpg cover most of it
        assert np.array_equal(out[far], classical[far])


def test_a_photos_faces_are_followed_through_the_model_on_a_second_progress_line(tiny_model, compute):
    """A group photo's faces take a while on a CPU: ``on_face(done, total)`` is called before the
    first face and after each one, and the faces line shows them (not for a photo of one face)."""
    from rich.progress import Progress

    from fsr.detect.mtcnn import MTCNN
    from fsr.upscale import PhotoFacesBar, RunModels, upscale_photo

    image = read_image(WILD_DIR / "img38.jpg")  # faces of about 100 and 35 px
    system = load_sr_system(str(tiny_model), compute)
    models = RunModels(system, compute, MTCNN.load(compute))
    opts = options(mode="photo", model=str(tiny_model), scale=2, threshold=0)
    calls: list[tuple[int, int]] = []
    photo = upscale_photo(image, models, opts, on_face=lambda done, total: calls.append((done, total)))
    sr_faces = sum(r["route"] == "sr" for r in photo.faces)
    assert sr_faces >= 2
    assert calls == [(k, sr_faces) for k in range(sr_faces + 1)]
    assert np.array_equal(photo.rgb, upscale_photo(image, models, opts).rgb)  # following changes nothing

    progress = Progress(disable=True)
    bar = PhotoFacesBar(progress)
    task = progress.tasks[bar.task]
    follow = bar.follow("group.jpg")
    follow(0, 3)
    follow(2, 3)
    assert task.visible and task.total == 3 and task.completed == 2 and "group.jpg" in task.description
    assert task.fields["unit"] == "face"
    bar.hide()
    assert not task.visible
    bar.follow("portrait.jpg")(0, 1)  # one face: no second line
    assert not task.visible and task.completed == 0


def test_photo_threshold_routes_only_small_faces(tmp_path, tiny_model, compute):
    from fsr.detect.mtcnn import MTCNN

    src = tmp_path / "photo.png"
    image = read_image(WILD_DIR / "img38.jpg").rgb  # faces of about 100 and 35 px
    Image.fromarray(image).save(src)
    detector = MTCNN.load(compute)
    faces = [f for f in find_faces(detector, image, FaceFilter(min_score=0.5)) if not f.rejected]
    sides = np.array([f.side for f in faces])
    threshold = int(sides.max())  # the biggest face keeps the classical upscale
    opts = options(mode="photo", model=str(tiny_model), scale=1, threshold=threshold, min_score=0.5)
    summary = upscale_path(src, tmp_path / "out.png", opts, compute, detector=detector)
    (result,) = summary.results
    assert result.faces_found == len(faces) and result.faces_sr == int((sides < threshold).sum()) >= 1
    out = read_image(tmp_path / "out.png").rgb
    big = faces[int(np.argmax(sides))].box.astype(int)
    assert np.array_equal(out[big[1] : big[3], big[0] : big[2]], image[big[1] : big[3], big[0] : big[2]])


def test_alpha_channel_is_kept(tmp_path, tiny_model, compute):
    from fsr.detect.mtcnn import MTCNN

    rgb = read_image(WILD_DIR / "img38.jpg").rgb[::2, ::2]
    ramp = np.linspace(0, 255, rgb.shape[1]).astype(np.uint8)
    alpha = np.broadcast_to(ramp, rgb.shape[:2]).copy()
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(src / "photo.png")
    face = centre_crop(lfw_faces(1)[0], 32)
    Image.fromarray(np.dstack([face, np.full((32, 32), 77, np.uint8)]), "RGBA").save(src / "face.png")
    opts = options(model=str(tiny_model), scale=2, threshold=0)
    summary = upscale_path(src, tmp_path / "out", opts, compute, detector=MTCNN.load(compute))
    assert {r.input.split("/")[-1]: r.mode for r in summary.results} == {"face.png": "faces", "photo.png": "photo"}
    photo = read_image(tmp_path / "out" / "photo.png")
    assert photo.alpha is not None and np.array_equal(photo.alpha, classical_upscale(alpha, 2))
    face_out = read_image(tmp_path / "out" / "face.png")
    assert face_out.rgb.shape == (64, 64, 3) and face_out.alpha is not None and (face_out.alpha == 77).all()


def test_grey_face_stays_grey_and_output_names_keep_the_inputs_suffix(tmp_path, compute):
    """A grey face (an old print, an infrared camera) comes back as one grey channel, still
    closer to the real face than bicubic, instead of picking up the faint colour an RGB model
    leaves; a colour face next to it stays colour, and a camera's ``.JPG`` stays ``.JPG``."""
    import cv2

    hr = centre_crop(lfw_faces(3)[2], 128)
    grey_hr = np.asarray(Image.fromarray(hr).convert("L"))
    grey_lr = np.asarray(Image.fromarray(grey_hr).resize((32, 32), Image.BICUBIC))
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(grey_lr).save(src / "print.png")
    Image.fromarray(centre_crop(lfw_faces(3)[1], 32)).save(src / "IMG_0001.JPG", quality=95)
    summary = upscale_path(src, tmp_path / "out", options(model="default", mode="faces"), compute)
    assert {r.status for r in summary.results} == {"done"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == ["IMG_0001.JPG", "print.png"]
    grey_out = cv2.imread(str(tmp_path / "out" / "print.png"), cv2.IMREAD_UNCHANGED)
    assert grey_out.shape == (128, 128) and grey_out.dtype == np.uint8
    colour_out = read_image(tmp_path / "out" / "IMG_0001.JPG")
    assert not colour_out.grey and np.abs(np.diff(colour_out.rgb.astype(int), axis=2)).mean() > 5
    bicubic = np.asarray(Image.fromarray(grey_lr).resize((128, 128), Image.BICUBIC))
    assert _psnr(grey_out, grey_hr) > _psnr(bicubic, grey_hr) + 1.0, (_psnr(grey_out, grey_hr), _psnr(bicubic, grey_hr))


def test_outputs_keep_the_inputs_colour_profile(tmp_path, tiny_model, compute):
    """A photo in a wide-gamut space says so with an ICC profile; dropped, the upscale shows duller
    and shifted colours in a colour-managed viewer. Every output carries its input's profile,
    pixels unchanged; a grey file with a grey profile stays grey, and a grey-looking RGB file
    with an RGB profile stays RGB (a grey PNG cannot hold an RGB profile)."""
    import cv2
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    grey_profile = profile[:16] + b"GRAY" + profile[20:]
    colour = centre_crop(lfw_faces(2)[0], 32)
    grey = np.asarray(Image.fromarray(centre_crop(lfw_faces(2)[1], 32)).convert("L"))
    tagged, plain = tmp_path / "tagged", tmp_path / "plain"
    for folder, icc, grey_icc in ((tagged, profile, grey_profile), (plain, None, None)):
        folder.mkdir()
        Image.fromarray(colour).save(folder / "face.webp", lossless=True, icc_profile=icc)
        Image.fromarray(grey).save(folder / "print.png", icc_profile=grey_icc)
        Image.fromarray(grey).convert("RGB").save(folder / "scan.png", icc_profile=icc)
    opts = options(model=str(tiny_model), mode="faces", threshold=0)
    for folder in (tagged, plain):
        summary = upscale_path(folder, tmp_path / f"{folder.name}_out", opts, compute)
        assert {r.status for r in summary.results} == {"done"}
    for name, expected, channels in (("face.webp", profile, 3), ("print.png", grey_profile, 1), ("scan.png", profile, 3)):
        with Image.open(tmp_path / "tagged_out" / name) as image:
            assert image.info.get("icc_profile") == expected, name
            assert len(image.getbands()) == channels, (name, image.mode)
        with Image.open(tmp_path / "plain_out" / name) as image:
            assert "icc_profile" not in image.info
        out = cv2.imread(str(tmp_path / "tagged_out" / name), cv2.IMREAD_UNCHANGED)
        assert out.shape[:2] == (128, 128)
        if name != "scan.png":  # without a profile the scan collapses to one grey channel
            np.testing.assert_array_equal(out, cv2.imread(str(tmp_path / "plain_out" / name), cv2.IMREAD_UNCHANGED))


def test_photo_output_keeps_the_cameras_exif_upright(tmp_path, tiny_model, compute):
    """A real photo whose EXIF says "rotate 90 degrees" (``wild/img102.jpg``): the output is
    written upright, with the input's EXIF and its orientation set to upright, so no viewer
    turns it a second time."""
    photo = WILD_DIR / "img102.jpg"
    opts = options(model=str(tiny_model), mode="photo", scale=1, threshold=1, out_format="png")  # no face needs SR here
    summary = upscale_path(photo, tmp_path / "out.png", opts, compute)
    assert [r.status for r in summary.results] == ["done"]
    with Image.open(photo) as source, Image.open(tmp_path / "out.png") as output:
        assert source.size == (1024, 769) and source.getexif()[0x0112] == 6
        assert output.size == (769, 1024) and output.getexif()[0x0112] == 1
        # every other byte of the 9 KB is the camera's (the unturned thumbnail is unlinked)
        assert output.info["exif"].removeprefix(b"Exif\x00\x00") == upright_exif(source.info["exif"])
    assert read_image(tmp_path / "out.png").rgb.shape == (1024, 769, 3)


# ----------------------------------------------------------------------------- robustness


def _huge_png(path: Path) -> None:
    """A PNG that declares 100000 x 100000 pixels (a decompression bomb) and holds almost nothing."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(data + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def test_bad_inputs_reported_and_skipped_and_rerun_skips(tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    for i, p in enumerate(lfw_faces(2)):
        Image.fromarray(centre_crop(p, 32)).save(src / f"good{i}.png")
    jpeg = (WILD_DIR / "img38.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (src / "empty.png").write_bytes(b"")
    (src / "notes.png").write_text("this is not an image\n")
    _huge_png(src / "huge.png")
    out, report = tmp_path / "out", tmp_path / "report.json"
    first = run_cli(str(src), str(out), "--model", str(tiny_model), "--report", str(report))
    assert first.returncode == 0, first.stderr
    for bad in ("truncated.jpg", "empty.png", "notes.png", "huge.png"):
        lines = [line for line in first.stderr.splitlines() if bad in line]
        assert len(lines) == 1, (bad, first.stderr)
    rows = {Path(r["input"]).name: r for r in json.loads(report.read_text())["images"]}
    assert rows["huge.png"]["status"] == "failed" and "exceeds" in rows["huge.png"]["reason"]
    assert rows["good0.png"]["status"] == "done" and rows["good0.png"]["mode"] == "faces"
    assert rows["good0.png"]["model"] == "rrdb_tiny" and rows["good0.png"]["seconds"] > 0
    assert sorted(p.name for p in out.iterdir()) == [".fsr-upscale.json", "good0.png", "good1.png"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}

    second = run_cli(str(src), str(out), "--model", str(tiny_model), "--report", str(tmp_path / "again.csv"))
    assert second.returncode == 0, second.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    csv_text = (tmp_path / "again.csv").read_text()
    assert csv_text.count(",skipped,") == 2 and csv_text.count(",failed,") == 4


def test_the_report_names_each_jpeg_inputs_quality(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    face = centre_crop(lfw_faces(1)[0], 32)
    Image.fromarray(face).save(src / "web.jpg", quality=60)
    Image.fromarray(face).save(src / "lossless.png")
    report = tmp_path / "report.json"
    result = run_cli(str(src), str(tmp_path / "out"), "--mode", "faces", "--model", "bicubic", "--report", str(report))
    assert result.returncode == 0, result.stderr
    rows = {Path(r["input"]).name: r for r in json.loads(report.read_text())["images"]}
    assert rows["web.jpg"]["jpeg_quality"] == 60 and rows["lossless.png"]["jpeg_quality"] is None


def test_faces_from_low_quality_jpeg_files_point_to_the_jpeg_model(tmp_path):
    """The default never saw compressed faces: when some of its faces came from JPEG files of quality
    90 or lower, the run ends with one note naming fsr_jpeg; not for lossless or high-quality files,
    and not when the model already learned JPEG faces."""
    face = centre_crop(lfw_faces(1)[0], 32)
    for name, quality in (("web.jpg", 60), ("camera.jpg", 95), ("lossless.png", None)):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        Image.fromarray(face).save(folder / name, **({"quality": quality} if quality else {}))
    notes = {}
    for folder, model in (("web", "default"), ("camera", "default"), ("lossless", "default"), ("web", "fsr_jpeg")):
        result = run_cli(str(tmp_path / folder), str(tmp_path / f"out_{folder}_{model}"), "--mode", "faces", "--model", model)
        assert result.returncode == 0, result.stderr
        notes[folder, model] = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert notes["web", "default"] == ["note: 1 of the images were stored as JPEG at quality 60; --model fsr_jpeg, "
                                       "trained on compressed faces, restores such faces with fewer block artifacts "
                                       "and keeps their identity better"]
    assert notes["camera", "default"] == notes["lossless", "default"] == notes["web", "fsr_jpeg"] == []


def test_exit_code_nonzero_only_when_nothing_succeeded(tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_text("nope")
    (src / "b.png").write_bytes(b"")
    result = run_cli(str(src), str(tmp_path / "out"), "--model", str(tiny_model))
    assert result.returncode == 1
    assert "no image could be upscaled" in result.stderr


def test_never_writes_over_an_input(tmp_path, tiny_model):
    src = tmp_path / "faces"
    src.mkdir()
    face = src / "face.png"
    Image.fromarray(centre_crop(lfw_faces(1)[0], 32)).save(face)
    before = face.read_bytes()
    runner = CliRunner()
    for args in (
        [str(face), str(face)],  # same file
        [str(face), str(src)],  # into its own folder, same name
        [str(src), str(src)],  # folder onto itself
        [str(src), str(src / "out")],  # output inside the input folder
    ):
        result = runner.invoke(app, ["upscale", *args, "--model", str(tiny_model), "--no-progress"])
        assert result.exit_code == 2, (args, result.output)
        assert "input" in result.output and len(result.output.strip().splitlines()) <= 2
    assert face.read_bytes() == before and sorted(p.name for p in src.iterdir()) == ["face.png"]
    # a suffix makes writing beside the input safe
    result = runner.invoke(app, ["upscale", str(face), str(src), "--suffix", "_x4", "--model", str(tiny_model), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert read_image(src / "face_x4.png").rgb.shape == (128, 128, 3) and face.read_bytes() == before


def test_format_suffix_and_single_file_output(tmp_path, tiny_model, compute):
    face = tmp_path / "face.jpg"
    Image.fromarray(centre_crop(lfw_faces(1)[0], 32)).save(face, quality=95)
    summary = upscale_path(face, tmp_path / "out", options(model=str(tiny_model), out_format="webp", suffix="_sr"), compute)
    assert summary.results[0].output.endswith("out/face_sr.webp")
    assert read_image(tmp_path / "out" / "face_sr.webp").rgb.shape == (128, 128, 3)
    jobs = plan_jobs(face, tmp_path / "named.png", options())
    assert jobs[0].output == tmp_path / "named.png"


def test_missing_default_model_is_one_clear_line(tmp_path, monkeypatch, compute):
    import fsr.core.weights as weights

    monkeypatch.setattr(weights, "SHIPPED_WEIGHTS_DIR", tmp_path / "no_weights")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("FSR_WEIGHTS_DIR", raising=False)
    face = tmp_path / "face.png"
    Image.fromarray(centre_crop(lfw_faces(1)[0], 32)).save(face)
    with pytest.raises(UpscaleError) as info:
        upscale_path(face, tmp_path / "out", options(model="default"), compute)
    message = str(info.value)
    assert "\n" not in message and "fsr_default" in message and "--model" in message


def test_interrupted_run_leaves_no_partial_output_and_resumes(tmp_path):
    """Kill a run mid-way (SIGKILL): every output present is complete; re-running finishes the rest."""
    src = tmp_path / "in"
    src.mkdir()
    faces = lfw_faces(40)
    for p in faces:
        (src / p.name).write_bytes(p.read_bytes())  # 250x250 photos-as-faces -> 1000x1000 PNG outputs
    out = tmp_path / "out"
    args = [*FSR, "upscale", str(src), str(out), "--mode", "faces", "--model", "bicubic", "--format", "png",
            "--batch-size", "1", "--threads", "1", "--no-progress", "--max-drift", "0"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (out.is_dir() and any(p.suffix == ".png" for p in out.iterdir())):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    written = sorted(p for p in out.iterdir() if p.suffix == ".png")
    assert 0 < len(written) < len(faces), "the run was not caught mid-way"
    for p in written:  # every file under its final name is complete
        assert read_image(p).rgb.shape == (1000, 1000, 3)
    rerun = run_cli(str(src), str(out), "--mode", "faces", "--model", "bicubic", "--format", "png",
                    "--report", str(tmp_path / "r.json"))
    assert rerun.returncode == 0, rerun.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["images"]
    assert sum(r["status"] == "skipped" for r in rows) == len(written)
    assert sum(r["status"] == "done" for r in rows) == len(faces) - len(written)
    names = sorted(p.name for p in out.iterdir() if p.name != ".fsr-upscale.json")
    assert names == sorted(p.with_suffix(".png").name for p in faces)  # no temp files


# ----------------------------------------------------------------------------- model card and routing


def test_shipped_cards_load_with_a_measured_face_range_and_old_keys_are_read(tmp_path):
    from fsr.models.sr import ModelCard, read_card

    for name in ("fsr_default", "fsr_fast", "fsr_l1", "fsr_identity", "fsr_verify"):
        card = read_card(REPO / "weights" / f"{name}.safetensors")
        assert card.architecture == "rrdb" and card.scale == 4 and card.input_size == 32 and len(card.sha256) == 64
        low, high = card.lr_face_range
        assert 8 <= low < high and card.admits((low + high) / 2) and not card.admits(high + 1)
        assert card.to_dict()["lr_face_range"] == [low, high]
    old = ModelCard.from_dict({"architecture": "rrdb", "arch_args": {"nf": 8}, "lr_size": 24, "data": {"faces": 3}})
    assert old.input_size == 24 and old.training_data == {"faces": 3} and old.lr_face_range is None and old.admits(500)
    assert ModelCard.from_dict(old.to_dict()) == old
    with pytest.raises(Exception, match="lr_face_range"):
        ModelCard.from_dict({"architecture": "rrdb", "arch_args": {}, "lr_face_range": [64, 16]})


def test_faces_outside_the_cards_range_keep_the_classical_upscale(tmp_path, tiny_model, compute):
    from fsr.detect.mtcnn import MTCNN

    model = tmp_path / "ranged.safetensors"
    model.write_bytes(tiny_model.read_bytes())
    card = json.loads(tiny_model.with_suffix(".json").read_text())
    model.with_suffix(".json").write_text(json.dumps({**card, "lr_face_range": [16, 60]}))
    image = read_image(REPO / "examples" / "photos" / "img54.jpg").rgb  # real faces of about 134, 27 and 26 px
    Image.fromarray(image).save(tmp_path / "photo.png")
    summary = upscale_path(tmp_path / "photo.png", tmp_path / "out.png", options(model=str(model), scale=1),
                           compute, detector=MTCNN.load(compute))
    faces = summary.results[0].faces
    big = [f for f in faces if f["route"] != "rejected" and f["side"] > 60]
    small = [f for f in faces if f["route"] != "rejected" and 16 <= f["side"] <= 60]
    assert big and small and {f["route"] for f in big} == {"classical"} and {f["route"] for f in small} == {"sr"}
    assert "range" in big[0]["reason"]
    out = read_image(tmp_path / "out.png").rgb
    x1, y1, x2, y2 = (int(v) for v in big[0]["box"])
    assert np.array_equal(out[y1:y2, x1:x2], image[y1:y2, x1:x2])
    # faces mode: a 24 px crop is in range (face about 16 px), a 128 px crop (face about 85 px) is not
    for side, route in ((24, "sr"), (128, "classical")):
        Image.fromarray(centre_crop(lfw_faces(1)[0], side)).save(tmp_path / f"c{side}.png")
        result = upscale_path(tmp_path / f"c{side}.png", tmp_path / "crops", options(model=str(model)), compute).results[0]
        assert result.faces[0]["route"] == route, side


def test_false_positives_are_rejected_and_reported(tmp_path, compute):
    """examples/photos/img59 (wild/img59 at 450 px): the hand holding the microphone (score 0.73)
    and another low-score detection are not faces; the singer's face is."""
    from fsr.detect.mtcnn import MTCNN
    from fsr.models.face.pipeline import landmark_problem

    detector = MTCNN.load(compute)
    photo = REPO / "examples" / "photos" / "img59.jpg"
    faces = find_faces(detector, read_image(photo).rgb, FaceFilter())
    real = [f for f in faces if not f.rejected]
    rejected = [f for f in faces if f.rejected]
    assert len(real) >= 1 and all(f.score >= 0.9 for f in real) and rejected
    assert all("score" in f.rejected for f in rejected if f.score < 0.9)
    face = real[0]
    assert landmark_problem(face.box, face.landmarks) == ""
    upside_down = face.landmarks.copy()
    upside_down[:, 1] = face.box[1] + face.box[3] - upside_down[:, 1]
    assert "above" in landmark_problem(face.box, upside_down)
    summary = upscale_path(photo, tmp_path / "o.jpg", options(model="bicubic", scale=1), compute, detector=detector)
    write_upscale_report(tmp_path / "r.json", summary)
    routes = [f["route"] for f in json.loads((tmp_path / "r.json").read_text())["images"][0]["faces"]]
    assert routes.count("rejected") == len(rejected) and summary.results[0].faces_rejected == len(rejected)


# ----------------------------------------------------------------------------- resume with settings


def test_rerun_with_another_model_is_refused_then_redone_with_overwrite(tmp_path, tiny_model):
    src = tmp_path / "in"
    src.mkdir()
    for i, p in enumerate(lfw_faces(2)):
        Image.fromarray(centre_crop(p, 32)).save(src / f"f{i}.png")
    out = tmp_path / "out"
    first = run_cli(str(src), str(out), "--model", "bicubic")
    assert first.returncode == 0 and f"outputs: {out}" in first.stdout.replace("\n", ""), first.stdout
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    again = run_cli(str(src), str(out), "--model", "bicubic")
    assert again.returncode == 0 and {p.name: p.read_bytes() for p in out.glob("*.png")} == before
    other = run_cli(str(src), str(out), "--model", str(tiny_model))
    assert other.returncode == 2 and "--overwrite" in other.stderr and "model" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before
    redo = run_cli(str(src), str(out), "--model", str(tiny_model), "--overwrite", "--report", str(tmp_path / "r.json"))
    assert redo.returncode == 0, redo.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["images"]
    assert {r["status"] for r in rows} == {"done"} and {r["model"] for r in rows} == {"rrdb_tiny"}
    assert all(p.read_bytes() != before[p.name] for p in out.glob("*.png"))
    recorded = json.loads((out / ".fsr-upscale.json").read_text())["settings"]
    assert recorded["model"] == "rrdb_tiny" and len(recorded["model_sha256"]) == 64
    # the self-ensemble changes the pixels: same weights, yet a re-run with --tta is refused too
    tta = run_cli(str(src), str(out), "--model", str(tiny_model), "--tta")
    assert tta.returncode == 2 and "self_ensemble" in tta.stderr and "--overwrite" in tta.stderr


# ----------------------------------------------------------------------------- quality on real faces


def held_out_celeba(count: int) -> list[Path]:
    """First photo of each of ``count`` held-out CelebA identities: those of
    fsr/data/splits/celeba_test_identities.txt (else the last 40 identity folders, sorted)."""
    from tests.conftest import CELEBA_DIR

    split = REPO / "fsr" / "data" / "splits" / "celeba_test_identities.txt"
    if split.is_file():
        names = [line.strip() for line in split.read_text().splitlines() if line.strip() and not line.startswith("#")]
        folders = [CELEBA_DIR / name for name in names if (CELEBA_DIR / name).is_dir()]
    else:
        folders = sorted(p for p in CELEBA_DIR.iterdir() if p.is_dir())[-40:]
    return [sorted(d.glob("*.jpg"))[0] for d in folders[:count]]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_default_model_beats_bicubic_on_face_crops_of_every_size(tmp_path, compute):
    """Crops of 24, 32, 48 and 64 px (bicubic /4 of real face squares) in faces mode: SR >= bicubic."""
    system = load_sr_system("default", compute)
    for n in (24, 32, 48, 64):
        gains = []
        for path in held_out_celeba(4):
            rgb = read_image(path).rgb
            h = rgb.shape[0]
            square = to_tensor(np.ascontiguousarray(rgb[h // 4 : 3 * h // 4, h // 4 : 3 * h // 4]))[None]
            hr = to_uint8(resize_bicubic(square, 4 * n)[0].clamp(0, 1))
            lr = to_uint8(resize_bicubic(to_tensor(hr)[None], n)[0].clamp(0, 1))
            Image.fromarray(lr).save(tmp_path / "lr.png")
            summary = upscale_path(tmp_path / "lr.png", tmp_path / f"sr{n}.png", options(overwrite=True), compute, system=system)
            assert summary.results[0].faces_sr == 1
            sr = read_image(tmp_path / f"sr{n}.png").rgb
            gains.append(_psnr(sr, hr) - _psnr(classical_upscale(lr, 4), hr))
        assert np.mean(gains) > 0.5, (n, gains)


def test_sharp_128_crop_keeps_its_detail(tmp_path, compute):
    """A sharp 128 px face crop, x4 in faces mode and scaled back down: >= 35 dB from the input."""
    rgb = read_image(WILD_DIR / "img1.jpg").rgb
    crop = to_uint8(resize_bicubic(to_tensor(np.ascontiguousarray(rgb[100:400, 200:500]))[None], 128)[0].clamp(0, 1))
    Image.fromarray(crop).save(tmp_path / "sharp.png")
    upscale_path(tmp_path / "sharp.png", tmp_path / "up.png", options(mode="faces"), compute)
    up = read_image(tmp_path / "up.png").rgb
    assert up.shape == (512, 512, 3)
    back = to_uint8(resize_bicubic(to_tensor(up)[None], 128)[0].clamp(0, 1))
    assert _psnr(back, crop) >= 35.0


def test_photo_mode_beats_bicubic_on_face_regions_of_downscaled_photos(tmp_path, compute):
    """Held-out CelebA and LFW photos, downscaled x4 and upscaled x4 in photo mode: on the face
    squares SR is above bicubic on average (benchmarks/photo_quality.py measures more)."""
    from fsr.detect.crop import square_box
    from fsr.detect.mtcnn import MTCNN

    detector = MTCNN.load(compute)
    gains = []
    for i, path in enumerate(held_out_celeba(3) + lfw_faces(2)):
        rgb = read_image(path).rgb
        h, w = (rgb.shape[0] // 4) * 4, (rgb.shape[1] // 4) * 4
        hr = np.ascontiguousarray(rgb[:h, :w])
        lr = to_uint8(resize_bicubic(to_tensor(hr)[None], (h // 4, w // 4))[0].clamp(0, 1))
        Image.fromarray(lr).save(tmp_path / f"lr{i}.png")
        upscale_path(tmp_path / f"lr{i}.png", tmp_path / f"sr{i}.png", options(mode="photo"), compute, detector=detector)
        sr, bicubic = read_image(tmp_path / f"sr{i}.png").rgb, classical_upscale(lr, 4)
        for face in (f for f in find_faces(detector, hr, FaceFilter(min_size=64)) if not f.rejected):
            x0, y0, side = square_box(face.box)
            region = (slice(max(0, y0), y0 + side), slice(max(0, x0), x0 + side))
            gains.append(_psnr(sr[region], hr[region]) - _psnr(bicubic[region], hr[region]))
    assert len(gains) >= 4 and np.mean(gains) > 1.0 and min(gains) > 0, gains


# ----------------------------------------------------------------------------- identity drift


class _OtherPerson:
    """An 'SR system' that answers every face with another person's face (bicubic of their LR)."""

    name, scale, card, self_ensemble = "swap", 4, None, False

    def __init__(self, system, other_lr: np.ndarray) -> None:
        self.model = system.model  # a real network, so the drift check runs
        self.other = to_tensor(other_lr)[None]

    def upscale(self, lr: torch.Tensor) -> torch.Tensor:
        other = resize_bicubic(self.other, lr.shape[-2:])
        return resize_bicubic(other, (lr.shape[-2] * 4, lr.shape[-1] * 4)).clamp(0, 1).expand(lr.shape[0], -1, -1, -1)


def test_drift_flags_another_persons_face_and_spares_the_models_own_faces(tmp_path, compute):
    from fsr.models.face.pipeline import DEFAULT_MAX_DRIFT

    system = load_sr_system("default", compute)
    crops = []
    for path in held_out_celeba(6):
        rgb = read_image(path).rgb
        h = rgb.shape[0]
        square = to_tensor(np.ascontiguousarray(rgb[h // 4 : 3 * h // 4, h // 4 : 3 * h // 4]))[None]
        crops.append(to_uint8(resize_bicubic(square, 32)[0].clamp(0, 1)))
    (tmp_path / "in").mkdir()
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(tmp_path / "in" / f"face{i}.png")
    own = upscale_path(tmp_path / "in", tmp_path / "own", options(max_drift=DEFAULT_MAX_DRIFT, mode="faces"), compute,
                       system=system)
    own_drift = [r.faces[0]["drift"] for r in own.results]
    assert all(d is not None and 0 <= d for d in own_drift)
    assert np.mean(np.array(own_drift) > DEFAULT_MAX_DRIFT) <= 1 / 6, own_drift
    for i in range(len(crops)):
        swap = _OtherPerson(system, crops[(i + 3) % len(crops)])
        result = upscale_path(tmp_path / "in" / f"face{i}.png", tmp_path / f"swap{i}.png",
                              options(max_drift=DEFAULT_MAX_DRIFT), compute, system=swap).results[0]
        face = result.faces[0]
        assert face["drift"] > DEFAULT_MAX_DRIFT and face["route"] == "classical" and "drift" in face["reason"], face
        out = read_image(tmp_path / f"swap{i}.png").rgb
        assert np.array_equal(out, classical_upscale(crops[i], 4))


# ----------------------------------------------------------------------------- the newcomer's path


def test_warnings_reach_the_user_as_one_line(tmp_path):
    """A warning (here: fp16 asked for on a CPU) is one "warning:" line, not Python's
    "file:line: UserWarning" with the source line under it."""
    crop = tmp_path / "face.png"
    Image.fromarray(centre_crop(lfw_faces(1)[0], 32)).save(crop)
    result = run_cli(str(crop), str(tmp_path / "out.png"), "--mode", "faces", "--model", "bicubic",
                     "--device", "cpu", "--precision", "fp16")
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "fp16" in line]
    assert warned == ["warning: precision fp16 is not used on the CPU; running in fp32"], result.stderr
    assert "UserWarning" not in result.stderr and "device.py" not in result.stderr
    assert read_image(tmp_path / "out.png").rgb.shape == (128, 128, 3)


def test_help_of_every_subcommand_fits_80_columns():
    runner = CliRunner()
    for command in ("prepare", "train", "upscale", "metrics", "verify-sweep", "verify", None):
        args = [command, "--help"] if command else ["--help"]  # None: the top level's command list
        result = runner.invoke(app, args, terminal_width=80, env={"COLUMNS": "80"})
        assert result.exit_code == 0, command
        lines = result.output.splitlines()
        assert max(len(line) for line in lines) <= 80, (command, max(lines, key=len))
        assert "<bool>" not in result.output and "…" not in result.output, command


def test_verify_sweep_without_data_says_how_to_make_it():
    result = CliRunner().invoke(app, ["verify-sweep", "--pairs", str(SHARED_PAIRS)])
    assert result.exit_code == 2
    assert "fsr prepare --pairs" in result.output and len(result.output.strip().splitlines()) <= 2


def test_prepare_selection_keeps_only_the_images_the_pairs_name(tmp_path):
    from fsr.data.selection import SelectionError, pair_image_keys, select_images

    keys = pair_image_keys(SHARED_PAIRS)
    assert "Abel_Pacheco/Abel_Pacheco_0001.jpg" in keys and all(k.endswith(".jpg") for k in keys)
    chosen = select_images([LFW_DIR], SHARED_PAIRS, limit=25)
    assert len(chosen) == 25 and all(p.relative_to(LFW_DIR).as_posix() in keys for p in chosen)
    assert chosen == sorted(chosen)
    csv_pairs = tmp_path / "pairs.csv"
    csv_pairs.write_text("a,b,same\n" + f"{chosen[0].relative_to(LFW_DIR)},{chosen[1].relative_to(LFW_DIR)},1\n")
    assert select_images([LFW_DIR], csv_pairs) == chosen[:2]
    with pytest.raises(SelectionError, match="no image"):
        select_images([WILD_DIR], SHARED_PAIRS)


def test_verify_uses_the_face_pipeline_and_the_cards_range(tmp_path, compute):
    """`fsr verify`: the same photo at full and half size is the same person; a face in the
    default model's range is super-resolved at its own size (x4 of its square), one above it not."""
    from fsr.evaluate.pair import verify_photos

    photo = REPO / "examples" / "photos" / "img54.jpg"  # the main face's box is about 134 px
    rgb = read_image(photo).rgb
    Image.fromarray(to_uint8(resize_bicubic(to_tensor(rgb)[None], (rgb.shape[0] // 2, rgb.shape[1] // 2))[0])).save(
        tmp_path / "half.png")
    verdict = verify_photos(photo, tmp_path / "half.png", compute, system="default", sr_threshold=None)
    assert verdict.same and verdict.a.super_resolved and verdict.b.super_resolved
    assert abs(verdict.b.face.shape[-1] / 4 - verdict.b.side * 1.5) <= 1  # its square at its own size, x4
    direct = verify_photos(photo, tmp_path / "half.png", compute, system="default", sr_threshold=100)
    assert not direct.a.super_resolved and direct.b.super_resolved and direct.same
