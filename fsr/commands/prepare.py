"""`fsr prepare SRC... DST`: detect, crop and degrade faces into a training/evaluation set."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from fsr.commands.common import (
    BatchSizeOpt,
    DeviceOpt,
    PrecisionOpt,
    SeedOpt,
    ThreadsOpt,
    console,
    fail,
    make_compute,
)
from fsr.core.io import DEFAULT_MAX_PIXELS, describe_os_error
from fsr.core.weights import WeightsError
from fsr.data.identities import IdentityListError, identity_list_path
from fsr.data.prepare import PrepareConfig, PrepareError, prepare_dataset
from fsr.data.selection import SelectionError, select_images


ExcludeIdentitiesOpt = typer.Option(
    [], "--exclude-identities", help="Skip these identities: an LFW pairs.txt (every name in it), a file of one name per "
    "line, or fsr:celeba-test (fsr's held-out CelebA identities). Repeatable.", show_default=False, metavar="FILE",
)
OnlyIdentitiesOpt = typer.Option(
    [], "--only-identities", help="Keep only these identities (same forms as --exclude-identities). Repeatable.",
    show_default=False, metavar="FILE",
)


def prepare_command(
    paths: list[Path] = typer.Argument(
        ..., metavar="SRC... DST", help="One or more source folders (or image files), then the destination folder DST (last).",
        show_default=False,
    ),
    identities: Path | None = typer.Option(
        None, "--identities", help="Identity file '<file name> <identity>' per line (CelebA identity_CelebA.txt); default: the image's folder name."
    ),
    partition: Path | None = typer.Option(
        None, "--partition", help="Split file '<file name> <0|1|2>' (train|val|test; CelebA list_eval_partition.txt); default: identity-disjoint split by --seed."
    ),
    test_fraction: float = typer.Option(0.1, "--test-fraction", min=0.0, max=1.0, help="Fraction of identities put in the test split (random by --seed)."),
    val_fraction: float = typer.Option(0.0, "--val-fraction", min=0.0, max=1.0, help="Fraction of identities put in the val split (random by --seed)."),
    split: str | None = typer.Option(None, "--split", help="Put every face into this split: train | val | test (overrides the fractions and --partition)."),
    exclude_identities: list[str] = ExcludeIdentitiesOpt,
    only_identities: list[str] = OnlyIdentitiesOpt,
    all_faces: bool = typer.Option(False, "--all-faces", help="Keep every face found, not only one per image."),
    select: str = typer.Option("confident", "--select", help="Which face to keep without --all-faces: confident | largest | center (nearest the image centre)."),
    margin: float = typer.Option(0.25, "--margin", min=0.0, help="Context around the face box: crop side = max(box w, h) * (1 + 2*margin); 0.25 = 1.5x the box."),
    min_face: float = typer.Option(20.0, "--min-face", min=1.0, help="Smallest face box side in source pixels (detector minimum; smaller faces are rejected)."),
    size: int = typer.Option(128, "--size", min=8, help="Side of the HR face crops in pixels."),
    scale: int = typer.Option(4, "--scale", min=1, help="Downscale factor HR -> LR (antialiased bicubic)."),
    workers: int = typer.Option(min(8, os.cpu_count() or 1), "--workers", min=1, help="Threads decoding images and writing crops, in parallel with detection."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Refuse images whose declared size exceeds this many pixels (decompression bombs)."),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    batch_size: int = BatchSizeOpt,
    threads: int = ThreadsOpt,
    seed: int = SeedOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    quiet: bool = typer.Option(False, "--quiet", hidden=True, help="Old name of --no-progress."),
    pairs: Path | None = typer.Option(None, "--pairs", help="Only the images this pairs file names (LFW pairs.txt or CSV)."),
    limit: int = typer.Option(0, "--limit", min=0, help="Only the first N images in sorted order (0 = all)."),
) -> None:
    """Turn folders of face photos into HR/LR face crops plus a manifest (Sec. IV-B of the paper).

    Faces are found with MTCNN, cut as a square around the box (see --margin), resized to --size and downscaled by --scale with antialiased bicubic.

    Writes DST/hr, DST/lr, DST/manifest.csv and DST/rejects.csv. Re-running the same command resumes an interrupted run.
    """
    if len(paths) < 2:
        fail("give at least one source and the destination: fsr prepare SRC [SRC...] DST")
    *sources, dst = paths
    for option, value in (("--identities", identities), ("--partition", partition)):
        if value is not None and not value.is_file():
            fail(f"{value}: {option} file not found")
    excluded_lists = _identity_lists("--exclude-identities", exclude_identities)
    only_lists = _identity_lists("--only-identities", only_identities)
    sources = _selected_sources(sources, pairs, limit)
    compute = make_compute(device, precision, batch_size, threads, seed)
    config = PrepareConfig(
        identities_file=identities,
        partition_file=partition,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        split=split,
        exclude_identities=excluded_lists,
        only_identities=only_lists,
        all_faces=all_faces,
        select=select,
        margin=margin,
        min_face=min_face,
        size=size,
        scale=scale,
        workers=workers,
        max_pixels=max_pixels,
    )
    try:
        summary = prepare_dataset(sources, dst, config, compute, progress=progress and not quiet)
    except (PrepareError, WeightsError, FileNotFoundError) as exc:
        fail(str(exc))
    except OSError as exc:  # e.g. an unreadable source folder; write errors arrive as PrepareError
        fail(f"file-system error: {describe_os_error(exc)}")
    except KeyboardInterrupt:
        fail(f"interrupted; finished chunks are kept in {dst}: run the same command again to resume", code=130)

    _print_results(summary, dst, config.size)


def _print_results(summary, dst: Path, size: int) -> None:
    """The summary table, where the files are, the note on enlarged faces; exit 1 when nothing was prepared."""
    console.print(_summary_table(summary, dst))
    console.print(f"manifest: {dst / 'manifest.csv'}  rejects: {dst / 'rejects.csv'}  ({summary.device})")
    if summary.faces_enlarged:
        console.print(_enlarged_note(summary, size))
    if summary.faces == 0:
        fail("nothing could be prepared", code=1)


def _identity_lists(option: str, specs: list[str]) -> tuple[Path, ...]:
    """The files of an identity-list option (paths or fsr:NAME); one line and exit when one is missing."""
    paths = []
    for spec in specs:
        try:
            path = identity_list_path(spec)
        except IdentityListError as exc:
            fail(f"{option} {exc}")
        if not path.is_file():
            fail(f"{spec}: {option} file not found")
        paths.append(path)
    return tuple(paths)


def _selected_sources(sources: list[Path], pairs: Path | None, limit: int) -> list[Path]:
    """The sources as given, or only the images ``--pairs`` names / the first ``--limit``."""
    if pairs is None and not limit:
        return sources
    try:
        return select_images([Path(s) for s in sources], pairs, limit)
    except SelectionError as exc:
        fail(str(exc))


def _enlarged_note(summary, size: int) -> str:
    """The warning about faces cut smaller than --size: how many, and the --min-face that drops them."""
    return (
        f"[yellow]note: {summary.faces_enlarged:,} of {summary.faces:,} faces were cut smaller than --size {size} px and "
        f"enlarged: their HR holds no more detail than the source (blurry training targets); --min-face "
        f"{summary.min_face_for_full_detail} keeps only faces whose crop is at least {size} px"
    )


def _summary_table(summary, dst: Path) -> Table:
    """The counts of a prepare run, one row per count and per split and reject reason."""
    table = Table(title=f"fsr prepare -> {dst}")
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_row("images found", f"{summary.images_found:,}")
    if summary.images_excluded:
        table.add_row("excluded identities' images", f"{summary.images_excluded:,}")
    table.add_row("images prepared", f"{summary.images_prepared:,} ({100 * summary.yield_fraction:.2f}%)")
    table.add_row("faces written", f"{summary.faces:,}")
    for split_name, count in summary.faces_per_split.items():
        table.add_row(f"  {split_name}", f"{count:,} faces, {summary.identities_per_split.get(split_name, 0):,} identities")
    if summary.faces_enlarged:
        share = 100 * summary.faces_enlarged / summary.faces
        table.add_row("HR enlarged from a smaller crop", f"{summary.faces_enlarged:,} ({share:.1f}%; smallest {summary.smallest_crop} px)")
    table.add_row("images rejected", f"{summary.images_rejected:,}")
    for reason, count in summary.reject_reasons.items():
        table.add_row(f"  {reason}", f"{count:,}")
    if summary.resumed_images:
        table.add_row("already done (resumed)", f"{summary.resumed_images:,}")
    table.add_row("processed now", f"{summary.processed_images:,} in {summary.seconds:.1f} s ({summary.images_per_second:.1f} img/s)")
    return table
