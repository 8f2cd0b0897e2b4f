"""``fsr prepare``: raw face photos -> square HR face crops + bicubic LR faces + manifest.

The paper's data preparation (Sec. IV-B): detect the face (MTCNN), take a square box
around it, resize to ``size`` (128) and downscale by ``scale`` (4) with antialiased
bicubic (:func:`fsr.data.degrade.bicubic_down`, the one degradation path) to 32x32.

Pipeline: source images are listed (sorted), given an identity (folder name or an
identity file) and a split (partition file, a forced split, or an identity-disjoint
random split by seed), then processed in fixed chunks of ``chunk_size`` images:
decoding in ``workers`` threads (the next chunk is decoded while this one is detected),
MTCNN on the whole chunk at once, crop / LR / PNG writing in the worker threads.

Resuming: every finished chunk is appended, with its results, as one line to
``DST/.prepare-journal.jsonl`` (flushed and fsynced) after its files are written. A
re-run reads the journal, skips finished chunks (same images, outputs present), redoes
the rest with the same chunk boundaries, and writes ``manifest.csv``/``rejects.csv``
atomically, sorted, only when everything is done. An interrupted (SIGINT or SIGKILL)
run therefore ends, once re-run, with the same manifest and files as an uninterrupted one.

Ownership: ``prepare.json`` marks a folder as made by fsr prepare. A DST that holds a
manifest, summary, ``hr/`` or ``lr/`` without it is refused (nothing of the user's is
overwritten); after a kill only the temporaries of this run's own outputs are removed;
DST's ``hr/``/``lr/`` and any other prepared folder inside a source are never read as
source photos. Stages: :func:`plan_prepare` -> :func:`run_chunks` -> :func:`write_results`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fsr.core.batching import is_out_of_memory, make_progress
from fsr.core.device import Compute
from fsr.core.io import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    describe_os_error,
    list_image_files,
    read_image,
    remove_stale_temporaries,
    write_image,
    write_json,
)
from fsr.data.degrade import bicubic_down
from fsr.data.manifest import (
    MANIFEST_FILE,
    REJECTS_FILE,
    FaceRecord,
    write_manifest,
    write_rejects,
)
from fsr.data.identities import IdentityListError, read_name_lists
from fsr.detect.crop import DEFAULT_MARGIN, crop_square, square_box
from fsr.detect.mtcnn import MTCNN

JOURNAL_FILE = ".prepare-journal.jsonl"
SETTINGS_FILE = "prepare.json"
SUMMARY_FILE = "summary.json"
OWNED_FILES = (MANIFEST_FILE, REJECTS_FILE, SUMMARY_FILE, SETTINGS_FILE, JOURNAL_FILE)  # fsr prepare's own files in DST
SELECT_CHOICES = ("confident", "largest", "center")
FORMAT_VERSION = 1


class PrepareError(RuntimeError):
    """A prepare request that cannot run (bad arguments, settings clash with DST)."""


@dataclass
class PrepareConfig:
    """What ``prepare_dataset`` does. Fields mirror the CLI options of ``fsr prepare``."""

    identities_file: Path | None = None  # "<file name> <identity>" per line (CelebA identity_CelebA.txt)
    partition_file: Path | None = None  # "<file name> <0|1|2>" per line (CelebA list_eval_partition.txt)
    test_fraction: float = 0.1  # of identities, when splitting by seed
    val_fraction: float = 0.0
    split: str | None = None  # force every face into this split
    exclude_identities: tuple[Path, ...] = ()  # skip these: pairs.txt files or one name per line
    only_identities: tuple[Path, ...] = ()  # keep only these (same formats); () = every identity
    all_faces: bool = False
    select: str = "confident"  # which face when not all_faces
    margin: float = DEFAULT_MARGIN
    min_face: float = 20.0  # px: detector minimum and reject threshold (box side)
    size: int = 128
    scale: int = 4
    workers: int = 4
    max_pixels: int = DEFAULT_MAX_PIXELS
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709

    def __post_init__(self) -> None:
        self.exclude_identities = _path_tuple(self.exclude_identities)
        self.only_identities = _path_tuple(self.only_identities)


def _path_tuple(value) -> tuple[Path, ...]:
    """None, one path or several -> a tuple of paths."""
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike)):
        return (Path(value),)
    return tuple(Path(v) for v in value)


@dataclass
class PrepareSummary:
    """Counts and timings of one ``prepare_dataset`` run (also written to DST/summary.json)."""

    dst: str
    images_found: int = 0
    images_excluded: int = 0
    images_prepared: int = 0
    images_rejected: int = 0
    faces: int = 0
    resumed_images: int = 0
    processed_images: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    faces_enlarged: int = 0  # HR crops cut smaller than --size from the source and enlarged to it
    smallest_crop: int = 0  # side of the smallest square cut (source pixels)
    min_face_for_full_detail: int = 0  # the --min-face whose crops are all at least --size
    faces_per_split: dict[str, int] = field(default_factory=dict)
    identities_per_split: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0
    device: str = ""

    @property
    def yield_fraction(self) -> float:
        considered = self.images_prepared + self.images_rejected
        return self.images_prepared / considered if considered else 0.0


@dataclass
class WorkItem:
    key: str  # source path relative to the source root (prefixed by the root's name when several)
    path: Path
    identity: str
    split: str
    stem: str  # output path stem relative to hr/ and lr/


# ----------------------------------------------------------------------------- inputs


def _read_key_value_file(path: Path, what: str) -> dict[str, str]:
    table: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PrepareError(f"{path}: cannot read {what} file ({exc.strerror or exc})") from None
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            if number <= 2:
                continue  # tolerate a count/header line
            raise PrepareError(f"{path}:{number}: expected '<file name> <{what}>', got '{line.strip()}'")
        table[parts[0]] = parts[1]
    if not table:
        raise PrepareError(f"{path}: no entries in {what} file")
    return table


PARTITION_SPLITS = {"0": "train", "1": "val", "2": "test"}


def _assign_splits(identities: list[str], test_fraction: float, val_fraction: float, seed: int) -> dict[str, str]:
    """Identity-disjoint split: identities shuffled by ``seed``; first test, then val, rest train."""
    if not 0 <= test_fraction <= 1 or not 0 <= val_fraction <= 1 or test_fraction + val_fraction > 1:
        raise PrepareError(f"split fractions must be in [0, 1] and sum to at most 1 (test {test_fraction}, val {val_fraction})")
    ordered = sorted(identities)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ordered))
    n_test = int(round(test_fraction * len(ordered)))
    n_val = int(round(val_fraction * len(ordered)))
    splits: dict[str, str] = {}
    for rank, index in enumerate(order):
        name = ordered[int(index)]
        splits[name] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return splits


def _list_sources(sources: list[Path], dst: Path, prefix: bool) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """(key, path) of every source image, sorted by key, and (key, reason) for what was skipped.

    Left out: DST's own ``hr/`` and ``lr/`` (so DST may lie inside a source and a source inside
    DST) and any other folder fsr prepare made (its crops are not new faces; reported).
    """
    own = {(dst / "hr").resolve(), (dst / "lr").resolve()}
    entries: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    for source in sources:
        if not source.exists():
            raise PrepareError(f"{source}: no such file or folder")
        root = source if source.is_dir() else source.parent

        def key(path: Path, root: Path = root) -> str:
            rel = path.relative_to(root).as_posix()
            return f"{root.resolve().name}/{rel}" if prefix else rel

        def skip_dir(folder: Path, root: Path = root) -> bool:
            if folder.resolve() in own:
                return True
            if _is_prepared_folder(folder) and folder.resolve() != dst.resolve():
                skipped.append((key(folder), "skipped: an fsr prepare output folder (its crops are not source photos)"))
                return True
            return False

        listing = list_image_files(source, skip_dirs=skip_dir)
        entries.extend((key(path), path) for path in listing.files)
        skipped.extend((key(path), f"skipped: {reason}") for path, reason in listing.skipped)
    entries.sort(key=lambda e: e[0])
    return entries, skipped


def list_work(
    sources: list[Path], dst: Path, config: PrepareConfig, seed: int
) -> tuple[list[WorkItem], list[tuple[str, str]], int]:
    """Image files -> (work items sorted by key, early rejects, number excluded)."""
    prefix = len(sources) > 1
    names = [s.resolve().name for s in sources]
    if prefix and len(set(names)) != len(names):
        raise PrepareError(f"source folders must have distinct names, got {', '.join(names)}")
    entries, listing_rejects = _list_sources(sources, dst, prefix)

    identity_table = _read_key_value_file(config.identities_file, "identity") if config.identities_file else None
    partition_table = _read_key_value_file(config.partition_file, "partition") if config.partition_file else None
    try:
        excluded_names = read_name_lists(config.exclude_identities)
        only_names = read_name_lists(config.only_identities) if config.only_identities else None
    except IdentityListError as exc:
        raise PrepareError(str(exc)) from None

    rejects: list[tuple[str, str]] = listing_rejects
    staged: list[tuple[str, Path, str]] = []
    excluded = 0
    for key, path in entries:
        if identity_table is not None:
            identity = identity_table.get(path.name)
            if identity is None:
                rejects.append((key, "no identity: file not in the identity file"))
                continue
        else:
            parts = key.split("/")
            identity = parts[-2] if len(parts) >= 2 else Path(parts[-1]).stem
        if identity in excluded_names or (only_names is not None and identity not in only_names):
            excluded += 1
            continue
        staged.append((key, path, identity))

    if config.split is not None:
        split_of = {identity: config.split for _, _, identity in staged}
    elif partition_table is None:
        split_of = _assign_splits(sorted({i for _, _, i in staged}), config.test_fraction, config.val_fraction, seed)
    else:
        split_of = {}

    stems = [str(Path(key).with_suffix("")) for key, _, _ in staged]
    counts = Counter(stems)
    items: list[WorkItem] = []
    for (key, path, identity), stem in zip(staged, stems):
        if partition_table is not None and config.split is None:
            code = partition_table.get(path.name)
            if code not in PARTITION_SPLITS:
                rejects.append((key, "no split: file not in the partition file"))
                continue
            split = PARTITION_SPLITS[code]
        else:
            split = split_of[identity]
        if counts[stem] > 1:
            stem = key  # a.jpg and a.png side by side: keep the extension in the name
        items.append(WorkItem(key=key, path=path, identity=identity, split=split, stem=stem))
    return items, rejects, excluded


# ----------------------------------------------------------------------------- journal


def _settings(sources: list[Path], config: PrepareConfig, seed: int, chunk_size: int) -> dict:
    """The settings that decide the results; a DST made with others cannot be resumed."""
    data = asdict(config)
    data.pop("workers")
    for key in ("identities_file", "partition_file"):
        data[key] = str(Path(data[key]).resolve()) if data[key] else None
    data["exclude_identities"] = _paths_setting(config.exclude_identities)
    data["only_identities"] = _paths_setting(config.only_identities)
    if data["only_identities"] is None:
        del data["only_identities"]  # as DSTs prepared before the option record it: they resume
    data["thresholds"] = list(config.thresholds)
    return {
        "format": FORMAT_VERSION,
        "sources": [str(s.resolve()) for s in sources],
        "seed": seed,
        "chunk_size": chunk_size,
        "config": data,
    }


def _paths_setting(paths: tuple[Path, ...]) -> str | list[str] | None:
    """Identity-list files as settings record them: none, one path (as always), or a list."""
    resolved = [str(path.resolve()) for path in paths]
    return None if not resolved else resolved[0] if len(resolved) == 1 else resolved


def _load_settings(dst: Path, wanted: dict) -> dict:
    """Reuse DST's chunk size; refuse to mix results made with different settings."""
    path = dst / SETTINGS_FILE
    if not path.is_file():
        return wanted
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError):
        return wanted
    differences = []
    if existing.get("sources") != wanted["sources"]:
        differences.append("sources")
    if existing.get("seed") != wanted["seed"]:
        differences.append("seed")
    for key, value in wanted["config"].items():
        if existing.get("config", {}).get(key) != value:
            differences.append(key)
    if differences:
        raise PrepareError(
            f"{dst}: already prepared with different settings ({', '.join(differences)}); "
            "use another destination or the same options"
        )
    return {**wanted, "chunk_size": int(existing.get("chunk_size", wanted["chunk_size"]))}


class Journal:
    """Append-only record of finished chunks; a torn last line (killed mid-write) is cut off."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.chunks: dict[int, dict] = {}
        good_bytes = 0
        if path.is_file():
            with open(path, "rb") as fh:
                for raw in fh:
                    if not raw.endswith(b"\n"):
                        break
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        break
                    self.chunks[int(record["chunk"])] = record
                    good_bytes += len(raw)
            if good_bytes != path.stat().st_size:
                with open(path, "r+b") as fh:
                    fh.truncate(good_bytes)
        self.handle = open(path, "ab")

    def commit(self, record: dict) -> None:
        self.handle.write((json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8"))
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.chunks[int(record["chunk"])] = record

    def close(self) -> None:
        """Close; a failed flush (disk full) is dropped: a torn last line is cut off on the next open."""
        try:
            self.handle.close()
        except OSError:
            pass


# ----------------------------------------------------------------------------- per-image work


def _decode(item: WorkItem, max_pixels: int) -> np.ndarray | str:
    """(H, W, 3) uint8 RGB, or the reason the file is unusable."""
    try:
        return read_image(item.path, max_pixels=max_pixels).rgb_uint8()
    except ImageReadError as exc:
        return f"unreadable: {exc.reason}"
    except Exception as exc:  # noqa: BLE001 - a bad file must never stop the run
        return f"unreadable: {exc.__class__.__name__}: {exc}"


def _select_faces(detections, image_shape, config: PrepareConfig) -> tuple[list[int], str | None]:
    """Indices of the faces to keep (in output order) or a reject reason."""
    if len(detections) == 0:
        return [], "no face detected"
    boxes = detections.boxes
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    big = [i for i in range(len(detections)) if sides[i] >= config.min_face]
    if not big:
        return [], f"face too small: largest box {sides.max():.1f} px < --min-face {config.min_face:g} px"
    if config.all_faces:
        return big, None
    if config.select == "largest":
        return [max(big, key=lambda i: (sides[i], -i))], None
    if config.select == "center":
        h, w = image_shape[:2]
        centre = np.array([w / 2.0, h / 2.0])
        mids = (boxes[:, :2] + boxes[:, 2:4]) / 2.0
        return [min(big, key=lambda i: (float(np.hypot(*(mids[i] - centre))), i))], None
    return [big[0]], None  # most confident


def _write_face(image: np.ndarray, crop: tuple[int, int, int], hr_path: Path, lr_path: Path, size: int, scale: int) -> None:
    """Cut the HR crop, degrade it to LR with the shared bicubic path, write both PNGs."""
    hr = crop_square(image, *crop, size=size)
    hr_tensor = torch.from_numpy(np.array(hr)).permute(2, 0, 1)[None].float().div_(255.0)
    lr_tensor = bicubic_down(hr_tensor, scale)[0]
    lr = lr_tensor.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    write_image(hr_path, hr)
    write_image(lr_path, lr)


# ----------------------------------------------------------------------------- main entry


@dataclass
class PreparePlan:
    """What a run will do: the work in fixed chunks, and the rejects known before decoding."""

    sources: list[Path]
    dst: Path
    items: list[WorkItem]
    chunks: list[list[WorkItem]]
    early_rejects: list[tuple[str, str]]
    excluded: int


def prepare_dataset(
    sources: list[str | os.PathLike] | str | os.PathLike,
    dst: str | os.PathLike,
    config: PrepareConfig | None = None,
    compute: Compute | None = None,
    *,
    chunk_size: int | None = None,
    progress: bool = True,
    detector=None,
    on_chunk: Callable[[int], None] | None = None,
) -> PrepareSummary:
    """Prepare ``sources`` (folders or files) into ``dst``; resumable, see the module doc.

    chunk_size: images per detection batch and per journal entry (default
    ``compute.batch_size``; a resumed run keeps the first run's value). A file-system
    error (full disk, read-only or forbidden DST) is a one-line :class:`PrepareError`
    saying what is kept.
    """
    started = time.perf_counter()
    config = config or PrepareConfig()
    compute = compute or Compute.create("cpu")
    plan = plan_prepare(sources, dst, config, compute, chunk_size)
    journal: Journal | None = None
    try:
        journal = Journal(plan.dst / JOURNAL_FILE)
        summary = PrepareSummary(dst=str(plan.dst), images_found=len(plan.items) + len(plan.early_rejects) + plan.excluded,
                                 images_excluded=plan.excluded, device=compute.describe())
        run_chunks(plan, journal, config, compute, summary, progress=progress, detector=detector, on_chunk=on_chunk)
        journal.close()
        write_results(plan, journal, summary, started, config)
    except OSError as exc:
        done = sum(len(r["results"]) for r in journal.chunks.values()) if journal is not None else 0
        raise PrepareError(
            f"cannot write {describe_os_error(exc)}; {done} finished images are kept in {plan.dst} "
            "(free space or fix the folder's permissions, then run the same command again to resume)"
        ) from None
    finally:
        if journal is not None:
            journal.close()
    return summary


def plan_prepare(sources, dst, config: PrepareConfig, compute: Compute, chunk_size: int | None) -> PreparePlan:
    """Check the request, list the work and record the settings in DST (refusing a DST fsr did not make)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    source_paths = [Path(s) for s in sources]
    if not source_paths:
        raise PrepareError("no source folder given")
    dst = Path(dst)
    if config.split is not None and config.split not in ("train", "val", "test"):
        raise PrepareError(f"--split must be train, val or test, got '{config.split}'")
    if config.select not in SELECT_CHOICES:
        raise PrepareError(f"--select must be one of {', '.join(SELECT_CHOICES)}, got '{config.select}'")
    if config.size % config.scale:
        raise PrepareError(f"--size {config.size} is not divisible by --scale {config.scale}")
    for src in source_paths:
        if src.resolve() == dst.resolve():
            raise PrepareError(f"{dst}: the destination must differ from the source")
    check_destination(dst)
    items, early_rejects, excluded = list_work(source_paths, dst, config, compute.seed)
    wanted = _settings(source_paths, config, compute.seed, chunk_size or compute.batch_size)
    try:
        dst.mkdir(parents=True, exist_ok=True)
        settings = _load_settings(dst, wanted)
        write_json(dst / SETTINGS_FILE, settings)
    except OSError as exc:
        raise PrepareError(f"cannot write {describe_os_error(exc)}; nothing was prepared") from None
    size = int(settings["chunk_size"])
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    return PreparePlan(source_paths, dst, items, chunks, early_rejects, excluded)


def check_destination(dst: Path) -> None:
    """Refuse a DST that holds files fsr prepare writes (manifest, summary, hr/, lr/ ...) but
    that no fsr prepare made (no ``prepare.json`` of ours): they would be overwritten."""
    if not dst.is_dir() or _is_prepared_folder(dst):
        return
    clashes = [name for name in OWNED_FILES if (dst / name).exists()]
    clashes += [f"{name}/" for name in ("hr", "lr") if (dst / name).is_dir() and any((dst / name).iterdir())]
    if clashes:
        raise PrepareError(
            f"{dst}: already holds {', '.join(clashes)} not written by fsr prepare (no {SETTINGS_FILE}); "
            "choose an empty or new destination folder"
        )


def _is_prepared_folder(folder: Path) -> bool:
    """True when ``folder`` was made by fsr prepare (holds our ``prepare.json``)."""
    try:
        settings = json.loads((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(settings, dict) and "format" in settings and "sources" in settings


def _chunk_done(plan: PreparePlan, journal: Journal, index: int) -> bool:
    """True when the journal holds chunk ``index`` for the same images and its outputs exist."""
    record = journal.chunks.get(index)
    if record is None or [r["key"] for r in record["results"]] != [item.key for item in plan.chunks[index]]:
        return False
    return all(
        (plan.dst / face["hr"]).is_file() and (plan.dst / face["lr"]).is_file()
        for result in record["results"]
        for face in result.get("faces", [])
    )


def run_chunks(plan: PreparePlan, journal: Journal, config: PrepareConfig, compute: Compute, summary: PrepareSummary,
               *, progress: bool, detector, on_chunk) -> None:
    """Detect, crop and write every chunk the journal does not hold yet; decode one chunk ahead."""
    chunks = plan.chunks
    pending = [i for i in range(len(chunks)) if not _chunk_done(plan, journal, i)]
    summary.resumed_images = sum(len(chunks[i]) for i in set(range(len(chunks))) - set(pending))
    if not pending:
        return
    (plan.dst / MANIFEST_FILE).unlink(missing_ok=True)
    _remove_stale_temporaries(plan)
    detector = detector or MTCNN.load(compute)
    pool = ThreadPoolExecutor(max_workers=max(1, int(config.workers)), thread_name_prefix="fsr-prepare")
    bar = make_progress("img", disable=not progress)
    try:
        with bar:
            task = bar.add_task("prepare", total=sum(len(chunks[i]) for i in pending))

            def submit_decode(index: int) -> list[Future]:
                return [pool.submit(_decode, item, config.max_pixels) for item in chunks[index]]

            decoded_next = submit_decode(pending[0])
            waiting: tuple[dict, list[Future]] | None = None
            for position, index in enumerate(pending):
                decoded = [f.result() for f in decoded_next]
                if position + 1 < len(pending):
                    decoded_next = submit_decode(pending[position + 1])
                record, writes = _process_chunk(index, chunks[index], decoded, detector, config, plan.dst, pool)
                if waiting is not None:
                    _commit(journal, *waiting)
                waiting = (record, writes)
                summary.processed_images += len(chunks[index])
                bar.advance(task, len(chunks[index]))
                if on_chunk is not None:
                    on_chunk(index)
            if waiting is not None:
                _commit(journal, *waiting)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _collect(plan: PreparePlan, journal: Journal) -> tuple[list[FaceRecord], list[tuple[str, str]], Counter, int]:
    """(face records, rejects, reject reasons, images prepared) from the journal, in source order."""
    records: list[FaceRecord] = []
    rejects = list(plan.early_rejects)
    reasons: Counter[str] = Counter(reason.split(":")[0] for _, reason in plan.early_rejects)
    prepared = 0
    for index in range(len(plan.chunks)):
        for result in journal.chunks[index]["results"]:
            if "reason" in result:
                rejects.append((result["key"], result["reason"]))
                reasons[result["reason"].split(":")[0]] += 1
                continue
            prepared += 1
            records.extend(_face_record(result, face) for face in result["faces"])
    rejects.sort()
    return records, rejects, reasons, prepared


def _face_record(result: dict, face: dict) -> FaceRecord:
    return FaceRecord(
        face_id=face["face_id"],
        source=result["key"],
        identity=result["identity"],
        split=result["split"],
        score=face["score"],
        box=tuple(face["box"]),  # type: ignore[arg-type]
        crop=tuple(face["crop"]),  # type: ignore[arg-type]
        landmarks=np.asarray(face["landmarks"], dtype=np.float32),
        hr=face["hr"],
        lr=face["lr"],
    )


def write_results(plan: PreparePlan, journal: Journal, summary: PrepareSummary, started: float, config: PrepareConfig) -> None:
    """Everything done: write rejects.csv, manifest.csv (sorted by source key) and summary.json."""
    records, rejects, reasons, prepared = _collect(plan, journal)
    write_rejects(plan.dst, rejects)
    write_manifest(plan.dst, records)
    summary.images_prepared = prepared
    summary.images_rejected = len(rejects)
    summary.faces = len(records)
    summary.reject_reasons = dict(sorted(reasons.items()))
    crop_sides = [r.crop[2] for r in records]
    summary.faces_enlarged = sum(side < config.size for side in crop_sides)
    summary.smallest_crop = min(crop_sides, default=0)
    summary.min_face_for_full_detail = math.ceil(config.size / (1.0 + 2.0 * config.margin) - 1e-9)
    split_faces: Counter[str] = Counter(r.split for r in records)
    split_ids: dict[str, set[str]] = {}
    for r in records:
        split_ids.setdefault(r.split, set()).add(r.identity)
    summary.faces_per_split = {s: split_faces[s] for s in ("train", "val", "test") if split_faces[s]}
    summary.identities_per_split = {s: len(split_ids[s]) for s in ("train", "val", "test") if s in split_ids}
    summary.seconds = time.perf_counter() - started
    summary.images_per_second = summary.processed_images / summary.seconds if summary.seconds > 0 else 0.0
    write_json(plan.dst / SUMMARY_FILE, {**asdict(summary), "yield_fraction": summary.yield_fraction})


_FACE_SUFFIX = re.compile(r"_face\d+$")


def _remove_stale_temporaries(plan: PreparePlan) -> None:
    """Delete half-written temporaries a killed run left for this run's own outputs only
    (``hr/<stem>.png``, ``lr/<stem>.png``, the manifest...); any other file is left alone."""
    stems: dict[Path, set[str]] = {}
    for item in plan.items:
        rel = Path(item.stem)
        for kind in ("hr", "lr"):
            stems.setdefault(plan.dst / kind / rel.parent, set()).add(rel.name)
    for folder, names in stems.items():
        remove_stale_temporaries(
            folder, lambda target, names=names: target.endswith(".png") and _FACE_SUFFIX.sub("", target[:-4]) in names
        )
    remove_stale_temporaries(plan.dst, lambda target: target in OWNED_FILES)


def _commit(journal: Journal, record: dict, writes: list[Future]) -> None:
    for future in writes:
        future.result()  # re-raises a write error: the chunk is then not marked done
    journal.commit(record)


def _detect_with_backoff(detector, images: list[np.ndarray], config: PrepareConfig) -> list:
    """MTCNN on a list of images; on GPU out-of-memory, the list is halved and retried."""
    try:
        return detector.detect(images, min_face=config.min_face, thresholds=config.thresholds, factor=config.factor)
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is an out-of-memory error
        if not is_out_of_memory(exc) or len(images) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(images) // 2
        return _detect_with_backoff(detector, images[:half], config) + _detect_with_backoff(detector, images[half:], config)


def _process_chunk(index, chunk, decoded, detector, config: PrepareConfig, dst: Path, pool: ThreadPoolExecutor):
    """Detect on one chunk, choose faces, queue the crop/LR/PNG writes; returns (journal record, write futures)."""
    good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
    detections = _detect_with_backoff(detector, [decoded[i] for i in good], config) if good else []
    by_item = dict(zip(good, detections))
    results = []
    writes: list[Future] = []
    for i, item in enumerate(chunk):
        entry: dict = {"key": item.key, "identity": item.identity, "split": item.split}
        if i not in by_item:
            entry["reason"] = decoded[i]
            results.append(entry)
            continue
        image = decoded[i]
        found = by_item[i]
        chosen, reason = _select_faces(found, image.shape, config)
        if reason is not None:
            entry["reason"] = reason
            results.append(entry)
            continue
        faces = []
        for rank, k in enumerate(chosen):
            stem = item.stem if rank == 0 or not config.all_faces else f"{item.stem}_face{rank}"
            hr_rel = f"hr/{stem}.png"
            lr_rel = f"lr/{stem}.png"
            box = [round(float(v), 4) for v in found.boxes[k]]
            crop = square_box(found.boxes[k], config.margin)
            faces.append(
                {
                    "face_id": stem,
                    "score": round(float(found.scores[k]), 6),
                    "box": box,
                    "crop": list(crop),
                    "landmarks": [[round(float(x), 4), round(float(y), 4)] for x, y in found.landmarks[k]],
                    "hr": hr_rel,
                    "lr": lr_rel,
                }
            )
            writes.append(pool.submit(_write_face, image, crop, dst / hr_rel, dst / lr_rel, config.size, config.scale))
        entry["faces"] = faces
        results.append(entry)
    return {"chunk": index, "results": results}, writes
