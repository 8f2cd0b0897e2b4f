"""Image-quality and identity metrics of SR systems against HR ground truth (Tables 1, 2, 4; Fig. 6).

Per image and system: PSNR on RGB and on the luma Y, SSIM on RGB and on Y, MSE, and the
identity similarity of the SR face to its HR face under a face recognition model.

- PSNR and SSIM are piq's (``piq.psnr``, ``piq.ssim`` with an 11x11 Gaussian window,
  sigma 1.5, K1 0.01, K2 0.03, no downsampling), on images in [0, 1].
- Y is ITU-R BT.601 luma as in MATLAB's ``rgb2ycbcr`` (the SR convention):
  ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255`` for R, G, B in [0, 1].
- MSE is on the 0..255 scale, averaged over pixels and channels (Table 4's unit).
- Identity: ``id_cosine`` = the face model's ``similarity`` (cosine of normalised
  embeddings; for dlib of *centred* descriptors, since raw dlib cosines are ~0.97 for any
  face); for dlib also ``id_distance``, the Euclidean distance of raw descriptors (dlib's
  same-person rule is < 0.6). Faces are aligned with the 5 landmarks when known.
- Fig. 6 heatmap: per pixel ``eps_ij = max_c |y_ijc - x_ijc|`` (0..255), one colour scale
  per figure with a colour bar.

Two ways in: SR images already on disk (``evaluate_folders``: HR and SR folders matched by
relative path without the suffix), or SR systems run on a prepared set
(``evaluate_prepared``: each system upscales the prepared 32x32 LR faces through
``fsr.models.systems.load_sr_system``; outputs are quantised to 8 bits as if saved).
"""

from __future__ import annotations

import csv
import io
import math
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fsr.core.batching import make_progress
from fsr.core.device import Compute
from fsr.core.io import ImageReadError, atomic_path, atomic_write_text, list_image_files, read_image, to_tensor, write_json
from fsr.data.degrade import JPEG_BLOCK, jpeg_degrade, quantise_8bit
from fsr.data.manifest import read_manifest
from fsr.evaluate.grid import GridRow, grid_positions, save_comparison_grid
from fsr.evaluate.identity import FaceEmbedder, load_face_model
from fsr.models.systems import load_sr_system

PIXEL_METRICS = ("psnr_rgb", "psnr_y", "ssim", "ssim_y", "mse")
MIN_IMAGE_SIDE = 11  # px: the SSIM window (Gaussian, 11x11)

METRIC_LABELS = {
    "psnr_rgb": "PSNR RGB (dB)",
    "psnr_y": "PSNR Y (dB)",
    "ssim": "SSIM RGB",
    "ssim_y": "SSIM Y",
    "mse": "MSE (0..255)",
    "id_cosine": "ID cosine SR-HR",
    "id_distance": "ID distance SR-HR",
}
HIGHER_IS_BETTER = {"psnr_rgb": True, "psnr_y": True, "ssim": True, "ssim_y": True, "mse": False, "id_cosine": True, "id_distance": False}


class MetricsError(RuntimeError):
    """Inputs that cannot be evaluated (one line, naming the file or folder)."""


# ----------------------------------------------------------------------------- pixel metrics


def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 1, H, W) BT.601 luma Y in [16/255, 235/255]."""
    weights = images.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    return (16.0 + (images * weights).sum(1, keepdim=True)) / 255.0


def pixel_metrics(sr: torch.Tensor, hr: torch.Tensor) -> dict[str, np.ndarray]:
    """PSNR (RGB, Y), SSIM (RGB, Y) and MSE of SR against HR, per image.

    sr, hr: (N, 3, H, W) float in [0, 1] (same shape). Returns arrays of shape (N,).
    """
    if sr.shape != hr.shape:
        raise ValueError(f"SR {tuple(sr.shape)} and HR {tuple(hr.shape)} differ in shape")
    import piq  # imported here: piq pulls in torchvision, about a second of every command's start-up

    sr = sr.detach().float().cpu().clamp(0, 1)
    hr = hr.detach().float().cpu().clamp(0, 1)
    sr_y, hr_y = rgb_to_y(sr), rgb_to_y(hr)
    ssim_kwargs = dict(data_range=1.0, reduction="none", downsample=False)
    return {
        "psnr_rgb": piq.psnr(sr, hr, data_range=1.0, reduction="none").numpy().astype(np.float64),
        "psnr_y": piq.psnr(sr_y, hr_y, data_range=1.0, reduction="none").numpy().astype(np.float64),
        "ssim": piq.ssim(sr, hr, **ssim_kwargs).numpy().astype(np.float64),
        "ssim_y": piq.ssim(sr_y, hr_y, **ssim_kwargs).numpy().astype(np.float64),
        "mse": ((sr - hr) * 255.0).pow(2).mean(dim=(1, 2, 3)).numpy().astype(np.float64),
    }


def colour_shift(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """How far SR moves a face's colour: per image, the largest distance of one channel's mean
    SR - HR from the mean over the three channels (a uniform brightening is no colour shift).
    (N, 3, H, W) in [0, 1] -> (N,) in grey levels (0..255)."""
    bias = (sr.float() - hr.float()).mean(dim=(2, 3)) * 255.0  # (N, 3)
    return (bias - bias.mean(dim=1, keepdim=True)).abs().amax(dim=1)


def difference_map(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Fig. 6: per-pixel max over RGB of |SR - HR|. (N, 3, H, W) in [0, 1] -> (N, H, W) in 0..255."""
    return (sr.float() - hr.float()).abs().amax(dim=1) * 255.0


# ----------------------------------------------------------------------------- heatmaps


def save_heatmap(
    path: str | Path,
    hr: torch.Tensor,
    outputs: dict[str, torch.Tensor],
    title: str = "",
    stats: dict[str, dict[str, float]] | None = None,
) -> Path:
    """Write a Fig. 6-style PNG: the HR target and each system's output (top row), each
    output's max-over-channels difference to HR (bottom row, shared 'jet' scale: cool = low,
    warm = high, 0..255 grey levels) and a colour bar.

    hr: (3, H, W) in [0, 1]; outputs: name -> (3, H, W) in [0, 1]; stats: name -> metrics
    printed under each panel (Table 4).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(outputs)
    diffs = {n: difference_map(outputs[n][None], hr[None])[0].numpy() for n in names}
    vmax = max(1.0, max(float(d.max()) for d in diffs.values()))
    cols = len(names) + 1
    fig, axes = plt.subplots(2, cols, figsize=(2.3 * cols + 0.8, 5.0), squeeze=False)
    to_np = lambda t: t.clamp(0, 1).permute(1, 2, 0).numpy()  # noqa: E731
    axes[0, 0].imshow(to_np(hr))
    axes[0, 0].set_title("HR (target)", fontsize=9)
    axes[1, 0].axis("off")
    image = None
    for j, name in enumerate(names, start=1):
        axes[0, j].imshow(to_np(outputs[name]))
        axes[0, j].set_title(name, fontsize=9)
        image = axes[1, j].imshow(diffs[name], cmap="jet", vmin=0.0, vmax=vmax)
        if stats and name in stats:
            s = stats[name]
            axes[1, j].set_xlabel(
                f"MSE {s['mse']:.1f}\nPSNR {s['psnr_rgb']:.2f} SSIM {s['ssim']:.3f}", fontsize=8
            )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        bar = fig.colorbar(image, ax=axes[1, :].tolist(), fraction=0.025, pad=0.02)
        bar.set_label("max_c |SR - HR| (grey levels)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


# ----------------------------------------------------------------------------- evaluation core


@dataclass
class Chunk:
    """A batch of aligned images: ``keys``, HR (n, 3, H, W) and per-system SR in [0, 1],
    and optional landmarks (n, 5, 2) in HR pixels."""

    keys: list[str]
    hr: torch.Tensor
    outputs: dict[str, torch.Tensor]
    landmarks: torch.Tensor | None = None
    lr: torch.Tensor | None = None


@dataclass
class MetricsReport:
    """Per-image rows and per-system summaries."""

    systems: list[str]
    rows: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    face_model: str | None = None
    heatmaps: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    baseline: str | None = "bicubic"
    grid_rows: list[GridRow] = field(default_factory=list)
    grid: str | None = None

    @property
    def metric_names(self) -> list[str]:
        names = list(PIXEL_METRICS)
        if self.rows and "id_cosine" in self.rows[0]:
            names.append("id_cosine")
        if self.rows and "id_distance" in self.rows[0]:
            names.append("id_distance")
        return names

    def summary(self) -> dict[str, dict[str, float]]:
        """system -> {metric: mean, metric_std: std, n_images}."""
        out: dict[str, dict[str, float]] = {}
        for system in self.systems:
            rows = [r for r in self.rows if r["system"] == system]
            entry: dict[str, float] = {"n_images": len(rows)}
            for m in self.metric_names:
                values = np.array([r[m] for r in rows], dtype=np.float64)
                entry[m] = float(values.mean()) if values.size else math.nan
                entry[f"{m}_std"] = float(values.std()) if values.size else math.nan
            out[system] = entry
        return out

    def paired(self) -> dict[str, dict[str, dict[str, float]]]:
        """Every other system against ``baseline`` image by image (empty when the baseline is
        not among the systems): system -> metric -> ``delta`` (mean per-image difference,
        system - baseline), ``ci95`` (half-width, 1.96 standard errors), ``relative``
        (delta / baseline mean) and ``better_fraction`` (share of images where the system is
        better, by the metric's direction)."""
        base = self.baseline
        if base not in self.systems or len(self.systems) < 2:
            return {}
        values = {s: {} for s in self.systems}
        for r in self.rows:
            values[r["system"]][r["image"]] = r
        base_rows = values[base]
        out: dict[str, dict[str, dict[str, float]]] = {}
        for system in self.systems:
            if system == base:
                continue
            keys = [k for k in values[system] if k in base_rows]
            entry: dict[str, dict[str, float]] = {}
            for m in self.metric_names:
                a = np.array([values[system][k][m] for k in keys], dtype=np.float64)
                b = np.array([base_rows[k][m] for k in keys], dtype=np.float64)
                if a.size == 0:
                    continue
                d = a - b
                se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
                better = d > 0 if HIGHER_IS_BETTER[m] else d < 0
                entry[m] = {
                    "delta": float(d.mean()),
                    "ci95": 1.96 * se,
                    "relative": float(d.mean() / b.mean()) if b.mean() != 0 else math.nan,
                    "better_fraction": float(better.mean()),
                    "n_images": int(d.size),
                }
            out[system] = entry
        return out


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "image"


def evaluate_chunks(
    chunks: Iterable[Chunk],
    systems: list[str],
    total: int,
    embedder: FaceEmbedder | None = None,
    heatmap_keys: set[str] | None = None,
    heatmap_first: int = 0,
    heatmap_dir: Path | None = None,
    show_progress: bool = True,
    grid: int = 0,
) -> MetricsReport:
    """Compute every metric for every (image, system) in a stream of chunks; keep ``grid``
    faces spread over the set for the comparison grid (``report.grid_rows``)."""
    report = MetricsReport(systems=list(systems), face_model=embedder.name if embedder else None)
    heatmap_keys = set(heatmap_keys or ())
    grid_at = grid_positions(total, grid)
    seen = 0
    with make_progress("img", disable=not show_progress) as progress:
        task = progress.add_task("metrics", total=total)
        for chunk in chunks:
            per_system = {name: pixel_metrics(chunk.outputs[name], chunk.hr) for name in systems}
            if embedder is not None:
                hr_emb = embedder.embed(chunk.hr, chunk.landmarks)
                for name in systems:
                    sr_emb = embedder.embed(chunk.outputs[name], chunk.landmarks)
                    scores = embedder.compare(sr_emb, hr_emb)
                    per_system[name]["id_cosine"] = scores["cosine"]
                    if "distance" in scores:
                        per_system[name]["id_distance"] = scores["distance"]
            for i, key in enumerate(chunk.keys):
                stats = {}
                for name in systems:
                    row = {"image": key, "system": name}
                    row.update({m: float(v[i]) for m, v in per_system[name].items()})
                    report.rows.append(row)
                    stats[name] = row
                wanted = key in heatmap_keys or (not heatmap_keys and seen < heatmap_first)
                if wanted and heatmap_dir is not None:
                    path = save_heatmap(
                        heatmap_dir / f"{_safe_name(key)}.png",
                        chunk.hr[i],
                        {name: chunk.outputs[name][i] for name in systems},
                        title=key,
                        stats=stats,
                    )
                    report.heatmaps.append(str(path))
                if seen in grid_at:
                    report.grid_rows.append(GridRow(key, chunk.hr[i], {n: chunk.outputs[n][i] for n in systems}, stats,
                                                    None if chunk.lr is None else chunk.lr[i]))
                seen += 1
            progress.advance(task, len(chunk.keys))
        progress.update(task, total=seen)  # unreadable or mismatched images were skipped: the bar ends full
    missing = heatmap_keys - {r["image"] for r in report.rows}
    report.skipped += [f"{k}: heatmap requested but the image was not evaluated" for k in sorted(missing)]
    return report


# ----------------------------------------------------------------------------- folders


def _index_folder(root: Path, skipped: list[str]) -> dict[str, Path]:
    """relative path without suffix -> file; what the listing skipped (GIF, loops...) goes to ``skipped``."""
    listing = list_image_files(root)
    skipped.extend(f"{path}: {reason}" for path, reason in listing.skipped)
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in listing.files}


def _load_rgb(path: Path) -> torch.Tensor:
    return to_tensor(np.array(read_image(path).rgb))


def folder_chunks(
    hr_dir: Path, sr_dirs: dict[str, Path], keys: list[str], hr_files: dict, sr_files: dict, chunk_size: int, skipped: list[str]
) -> Iterator[Chunk]:
    """Chunks of at most ``chunk_size`` images of one size (HR images may differ in size:
    a chunk ends where the size changes), in key order."""
    batch_keys, hrs, outs = [], [], {n: [] for n in sr_dirs}
    for key in keys:
        try:
            hr = _load_rgb(hr_files[key])
            srs = {n: _load_rgb(sr_files[n][key]) for n in sr_dirs}
        except ImageReadError as exc:
            skipped.append(str(exc))
            continue
        if min(hr.shape[1:]) < MIN_IMAGE_SIDE:
            skipped.append(f"{hr_files[key]}: {hr.shape[2]}x{hr.shape[1]} px is too small to score "
                           f"(SSIM needs at least {MIN_IMAGE_SIDE} px a side)")
            continue
        bad = [n for n, t in srs.items() if t.shape != hr.shape]
        if bad:
            n = bad[0]
            skipped.append(
                f"{sr_files[n][key]}: size {tuple(srs[n].shape[1:])} differs from HR {tuple(hr.shape[1:])} ({hr_files[key]})"
            )
            continue
        if hrs and (hr.shape != hrs[0].shape or len(hrs) == chunk_size):
            yield Chunk(batch_keys, torch.stack(hrs), {n: torch.stack(v) for n, v in outs.items()})
            batch_keys, hrs, outs = [], [], {n: [] for n in sr_dirs}
        batch_keys.append(key)
        hrs.append(hr)
        for n in sr_dirs:
            outs[n].append(srs[n])
    if batch_keys:
        yield Chunk(batch_keys, torch.stack(hrs), {n: torch.stack(v) for n, v in outs.items()})


def evaluate_folders(
    hr_dir: str | Path,
    sr_dirs: dict[str, str | Path],
    embedder: FaceEmbedder | None = None,
    limit: int | None = None,
    chunk_size: int = 64,
    heatmap_keys: set[str] | None = None,
    heatmap_first: int = 0,
    heatmap_dir: Path | None = None,
    show_progress: bool = True,
    grid: int = 0,
) -> MetricsReport:
    """Metrics of SR images on disk against HR images, matched by relative path without suffix.

    Images present in the HR folder and in every SR folder are evaluated; the others, and
    unreadable or wrongly sized files, are reported in ``report.skipped`` and left out.
    Faces are embedded whole (no landmarks are known for plain folders).
    """
    hr_dir = Path(hr_dir)
    if not hr_dir.is_dir():
        raise MetricsError(f"{hr_dir}: HR folder not found")
    dirs = {n: Path(p) for n, p in sr_dirs.items()}
    for n, p in dirs.items():
        if not p.is_dir():
            raise MetricsError(f"{p}: SR folder for '{n}' not found")
    skipped: list[str] = []
    hr_files = _index_folder(hr_dir, skipped)
    sr_files = {n: _index_folder(p, skipped) for n, p in dirs.items()}
    keys = sorted(hr_files)
    for n in dirs:
        absent = [k for k in keys if k not in sr_files[n]]
        if absent:
            skipped.append(f"{dirs[n]}: {len(absent)} HR image(s) have no SR counterpart (e.g. {absent[0]})")
    keys = [k for k in keys if all(k in sr_files[n] for n in dirs)]
    if limit:
        keys = keys[:limit]
    if not keys:
        raise MetricsError(f"{hr_dir}: no image found in the HR folder and every SR folder")
    chunks = folder_chunks(hr_dir, dirs, keys, hr_files, sr_files, chunk_size, skipped)
    report = evaluate_chunks(chunks, list(dirs), len(keys), embedder, heatmap_keys, heatmap_first, heatmap_dir, show_progress,
                             grid=grid)
    report.skipped = skipped + report.skipped
    report.source = {"mode": "folders", "hr": str(hr_dir), "sr": {n: str(p) for n, p in dirs.items()}}
    return report


# ----------------------------------------------------------------------------- prepared set


def select_records(prepared_dir: str | Path, split: str | None = None, limit: int | None = None):
    """Records of a prepared set (interface B), optionally one split, in face_id order."""
    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / "manifest.csv").is_file():
        raise MetricsError(f"{prepared_dir}: not a prepared set (no manifest.csv; run fsr prepare)")
    records = sorted(read_manifest(prepared_dir), key=lambda r: r.face_id)
    if split:
        records = [r for r in records if r.split == split]
    if limit:
        records = records[:limit]
    return records


def load_faces(prepared_dir: Path, records, skipped: list[str]):
    """HR (n,3,128,128), LR (n,3,32,32) float in [0,1] and landmarks (n,5,2) in HR pixels.
    Records whose files cannot be read are reported in ``skipped`` and left out."""
    kept, hrs, lrs, lms = [], [], [], []
    for rec in records:
        try:
            hr = torch.from_numpy(np.array(rec.load_hr(prepared_dir))).permute(2, 0, 1).float() / 255.0
            lr = torch.from_numpy(np.array(rec.load_lr(prepared_dir))).permute(2, 0, 1).float() / 255.0
        except (ImageReadError, OSError, ValueError) as exc:
            skipped.append(f"{prepared_dir / rec.hr}: cannot load face ({exc})")
            continue
        kept.append(rec)
        hrs.append(hr)
        lrs.append(lr)
        try:
            lm = np.asarray(rec.landmarks_in_crop(hr.shape[-1]), dtype=np.float32)
            lms.append(torch.from_numpy(lm) if lm.shape == (5, 2) and np.isfinite(lm).all() else None)
        except (AttributeError, ValueError, TypeError):
            lms.append(None)
    if not kept:
        return kept, None, None, None
    landmarks = torch.stack(lms) if all(lm is not None for lm in lms) else None
    return kept, torch.stack(hrs), torch.stack(lrs), landmarks


def jpeg_offsets(face_ids: list[str]) -> list[tuple[int, int]]:
    """A fixed (dy, dx) block-grid offset in [0, 16) per face, from its id (CRC-32): the same for a
    face in every run and chunk size, spread over the grid as in faces cut from JPEG photos."""
    return [(crc % JPEG_BLOCK, (crc >> 8) % JPEG_BLOCK) for crc in (zlib.crc32(f.encode()) for f in face_ids)]


def prepared_chunks(prepared_dir: Path, records, systems: dict, chunk_size: int, skipped: list[str],
                    lr_jpeg: int = 0) -> Iterator[Chunk]:
    """The prepared faces in chunks, each with every system's output; ``lr_jpeg`` (1-100, 0 = off)
    JPEG-compresses the LR faces at that quality before any system sees them."""
    for start in range(0, len(records), chunk_size):
        kept, hr, lr, landmarks = load_faces(prepared_dir, records[start : start + chunk_size], skipped)
        if not kept:
            continue
        if lr_jpeg:
            lr = jpeg_degrade(lr, [lr_jpeg] * len(kept), jpeg_offsets([r.face_id for r in kept]))
        outputs = {name: quantise_8bit(system.upscale(lr)) for name, system in systems.items()}
        for name, out in outputs.items():
            if out.shape != hr.shape:
                raise MetricsError(f"system '{name}' made {tuple(out.shape[-2:])} faces but HR faces are {tuple(hr.shape[-2:])}")
        yield Chunk([r.face_id for r in kept], hr, outputs, landmarks, lr)


def evaluate_prepared(
    prepared_dir: str | Path,
    systems: list[str],
    compute: Compute,
    embedder: FaceEmbedder | None = None,
    split: str | None = None,
    limit: int | None = None,
    chunk_size: int = 256,
    heatmap_keys: set[str] | None = None,
    heatmap_first: int = 0,
    heatmap_dir: Path | None = None,
    show_progress: bool = True,
    grid: int = 0,
    lr_jpeg: int = 0,
) -> MetricsReport:
    """Run SR systems (specs for ``load_sr_system``) on a prepared set's LR faces and score
    their outputs against the HR faces. Image keys are the records' ``face_id``. ``lr_jpeg``
    (1-100): the LR faces JPEG-compressed at that quality first (0 = as prepared)."""
    if not 0 <= lr_jpeg <= 100:
        raise MetricsError(f"--lr-jpeg must be a JPEG quality in [1, 100] (0 = off), got {lr_jpeg}")
    prepared_dir = Path(prepared_dir)
    records = select_records(prepared_dir, split, limit)
    if not records:
        raise MetricsError(f"{prepared_dir}: no faces" + (f" in split '{split}'" if split else ""))
    loaded = {}
    for spec in systems:
        system = load_sr_system(spec, compute)
        name = system.name if system.name not in loaded else spec
        loaded[name] = system
    skipped: list[str] = []
    chunks = prepared_chunks(prepared_dir, records, loaded, chunk_size, skipped, lr_jpeg)
    report = evaluate_chunks(chunks, list(loaded), len(records), embedder, heatmap_keys, heatmap_first, heatmap_dir, show_progress,
                             grid=grid)
    report.skipped = skipped + report.skipped
    report.source = {"mode": "prepared", "data": str(prepared_dir), "split": split, "systems": dict(zip(loaded, systems)),
                     "lr_jpeg_quality": lr_jpeg or None}
    return report


# ----------------------------------------------------------------------------- outputs


def write_metrics_files(report: MetricsReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics_per_image.csv`` and ``metrics_summary.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["image", "system", *report.metric_names]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    csv_path = out_dir / "metrics_per_image.csv"
    atomic_write_text(csv_path, buffer.getvalue())
    json_path = out_dir / "metrics_summary.json"
    paired = report.paired()
    write_json(
        json_path,
        {
            "systems": report.systems,
            "face_model": report.face_model,
            "metrics": {m: METRIC_LABELS[m] for m in report.metric_names},
            "summary": report.summary(),
            "paired_vs_baseline": {"baseline": report.baseline if paired else None, "systems": paired},
            "source": report.source,
            "heatmaps": report.heatmaps,
            "comparison_grid": report.grid,
            "skipped": report.skipped,
        },
    )
    return {"csv": csv_path, "json": json_path}


def summary_table(report: MetricsReport, title: str = "SR vs HR"):
    """Rich table, Table 1/2 layout: one row per metric, systems side by side (best in bold)."""
    from rich.table import Table

    summary = report.summary()
    table = Table(title=title)
    table.add_column("metric")
    for s in report.systems:
        table.add_column(s, justify="right")
    for m in report.metric_names:
        values = [summary[s][m] for s in report.systems]
        finite = [v for v in values if not math.isnan(v)]
        best = (max(finite) if HIGHER_IS_BETTER[m] else min(finite)) if finite else None
        fmt = "{:.2f}" if m.startswith("psnr") or m == "mse" else "{:.4f}"
        label = METRIC_LABELS[m] + (f" ({report.face_model})" if m.startswith("id_") and report.face_model else "")
        cells = [
            (f"[bold]{fmt.format(v)}[/]" if len(values) > 1 and v == best else fmt.format(v)) for v in values
        ]
        table.add_row(label, *cells)
    table.add_row("images", *[str(int(summary[s]["n_images"])) for s in report.systems])
    return table


def paired_table(report: MetricsReport):
    """Rich table of per-image differences to the baseline (mean ± 95% CI, relative change,
    share of images improved); None when there is no baseline among the systems."""
    from rich.table import Table

    paired = report.paired()
    if not paired:
        return None
    table = Table(title=f"difference to {report.baseline}, image by image")
    table.add_column("metric")
    for s in paired:
        table.add_column(s, justify="right")
    for m in report.metric_names:
        fmt = "{:+.2f}" if m.startswith("psnr") or m == "mse" else "{:+.4f}"
        cells = []
        for s in paired:
            c = paired[s].get(m)
            if c is None:
                cells.append("-")
                continue
            ci = fmt.format(c["ci95"]).lstrip("+")
            cells.append(f"{fmt.format(c['delta'])} ± {ci} ({c['relative'] * 100:+.1f}%, {c['better_fraction'] * 100:.0f}% better)")
        table.add_row(METRIC_LABELS[m], *cells)
    table.caption = "mean per-image difference ± 95% confidence half-width; relative to the baseline's mean"
    return table


def run_metrics(
    out_dir: str | Path,
    compute: Compute,
    hr_dir: str | Path | None = None,
    sr_dirs: dict[str, str | Path] | None = None,
    prepared_dir: str | Path | None = None,
    systems: list[str] | None = None,
    face_model: str | None = "dlib",
    face_weights: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    heatmap_first: int = 0,
    heatmap_keys: list[str] | None = None,
    show_progress: bool = True,
    baseline: str | None = "bicubic",
    grid: int = 0,
    lr_jpeg: int = 0,
) -> tuple[MetricsReport, dict[str, Path]]:
    """``fsr metrics``: evaluate folders (``hr_dir`` + ``sr_dirs``) or systems on a prepared set,
    write the CSV, JSON, heatmaps and the comparison grid of ``grid`` faces (``comparison.png``)
    into ``out_dir`` and return the report and file paths.
    ``baseline``: the system the others are compared with image by image (``report.paired``).
    ``lr_jpeg``: with ``prepared_dir``, the JPEG quality the LR faces are compressed at first (0 = off)."""
    if lr_jpeg and hr_dir is not None:
        raise MetricsError("--lr-jpeg applies to --data (the systems' LR input), not to SR folders given with --hr")
    if (hr_dir is None) == (prepared_dir is None):
        raise MetricsError("give either --hr with --sr NAME=DIR, or --data PREPARED with --system")
    embedder = None
    if face_model and face_model != "none":
        embedder = FaceEmbedder(load_face_model(face_model, face_weights, compute), compute)
    out_dir = Path(out_dir)
    heatmap_dir = out_dir / "heatmaps" if (heatmap_first or heatmap_keys) else None
    keys = set(heatmap_keys or ())
    if hr_dir is not None:
        if not sr_dirs:
            raise MetricsError("--hr needs at least one --sr NAME=DIR")
        report = evaluate_folders(
            hr_dir, sr_dirs, embedder, limit, compute.batch_size, keys, heatmap_first, heatmap_dir, show_progress,
            grid=grid,
        )
    else:
        if not systems:
            raise MetricsError("--data needs at least one --system (bicubic | default | NAME | PATH)")
        report = evaluate_prepared(
            prepared_dir, systems, compute, embedder, split, limit, max(64, compute.batch_size),
            keys, heatmap_first, heatmap_dir, show_progress, grid=grid, lr_jpeg=lr_jpeg,
        )
    report.baseline = baseline
    if report.grid_rows:
        title = f"{report.source.get('data') or report.source.get('hr')}: PSNR RGB" + (
            f", {report.face_model} SR-HR" if report.face_model else "")
        report.grid = str(save_comparison_grid(out_dir / "comparison.png", report.grid_rows, report.systems, title))
    paths = write_metrics_files(report, out_dir)
    if report.grid:
        paths["grid"] = Path(report.grid)
    return report, paths
