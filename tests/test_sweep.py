"""fsr verify-sweep and fsr verify on real LFW faces prepared by fsr prepare in a tmp dir."""

from __future__ import annotations

import itertools
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fsr.cli import app
from fsr.core.device import Compute
from fsr.core.io import read_image, write_image
from fsr.core.weights import load_safetensors, save_safetensors
from fsr.evaluate.sweep import embed_hr, embed_system, load_face_set, match_records, run_sweep, select_pairs
from fsr.evaluate.verification import read_pairs
from tests.conftest import LFW_DIR, SHARED_DATA

IDENTITIES = ["George_Papandreou", "Vladimiro_Montesinos", "Erika_Harold", "Catherine_Deneuve"]
PER_IDENTITY = 3
MISSING = "Nobody_Here/Nobody_Here_0001.jpg"  # never prepared: a failure to enrol


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """12 real LFW photos of 4 people, prepared by `fsr prepare`, and a pairs CSV over them."""
    root = tmp_path_factory.mktemp("sweep")
    src, dst = root / "src", root / "prepared"
    keys = []
    for name in IDENTITIES:
        for path in sorted((LFW_DIR / name).glob("*.jpg"))[:PER_IDENTITY]:
            (src / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, src / name / path.name)
            keys.append(f"{name}/{path.name}")
    result = CliRunner().invoke(app, ["prepare", str(src), str(dst), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (dst / "manifest.csv").is_file()
    rows, fold = [], 0
    by_name = {n: [k for k in keys if k.startswith(n + "/")] for n in IDENTITIES}
    for name in IDENTITIES:
        for a, b in itertools.combinations(by_name[name], 2):
            rows.append((a, b, 1, fold % 3))
            fold += 1
    for (n1, n2), i in zip(itertools.combinations(IDENTITIES, 2), itertools.count()):
        rows.append((by_name[n1][i % PER_IDENTITY], by_name[n2][(i + 1) % PER_IDENTITY], 0, i % 3))
        rows.append((by_name[n1][(i + 2) % PER_IDENTITY], by_name[n2][i % PER_IDENTITY], 0, (i + 1) % 3))
    rows.append((by_name[IDENTITIES[0]][0], MISSING, 1, 0))  # same-person pair with an unenrolled image
    pairs_csv = root / "pairs.csv"
    pairs_csv.write_text("a,b,same,fold\n" + "".join(f"{a},{b},{s},{f}\n" for a, b, s, f in rows))
    return SimpleNamespace(root=root, src=src, dst=dst, pairs=pairs_csv, keys=keys)


@pytest.fixture(scope="module")
def compute():
    return Compute.create("cpu", batch_size=32)


def test_sweep_scores_real_faces(prepared, compute):
    result = run_sweep(prepared.dst, prepared.pairs, ["bicubic"], compute, alphas=[0.25, 1.0], show_progress=False)
    assert result.face_model == "dlib" and result.score == "distance"
    assert result.n_pairs == 25 and result.n_images == 12
    assert result.failed_images == [MISSING] and result.n_failed_pairs == 1
    hr = result.hr
    # dlib on 128-px HR faces of these people: every fold right except the unenrolled same pair
    assert hr.accuracy_mean >= 0.9
    assert hr.n_failed == 1
    for alpha in (0.25, 1.0):
        r = result.results["bicubic"][alpha]
        assert len(r.fold_accuracies) == 3 and 0.0 <= r.accuracy_mean <= 1.0
    assert result.results["bicubic"][1.0].accuracy_mean >= result.results["bicubic"][0.25].accuracy_mean
    # the original photos as the HR reference (the dlib anchor's condition)
    photo = run_sweep(prepared.dst, prepared.pairs, [], compute, alphas=[1.0], hr_source="photo", show_progress=False)
    assert photo.hr.accuracy_mean >= 0.9 and photo.hr.n_failed == 1


def test_alpha_degradation_moves_identity_away_from_hr(prepared, compute):
    """Smaller alpha = less information: SR faces drift further from their HR identity."""
    from fsr.evaluate.identity import FaceEmbedder, load_face_model
    from fsr.data.manifest import read_manifest
    from fsr.models.systems import load_sr_system

    key_to_record, missing = match_records(prepared.keys, read_manifest(prepared.dst))
    assert not missing
    faces = load_face_set(prepared.dst, key_to_record, show_progress=False)
    assert faces.hr.shape == (12, 3, 128, 128) and faces.lr.shape == (12, 3, 32, 32) and faces.landmarks.shape == (12, 5, 2)
    embedder = FaceEmbedder(load_face_model("dlib", None, compute), compute)
    bicubic = load_sr_system("bicubic", compute)
    hr = embed_hr(faces, embedder, 8)
    drift = {a: embedder.compare(embed_system(faces, bicubic, a, embedder, 8), hr)["distance"].mean() for a in (0.25, 0.5, 1.0)}
    assert drift[1.0] < drift[0.5] < drift[0.25]
    assert drift[1.0] < 0.6  # bicubic from 32 px keeps dlib's identity on average


def test_bf16_sweep_embeds_like_fp32_and_caches_apart(prepared, compute, monkeypatch):
    """--precision bf16 (the CPU speed option on CPUs with native bf16): the default model's SR
    faces and their dlib embeddings stay within a small fraction of dlib's 0.6 same-person
    threshold of the fp32 ones, and the bf16 run never reuses fp32 cached embeddings. (bf16 is
    forced on CPUs without native bf16 too, where it is only slower.)"""
    import fsr.core.device

    monkeypatch.setattr(fsr.core.device, "cpu_has_native_bf16", lambda: True)
    from fsr.data.manifest import read_manifest
    from fsr.evaluate.identity import FaceEmbedder, load_face_model
    from fsr.evaluate.sweep import sweep_fingerprint
    from fsr.models.systems import load_sr_system

    key_to_record, _ = match_records(prepared.keys, read_manifest(prepared.dst))
    faces = load_face_set(prepared.dst, key_to_record, show_progress=False)
    bf16 = Compute.create("cpu", "bf16", batch_size=32)
    assert bf16.dtype == torch.bfloat16
    emb = {}
    for name, c in (("fp32", compute), ("bf16", bf16)):
        embedder = FaceEmbedder(load_face_model("dlib", None, c), c)
        emb[name] = embed_system(faces, load_sr_system("default", c), 1.0, embedder, 8)
        if name == "fp32":
            fp32_key = sweep_fingerprint(prepared.dst, faces, "dlib", embedder)
            between_faces = torch.cdist(emb[name], emb[name])[~torch.eye(len(faces.keys), dtype=torch.bool)]
        else:
            assert sweep_fingerprint(prepared.dst, faces, "dlib", embedder) != fp32_key
    drift = (emb["bf16"] - emb["fp32"]).norm(dim=1)
    assert drift.max() < 0.05, drift  # dlib: same person below 0.6
    assert drift.max() < 0.2 * between_faces.min()


def _tiny_sr_export(folder):
    """A small untrained RRDB x4 export (fsr's .safetensors + .json card): exercises the model path."""
    from fsr.models.rrdb import RRDBNet

    torch.manual_seed(0)
    model = RRDBNet(nf=8, nb=1, gc=4, upsampler="pixelshuffle", bicubic_skip=True)
    path = folder / "tiny.safetensors"
    save_safetensors(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"architecture": "rrdb", "arch_args": model.arch_args, "scale": 4}))
    return path


def test_verify_sweep_cli_writes_outputs_and_resumes(prepared):
    out = prepared.root / "sweep_out"
    tiny = _tiny_sr_export(prepared.root)
    args = ["verify-sweep", "--data", str(prepared.dst), "--pairs", str(prepared.pairs), "--alphas", "0.5,1",
            "--system", "bicubic", "--system", str(tiny), "--out", str(out), "--device", "cpu"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    for name in ("sweep.json", "sweep.csv", "sweep.png", "paired.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    summary = json.loads((out / "sweep.json").read_text())
    paired = summary["paired_vs_baseline"]
    assert paired["baseline"] == "bicubic" and set(paired["systems"]) == {"tiny"}
    for alpha in ("0.5", "1"):
        c = paired["systems"]["tiny"][alpha]
        delta = summary["systems"]["tiny"]["by_alpha"][alpha]["accuracy_mean"] - summary["systems"]["bicubic"]["by_alpha"][alpha]["accuracy_mean"]
        assert c["delta"] == pytest.approx(delta) and 0.0 < c["p_value"] <= 1.0
        assert c["wins"] + c["losses"] <= summary["n_pairs"]
    assert len((out / "paired.csv").read_text().splitlines()) == 3  # header + tiny at two alphas
    assert "accuracy minus bicubic" in first.output
    assert summary["failed_to_enrol"]["images"] == 1 and summary["failed_to_enrol"]["pairs"] == 1
    assert set(summary["systems"]) == {"bicubic", "tiny"}
    assert set(summary["systems"]["bicubic"]["by_alpha"]) == {"0.5", "1"}
    assert 0.0 <= summary["systems"]["tiny"]["by_alpha"]["1"]["accuracy_mean"] <= 1.0
    assert "failure to enrol: 1 pair image(s)" in first.output and "avg acc" in first.output
    assert read_image(out / "sweep.png").rgb.shape[1] > 400
    cached = sorted(p.name for p in (out / "cache").glob("*.npy"))
    assert len(cached) == 5  # HR + two systems x two alphas
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert sorted(p.name for p in (out / "cache").glob("*.npy")) == cached
    assert json.loads((out / "sweep.json").read_text())["systems"] == summary["systems"]
    card_path = tiny.with_suffix(".json")
    card = json.loads(card_path.read_text())
    # a new measurement, or a new validated face-size range (it routes faces in `fsr upscale` only)
    card_path.write_text(json.dumps({**card, "heldout": {"psnr_gain_db": 1.0}, "lr_face_range": [12.0, 80.0]}))
    assert CliRunner().invoke(app, args).exit_code == 0
    assert sorted(p.name for p in (out / "cache").glob("*.npy")) == cached
    # the same weights under another name (a copy, as `default` and `fsr_default` are one file)
    # reuse the cache; the mirror ensemble of them does not
    renamed = prepared.root / "renamed"
    renamed.mkdir()
    for path in (tiny, tiny.with_suffix(".json")):
        shutil.copy(path, renamed / path.name.replace("tiny", "same_weights"))
    again = CliRunner().invoke(app, [a.replace(str(tiny), str(renamed / "same_weights.safetensors")) for a in args])
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in (out / "cache").glob("*.npy")) == cached
    assert json.loads((out / "sweep.json").read_text())["systems"]["same_weights"] == summary["systems"]["tiny"]
    assert CliRunner().invoke(app, [a.replace(str(tiny), f"{tiny}+") for a in args]).exit_code == 0
    assert len(list((out / "cache").glob("*.npy"))) == len(cached) + 2
    state = load_safetensors(tiny)
    save_safetensors({k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}, tiny)
    assert CliRunner().invoke(app, args).exit_code == 0
    assert len(list((out / "cache").glob("*.npy"))) == len(cached) + 4  # new weights: both alphas again


def test_select_pairs_and_match_records():
    pairs = read_pairs(SHARED_DATA / "lfw" / "pairs.txt")
    quick = select_pairs(pairs, folds=2, limit=10)
    assert len(quick) == 20 and {p.fold for p in quick} == {0, 1}
    assert sum(p.same for p in quick) == 10
    records = [
        SimpleNamespace(source="/data/lfw/A_B/A_B_0001.jpg", score=0.9, face_id="1"),
        SimpleNamespace(source="/data/lfw/A_B/A_B_0001.jpg", score=0.99, face_id="2"),  # a second face, more confident
        SimpleNamespace(source="/x/img1.jpg", score=0.9, face_id="3"),
        SimpleNamespace(source="/y/img1.jpg", score=0.9, face_id="4"),
    ]
    found, missing = match_records(["A_B/A_B_0001.jpg", "img1.jpg", "C/C_0001.jpg", "y/img1.jpg"], records)
    assert found["A_B/A_B_0001.jpg"].face_id == "2" and found["y/img1.jpg"].face_id == "4"
    assert missing == ["img1.jpg", "C/C_0001.jpg"]  # ambiguous, absent


def test_verify_two_photos(tmp_path):
    a = LFW_DIR / "Erika_Harold" / sorted(p.name for p in (LFW_DIR / "Erika_Harold").glob("*.jpg"))[0]
    b = LFW_DIR / "Erika_Harold" / sorted(p.name for p in (LFW_DIR / "Erika_Harold").glob("*.jpg"))[1]
    c = LFW_DIR / "George_Papandreou" / sorted(p.name for p in (LFW_DIR / "George_Papandreou").glob("*.jpg"))[0]
    runner = CliRunner()
    same = runner.invoke(app, ["verify", str(a), str(b), "--system", "bicubic", "--threshold", "64", "--device", "cpu"])
    assert same.exit_code == 0, same.output
    assert "same person" in same.output and "direct, no SR" in same.output
    different = runner.invoke(app, ["verify", str(a), str(c), "--system", "bicubic", "--device", "cpu"])
    assert different.exit_code == 0, different.output
    assert "different people" in different.output
    # a small copy of the photo: the face box falls below --threshold and goes through SR
    rgb = np.array(read_image(b).rgb)
    small = torch.nn.functional.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), size=(90, 90), mode="area")
    write_image(tmp_path / "small.png", small[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
    sr = runner.invoke(app, ["verify", str(a), str(tmp_path / "small.png"), "--system", "bicubic", "--threshold", "64", "--device", "cpu"])
    assert sr.exit_code == 0, sr.output
    assert "SR bicubic x4" in sr.output
    bad = runner.invoke(app, ["verify", str(a), str(tmp_path / "nothing.jpg"), "--device", "cpu"])
    assert bad.exit_code != 0 and "nothing.jpg" in bad.output
    # a thumbnail too small to hold a detectable face: the one-line reason gives its size
    write_image(tmp_path / "thumb.png", np.ascontiguousarray(rgb[::32, ::32]))
    thumb = runner.invoke(app, ["verify", str(a), str(tmp_path / "thumb.png"), "--system", "bicubic", "--device", "cpu"])
    assert thumb.exit_code != 0 and "thumb.png: no face found in the 8x8 px image" in " ".join(thumb.output.split())


@pytest.mark.parametrize("system", ["default", "fsr_verify"])
def test_verify_says_same_person_for_each_shipped_32px_example_and_its_photo(system):
    """Each 32 px crop in examples/faces/ was cut from a wild/ photo: the SR of the crop by the
    default model and by the model named for verification and the photo's face are the same
    person by dlib's rule (distance < 0.6)."""
    from tests.conftest import REPO, SHARED_DATA

    crops = sorted((REPO / "examples" / "faces").glob("*_32.png"))
    assert len(crops) >= 5
    runner = CliRunner()
    for crop in crops:
        photo = SHARED_DATA / "wild" / f"{crop.stem[: -len('_32')]}.jpg"
        result = runner.invoke(app, ["verify", str(crop), str(photo), "--system", system, "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert "same person" in result.output and f"SR {system}" in result.output, (crop.name, result.output[-300:])
