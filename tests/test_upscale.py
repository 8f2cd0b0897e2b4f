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
)
from tests.conftest import LFW_DIR, REPO, WILD_DIR

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
    assert sorted(p.name for p in out.iterdir()) == ["good0.png", "good1.png"]
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}

    second = run_cli(str(src), str(out), "--model", str(tiny_model), "--report", str(tmp_path / "again.csv"))
    assert second.returncode == 0, second.stderr
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    csv_text = (tmp_path / "again.csv").read_text()
    assert csv_text.count(",skipped,") == 2 and csv_text.count(",failed,") == 4


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
            "--batch-size", "1", "--threads", "1", "--no-progress"]
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
    assert sorted(p.name for p in out.iterdir()) == sorted(p.with_suffix(".png").name for p in faces)  # no temp files
