"""`fsr metrics`: PSNR, SSIM, MSE and identity similarity of SR systems against HR (Tables 1, 2, 4; Fig. 6)."""

from __future__ import annotations

from pathlib import Path

import typer

from fsr.commands.common import BatchSizeOpt, DeviceOpt, PrecisionOpt, ThreadsOpt, console, err_console, fail, make_compute
from fsr.core.io import describe_os_error
from fsr.core.weights import WeightsError
from fsr.data.manifest import ManifestError
from fsr.evaluate.identity import FaceModelError
from fsr.evaluate.metrics import MetricsError, paired_table, run_metrics, summary_table


def _parse_sr(values: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            fail(f"--sr {value!r}: expected NAME=DIR")
        if name in out:
            fail(f"--sr {value!r}: name '{name}' given twice")
        out[name] = folder
    return out


def metrics_command(
    hr: Path | None = typer.Option(None, "--hr", help="Folder of HR ground-truth images (compare SR folders against it)."),
    sr: list[str] = typer.Option([], "--sr", help="NAME=DIR: a folder of SR images, matched to --hr by relative path without suffix. Repeat for several systems."),
    data: Path | None = typer.Option(None, "--data", help="Prepared set (fsr prepare output): run --system on its LR faces and compare with its HR faces."),
    system: list[str] = typer.Option([], "--system", help="SR system for --data: bicubic | default | NAME | PATH (.safetensors + .json card, or BasicSR .pth). Repeat for several."),
    split: str | None = typer.Option(None, "--split", help="Only faces of this split of the prepared set (train | val | test); default all."),
    limit: int = typer.Option(0, "--limit", min=0, help="Evaluate only the first N images (0 = all)."),
    model: str = typer.Option("dlib", "--model", help="Face model for identity similarity: dlib | sphereface | lightcnn | none."),
    weights: str | None = typer.Option(None, "--weights", help="Face model weights (needed for sphereface / lightcnn unless in the weights folders)."),
    out: Path = typer.Option(Path("metrics_out"), "--out", help="Output folder for metrics_per_image.csv, metrics_summary.json and heatmaps/."),
    baseline: str = typer.Option("bicubic", "--baseline", help="System the others are compared with image by image (mean difference with a 95% confidence interval, relative change, share of images improved). Ignored when it is not among the systems."),
    heatmap: int = typer.Option(0, "--heatmap", min=0, help="Write Fig. 6 heatmap PNGs for the first N images."),
    heatmap_images: list[str] = typer.Option([], "--heatmap-images", help="Write heatmaps for these images (relative path without suffix, or face_id for --data). Repeatable."),
    grid: int = typer.Option(0, "--grid", min=0, help="Write comparison.png: N faces spread over the set, one row each (LR, every system, HR)."),
    lr_jpeg: int = typer.Option(0, "--lr-jpeg", min=0, max=100, metavar="Q", help="With --data: JPEG-compress each LR face at quality Q (1-100) before the systems see it, as faces cut from JPEG photos (0 = off)."),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    batch_size: int = BatchSizeOpt,
    threads: int = ThreadsOpt,
) -> None:
    """Compare SR systems with HR ground truth: PSNR (RGB, Y), SSIM, MSE and SR-HR identity similarity."""
    compute = make_compute(device, precision, batch_size, threads)
    try:
        report, paths = run_metrics(
            out, compute, hr_dir=hr, sr_dirs=_parse_sr(sr) if sr else None, prepared_dir=data, systems=list(system),
            face_model=model, face_weights=weights, split=split, limit=limit or None,
            heatmap_first=heatmap, heatmap_keys=list(heatmap_images), baseline=baseline, grid=grid, lr_jpeg=lr_jpeg,
        )
    except (MetricsError, FaceModelError, WeightsError, FileNotFoundError, ManifestError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {describe_os_error(exc)}; no metrics were saved in {out}")
    for line in report.skipped:
        err_console.print(f"[yellow]skipped:[/] {line}", highlight=False)
    console.print(summary_table(report))
    comparison = paired_table(report)
    if comparison is not None:
        console.print(comparison)
    console.print(f"per-image: {paths['csv']}\nsummary: {paths['json']}")
    if report.grid:
        console.print(f"comparison grid: {report.grid}")
    if report.heatmaps:
        console.print(f"heatmaps: {len(report.heatmaps)} in {Path(report.heatmaps[0]).parent}")
