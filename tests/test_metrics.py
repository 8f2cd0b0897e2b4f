"""fsr metrics: PSNR/SSIM/MSE equal piq and an independent numpy computation on real faces;
heatmaps and the folder CLI write their files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fsr.cli import app
from fsr.core.io import read_image, to_tensor, write_image
from fsr.data.degrade import bicubic_down, bicubic_up, quantise_8bit
from fsr.evaluate.grid import grid_positions
from fsr.evaluate.metrics import colour_shift, difference_map, pixel_metrics, save_heatmap
from tests.conftest import LFW_DIR

FACES = ["Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0001.jpg", "Aaron_Peirsol/Aaron_Peirsol_0001.jpg"]


def _face(rel: str) -> np.ndarray:
    """A 128x128 uint8 central crop of a real LFW photo."""
    rgb = read_image(LFW_DIR / rel).rgb
    return np.ascontiguousarray(rgb[61:189, 61:189])


@pytest.fixture(scope="module")
def faces() -> list[np.ndarray]:
    return [_face(r) for r in FACES]


def _bicubic_x4(hr: np.ndarray) -> np.ndarray:
    t = to_tensor(hr)[None]
    return (quantise_8bit(bicubic_up(bicubic_down(t, 4), 4))[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


# --- an independent numpy computation (float64) -------------------------------------------


def _np_psnr(x: np.ndarray, y: np.ndarray) -> float:
    mse = np.mean((x.astype(np.float64) / 255 - y.astype(np.float64) / 255) ** 2)
    return float(10 * np.log10(1.0 / mse))


def _np_y(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64) / 255
    return (16 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255


def _np_ssim_channel(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 SSIM of one channel in [0, 1]: 11x11 Gaussian (sigma 1.5), valid windows."""
    coords = np.arange(11) - 5.0
    g = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * 1.5**2))
    g /= g.sum()
    windows_x = np.lib.stride_tricks.sliding_window_view(x, (11, 11))
    windows_y = np.lib.stride_tricks.sliding_window_view(y, (11, 11))
    mu_x = np.einsum("ijkl,kl->ij", windows_x, g)
    mu_y = np.einsum("ijkl,kl->ij", windows_y, g)
    sxx = np.einsum("ijkl,kl->ij", windows_x**2, g) - mu_x**2
    syy = np.einsum("ijkl,kl->ij", windows_y**2, g) - mu_y**2
    sxy = np.einsum("ijkl,kl->ij", windows_x * windows_y, g) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(ssim_map.mean())


def _np_ssim_rgb(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([_np_ssim_channel(x[..., c] / 255.0, y[..., c] / 255.0) for c in range(3)]))


def _batch(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([to_tensor(a) for a in arrays])


def test_bicubic_degradation_matches_piq_and_numpy(faces):
    import piq

    srs = [_bicubic_x4(f) for f in faces]
    m = pixel_metrics(_batch(srs), _batch(faces))
    for i, (sr, hr) in enumerate(zip(srs, faces)):
        assert m["psnr_rgb"][i] == pytest.approx(_np_psnr(sr, hr), abs=1e-3)
        assert m["psnr_y"][i] == pytest.approx(
            10 * np.log10(1.0 / np.mean((_np_y(sr) - _np_y(hr)) ** 2)), abs=1e-3
        )
        assert m["ssim"][i] == pytest.approx(_np_ssim_rgb(sr, hr), abs=2e-5)
        assert m["ssim_y"][i] == pytest.approx(_np_ssim_channel(_np_y(sr), _np_y(hr)), abs=2e-5)
        assert m["mse"][i] == pytest.approx(np.mean((sr.astype(np.float64) - hr) ** 2), rel=1e-5)
        # a x4 bicubic round trip of a real face: blurred but recognisable
        assert 20 < m["psnr_rgb"][i] < 35 and 0.5 < m["ssim"][i] < 0.95
    x, y = _batch(srs), _batch(faces)
    assert m["psnr_rgb"] == pytest.approx(piq.psnr(x, y, data_range=1.0, reduction="none").numpy(), abs=1e-5)
    assert m["ssim"] == pytest.approx(piq.ssim(x, y, data_range=1.0, reduction="none", downsample=False).numpy(), abs=1e-6)


def test_jpeg_degradation_is_a_jpeg_file_round_trip_with_its_block_grid_where_asked(faces):
    """jpeg_degrade on real faces: what Pillow's own JPEG encoder and decoder give at the same
    quality (within a grey level or two: two builds of libjpeg), quality 0 leaves a face as it is,
    lower quality loses more, and the 8x8 block edges fall where the offset puts them."""
    import io as bytes_io

    from fsr.data.degrade import jpeg_degrade

    batch = _batch(faces)
    assert jpeg_degrade(batch, [0, 0, 0]) is batch
    for quality in (90, 50):
        ours = jpeg_degrade(batch, [quality] * 3)
        for i, face in enumerate(faces):
            encoded = bytes_io.BytesIO()
            Image.fromarray(face).save(encoded, "JPEG", quality=quality)
            pillow = np.asarray(Image.open(encoded).convert("RGB"), dtype=np.float64)
            diff = np.abs(ours[i].permute(1, 2, 0).numpy() * 255 - pillow)
            assert diff.mean() < 0.5 and diff.max() <= 3, (quality, diff.mean(), diff.max())
    psnr = {q: pixel_metrics(jpeg_degrade(batch, [q] * 3), batch)["psnr_rgb"] for q in (95, 75, 30)}
    assert (psnr[95] > psnr[75]).all() and (psnr[75] > psnr[30]).all() and (psnr[30] > 22).all()
    # the error image jumps across block edges: at columns c with (c + dx) % 8 == 0 for offset dx
    for dy, dx in ((0, 0), (3, 5), (13, 10)):
        error = (jpeg_degrade(batch, [20] * 3, [(dy, dx)] * 3) - batch).mean(1).numpy()
        jumps = np.abs(np.diff(error, axis=2)).mean(axis=(0, 1))  # jumps[c - 1]: between columns c - 1 and c
        by_phase = [jumps[[c - 1 for c in range(1, 128) if (c + dx) % 8 == phase]].mean() for phase in range(8)]
        assert int(np.argmax(by_phase)) == 0 and by_phase[0] > 1.5 * np.median(by_phase), (dx, by_phase)
        rows = np.abs(np.diff(error, axis=1)).mean(axis=(0, 2))
        by_phase = [rows[[r - 1 for r in range(1, 128) if (r + dy) % 8 == phase]].mean() for phase in range(8)]
        assert int(np.argmax(by_phase)) == 0, (dy, by_phase)


def test_constant_offset_has_a_closed_form_answer(faces):
    hr = (faces[0].astype(np.float64) * 0.9).round().astype(np.uint8)  # max <= 230: no clipping below
    assert hr.max() <= 247
    sr = hr + 8
    m = pixel_metrics(_batch([sr]), _batch([hr]))
    assert m["mse"][0] == pytest.approx(64.0, rel=1e-5)
    assert m["psnr_rgb"][0] == pytest.approx(20 * np.log10(255 / 8), abs=1e-3)
    y_offset = 8 * (65.481 + 128.553 + 24.966) / 255  # luma offset in grey levels
    assert m["psnr_y"][0] == pytest.approx(20 * np.log10(255 / y_offset), abs=1e-3)
    same = pixel_metrics(_batch([hr]), _batch([hr]))
    assert same["mse"][0] == 0 and same["ssim"][0] == pytest.approx(1.0, abs=1e-6)
    assert m["ssim"][0] < 1.0


def test_colour_shift_counts_a_tint_and_not_a_brightening(faces):
    """On a real face: +6 grey levels on red alone is a tint of 4 (6 less the 2 of the mean over the
    channels), +6 on all three a brightening (no colour shift), and bicubic x4 none to speak of."""
    hr = (faces[0].astype(np.float64) * 0.9).round().astype(np.uint8)  # no clipping at +6
    tinted, brighter = hr.astype(np.int16), hr.astype(np.int16) + 6
    tinted[..., 0] += 6
    shift = colour_shift(_batch([tinted.astype(np.uint8), brighter.astype(np.uint8)]), _batch([hr, hr]))
    assert shift[0].item() == pytest.approx(4.0, abs=1e-3) and shift[1].item() == pytest.approx(0.0, abs=1e-3)
    hr_t = _batch(faces[:1])
    assert colour_shift(quantise_8bit(bicubic_up(bicubic_down(hr_t, 4), 4)), hr_t)[0].item() < 0.5


def test_worse_degradation_scores_worse(faces):
    hr = _batch(faces[:1])
    x4 = quantise_8bit(bicubic_up(bicubic_down(hr, 4), 4))
    x8 = quantise_8bit(torch.nn.functional.interpolate(bicubic_down(hr, 8), scale_factor=8, mode="bicubic").clamp(0, 1))
    m4, m8 = pixel_metrics(x4, hr), pixel_metrics(x8, hr)
    assert m8["psnr_rgb"][0] < m4["psnr_rgb"][0] - 1.0
    assert m8["ssim"][0] < m4["ssim"][0]
    assert m8["mse"][0] > m4["mse"][0]


def test_difference_map_and_heatmap_png(faces, tmp_path):
    hr = faces[1]
    sr = _bicubic_x4(hr)
    d = difference_map(_batch([sr]), _batch([hr]))[0].numpy()
    expected = np.abs(sr.astype(np.int16) - hr.astype(np.int16)).max(axis=2)
    assert d.shape == (128, 128)
    assert np.allclose(d, expected, atol=1e-3)
    path = save_heatmap(tmp_path / "h.png", to_tensor(hr), {"bicubic": to_tensor(sr), "identity": to_tensor(hr)}, title="x")
    image = read_image(path).rgb
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert image.std() > 20  # a real figure, not a blank canvas


def test_metrics_cli_on_folders(faces, tmp_path):
    hr_dir, sr_dir, bad_dir = tmp_path / "hr", tmp_path / "sr", tmp_path / "same"
    for rel, face in zip(FACES, faces):
        stem = rel.replace(".jpg", "")
        write_image(hr_dir / f"{stem}.png", face)
        write_image(sr_dir / f"{stem}.png", _bicubic_x4(face))
        write_image(bad_dir / f"{stem}.png", face)
    (bad_dir / "Aaron_Eckhart" / "Aaron_Eckhart_0001.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["metrics", "--hr", str(hr_dir), "--sr", f"bicubic={sr_dir}", "--sr", f"copy={bad_dir}", "--model", "none",
         "--out", str(out), "--heatmap", "1", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "metrics_per_image.csv").open()))
    assert len(rows) == 4  # the unreadable file's image is skipped for both systems
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["summary"]["copy"]["n_images"] == 2
    assert summary["summary"]["copy"]["mse"] == 0.0
    assert 20 < summary["summary"]["bicubic"]["psnr_rgb"] < 35
    assert any("not an image" in s or "cannot" in s for s in summary["skipped"])
    assert len(list((out / "heatmaps").glob("*.png"))) == 1
    assert "PSNR RGB" in result.output
    # image-by-image comparison with the baseline (bicubic), on the images both systems have
    paired = summary["paired_vs_baseline"]
    assert paired["baseline"] == "bicubic" and set(paired["systems"]) == {"copy"}
    copy_images = {r["image"] for r in rows if r["system"] == "copy"}
    bicubic = [r for r in rows if r["system"] == "bicubic" and r["image"] in copy_images]
    ssim_gap = np.array([1.0 - float(r["ssim"]) for r in bicubic])
    mse = paired["systems"]["copy"]["mse"]
    assert mse["delta"] == pytest.approx(-np.mean([float(r["mse"]) for r in bicubic]), rel=1e-5)
    assert mse["relative"] == pytest.approx(-1.0) and mse["better_fraction"] == 1.0 and mse["n_images"] == 2
    ssim = paired["systems"]["copy"]["ssim"]
    assert ssim["delta"] == pytest.approx(ssim_gap.mean(), abs=1e-5)
    assert ssim["ci95"] == pytest.approx(1.96 * ssim_gap.std(ddof=1) / np.sqrt(2), abs=1e-5)
    assert "difference to bicubic" in result.output


def test_metrics_cli_runs_systems_on_a_prepared_set(tmp_path):
    """`fsr metrics --data`: systems upscale the prepared LR faces; dlib identity vs HR with landmarks."""
    import shutil

    from fsr.data.manifest import read_manifest

    src = tmp_path / "src"
    for rel in FACES:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(LFW_DIR / rel, src / rel)
    dst = tmp_path / "prepared"
    prepared = CliRunner().invoke(app, ["prepare", str(src), str(dst), "--device", "cpu"])
    assert prepared.exit_code == 0, prepared.output
    records = read_manifest(dst)
    assert len(records) == 3
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["metrics", "--data", str(dst), "--system", "bicubic", "--model", "dlib", "--out", str(out),
         "--heatmap-images", records[1].face_id, "--grid", "2", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    rows = {r["image"]: r for r in csv.DictReader((out / "metrics_per_image.csv").open())}
    assert set(rows) == {r.face_id for r in records}
    for rec in records:  # the same numbers as bicubic on the stored LR, computed here directly
        lr = to_tensor(np.array(rec.load_lr(dst)))[None]
        hr = to_tensor(np.array(rec.load_hr(dst)))[None]
        direct = pixel_metrics(quantise_8bit(bicubic_up(lr, 4)), hr)
        assert float(rows[rec.face_id]["psnr_rgb"]) == pytest.approx(direct["psnr_rgb"][0], abs=1e-4)
        assert float(rows[rec.face_id]["ssim"]) == pytest.approx(direct["ssim"][0], abs=1e-5)
        # dlib keeps the identity of a bicubic x4 face: well inside its 0.6 rule, centred cosine high
        assert 0.0 < float(rows[rec.face_id]["id_distance"]) < 0.6
        assert 0.5 < float(rows[rec.face_id]["id_cosine"]) <= 1.0
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["face_model"] == "dlib" and summary["summary"]["bicubic"]["n_images"] == 3
    assert [p.split("/")[-1] for p in summary["heatmaps"]] == [f"{records[1].face_id.replace('/', '_')}.png"]
    assert "ID distance SR-HR (dlib)" in result.output
    # the comparison grid: 2 faces (first and last) x (LR, bicubic, HR) at 1.9 x 2.15 inches per tile, 100 dpi
    grid = Image.open(summary["comparison_grid"])
    assert summary["comparison_grid"] == str(out / "comparison.png") and grid.size == (570, 470)
    tiles = np.asarray(grid.convert("L"), dtype=np.float64)
    assert tiles.std() > 20  # faces, not a blank page
    assert grid_positions(3, 2) == {0, 2} and grid_positions(809, 4) == {0, 269, 539, 808}
    # --lr-jpeg: every system gets the LR faces JPEG-compressed first; bicubic of a quality-30 face
    # is further from the HR than bicubic of the lossless one, face by face
    compressed = CliRunner().invoke(app, ["metrics", "--data", str(dst), "--system", "bicubic", "--model", "none",
                                          "--out", str(tmp_path / "q30"), "--lr-jpeg", "30", "--device", "cpu"])
    assert compressed.exit_code == 0, compressed.output
    rows30 = {r["image"]: r for r in csv.DictReader((tmp_path / "q30" / "metrics_per_image.csv").open())}
    for face_id, row in rows.items():
        assert float(rows30[face_id]["psnr_rgb"]) < float(row["psnr_rgb"]) - 0.3
    assert json.loads((tmp_path / "q30" / "metrics_summary.json").read_text())["source"]["lr_jpeg_quality"] == 30
    refused = CliRunner().invoke(app, ["metrics", "--hr", str(dst / "hr"), "--sr", f"x={dst / 'hr'}", "--lr-jpeg", "50",
                                       "--model", "none", "--out", str(tmp_path / "bad"), "--device", "cpu"])
    assert refused.exit_code == 2 and "--lr-jpeg applies to --data" in refused.output
