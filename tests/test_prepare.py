"""`fsr prepare` end to end on real faces and bad files: manifest, rejects, LR, splits, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from typer.testing import CliRunner

from fsr.cli import app
from fsr.core.device import Compute
from fsr.data.manifest import read_manifest, read_rejects
from fsr.data.identities import identity_list_path, read_name_list
from fsr.data.prepare import JOURNAL_FILE, PrepareConfig, list_work, prepare_dataset
from tests.conftest import LFW_DIR, REPO, SHARED_DATA
from tests.test_io import make_declared_huge_png

FACE = LFW_DIR / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"


def copy_lfw(dst: Path, names: dict[str, int]) -> list[str]:
    keys = []
    for name, count in names.items():
        (dst / name).mkdir(parents=True, exist_ok=True)
        for path in sorted((LFW_DIR / name).glob("*.jpg"))[:count]:
            shutil.copy(path, dst / name / path.name)
            keys.append(f"{name}/{path.name}")
    return keys


def make_variants(folder: Path) -> tuple[list[str], dict[str, str]]:
    """Good odd-format copies of a real face and unusable files; returns (good names, bad name -> reason)."""
    folder.mkdir(parents=True)
    face = np.asarray(Image.open(FACE).convert("RGB"))
    Image.fromarray(face).convert("L").save(folder / "gray.png")
    alpha = np.full(face.shape[:2], 200, np.uint8)
    Image.fromarray(np.dstack([face, alpha])).save(folder / "rgba.png")
    Image.fromarray(face).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    cv2.imwrite(str(folder / "deep16.png"), cv2.cvtColor(face.astype(np.uint16) * 257, cv2.COLOR_RGB2BGR))
    exif = Image.Exif()
    exif[0x0112] = 6  # viewer rotates the stored pixels 90 degrees clockwise
    Image.fromarray(np.ascontiguousarray(np.rot90(face, k=1))).save(folder / "rotated.jpg", quality=95, exif=exif)
    (folder / "truncated.jpg").write_bytes(FACE.read_bytes()[:4000])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a photo\n")
    make_declared_huge_png(folder / "bomb.png", 40000, 40000)
    good = ["gray.png", "rgba.png", "cmyk.jpg", "deep16.png", "rotated.jpg"]
    bad = {
        "truncated.jpg": "cannot decode",
        "empty.jpg": "empty file",
        "notes.jpg": "not an image",
        "bomb.png": "exceeds the limit",
    }
    return good, bad


def test_prepare_cli_on_real_faces_and_bad_inputs(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    real = copy_lfw(src, {"Aaron_Peirsol": 2, "Abdullah_Gul": 2, "Ai_Sugiyama": 2})
    good, bad = make_variants(src / "Odd_Formats")
    (src / "README.txt").write_text("not an image extension: ignored\n")

    result = CliRunner().invoke(
        app, ["prepare", str(src), str(dst), "--threads", "1", "--workers", "2", "--batch-size", "4", "--no-progress",
              "--test-fraction", "0.25"]
    )
    assert result.exit_code == 0, result.output
    assert "images prepared" in result.output

    records = read_manifest(dst)
    sources = [r.source for r in records]
    assert sources == sorted(real + [f"Odd_Formats/{name}" for name in good])
    rejects = dict(read_rejects(dst))
    assert set(rejects) == {f"Odd_Formats/{name}" for name in bad}
    for name, reason in bad.items():
        assert reason in rejects[f"Odd_Formats/{name}"]

    by_source = {r.source: r for r in records}
    for record in records:
        hr = record.load_hr(dst)
        lr = record.load_lr(dst)
        assert hr.shape == (128, 128, 3) and lr.shape == (32, 32, 3)
        pil_lr = np.asarray(Image.fromarray(hr).resize((32, 32), Image.BICUBIC))
        assert np.abs(lr.astype(int) - pil_lr.astype(int)).max() <= 1  # LR = PIL bicubic of HR
        marks = record.landmarks_in_crop(128)
        assert np.all((marks > 16) & (marks < 112)), "landmarks lie well inside the crop"
        assert marks[:2, 1].max() < marks[2, 1] < marks[3:, 1].min(), "eyes above nose above mouth (upright)"
        assert record.identity == Path(record.source).parent.name

    # every odd format of the same photo (EXIF rotation applied) gives the same face in the same place
    reference = by_source["Aaron_Peirsol/Aaron_Peirsol_0001.jpg"]
    ref_centre = np.array(reference.crop[:2]) + reference.crop[2] / 2
    for name in good:
        record = by_source[f"Odd_Formats/{name}"]
        centre = np.array(record.crop[:2]) + record.crop[2] / 2
        assert np.abs(centre - ref_centre).max() < 6, name
        assert abs(record.crop[2] / reference.crop[2] - 1) < 0.1, name
        assert np.abs(record.landmarks - reference.landmarks).max() < 6, name
    gray = by_source["Odd_Formats/gray.png"].load_hr(dst)
    assert np.array_equal(gray[..., 0], gray[..., 2])

    # identity-disjoint split
    splits: dict[str, set[str]] = {}
    for record in records:
        splits.setdefault(record.identity, set()).add(record.split)
    assert all(len(s) == 1 for s in splits.values())
    assert {s for v in splits.values() for s in v} == {"train", "test"}

    # a second run finds everything done and changes nothing
    before = (dst / "manifest.csv").read_bytes()
    again = CliRunner().invoke(app, ["prepare", str(src), str(dst), "--threads", "1", "--batch-size", "4", "--quiet", "--test-fraction", "0.25"])
    assert again.exit_code == 0, again.output
    assert (dst / "manifest.csv").read_bytes() == before
    assert "already done" in again.output

    # other settings on the same destination are refused with a one-line error
    clash = CliRunner().invoke(app, ["prepare", str(src), str(dst), "--size", "64", "--test-fraction", "0.25", "--quiet"])
    assert clash.exit_code != 0 and "different settings (size)" in clash.output


def test_nothing_prepared_exits_non_zero(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.jpg").write_bytes(b"")
    Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(src / "wall.png")
    result = CliRunner().invoke(app, ["prepare", str(src), str(tmp_path / "out"), "--threads", "1", "--quiet"])
    assert result.exit_code == 1
    assert "nothing could be prepared" in result.output
    assert dict(read_rejects(tmp_path / "out")) == {"empty.jpg": "unreadable: empty file (0 bytes)", "wall.png": "no face detected"}


def test_small_faces_enlarged_to_the_hr_size_are_counted_and_min_face_drops_them(tmp_path):
    """A face cut smaller than --size is enlarged to it, so its HR is no sharper than the source:
    prepare counts such faces and names the --min-face that keeps only full-detail crops."""
    src = tmp_path / "src" / "Aaron_Peirsol"
    src.mkdir(parents=True)
    photo = LFW_DIR / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"
    shutil.copy(photo, src / "full.jpg")  # face box ~100 px: a crop of ~150 px at margin 0.25
    Image.open(photo).resize((100, 100), Image.BICUBIC).save(src / "small.png")  # crop of ~60 px
    args = ["--threads", "1", "--no-progress", "--split", "train"]
    result = CliRunner().invoke(app, ["prepare", str(tmp_path / "src"), str(tmp_path / "out"), *args], terminal_width=200)
    assert result.exit_code == 0, result.output
    sides = {Path(r.source).name: r.crop[2] for r in read_manifest(tmp_path / "out")}
    assert sides["full.jpg"] >= 128 > sides["small.png"], sides
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["faces_enlarged"], summary["smallest_crop"], summary["min_face_for_full_detail"]) == (1, sides["small.png"], 86)
    assert "HR enlarged from a smaller crop" in result.output and "--min-face 86 keeps only" in " ".join(result.output.split())

    again = CliRunner().invoke(app, ["prepare", str(tmp_path / "src"), str(tmp_path / "out86"), *args, "--min-face", "86"])
    assert again.exit_code == 0, again.output
    assert [Path(r.source).name for r in read_manifest(tmp_path / "out86")] == ["full.jpg"]
    assert "face too small" in dict(read_rejects(tmp_path / "out86"))["Aaron_Peirsol/small.png"]
    assert json.loads((tmp_path / "out86" / "summary.json").read_text())["faces_enlarged"] == 0
    assert "HR enlarged" not in again.output and "faces were cut smaller" not in again.output


def test_held_out_celeba_identities_by_name_and_several_identity_lists(tmp_path):
    """fsr:celeba-test names fsr's held-out CelebA identities: --only-identities keeps exactly
    them (the held-out test split in one command), and --exclude-identities, repeated, leaves
    them and every LFW pairs.txt name out of a training set."""
    celeba = SHARED_DATA / "celeba_train"
    held_out = read_name_list(identity_list_path("fsr:celeba-test"))
    assert len(held_out) == 40 and held_out <= {p.name for p in celeba.iterdir() if p.is_dir()}

    items, _, left_out = list_work([celeba], tmp_path / "test", PrepareConfig(only_identities=identity_list_path("fsr:celeba-test"),
                                                                             split="test"), seed=0)
    assert {i.identity for i in items} == held_out and {i.split for i in items} == {"test"}
    assert left_out > len(items) > 500

    src = tmp_path / "src"
    copy_lfw(src, {"Aaron_Peirsol": 1, "Aaron_Pena": 1})  # named in pairs.txt / never named
    shutil.copytree(celeba / sorted(held_out)[0], src / sorted(held_out)[0])
    kept_celeba = sorted(p.name for p in celeba.iterdir() if p.is_dir() and p.name not in held_out)[0]
    shutil.copytree(celeba / kept_celeba, src / kept_celeba)
    pairs = SHARED_DATA / "lfw" / "pairs.txt"
    config = PrepareConfig(exclude_identities=(pairs, identity_list_path("fsr:celeba-test")))
    items, _, _ = list_work([src], tmp_path / "train", config, seed=0)
    assert {i.identity for i in items} == {"Aaron_Pena", kept_celeba}

    args = ["prepare", str(src / "Aaron_Pena"), str(src / "Aaron_Peirsol"), str(tmp_path / "out"), "--split", "train",
            "--exclude-identities", str(pairs), "--exclude-identities", "fsr:celeba-test", "--device", "cpu", "--no-progress"]
    first = CliRunner().invoke(app, args, terminal_width=200)
    assert first.exit_code == 0, first.output
    assert [r.identity for r in read_manifest(tmp_path / "out")] == ["Aaron_Pena"]
    recorded = json.loads((tmp_path / "out" / "prepare.json").read_text())["config"]["exclude_identities"]
    assert recorded == [str(pairs.resolve()), str(identity_list_path("fsr:celeba-test").resolve())]
    again = CliRunner().invoke(app, args, terminal_width=200)  # the same settings: a re-run, not a clash
    assert again.exit_code == 0 and "different settings" not in again.output, again.output

    for bad, says in (("fsr:celeba-tset", "no such identity list in fsr (known: fsr:celeba-test)"),
                      (str(tmp_path / "none.txt"), "--only-identities file not found")):
        result = CliRunner().invoke(app, ["prepare", str(src), str(tmp_path / "bad"), "--only-identities", bad])
        assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
    assert not (tmp_path / "bad").exists()


def test_identities_partition_exclusion_and_forced_split(tmp_path):
    src = tmp_path / "src"
    copy_lfw(src, {"Aaron_Peirsol": 3, "Abdullah_Gul": 3, "Adrien_Brody": 2, "Ai_Sugiyama": 2, "Alan_Ball": 2})
    pairs = SHARED_DATA / "lfw" / "pairs.txt"
    names = read_name_list(pairs)
    assert "Adrien_Brody" in names and "10" not in names and len(names) == 4281

    items, rejects, excluded = list_work([src], tmp_path / "out", PrepareConfig(exclude_identities=pairs), seed=0)
    assert not {i.identity for i in items} & names
    assert excluded == sum(1 for p in src.rglob("*.jpg") if p.parent.name in names) > 0

    config = PrepareConfig(test_fraction=0.4, val_fraction=0.2)
    items, _, _ = list_work([src], tmp_path / "out", config, seed=3)
    split_of = {}
    for item in items:
        assert split_of.setdefault(item.identity, item.split) == item.split
    assert sorted(split_of.values()) == ["test", "test", "train", "train", "val"]
    again, _, _ = list_work([src], tmp_path / "out", config, seed=3)
    assert [(i.key, i.split) for i in again] == [(i.key, i.split) for i in items]

    forced, _, _ = list_work([src], tmp_path / "out", PrepareConfig(split="test"), seed=0)
    assert {i.split for i in forced} == {"test"}

    files = sorted(p.name for p in src.rglob("*.jpg"))
    (tmp_path / "ids.txt").write_text("".join(f"{n} {100 + k % 3}\n" for k, n in enumerate(files[:-1])))
    (tmp_path / "part.txt").write_text("".join(f"{n} {k % 3}\n" for k, n in enumerate(files)))
    config = PrepareConfig(identities_file=tmp_path / "ids.txt", partition_file=tmp_path / "part.txt")
    items, rejects, _ = list_work([src], tmp_path / "out", config, seed=0)
    assert {i.identity for i in items} == {"100", "101", "102"}
    assert [r[1] for r in rejects] == ["no identity: file not in the identity file"]
    assert {i.split for i in items} == {"train", "val", "test"}

    # several sources: keys are prefixed by the source folder's name
    other = tmp_path / "more"
    copy_lfw(other, {"Alan_Ball": 1})
    items, _, _ = list_work([src, other], tmp_path / "out", PrepareConfig(), seed=0)
    assert "more/Alan_Ball/Alan_Ball_0001.jpg" in {i.key for i in items}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("summary.json", JOURNAL_FILE)
    }


def test_sigkill_then_rerun_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    src = tmp_path / "src"
    copy_lfw(src, {"Abdullah_Gul": 6, "Adrien_Brody": 6, "Ai_Sugiyama": 2})
    (src / "Ai_Sugiyama" / "broken.jpg").write_bytes(FACE.read_bytes()[:2000])
    compute = Compute.create("cpu", batch_size=2, threads=1)
    config = PrepareConfig(workers=2, test_fraction=0.3)
    straight = tmp_path / "straight"
    prepare_dataset(src, straight, config, compute, progress=False)

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "fsr.cli", "prepare", str(src), str(killed), "--batch-size", "2",
               "--threads", "1", "--workers", "2", "--test-fraction", "0.3", "--quiet"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = killed / JOURNAL_FILE
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if journal.is_file() and journal.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "manifest.csv").exists()
    done = journal.read_bytes().count(b"\n")
    assert 2 <= done < 8

    summary = prepare_dataset(src, killed, config, compute, progress=False)
    assert summary.resumed_images >= 4 and summary.processed_images > 0
    after_kill, reference = tree_bytes(killed), tree_bytes(straight)
    assert sorted(after_kill) == sorted(reference)  # no stray temporaries either
    assert [k for k in reference if after_kill[k] != reference[k]] == []
    assert len(read_manifest(killed)) == 14


def test_out_of_memory_during_detection_halves_the_batch(tmp_path):
    from fsr.detect.mtcnn import MTCNN

    src = tmp_path / "src"
    copy_lfw(src, {"Abdullah_Gul": 3})
    real = MTCNN.load()
    calls = []

    class SmallMemoryDetector:
        def detect(self, images, **kwargs):
            calls.append(len(images))
            if len(images) > 1:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real.detect(images, **kwargs)

    compute = Compute.create("cpu", batch_size=3, threads=1)
    summary = prepare_dataset(src, tmp_path / "out", PrepareConfig(split="test"), compute, progress=False,
                              detector=SmallMemoryDetector())
    assert summary.faces == 3 and calls == [3, 1, 2, 1, 1]  # halved until it fits
