"""`fsr upscale IN OUT`: super-resolve face crops and the faces in photos (fsr.upscale)."""

from __future__ import annotations

import signal
from pathlib import Path

import typer
from rich.table import Table

from fsr.commands.common import (
    BatchSizeOpt,
    DeviceOpt,
    PrecisionOpt,
    ThreadsOpt,
    console,
    err_console,
    fail,
    make_compute,
)
from fsr.core.io import DEFAULT_MAX_PIXELS, describe_os_error
from fsr.models.face.pipeline import DEFAULT_MAX_DRIFT, DEFAULT_MIN_FACE, DEFAULT_MIN_SCORE
from fsr.upscale import (
    UpscaleError, UpscaleOptions, UpscaleSummary, jpeg_hint, throughput, upscale_path, write_upscale_report,
)


def _terminate_as_interrupt(signum, frame):  # noqa: ARG001
    """SIGTERM unwinds like Ctrl-C, so temporary output files are removed on the way out."""
    raise KeyboardInterrupt


def upscale_command(
    src: Path = typer.Argument(..., metavar="IN", help="Image file, or folder (walked recursively)."),
    dst: Path = typer.Argument(..., metavar="OUT", help="Output folder (mirrors IN), or file for one input."),
    mode: str = typer.Option(
        "auto", "--mode", metavar="MODE",
        help="faces (crops) | photo (find faces) | auto (<= 160 px, near square, a face found: faces).",
    ),
    model: str = typer.Option(
        "default", "--model", metavar="MODEL", help="default | bicubic | NAME in weights/ | PATH (.safetensors, .pth)."
    ),
    tta: bool = typer.Option(False, "--tta", help="Average the model over the face and its mirror (2x work)."),
    scale: int = typer.Option(4, "--scale", min=1, max=16, help="Output size factor."),
    threshold: float | None = typer.Option(
        None, "--threshold", "--min-face", min=0, metavar="PX", show_default="model's range",
        help="Faces below PX (box side) get SR; 0 = every face. Default: the model card's range.",
    ),
    margin: float = typer.Option(0.25, "--margin", help="Face crop margin per side (fraction of the box)."),
    detect_min_face: int = typer.Option(
        DEFAULT_MIN_FACE, "--detect-min-face", min=8, metavar="PX", help="Smallest face (box side) looked for and kept."
    ),
    min_score: float = typer.Option(DEFAULT_MIN_SCORE, "--min-score", min=0, max=1, help="Smallest detector score of a real face."),
    face_check: bool = typer.Option(
        True, "--face-check/--no-face-check", help="Require plausible landmarks (eyes above mouth, in the box)."
    ),
    max_drift: float = typer.Option(
        DEFAULT_MAX_DRIFT, "--max-drift", min=0,
        help="Keep the classical face when SR moves its dlib identity further (0 = off).",
    ),
    detect_max_pixels: int = typer.Option(
        12_000_000, "--detect-max-pixels", min=100_000, metavar="N", help="Detect faces on a copy shrunk to N pixels."
    ),
    out_format: str = typer.Option("same", "--format", metavar="FMT", help="same | png | jpg | webp."),
    suffix: str = typer.Option("", "--suffix", help="Appended to each output file's stem, e.g. _x4."),
    quality: int = typer.Option(95, "--quality", min=1, max=100, help="JPEG/WebP quality."),
    skip_existing: bool = typer.Option(
        True, "--skip-existing/--overwrite", help="Skip finished outputs, or re-do them."
    ),
    report: Path | None = typer.Option(None, "--report", help="Per-image and per-face results (.json or .csv)."),
    tile: int = typer.Option(512, "--tile", min=16, help="Tile side (input px) of the classical upscale."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Refuse larger inputs (pixels)."),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    batch_size: int = BatchSizeOpt,
    threads: int = ThreadsOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Upscale face crops (faces mode) or whole photos with super-resolved faces (photo mode).

    The model runs on every face at the face's own resolution, when the face's size is in
    the range the model was validated on; other faces keep the classical upscale.
    """
    if report is not None and report.suffix.lower() not in (".json", ".csv"):
        fail(f"{report}: the report must end in .json or .csv")
    options = UpscaleOptions(
        mode=mode, model=f"{model}+" if tta and not model.endswith("+") else model, scale=scale,
        threshold=threshold, margin=margin, detect_min_face=detect_min_face,
        min_score=min_score, check_landmarks=face_check, max_drift=max_drift, detect_max_pixels=detect_max_pixels,
        out_format=out_format.lower().lstrip("."), suffix=suffix, quality=quality, overwrite=not skip_existing,
        max_pixels=max_pixels, tile=tile, show_progress=progress,
    )
    compute = make_compute(device, precision, batch_size, threads)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        summary = upscale_path(src, dst, options, compute)
    except UpscaleError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; finished outputs are kept, re-run the same command to continue", code=130)
    _print_skipped(summary)
    if report is not None:
        try:
            write_upscale_report(report, summary)
        except OSError as exc:
            fail(f"cannot write the report {report} ({describe_os_error(exc)}); the {summary.done} upscaled images are kept")
    _print_summary(summary, report)
    if not summary.succeeded:
        fail("no image could be upscaled", code=1)


def _print_summary(summary: UpscaleSummary, report: Path | None) -> None:
    """The run's table, where its outputs and report are, and a note on JPEG inputs (if any)."""
    console.print(_summary_table(summary))
    console.print(f"outputs: {summary.output_root}", highlight=False, soft_wrap=True)
    if report is not None:
        console.print(f"report: {report}", highlight=False, soft_wrap=True)
    hint = jpeg_hint(summary)
    if hint:
        console.print(hint, highlight=False, soft_wrap=True)


def _print_skipped(summary: UpscaleSummary) -> None:
    """One line per input that was skipped or could not be written, with the reason."""
    for result in summary.results:
        if result.status in ("failed", "unwritten"):
            err_console.print(f"[yellow]skipped[/] {result.input}: {result.reason}", highlight=False, soft_wrap=True)


def _summary_table(summary: UpscaleSummary) -> Table:
    table = Table(title="fsr upscale", show_header=True)
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("upscaled", str(summary.done))
    table.add_row("already done (skipped)", str(summary.skipped))
    table.add_row("bad inputs (skipped)", str(summary.failed))
    if summary.unwritten:
        table.add_row("outputs that could not be written", str(summary.unwritten))
    modes = summary.modes
    table.add_row("faces mode / photo mode", f"{modes.get('faces', 0)} / {modes.get('photo', 0)}")
    table.add_row("faces found / super-resolved", f"{summary.faces_found} / {summary.faces_sr}")
    table.add_row("detections rejected (not faces)", str(summary.faces_rejected))
    table.add_row("model", summary.model)
    table.add_row("device", summary.device)
    table.add_row("time", f"{summary.seconds:.1f} s")
    table.add_row("rate while processing", f"{throughput(summary):.2f} img/s")
    return table
