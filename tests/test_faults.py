"""Fault injection: what a careless user can do to fsr, and what fsr must do about it.

Every case here is a fault that once lost data, accepted a corrupt file or ended in a
traceback: tampered weights for every loader, colliding output names, prepare touching
files it did not write, read-only and full output disks, oversized and odd inputs.
Everything runs on real images from ../shared/data, in seconds, on two CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fsr.core.weights import (
    SHIPPED_WEIGHTS_DIR,
    WeightsError,
    load_safetensors,
    load_torch_checkpoint,
    save_safetensors,
    sha256_file,
)
from fsr.models.rrdb import RRDBNet
from fsr.models.systems import DEFAULT_MODEL_NAME, load_sr_system
from fsr.train.checkpoint import CheckpointWarning, export_generator, find_latest_checkpoint, save_checkpoint
from tests.conftest import LFW_DIR, REPO, WILD_DIR

FSR = [sys.executable, "-m", "fsr.cli"]
FACES = sorted(LFW_DIR.glob("A*/*_0001.jpg"))[:6]


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Flip one bit in ``path`` (default: a byte in the middle of the file)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def one_line_error(result) -> str:
    """The CLI's error output: exactly one line, no traceback."""
    text = (result.stderr if hasattr(result, "stderr") else result.output).strip()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no error message"
    assert lines[-1].startswith("error:"), text
    return lines[-1]


def cli(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FSR, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250", **(env or {})},
    )


# ----------------------------------------------------------------------------- weights


@pytest.fixture()
def tampered_default(tmp_path) -> Path:
    """A copy of the shipped default model (weights + card) with one bit flipped in the weights."""
    folder = tmp_path / "weights"
    folder.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(SHIPPED_WEIGHTS_DIR / f"{DEFAULT_MODEL_NAME}{suffix}", folder / f"{DEFAULT_MODEL_NAME}{suffix}")
    flip_byte(folder / f"{DEFAULT_MODEL_NAME}.safetensors")
    return folder / f"{DEFAULT_MODEL_NAME}.safetensors"


def test_tampered_model_is_refused_as_model_path_and_through_weights_dir(tampered_default, monkeypatch):
    with pytest.raises(WeightsError, match=r"fsr_default.safetensors: SHA-256 mismatch .*fsr_default.json"):
        load_sr_system(str(tampered_default))
    monkeypatch.setenv("FSR_WEIGHTS_DIR", str(tampered_default.parent))
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        load_sr_system("default")
    monkeypatch.delenv("FSR_WEIGHTS_DIR")
    assert load_sr_system("default").model is not None  # the shipped file itself is intact


def test_tampered_model_through_the_cli_is_one_line(tampered_default, tmp_path):
    face = tmp_path / "face.png"
    Image.open(FACES[0]).crop((85, 85, 165, 165)).save(face)
    result = cli("upscale", str(face), str(tmp_path / "out"), "--model", str(tampered_default), "--no-progress")
    line = one_line_error(result)
    assert result.returncode != 0 and "fsr_default.safetensors: SHA-256 mismatch" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_tampered_dlib_weights_are_refused_wherever_they_come_from(tmp_path):
    from fsr.models.face import create_face_model

    copy = tmp_path / "my_dlib.safetensors"  # renamed: no SHA256SUMS, no card beside it
    shutil.copy(SHIPPED_WEIGHTS_DIR / "dlib_resnet_v1.safetensors", copy)
    assert create_face_model("dlib", weights=copy) is not None
    flip_byte(copy, offset=copy.stat().st_size - 100)
    with pytest.raises(WeightsError, match=r"my_dlib.safetensors: SHA-256 mismatch"):
        create_face_model("dlib", weights=copy)


def test_tampered_mtcnn_weights_are_refused(tmp_path):
    from fsr.detect.mtcnn import MTCNN

    copy = tmp_path / "mtcnn.safetensors"
    shutil.copy(SHIPPED_WEIGHTS_DIR / "mtcnn.safetensors", copy)
    flip_byte(copy)
    with pytest.raises(WeightsError, match="mtcnn.safetensors: SHA-256 mismatch"):
        MTCNN.load(weights=copy)


def test_export_records_digests_and_a_lone_tampered_file_is_refused(tmp_path):
    torch.manual_seed(0)
    net = RRDBNet(nf=8, nb=1, gc=8)
    weights, card = export_generator(net.state_dict(), tmp_path / "mine", {"architecture": "rrdb", "arch_args": net.arch_args})
    assert json.loads(card.read_text())["sha256"] == sha256_file(weights)
    assert load_sr_system(str(weights)).model is not None
    flip_byte(weights, offset=weights.stat().st_size - 3)
    with pytest.raises(WeightsError, match="mine.safetensors: SHA-256 mismatch"):
        load_sr_system(str(weights))
    card.unlink()  # no card any more: the digest inside the file still catches the flip
    with pytest.raises(WeightsError, match="mine.safetensors: tensor digest mismatch"):
        load_safetensors(weights)
    lone = tmp_path / "lone.safetensors"
    save_safetensors({"w": torch.arange(64.0)}, lone, record_digest=True)
    assert torch.equal(load_safetensors(lone)["w"], torch.arange(64.0))


def test_broken_and_unsafe_checkpoints_get_different_messages(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(4)}, good)
    assert torch.equal(load_torch_checkpoint(good)["w"], torch.zeros(4))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"w": Payload()}, unsafe)
    messages = {}
    for path in (junk, truncated, unsafe):
        with pytest.raises(WeightsError) as info:
            load_torch_checkpoint(path)
        messages[path.stem] = str(info.value)
        assert "\n" not in messages[path.stem] and str(path) in messages[path.stem]
    assert "not a valid PyTorch checkpoint" in messages["junk"] and "safely" not in messages["junk"]
    assert "truncated or corrupt" in messages["truncated"]
    assert "pickled Python objects (print)" in messages["unsafe"] and "not a valid" not in messages["unsafe"]


def test_checkpoint_listed_in_a_sha256sums_file_is_verified(tmp_path):
    ckpt = tmp_path / "sphere20a_20171020.pth"
    torch.save({"w": torch.ones(8)}, ckpt)
    (tmp_path / "SHA256SUMS").write_text(f"{sha256_file(ckpt)}  {ckpt.name}\n")
    assert load_torch_checkpoint(ckpt)["w"].sum() == 8
    flip_byte(ckpt, offset=ckpt.stat().st_size - 30)
    with pytest.raises(WeightsError, match="sphere20a_20171020.pth: SHA-256 mismatch .*SHA256SUMS"):
        load_torch_checkpoint(ckpt)


def test_corrupt_newest_training_checkpoint_is_skipped_with_a_warning(tmp_path):
    models = {"generator": {"w": torch.zeros(16)}}
    save_checkpoint(tmp_path, 10, models, {"opt": torch.ones(2)}, keep=3)
    newest = save_checkpoint(tmp_path, 20, models, {"opt": torch.ones(2)}, keep=3)
    flip_byte(newest.path / "generator.safetensors")
    with pytest.warns(CheckpointWarning, match="step_00000020: checkpoint is corrupt"):
        found = find_latest_checkpoint(tmp_path)
    assert found is not None and found.step == 10
    assert torch.equal(found.load_models()["generator"]["w"], torch.zeros(16))
    flip_byte(found.path / "generator.safetensors")  # damaged after it was chosen: still never used
    with pytest.raises(WeightsError, match="step_00000010/generator.safetensors: SHA-256 mismatch"):
        found.load_models()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact newest checkpoint raises no warning
        save_checkpoint(tmp_path, 30, models, {"opt": torch.ones(2)}, keep=3)
        assert find_latest_checkpoint(tmp_path).step == 30


# ----------------------------------------------------------------------------- disks


@pytest.fixture()
def small_disk(tmp_path):
    """``mount(size_kb, read_only=False) -> Path``: a tiny tmpfs, unmounted afterwards.

    Needs root (CI containers run as root); skipped with the reason otherwise.
    """
    mounted: list[Path] = []

    def mount(size_kb: int, read_only: bool = False) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        options = f"size={size_kb}k" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def face_crops(folder: Path, count: int = 6, side: int = 40) -> list[Path]:
    """``count`` real LFW faces cut to ``side`` px squares, as PNG files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in FACES[:count]:
        path = folder / f"{source.stem}.png"
        Image.open(source).crop((75, 75, 175, 175)).resize((side, side), Image.BICUBIC).save(path)
        paths.append(path)
    return paths


def test_upscale_onto_a_full_disk_stops_in_one_line_and_resumes(tmp_path, small_disk):
    src = tmp_path / "in"
    face_crops(src, count=6, side=60)
    disk = small_disk(200)  # room for two or three 240x240 PNG outputs
    result = cli("upscale", str(src), str(disk / "out"), "--model", "bicubic", "--no-progress", "--threads", "1")
    line = one_line_error(result)
    assert result.returncode != 0 and "No space left on device" in line and "re-run" in line
    kept = sorted(p for p in (disk / "out").iterdir() if p.name != ".fsr-upscale.json")  # the run's settings record
    assert 0 < len(kept) < 6 and all(p.suffix == ".png" for p in kept), "no temporaries, only whole outputs"
    for path in kept:
        assert Image.open(path).size == (240, 240)
    subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
    again = cli("upscale", str(src), str(disk / "out"), "--model", "bicubic", "--no-progress", "--threads", "1")
    assert again.returncode == 0, again.stderr
    assert len(list((disk / "out").glob("*.png"))) == 6


def test_upscale_into_a_read_only_folder_and_report_on_a_full_disk(tmp_path, small_disk):
    src = tmp_path / "in"
    face_crops(src, count=3)
    read_only = small_disk(64, read_only=True)
    result = cli("upscale", str(src), str(read_only / "out"), "--model", "bicubic", "--no-progress")
    line = one_line_error(result)
    assert "Read-only file system" in line and "bad inputs" not in result.stdout  # stopped: no input blamed
    full = small_disk(16)
    (full / "filler").write_bytes(b"\0" * 16 * 1024)
    result = cli("upscale", str(src), str(tmp_path / "out"), "--model", "bicubic", "--no-progress",
                 "--report", str(full / "report.json"))
    line = one_line_error(result)
    assert "cannot write the report" in line and "the 3 upscaled images are kept" in line
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    assert [p.name for p in full.iterdir()] == ["filler"]


def test_metrics_into_a_read_only_folder_is_one_line(tmp_path, small_disk):
    hr = tmp_path / "hr"
    face_crops(hr, count=2, side=64)
    read_only = small_disk(64, read_only=True)
    result = cli("metrics", "--hr", str(hr), "--sr", f"same={hr}", "--model", "none", "--out", str(read_only / "m"))
    line = one_line_error(result)
    assert "Read-only file system" in line


def test_prepare_into_a_read_only_folder_and_onto_a_full_disk(tmp_path, small_disk):
    src = tmp_path / "src"
    for face in FACES[:6]:
        (src / face.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(face, src / face.parent.name / face.name)
    args = ["--batch-size", "2", "--threads", "1", "--workers", "1", "--no-progress", "--split", "train"]
    read_only = small_disk(64, read_only=True)
    line = one_line_error(cli("prepare", str(src), str(read_only / "prep"), *args))
    assert "Read-only file system" in line and "nothing was prepared" in line
    full = small_disk(96)  # room for a few 128 px crops, not all
    result = cli("prepare", str(src), str(full / "prep"), *args)
    line = one_line_error(result)
    assert "No space left on device" in line and "finished images are kept" in line
    subprocess.run(["mount", "-o", "remount,size=8m", str(full)], check=True)
    assert cli("prepare", str(src), str(full / "prep"), *args).returncode == 0
    straight = tmp_path / "straight"
    assert cli("prepare", str(src), str(straight), *args).returncode == 0
    assert tree_bytes(full / "prep") == tree_bytes(straight)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the run's timings (summary.json), by relative path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in ("summary.json", "prepare.json")
    }


# ----------------------------------------------------------------------------- upscale inputs and outputs


def test_two_inputs_one_output_is_refused_naming_both(tmp_path):
    from fsr.upscale import UpscaleError, UpscaleOptions, plan_jobs

    src = tmp_path / "col"
    face_crops(src, count=1)
    first = next(src.iterdir())
    Image.open(first).save(src / f"{first.stem}.jpg", quality=95)
    with pytest.raises(UpscaleError, match=rf"{first.stem}.jpg and .*{first.stem}.png would both be written to"):
        plan_jobs(src, tmp_path / "out", UpscaleOptions(out_format="png"))
    assert len(plan_jobs(src, tmp_path / "out", UpscaleOptions(out_format="same"))) == 2  # distinct names: fine

    cased = tmp_path / "cased"
    cased.mkdir()
    Image.open(first).save(cased / "b.jpg", quality=95)
    Image.open(first).save(cased / "b.JPG", quality=90)
    result = cli("upscale", str(cased), str(tmp_path / "out2"), "--model", "bicubic", "--no-progress")
    line = one_line_error(result)
    assert "b.JPG and" in line and "b.jpg would both be written to" in line and not (tmp_path / "out2").exists()


def test_odd_entries_in_an_input_folder_are_each_reported(tmp_path):
    from fsr.core.device import Compute
    from fsr.upscale import UpscaleOptions, upscale_path

    src = tmp_path / "in"
    good = face_crops(src, count=2)
    Image.open(good[0]).save(src / "anim.gif")
    (src / "folder.jpg").mkdir()
    (src / "loop").symlink_to(src, target_is_directory=True)
    (src / "gone.png").symlink_to(tmp_path / "missing.png")
    (src / "self.jpg").symlink_to(src / "self.jpg")  # a link to itself
    Image.new("RGB", (1, 1), (128, 64, 32)).save(src / "dot.png")
    summary = upscale_path(src, tmp_path / "out", UpscaleOptions(model="bicubic", show_progress=False),
                           Compute.create("cpu", threads=1))
    reasons = {Path(r.input).name: r.reason for r in summary.results if r.status == "failed"}
    assert "unsupported format GIF" in reasons["anim.gif"]
    assert "a folder, not an image file" in reasons["folder.jpg"]
    assert "symbolic link loop" in reasons["loop"]
    assert "broken symbolic link" in reasons["gone.png"]
    assert "Too many levels of symbolic links" in reasons["self.jpg"]
    assert "too small to hold a face (1x1 px" in reasons["dot.png"]
    assert summary.done == 2 and summary.faces_sr == 2 and sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        p.name for p in good]


def test_auto_mode_counts_only_real_faces_as_super_resolved(tmp_path):
    """Noise, flat and scene images small enough to look like face crops get the classical
    upscale as photos without faces; real face crops of every size are super-resolved."""
    from fsr.core.device import Compute
    from fsr.core.io import grey_channel
    from fsr.upscale import UpscaleOptions, classical_upscale, upscale_path

    src = tmp_path / "in"
    real = [face_crops(src / f"{side}px", count=2, side=side) for side in (24, 32, 64, 128)]
    rng = np.random.default_rng(0)
    fakes = {}
    for side in (16, 32, 96, 160):
        fakes[f"noise{side}.png"] = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    fakes["grey64.png"] = np.full((64, 64, 3), 128, np.uint8)
    scene = np.asarray(Image.open(WILD_DIR / "img38.jpg").convert("RGB"))
    fakes["corner120.png"] = np.ascontiguousarray(scene[:120, :120])  # background, no face
    for name, pixels in fakes.items():
        Image.fromarray(pixels).save(src / name)
    summary = upscale_path(src, tmp_path / "out", UpscaleOptions(show_progress=False), Compute.create("cpu", threads=1))
    rows = {str(Path(r.input).relative_to(src)): r for r in summary.results}
    assert summary.done == len(rows) == 8 + len(fakes)
    for name, pixels in fakes.items():
        row = rows[name]
        assert (row.mode, row.faces_sr, row.faces_found) == ("photo", 0, 0), (name, row)
        out = np.asarray(Image.open(tmp_path / "out" / name))
        expected = classical_upscale(pixels, 4)
        if name.startswith("grey"):  # a grey input comes back as one grey channel
            expected = grey_channel(expected)
        assert np.array_equal(out, expected), name
    for paths in real:
        for path in paths:
            row = rows[str(path.relative_to(src))]
            assert row.mode == "faces" and row.faces_found == 1, (path, row)
    assert summary.faces_sr == sum(rows[str(p.relative_to(src))].faces_sr for paths in real for p in paths) >= 6


def test_single_gif_is_refused_before_any_work(tmp_path):
    gif = tmp_path / "face.gif"
    Image.open(FACES[0]).save(gif)
    result = cli("upscale", str(gif), str(tmp_path / "out"), "--model", "bicubic", "--no-progress")
    line = one_line_error(result)
    assert "face.gif: unsupported input format GIF" in line and not (tmp_path / "out").exists()
    png = tmp_path / "face.png"
    Image.open(FACES[0]).save(png)
    line = one_line_error(cli("upscale", str(png), str(tmp_path / "face_x4.gif"), "--model", "bicubic"))
    assert "face_x4.gif: unsupported output format GIF" in line


def test_declared_huge_image_is_refused_before_decoding_by_default(tmp_path):
    from tests.test_io import make_declared_huge_png

    src = tmp_path / "in"
    face_crops(src, count=1)
    make_declared_huge_png(src / "bomb.png", 14000, 14000)  # 196 MP declared in a few bytes
    result = cli("upscale", str(src), str(tmp_path / "out"), "--model", "bicubic", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "bomb.png: declared size 14000x14000 (196 MP) exceeds the limit of 50 MP" in " ".join(result.stderr.split())
    raised = cli("upscale", str(src / "bomb.png"), str(tmp_path / "out2"), "--model", "bicubic", "--max-pixels",
                 "300000000", "--no-progress")
    assert "exceeds the limit" not in raised.stderr  # --max-pixels raises the budget (the 1-pixel body then fails)


def test_write_failures_are_not_counted_as_bad_inputs(tmp_path, monkeypatch):
    import fsr.upscale as upscale
    from fsr.core.device import Compute

    src = tmp_path / "in"
    face_crops(src, count=2)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(upscale, "write_image", refuse)
    summary = upscale.upscale_path(src, tmp_path / "out", upscale.UpscaleOptions(model="bicubic", show_progress=False),
                                   Compute.create("cpu", threads=1))
    assert summary.failed == 0 and summary.unwritten == 2 and not summary.succeeded
    assert all("Permission denied" in r.reason and r.status == "unwritten" for r in summary.results)


def csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def mixed_folder(folder: Path) -> tuple[list[str], dict[str, str]]:
    """Good face photos beside every kind of bad entry; returns (good names, bad name -> reason)."""
    from tests.test_io import make_declared_huge_png

    folder.mkdir(parents=True)
    good = []
    for face in FACES[:3]:
        shutil.copy(face, folder / face.name)
        good.append(face.name)
    (folder / "truncated.jpg").write_bytes(FACES[0].read_bytes()[:3000])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a photo\n")
    make_declared_huge_png(folder / "bomb.png", 14000, 14000)
    Image.open(FACES[0]).save(folder / "anim.gif")
    (folder / "folder.jpg").mkdir()
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    bad = {"truncated.jpg": "cannot decode", "empty.png": "empty file", "notes.jpg": "not an image",
           "bomb.png": "exceeds the limit of 50 MP", "anim.gif": "unsupported format GIF",
           "folder.jpg": "a folder, not an image file", "loop": "symbolic link loop"}
    return good, bad


def test_mixed_bad_input_folder_through_every_subcommand(tmp_path):
    from fsr.data.manifest import read_manifest, read_rejects

    mixed = tmp_path / "Mixed_Person"
    good, bad = mixed_folder(mixed)
    prepared = tmp_path / "prepared"
    result = cli("prepare", str(mixed), str(prepared), *PREP_ARGS)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert sorted(r.source for r in read_manifest(prepared)) == sorted(good)
    rejects = dict(read_rejects(prepared))
    for name, reason in bad.items():
        assert reason in rejects[name], name
    assert "dot.png" in rejects  # no face in a single pixel

    result = cli("upscale", str(mixed), str(tmp_path / "up"), "--model", "bicubic", "--no-progress", "--threads", "1")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    text = " ".join(result.stderr.split())
    for name, reason in {**bad, "dot.png": "too small to hold a face"}.items():
        assert f"{name}: " in text and reason in text.split(f"{name}: ", 1)[1], name
    assert sorted(p.name for p in (tmp_path / "up").iterdir() if p.name != ".fsr-upscale.json") == sorted(good)

    result = cli("metrics", "--hr", str(mixed), "--sr", f"same={mixed}", "--model", "none", "--out", str(tmp_path / "m"))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    summary = json.loads((tmp_path / "m" / "metrics_summary.json").read_text())
    assert len({row["image"] for row in csv_rows(tmp_path / "m" / "metrics_per_image.csv")}) == len(good)
    skipped = " ".join(summary["skipped"])
    for name in ("truncated.jpg", "empty.png", "notes.jpg", "anim.gif", "folder.jpg", "loop", "dot.png: 1x1 px"):
        assert name in skipped, name

    line = one_line_error(cli("verify", str(mixed / "truncated.jpg"), str(mixed / good[0]), "--system", "bicubic"))
    assert "truncated.jpg" in line


# ----------------------------------------------------------------------------- prepare touches only its own files


def lfw_source(folder: Path, count: int = 4) -> Path:
    for face in FACES[:count]:
        (folder / face.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(face, folder / face.parent.name / face.name)
    return folder


PREP_ARGS = ["--batch-size", "2", "--threads", "1", "--workers", "1", "--no-progress", "--split", "train"]


@pytest.fixture(scope="module")
def prepare():
    """``prepare(src, dst)``: fsr prepare in-process with the CLI settings of PREP_ARGS (one detector)."""
    from fsr.core.device import Compute
    from fsr.data.prepare import PrepareConfig, prepare_dataset
    from fsr.detect.mtcnn import MTCNN

    threads = torch.get_num_threads()
    compute = Compute.create("cpu", batch_size=2, threads=1)
    detector = MTCNN.load(compute)

    def run(src: Path, dst: Path):
        return prepare_dataset(src, dst, PrepareConfig(split="train", workers=1), compute, progress=False, detector=detector)

    yield run
    torch.set_num_threads(threads)


def test_prepare_leaves_other_hidden_temporaries_and_refuses_foreign_manifests(tmp_path, prepare):
    src = lfw_source(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    user_files = {dst / ".draft.tmp": b"draft", dst / "projectA" / "deep" / ".report.docx.tmp": b"report"}
    for path, data in user_files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    prepare(src, dst)
    identity = FACES[0].parent.name
    inside = dst / "hr" / identity / ".notes.png.tmp"  # a user's file inside our output folder
    inside.write_bytes(b"notes")
    stale = dst / "hr" / identity / f".{FACES[0].stem}.png.ab12cd_3.tmp"  # what a killed run of ours leaves
    stale.write_bytes(b"half")
    (dst / ".prepare-journal.jsonl").write_bytes(b"")  # forget the finished chunks: everything is redone
    assert prepare(src, dst).processed_images == 4
    assert all(path.read_bytes() == data for path, data in user_files.items()) and inside.read_bytes() == b"notes"
    assert not stale.exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.csv").write_text("my,own,table\n")
    (foreign / "summary.json").write_text('{"mine": true}\n')
    line = one_line_error(cli("prepare", str(src), str(foreign), *PREP_ARGS))
    assert "already holds manifest.csv, summary.json not written by fsr prepare" in line
    assert (foreign / "manifest.csv").read_text() == "my,own,table\n" and sorted(p.name for p in foreign.iterdir()) == [
        "manifest.csv", "summary.json"]


def test_prepare_never_reads_its_own_outputs_and_may_write_beside_its_source(tmp_path, prepare):
    from fsr.data.manifest import read_manifest, read_rejects

    d3 = lfw_source(tmp_path / "d3", count=3)
    prepare(d3, d3 / "prepA")
    prepare(d3, d3 / "prepB")
    a, b = read_manifest(d3 / "prepA"), read_manifest(d3 / "prepB")
    assert [r.source for r in b] == [r.source for r in a] and {r.identity for r in b} == {f.parent.name for f in FACES[:3]}
    assert ("prepA", "skipped: an fsr prepare output folder (its crops are not source photos)") in read_rejects(d3 / "prepB")

    userdir = tmp_path / "userdir"
    lfw_source(userdir / "photos", count=2)
    assert prepare(userdir / "photos", userdir).faces == 2
    again = prepare(userdir / "photos", userdir)  # its own crops are not picked up
    assert again.images_found == 2 and len(read_manifest(userdir)) == 2


def test_face_too_small_message_shows_the_real_size():
    from fsr.data.prepare import PrepareConfig, _select_faces

    class Found:
        boxes = np.array([[10.0, 10.0, 29.6, 29.6]])

        def __len__(self):
            return 1

    _, reason = _select_faces(Found(), (100, 100, 3), PrepareConfig(min_face=20))
    assert reason == "face too small: largest box 19.6 px < --min-face 20 px"


# ----------------------------------------------------------------------------- metrics


def test_metrics_on_hr_images_of_different_sizes_and_a_truncated_manifest(tmp_path, prepare):
    from fsr.evaluate.metrics import evaluate_folders

    hr, sr = tmp_path / "hr", tmp_path / "sr"
    face_crops(hr / "small", count=2, side=64)
    face_crops(hr / "big", count=3, side=96)
    for path in hr.rglob("*.png"):
        out = sr / path.relative_to(hr)
        out.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(path)
        image.resize((image.width // 4, image.height // 4), Image.BICUBIC).resize(image.size, Image.BICUBIC).save(out)
    report = evaluate_folders(hr, {"bicubic": sr}, chunk_size=4, show_progress=False)
    assert len(report.rows) == 5 and not report.skipped
    result = cli("metrics", "--hr", str(hr), "--sr", f"bicubic={sr}", "--model", "none", "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr

    prepared = tmp_path / "prepared"
    prepare(lfw_source(tmp_path / "src", 2), prepared)
    manifest = prepared / "manifest.csv"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) - 40])  # cut the last row short
    line = one_line_error(cli("metrics", "--data", str(prepared), "--system", "bicubic", "--model", "none",
                              "--out", str(tmp_path / "m2")))
    assert "manifest.csv:3: truncated or malformed row" in line


# ----------------------------------------------------------------------------- the wheel


def test_built_wheel_carries_the_models_and_upscales_when_installed(tmp_path):
    """``pip wheel .`` then an install outside the checkout: the default model is found and checked."""
    import zipfile

    from fsr.core.weights import shipped_checksums

    tree = tmp_path / "tree"  # build from a copy: an in-place build would write build/ into the checkout
    tree.mkdir()
    for name in ("fsr", "weights", "pyproject.toml", "setup.py", "README.md"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, tree / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fsr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name, digest in shipped_checksums().items():
        assert f"fsr/_weights/{name}" in names
        packed = zipfile.ZipFile(wheel).read(f"fsr/_weights/{name}")
        assert packed == (SHIPPED_WEIGHTS_DIR / name).read_bytes()
        assert hashlib.sha256(packed).hexdigest() == digest, name
    for card in SHIPPED_WEIGHTS_DIR.glob("*.json"):
        assert f"fsr/_weights/{card.name}" in names
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "fsr").rglob("__init__.py")}
    assert all(f"{package}/__init__.py" in names for package in packages)

    site, work = tmp_path / "site", tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work.mkdir()
    Image.open(FACES[0]).crop((85, 85, 165, 165)).resize((32, 32), Image.BICUBIC).save(work / "face.png")
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HOME": str(work)}
    env.pop("FSR_WEIGHTS_DIR", None)
    where = subprocess.run([sys.executable, "-c", "import fsr.core.weights as w; print(w.SHIPPED_WEIGHTS_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(site / "fsr" / "_weights")
    run = subprocess.run([sys.executable, "-m", "fsr.cli", "upscale", "face.png", "out", "--no-progress", "--threads", "1"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert Image.open(work / "out" / "face.png").size == (128, 128)


# ----------------------------------------------------------------------------- kill -9 at random points


def kill_when(command: list[str], ready, rng: np.random.Generator, timeout: float = 240) -> bool:
    """Start ``command``, wait until ``ready()`` holds, then a random 0-0.3 s more, and SIGKILL it.

    Returns True when the process was killed (False when it finished first).
    """
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.02)
    time.sleep(float(rng.uniform(0.0, 0.3)))
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def files_in(folder: Path, pattern: str = "*.png") -> int:
    return sum(1 for _ in folder.rglob(pattern)) if folder.is_dir() else 0


KILL_POINTS = 2  # per command, into the same output (killed, re-run, killed again, finished); seeded moments


def run_straight_then_killed(args: list[str], slot: str, straight: Path, target: Path, points, rng) -> int:
    """Run ``fsr ARGS`` (``slot`` -> ``straight``) to the end; then into ``target``, kill -9 each
    run once it has written ``points[i]`` more files, and finish with one run to the end.
    Returns how many runs were really killed."""
    def into(folder: Path) -> list[str]:
        return [str(folder) if a == slot else a for a in args]

    assert cli(*into(straight)).returncode == 0
    killed = 0
    for at in points:
        before = files_in(target)
        killed += kill_when([*FSR, *into(target)], lambda at=at, before=before: files_in(target) >= before + at, rng)
    assert cli(*into(target)).returncode == 0
    return killed


def test_kill_9_during_prepare_then_rerun_is_byte_identical(tmp_path):
    src = lfw_source(tmp_path / "src", count=6)
    args = ["prepare", str(src), "DST", "--batch-size", "1", "--threads", "1", "--workers", "1", "--no-progress",
            "--test-fraction", "0.3"]
    straight, dst = tmp_path / "straight", tmp_path / "killed"
    rng = np.random.default_rng(13)
    points = rng.integers(1, 5, KILL_POINTS)  # hr + lr crops written by each run before its kill
    killed = run_straight_then_killed(args, "DST", straight, dst, points, rng)
    assert killed >= 1 and tree_bytes(dst) == tree_bytes(straight), f"killed after {points} crops"


def test_kill_9_during_upscale_then_rerun_is_byte_identical(tmp_path):
    src = tmp_path / "in"
    face_crops(src, count=6, side=120)
    args = ["upscale", str(src), "OUT", "--model", "default", "--mode", "photo", "--threshold", "0",
            "--batch-size", "1", "--threads", "1", "--no-progress"]
    straight, out = tmp_path / "straight", tmp_path / "killed"
    rng = np.random.default_rng(14)
    points = rng.integers(1, 3, KILL_POINTS)  # outputs written by each run before its kill
    killed = run_straight_then_killed(args, "OUT", straight, out, points, rng)
    assert killed >= 1, "every run finished before its kill"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in straight.iterdir()}


def test_kill_9_during_train_then_resume_is_byte_identical(tmp_path, prepare):
    src = tmp_path / "src"
    people = [d for d in sorted(LFW_DIR.glob("A*")) if len(list(d.glob("*.jpg"))) >= 2][:3]
    for person in people:  # the identity sampler needs pairs: two photos each
        shutil.copytree(person, src / person.name, ignore=lambda folder, names: sorted(names)[2:])
    data = tmp_path / "prepared"
    prepare(src, data)
    total = 6
    common = ["--preset", "srcnn", "--perceptual", "none", "--batch-size", "2", "--device", "cpu", "--threads", "1",
              "--deterministic", "--no-progress", "--set", "train.checkpoint_every=1", "--set", "train.val_every=0",
              "--set", "train.sample_every=0", "--set", "train.keep_checkpoints=50", "--steps", str(total)]
    straight, run = tmp_path / "straight", tmp_path / "killed"
    assert cli("train", str(data), "--run-dir", str(straight), *common).returncode == 0
    final = f"checkpoints/step_{total:08d}"
    reference = {p.name: p.read_bytes() for p in (straight / final).glob("*.safetensors")}
    rng = np.random.default_rng(15)
    points = sorted(rng.choice(np.arange(1, total), KILL_POINTS, replace=False))  # checkpoints written at the kill
    killed = 0
    for number, at in enumerate(points):
        resume = ["--resume"] if number else []
        killed += kill_when([*FSR, "train", str(data), "--run-dir", str(run), *resume, *common],
                            lambda at=at: (run / "checkpoints" / f"step_{at:08d}").is_dir(), rng)
    resumed = cli("train", str(data), "--run-dir", str(run), "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert reference and killed >= 1
    assert {p.name: p.read_bytes() for p in (run / final).glob("*.safetensors")} == reference, f"killed at steps {points}"
