"""`fsr verify-sweep` (LFW accuracy vs alpha: Table 3, Fig. 7) and `fsr verify` (two photos: Fig. 2)."""

from __future__ import annotations

from pathlib import Path

import typer

from fsr.commands.common import DeviceOpt, PrecisionOpt, ThreadsOpt, console, err_console, fail, make_compute
from fsr.core.weights import WeightsError
from fsr.evaluate.identity import FaceModelError
from fsr.evaluate.pair import PairVerifyError, verify_photos
from fsr.evaluate.sweep import SweepError, alpha_table, paired_table, run_sweep, sweep_table, write_sweep
from fsr.evaluate.verification import PairsError

ALPHA_HELP = (
    "Comma-separated degradation factors in (0, 1]. fsr's reading of Sec. V: the 32x32 LR face is "
    "resized to round(32*alpha) px by antialiased bicubic and back to 32x32 by bicubic before the "
    "SR system sees it (alpha=1: the plain LR face)."
)


def _parse_alphas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        fail(f"--alphas {text!r}: expected comma-separated numbers such as 0.1,0.5,1")
    if not values or any(not 0 < v <= 1 for v in values):
        fail(f"--alphas {text!r}: every alpha must be in (0, 1]")
    return values


def verify_sweep_command(
    data: Path | None = typer.Option(None, "--data", help="Prepared faces of the pair images (fsr prepare output)."),
    pairs: Path = typer.Option(..., "--pairs", help="LFW pairs.txt (10 folds x 300 same + 300 different) or a CSV a,b,same[,fold]."),
    system: list[str] = typer.Option(["bicubic"], "--system", help="SR system: bicubic | default | NAME | PATH (.safetensors + .json card, or BasicSR .pth). Repeat for several."),
    alphas: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0", "--alphas", help=ALPHA_HELP),
    model: str = typer.Option("dlib", "--model", help="Face model: dlib (shipped, offline) | sphereface (the paper's; needs --weights) | lightcnn."),
    weights: str | None = typer.Option(None, "--weights", help="Face model weights file (sphereface: sphere20a_20171020.pth; lightcnn: LightCNN_29Layers_V2_checkpoint.pth.tar)."),
    score: str = typer.Option("auto", "--score", help="Pair score: auto (dlib: Euclidean distance; others: cosine) | distance | cosine."),
    threshold_search: str = typer.Option("grid", "--threshold-search", help="grid: first best threshold on a 0.0005 grid (the reference anchor's protocol); exact: midpoints between training scores."),
    folds: int = typer.Option(0, "--folds", min=0, help="Use only the first N folds (>= 2) for a quick run (0 = all)."),
    limit: int = typer.Option(0, "--limit", min=0, help="At most N pairs per fold (half same, half different) for a quick run (0 = all)."),
    hr: bool = typer.Option(True, "--hr/--no-hr", help="Also score the HR faces (the alpha-independent reference line)."),
    hr_source: str = typer.Option("crop", "--hr-source", help="HR reference: crop (the 128x128 HR faces SR aims at) | photo (the original photos at full resolution, aligned with the detected landmarks: the reference anchor's HR condition)."),
    baseline: str = typer.Option("bicubic", "--baseline", help="System (its --system value or name) the others are compared with pair by pair: accuracy difference per alpha with an exact McNemar test (table, sweep.json, paired.csv). Ignored when it is not among --system."),
    out: Path = typer.Option(Path("verify_sweep_out"), "--out", help="Output folder: sweep.json, sweep.csv, sweep.png (Fig. 7) and cache/ (embeddings, for resuming)."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Keep embeddings per (system, alpha) under OUT/cache so a re-run resumes."),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Faces per batch on the device; halved automatically on out-of-memory."),
    threads: int = ThreadsOpt,
) -> None:
    """LFW 10-fold verification of SR faces against the degradation factor alpha (Table 3, Fig. 7).

    For each alpha the prepared 32x32 LR faces are degraded by alpha, super-resolved by each system to 128x128 and embedded by the face model; the HR faces give the reference line. Each test fold's threshold is chosen on the other folds. Pair images without a prepared face are failures to enrol: their pairs are decided "different" (counted, not dropped).
    """
    if data is None or not data.is_dir():
        fail(f"{'--data is missing' if data is None else f'{data}: no such folder'}; make it with: "
             f"fsr prepare --pairs {pairs} --split test LFW_DIR data/lfw (LFW: lfw-deepfunneled)")
    if score not in ("auto", "distance", "cosine"):
        fail(f"--score {score!r}: expected auto | distance | cosine")
    compute = make_compute(device, precision, batch_size, threads)
    try:
        result = run_sweep(
            data, pairs, list(system), compute, alphas=_parse_alphas(alphas), face_model=model, face_weights=weights,
            score=None if score == "auto" else score, folds=folds or None, limit=limit or None, include_hr=hr, hr_source=hr_source,
            threshold_search=threshold_search, cache_dir=(out / "cache") if cache else None, baseline=baseline,
        )
    except (SweepError, PairsError, FaceModelError, WeightsError, FileNotFoundError) as exc:
        fail(str(exc))
    paths = write_sweep(result, out)
    if result.failed_images:
        err_console.print(
            f"[yellow]failure to enrol:[/] {len(result.failed_images)} pair image(s) have no prepared face "
            f"(e.g. {result.failed_images[0]}); {result.n_failed_pairs} pair(s) decided 'different'",
            highlight=False,
            soft_wrap=True,
        )
    if len(result.alphas) > 1:
        console.print(alpha_table(result))
    console.print(sweep_table(result))
    comparison = paired_table(result)
    if comparison is not None:
        console.print(comparison)
    console.print(
        f"{result.n_pairs} pairs, {result.n_images} faces, {result.seconds:.1f} s on {compute.describe()}\n"
        f"json: {paths['json']}\ncsv: {paths['csv']}\nplot: {paths['png']}"
        + (f"\npaired: {paths['paired_csv']}" if "paired_csv" in paths else "")
    )


def verify_command(
    photo_a: Path = typer.Argument(..., help="First photo."),
    photo_b: Path = typer.Argument(..., help="Second photo."),
    system: str = typer.Option("default", "--system", help="SR system for small faces: default | bicubic | NAME | PATH."),
    threshold: float | None = typer.Option(
        None, "--threshold", min=0, metavar="PX", show_default="model's range",
        help="Faces below PX (box side) get SR; 0 = every face. Default: the model card's range.",
    ),
    model: str = typer.Option("dlib", "--model", help="Face model: dlib | sphereface | lightcnn."),
    weights: str | None = typer.Option(None, "--weights", help="Face model weights file (for sphereface / lightcnn)."),
    decision_threshold: float | None = typer.Option(None, "--decision-threshold", help="Same-person threshold. Defaults: dlib distance < 0.6; sphereface cosine > 0.3; lightcnn cosine > 0.35."),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    threads: int = ThreadsOpt,
) -> None:
    """Are the main faces in two photos the same person? Detect, super-resolve small faces, embed, compare (Fig. 2)."""
    from rich.table import Table

    compute = make_compute(device, precision, 8, threads)
    try:
        v = verify_photos(photo_a, photo_b, compute, system, model, weights, threshold, decision_threshold)
    except (PairVerifyError, FaceModelError, WeightsError, FileNotFoundError) as exc:
        fail(str(exc))
    table = Table(title="faces (the most confident one per photo)")
    for col in ("photo", "faces", "box px", "score", "route"):
        table.add_column(col, no_wrap=col == "route")
    for f in (v.a, v.b):
        table.add_row(Path(f.path).name, str(f.n_faces), f"{f.side:.0f}", f"{f.score:.3f}",
                      f"SR {v.system} x4, own size" if f.super_resolved else "direct, no SR")
    console.print(table)
    rule = f"< {v.threshold:g}" if v.score_name == "distance" else f"> {v.threshold:g}"
    extra = f", centred cosine {v.cosine:.4f}" if v.score_name == "distance" else ""
    verdict = "[bold green]same person[/]" if v.same else "[bold red]different people[/]"
    console.print(f"{v.face_model} {v.score_name} {v.score:.4f} (same when {rule}){extra}: {verdict}")
