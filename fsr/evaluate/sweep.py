"""LFW verification accuracy against the degradation factor alpha (Sec. V, Table 3, Fig. 7).

For every alpha in ``alphas`` and every SR system:

    LR face (32x32, from the prepared set)
      -> fsr.data.degrade.alpha_degrade(lr, alpha)   # fsr's reading of Sec. V, see below
      -> system.upscale(...)                         # 128x128 (bicubic, default, any checkpoint)
      -> face model embedding                        # aligned with the prepared 5 landmarks
      -> pair scores -> 10-fold accuracy (fsr.evaluate.verification)

plus the HR reference: the 128x128 HR faces embedded once (alpha-independent).

Reading of alpha: the paper "further downsample[s] all the LR images ... by a downsample
scaling factor alpha between 0 and 1" and then applies the SR model. fsr resizes the 32x32
LR face to round(32 alpha) px by antialiased bicubic and back to 32x32 by bicubic, so each
system always gets a 32x32 input (its only trained input size) carrying the information of
a round(32 alpha)-px face; alpha = 1 is the plain LR face.

Faces come from a prepared set (``fsr prepare``; interface B). A pair key ("Name/Name_0001.jpg"
for LFW) is matched to the record whose source path ends with the key (the most confident
face when an image has several). A pair image with no prepared face is a failure to enrol:
every pair that uses it gets no score and is decided "different" at any threshold (a
same-person pair counts as an error, a different-person pair as correct); their number is
reported. Thresholds: per test fold, chosen on the other folds (``kfold_verification``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fsr.core.batching import make_progress
from fsr.core.device import Compute, machine_description, precision_name, synchronize
from fsr.core.io import atomic_path, atomic_write_text, read_image, write_json
from fsr.data.degrade import alpha_degrade
from fsr.data.manifest import read_manifest
from fsr.evaluate.verification import Pair, PairedComparison, VerificationResult, kfold_verification, paired_comparison, read_pairs
from fsr.models.face import IdentityEmbedder, create_face_model
from fsr.models.systems import load_sr_system

DEFAULT_ALPHAS = tuple(round(0.1 * k, 1) for k in range(1, 11))
HR_NAME = "HR"


class SweepError(RuntimeError):
    """A sweep that cannot run (missing prepared set, no pairs, ...): one line."""


# ----------------------------------------------------------------------------- pairs -> faces


def select_pairs(pairs: list[Pair], folds: int | None = None, limit: int | None = None) -> list[Pair]:
    """Keep the first ``folds`` folds and, per fold, at most ``limit`` pairs (half same,
    half different, in file order). For quick runs; the full protocol uses neither."""
    fold_ids = sorted({p.fold for p in pairs})
    if folds:
        if folds < 2:
            raise SweepError("--folds must be at least 2 (thresholds are chosen on the other folds)")
        fold_ids = fold_ids[:folds]
    kept: list[Pair] = []
    for f in fold_ids:
        in_fold = [p for p in pairs if p.fold == f]
        if limit:
            same = [p for p in in_fold if p.same][: (limit + 1) // 2]
            diff = [p for p in in_fold if not p.same][: limit // 2]
            chosen = set(same) | set(diff)
            in_fold = [p for p in in_fold if p in chosen]
        kept.extend(in_fold)
    return kept


def match_records(keys: list[str], records) -> tuple[dict[str, object], list[str]]:
    """Map pair keys to prepared records by source-path suffix.

    Returns (key -> record) and the keys with no prepared face (failures to enrol). When
    one source has several faces, the most confident one is used.
    """
    best: dict[str, object] = {}
    for rec in records:
        src = Path(str(rec.source)).as_posix()
        if src not in best or float(rec.score) > float(best[src].score):
            best[src] = rec
    by_suffix: dict[str, list[str]] = {}
    for src in best:
        parts = src.split("/")
        for n in range(1, min(4, len(parts)) + 1):
            by_suffix.setdefault("/".join(parts[-n:]), []).append(src)
    found, missing = {}, []
    for key in keys:
        sources = by_suffix.get(Path(key).as_posix().lstrip("./"), [])
        if len(sources) == 1:
            found[key] = best[sources[0]]
        else:
            missing.append(key)  # absent, or ambiguous (several sources end with this key)
    return found, missing


@dataclass
class FaceSet:
    """The enrolled faces of a sweep: ``keys`` (N), HR (N,3,128,128) uint8, LR (N,3,32,32)
    uint8 and landmarks (N,5,2) in HR pixels (None if the manifest has none)."""

    keys: list[str]
    hr: torch.Tensor
    lr: torch.Tensor
    landmarks: torch.Tensor | None
    records: list = field(default_factory=list)


def load_face(prepared_dir: Path, record) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One prepared face: HR (128, 128, 3) and LR (32, 32, 3) uint8, landmarks (5, 2) in HR
    pixels or None when the record has no usable ones."""
    hr = np.ascontiguousarray(record.load_hr(prepared_dir))
    lr = np.ascontiguousarray(record.load_lr(prepared_dir))
    try:
        lm = np.asarray(record.landmarks_in_crop(hr.shape[0]), dtype=np.float32)
        lm = lm if lm.shape == (5, 2) and np.isfinite(lm).all() else None
    except (AttributeError, TypeError, ValueError):
        lm = None
    return hr, lr, lm


def load_face_set(prepared_dir: Path, key_to_record: dict, show_progress: bool = True, workers: int | None = None) -> FaceSet:
    """Read the HR and LR faces of the matched records (threaded: PNG decoding releases the GIL)."""
    keys = sorted(key_to_record)
    workers = workers or min(16, os.cpu_count() or 1)
    records = [key_to_record[key] for key in keys]
    hrs, lrs, lms = [], [], []
    with make_progress("face", disable=not show_progress) as progress, ThreadPoolExecutor(workers) as pool:
        task = progress.add_task("load faces", total=len(keys))
        for hr, lr, lm in pool.map(lambda record: load_face(prepared_dir, record), records):
            hrs.append(hr)
            lrs.append(lr)
            lms.append(lm)
            progress.advance(task)
    if not keys:
        raise SweepError(f"{prepared_dir}: none of the pair images has a prepared face")
    hr_t = torch.from_numpy(np.stack(hrs)).permute(0, 3, 1, 2).contiguous()
    lr_t = torch.from_numpy(np.stack(lrs)).permute(0, 3, 1, 2).contiguous()
    landmarks = torch.from_numpy(np.stack(lms)) if all(lm is not None for lm in lms) else None
    return FaceSet(keys, hr_t, lr_t, landmarks, records)


def source_photo_path(prepared_dir: Path, record) -> Path:
    """The original photo a prepared face was cut from (``prepare.json`` names the source folders;
    with several, ``record.source`` starts with the folder's name)."""
    settings = json.loads((Path(prepared_dir) / "prepare.json").read_text())
    roots = [Path(r) for r in settings.get("sources", [])]
    roots = [r if r.is_dir() else r.parent for r in roots]
    if len(roots) == 1:
        return roots[0] / record.source
    head, _, rest = str(record.source).partition("/")
    for root in roots:
        if root.name == head:
            return root / rest
    raise SweepError(f"{prepared_dir}: cannot locate the source photo of {record.source}")


# ----------------------------------------------------------------------------- embeddings


class EmbeddingCache:
    """Embeddings per (system, alpha) in ``folder`` as .npy, so an interrupted sweep resumes.

    The fingerprint covers the face keys, the prepared manifest, the face model and the
    system's weights file, so a changed input never reuses stale embeddings.
    """

    def __init__(self, folder: Path | None, fingerprint: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint

    def _key(self, system_id: str, alpha: float | None) -> str:
        """The name-independent end of a cache file's name: the alpha and a digest of what made it."""
        digest = hashlib.sha256(f"{self.fingerprint}|{system_id}|{alpha}".encode()).hexdigest()[:16]
        tag = "hr" if alpha is None else f"a{alpha:.3f}"
        return f"{tag}_{digest}.npy"

    def _path(self, system: str, system_id: str, alpha: float | None) -> Path | None:
        if self.folder is None:
            return None
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in system)
        return self.folder / f"{safe}_{self._key(system_id, alpha)}"

    def get(self, system_id: str, alpha: float | None, n: int) -> torch.Tensor | None:
        """The cached embeddings of ``system_id`` at ``alpha``, whatever display name they were
        saved under (the same weights reached as ``default``, ``fsr_default`` or a path)."""
        if self.folder is None:
            return None
        path = next(iter(sorted(self.folder.glob(f"*_{self._key(system_id, alpha)}"))), None)
        if path is None:
            return None
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return torch.from_numpy(arr) if arr.shape[0] == n else None

    def put(self, system: str, system_id: str, alpha: float | None, emb: torch.Tensor) -> None:
        path = self._path(system, system_id, alpha)
        if path is None:
            return
        buffer = io.BytesIO()
        np.save(buffer, emb.numpy(), allow_pickle=False)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())


def _model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap digest of a network's weights (the first values of every parameter)."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# The card fields that change what a system outputs in a sweep; the rest of a card (measurements,
# notes, the validated ``lr_face_range`` that only routes faces in ``fsr upscale``) can be updated
# without invalidating cached embeddings.
OUTPUT_CARD_FIELDS = ("architecture", "arch_args", "scale", "input_size")


def _system_fingerprint(system) -> str:
    """What identifies a system for the cache, whatever spec named it: single pass or mirror
    ensemble, the card fields that shape its output and a digest of its weights."""
    if system.model is None:
        return "single|bicubic"
    passes = "mirror-ensemble" if system.self_ensemble else "single"
    shape = json.dumps({key: getattr(system.card, key) for key in OUTPUT_CARD_FIELDS}, sort_keys=True, default=str)
    return f"{passes}|" + hashlib.sha256(f"{shape}|{_model_fingerprint(system.model)}".encode()).hexdigest()[:16]


def embed_system(
    faces: FaceSet,
    system,
    alpha: float,
    embedder: IdentityEmbedder,
    chunk: int,
    progress=None,
    task=None,
) -> torch.Tensor:
    """LR -> alpha_degrade -> system.upscale -> embedding, for every face; (N, D) on the CPU."""
    device = embedder.compute.device
    out = []
    for start in range(0, len(faces.keys), chunk):
        lr = faces.lr[start : start + chunk].to(device, non_blocking=True).float().div_(255.0)
        lr = alpha_degrade(lr, alpha)
        sr = system.upscale(lr)
        lm = None if faces.landmarks is None else faces.landmarks[start : start + chunk]
        out.append(embedder.embed_batched(sr, lm))
        if progress is not None:
            progress.advance(task, lr.shape[0])
    return torch.cat(out)


def embed_source_photos(prepared_dir: Path, faces: FaceSet, embedder: IdentityEmbedder, chunk: int,
                        progress=None, task=None) -> torch.Tensor:
    """Embed the original photos at their own resolution, aligned with the detected landmarks
    (source pixels): the reference anchor's HR condition. Photos are read one at a time and
    batched by size; (N, D)."""
    photos = (
        (np.array(read_image(source_photo_path(prepared_dir, record)).rgb_uint8()), np.asarray(record.landmarks, np.float32))
        for record in faces.records
    )
    on_batch = None if progress is None else (lambda n: progress.advance(task, n))
    return embedder.embed_photos(photos, chunk, on_batch)


def embed_hr(faces: FaceSet, embedder: IdentityEmbedder, chunk: int, progress=None, task=None) -> torch.Tensor:
    out = []
    for start in range(0, len(faces.keys), chunk):
        hr = faces.hr[start : start + chunk].float().div_(255.0)
        lm = None if faces.landmarks is None else faces.landmarks[start : start + chunk]
        out.append(embedder.embed_batched(hr, lm))
        if progress is not None:
            progress.advance(task, hr.shape[0])
    return torch.cat(out)


# ----------------------------------------------------------------------------- scoring


def score_pairs(pairs: list[Pair], index: dict[str, int], emb: torch.Tensor, embedder: IdentityEmbedder, score: str) -> np.ndarray:
    """Pair scores (P,) from embeddings: ``distance`` or ``cosine``; NaN where a face is missing."""
    ok = np.array([p.a in index and p.b in index for p in pairs])
    out = np.full(len(pairs), np.nan)
    if ok.any():
        a = torch.tensor([index[p.a] for p, k in zip(pairs, ok) if k])
        b = torch.tensor([index[p.b] for p, k in zip(pairs, ok) if k])
        out[ok] = embedder.compare(emb[a], emb[b])[score]
    return out


def threshold_grid(score: str) -> np.ndarray:
    """The reference protocol's grid: distances 0..4 step 0.0005 (the anchor used 0..2; the
    first maximiser is the same whenever it lies below 2); cosines -1..1 step 0.0005."""
    if score == "distance":
        return np.round(np.arange(8001) * 0.0005, 4)
    return np.round(np.arange(-2000, 2001) * 0.0005, 4)


@dataclass
class SweepResult:
    """Accuracy per system and alpha (``results[system][alpha]``) and the HR reference."""

    alphas: list[float]
    systems: list[str]
    results: dict[str, dict[float, VerificationResult]]
    hr: VerificationResult | None
    face_model: str
    score: str
    n_pairs: int
    n_images: int
    failed_images: list[str]
    n_failed_pairs: int
    threshold_search: str
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def average_accuracy(self, system: str) -> float:
        return float(np.mean([self.results[system][a].accuracy_mean for a in self.alphas]))

    @property
    def baseline(self) -> str | None:
        """The system the others are compared with, pair by pair: ``info["baseline"]`` (without
        that key: "bicubic"); None when it is not among the systems or there is only one."""
        wanted = self.info["baseline"] if "baseline" in self.info else "bicubic"
        if len(self.systems) < 2 or wanted not in self.systems:
            return None
        return wanted

    def paired(self) -> dict[str, dict[float, PairedComparison]]:
        """Every other system against :attr:`baseline` at every alpha (same pairs, same folds):
        accuracy difference, its per-fold standard error and the exact McNemar p-value."""
        base = self.baseline
        if base is None:
            return {}
        return {
            s: {a: paired_comparison(self.results[s][a], self.results[base][a]) for a in self.alphas}
            for s in self.systems
            if s != base
        }

    def to_dict(self) -> dict:
        return {
            "face_model": self.face_model,
            "score": self.score,
            "threshold_search": self.threshold_search,
            "alphas": self.alphas,
            "n_pairs": self.n_pairs,
            "n_images": self.n_images,
            "failed_to_enrol": {"images": len(self.failed_images), "pairs": self.n_failed_pairs, "keys": self.failed_images},
            "hr": self.hr.to_dict() if self.hr else None,
            "systems": {
                s: {
                    "average_accuracy": self.average_accuracy(s),
                    "by_alpha": {f"{a:g}": self.results[s][a].to_dict() for a in self.alphas},
                }
                for s in self.systems
            },
            "paired_vs_baseline": {
                "baseline": self.baseline,
                "test": "exact McNemar (two-sided) on per-pair decisions; delta_se = std of per-fold differences / sqrt(folds)",
                "systems": {s: {f"{a:g}": c.to_dict() for a, c in by_alpha.items()} for s, by_alpha in self.paired().items()},
            },
            "seconds": self.seconds,
            "timings": self.timings,
            **self.info,
        }


def check_sweep_arguments(prepared_dir: Path, systems: list[str], alphas, include_hr: bool, hr_source: str,
                          threshold_search: str) -> list[float]:
    """Refuse a sweep that cannot run, with one line; returns the sorted distinct alphas."""
    if not (prepared_dir / "manifest.csv").is_file():
        raise SweepError(f"{prepared_dir}: not a prepared set (no manifest.csv; run fsr prepare)")
    alphas = sorted({float(a) for a in alphas})
    for a in alphas:
        if not 0.0 < a <= 1.0:
            raise SweepError(f"alpha {a} is outside (0, 1]")
    if not systems and not include_hr:
        raise SweepError("nothing to evaluate: give at least one --system, or keep the HR reference")
    if hr_source not in ("crop", "photo"):
        raise SweepError(f"HR source must be crop or photo, got {hr_source!r}")
    if threshold_search not in ("grid", "exact"):
        raise SweepError(f"threshold search must be grid or exact, got {threshold_search!r}")
    return alphas


@dataclass
class NamedSystem:
    """An SR system of the sweep: its unique display ``name``, the ``--system`` ``spec`` it was
    loaded from, and ``cache_id`` (:func:`_system_fingerprint`: not the spec, so the same
    weights named another way reuse the cache)."""

    name: str
    spec: str
    system: object
    cache_id: str


def load_named_systems(specs: list[str], compute: Compute) -> list[NamedSystem]:
    """Load every ``--system`` spec; equal names get ``#2``, ``#3``... (never the HR row's name)."""
    loaded: list[NamedSystem] = []
    for spec in specs:
        system = load_sr_system(spec, compute)
        names = [s.name for s in loaded]
        base = system.name if system.name not in names and system.name != HR_NAME else spec
        name, k = base, 2
        while name in names or name == HR_NAME:
            name, k = f"{base}#{k}", k + 1
        loaded.append(NamedSystem(name, spec, system, _system_fingerprint(system)))
    return loaded


def choose_score(score: str | None, embedder: IdentityEmbedder, face_model: str) -> str:
    """``distance`` for a Euclidean face model, else ``cosine``, unless asked; distance needs Euclidean."""
    score = score or ("distance" if embedder.metric == "euclidean" else "cosine")
    if score == "distance" and embedder.metric != "euclidean":
        raise SweepError(f"--score distance needs a Euclidean face model; {face_model} is compared by cosine")
    return score


def sweep_fingerprint(prepared_dir: Path, faces: FaceSet, face_model: str, embedder: IdentityEmbedder) -> str:
    """What makes cached embeddings reusable: face keys, the manifest file, the face model's
    weights and the precision the SR and face networks run in (bf16 embeddings differ from fp32's)."""
    manifest = prepared_dir / "manifest.csv"
    stat = manifest.stat()
    identity = [faces.keys, str(manifest.resolve()), stat.st_size, stat.st_mtime, face_model, _model_fingerprint(embedder.model)]
    if embedder.compute is not None and embedder.compute.dtype != torch.float32:
        identity.append(precision_name(embedder.compute.dtype))  # fp32 keys stay as they were
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


@dataclass
class PairScorer:
    """Embeddings (N, D) -> pair scores -> 10-fold verification, for a fixed list of pairs."""

    pairs: list[Pair]
    index: dict[str, int]
    embedder: IdentityEmbedder
    score: str
    grid: np.ndarray | None

    def verify(self, emb: torch.Tensor) -> VerificationResult:
        scores = score_pairs(self.pairs, self.index, emb, self.embedder, self.score)
        same = np.array([p.same for p in self.pairs])
        fold_ids = np.array([p.fold for p in self.pairs])
        return kfold_verification(scores, same, fold_ids, higher_is_same=self.score == "cosine", grid=self.grid)


def embed_hr_reference(prepared_dir: Path, faces: FaceSet, scorer: PairScorer, cache: EmbeddingCache,
                       hr_source: str, chunk: int, progress, task) -> VerificationResult:
    """The alpha-independent HR row: HR crops (``crop``) or the source photos (``photo``), cached."""
    progress.update(task, description=f"embed HR ({hr_source})")
    n = len(faces.keys)
    emb = cache.get(f"hr-{hr_source}", None, n)
    if emb is None:
        if hr_source == "photo":
            emb = embed_source_photos(prepared_dir, faces, scorer.embedder, min(chunk, 64), progress, task)
        else:
            emb = embed_hr(faces, scorer.embedder, chunk, progress, task)
        cache.put(HR_NAME, f"hr-{hr_source}", None, emb)
    else:
        progress.advance(task, n)
    return scorer.verify(emb)


def embed_system_alphas(faces: FaceSet, named: NamedSystem, alphas: list[float], scorer: PairScorer,
                        cache: EmbeddingCache, chunk: int, progress, task) -> dict[float, VerificationResult]:
    """One system at every alpha (cached per alpha): alpha -> verification result."""
    n = len(faces.keys)
    results = {}
    for alpha in alphas:
        progress.update(task, description=f"{named.name} a={alpha:g}")
        emb = cache.get(named.cache_id, alpha, n)
        if emb is None:
            emb = embed_system(faces, named.system, alpha, scorer.embedder, chunk, progress, task)
            cache.put(named.name, named.cache_id, alpha, emb)
        else:
            progress.advance(task, n)
        results[alpha] = scorer.verify(emb)
    return results


def run_sweep(
    prepared_dir: str | Path,
    pairs_path: str | Path,
    systems: list[str],
    compute: Compute,
    alphas: tuple[float, ...] | list[float] = DEFAULT_ALPHAS,
    face_model: str = "dlib",
    face_weights: str | None = None,
    score: str | None = None,
    folds: int | None = None,
    limit: int | None = None,
    include_hr: bool = True,
    hr_source: str = "crop",
    threshold_search: str = "grid",
    cache_dir: str | Path | None = None,
    chunk: int = 1024,
    show_progress: bool = True,
    baseline: str | None = "bicubic",
) -> SweepResult:
    """Run the verification sweep (see the module docstring) and return every result.

    ``baseline``: the system (its --system spec or its name) every other system is compared
    with pair by pair (:meth:`SweepResult.paired`); ignored when it is not among ``systems``."""
    started = time.perf_counter()
    prepared_dir = Path(prepared_dir)
    alphas = check_sweep_arguments(prepared_dir, systems, alphas, include_hr, hr_source, threshold_search)
    pairs = select_pairs(read_pairs(pairs_path), folds, limit)
    if not pairs:
        raise SweepError(f"{pairs_path}: no pairs selected")

    key_to_record, missing = match_records(sorted({k for p in pairs for k in (p.a, p.b)}), read_manifest(prepared_dir))
    faces = load_face_set(prepared_dir, key_to_record, show_progress)
    index = {k: i for i, k in enumerate(faces.keys)}
    t_load = time.perf_counter() - started

    embedder = IdentityEmbedder(create_face_model(face_model, weights=face_weights, compute=compute), compute)
    score = choose_score(score, embedder, face_model)
    scorer = PairScorer(pairs, index, embedder, score, threshold_grid(score) if threshold_search == "grid" else None)
    loaded = load_named_systems(systems, compute)
    cache = EmbeddingCache(Path(cache_dir) if cache_dir else None, sweep_fingerprint(prepared_dir, faces, face_model, embedder))

    n = len(faces.keys)
    total = n * (len(loaded) * len(alphas) + (1 if include_hr else 0))
    t1 = time.perf_counter()
    with make_progress("face", disable=not show_progress) as progress:
        task = progress.add_task("embed", total=total)
        hr_result = embed_hr_reference(prepared_dir, faces, scorer, cache, hr_source, chunk, progress, task) if include_hr else None
        results = {named.name: embed_system_alphas(faces, named, alphas, scorer, cache, chunk, progress, task) for named in loaded}
    synchronize(compute.device)
    t_embed = time.perf_counter() - t1
    return SweepResult(
        alphas=alphas,
        systems=[named.name for named in loaded],
        results=results,
        hr=hr_result,
        face_model=face_model,
        score=score,
        n_pairs=len(pairs),
        n_images=n,
        failed_images=missing,
        n_failed_pairs=sum(1 for p in pairs if p.a not in index or p.b not in index),
        threshold_search=threshold_search,
        seconds=time.perf_counter() - started,
        timings={"load_faces_s": t_load, "embed_and_score_s": t_embed, "faces_embedded": total,
                 "faces_per_s": total / t_embed if t_embed > 0 else math.nan},
        info={"hr_source": hr_source, "prepared": str(prepared_dir), "pairs_file": str(pairs_path), "device": compute.describe(),
              "machine": machine_description(), "system_specs": {named.name: named.spec for named in loaded},
              "baseline": next((named.name for named in loaded if baseline in (named.name, named.spec)), None)},
    )


# ----------------------------------------------------------------------------- outputs


def sweep_table(result: SweepResult):
    """Rich table in Table 3's layout: average accuracy over alpha and accuracy at alpha = 1."""
    from rich.table import Table

    at_one = 1.0 in result.alphas
    table = Table(title=f"LFW verification vs alpha ({result.face_model}, {result.score}, {result.n_pairs} pairs)")
    table.add_column("system")
    table.add_column("avg acc", justify="right")
    table.add_column("acc α=1", justify="right")
    table.add_column("± std", justify="right")
    table.add_column("AUC α=1", justify="right")
    table.add_column("TAR@FAR1e-3 α=1", justify="right")
    for s in result.systems:
        r1 = result.results[s].get(1.0) if at_one else None
        table.add_row(
            s,
            f"{result.average_accuracy(s):.4f}",
            f"{r1.accuracy_mean:.4f}" if r1 else "-",
            f"{r1.accuracy_std:.4f}" if r1 else "-",
            f"{r1.auc:.4f}" if r1 else "-",
            f"{r1.tar_at_far_1e3:.4f}" if r1 else "-",
        )
    if result.hr is not None:
        h = result.hr
        label = f"{HR_NAME} ({'photo' if result.info.get('hr_source') == 'photo' else 'crop'})"
        table.add_row(label, f"{h.accuracy_mean:.4f}", f"{h.accuracy_mean:.4f}", f"{h.accuracy_std:.4f}", f"{h.auc:.4f}", f"{h.tar_at_far_1e3:.4f}")
    table.caption = "avg acc: mean over the alphas; HR is alpha-independent"
    return table


def alpha_table(result: SweepResult):
    """Rich table of accuracy per alpha (rows) and system (columns)."""
    from rich.table import Table

    table = Table(title="accuracy by alpha")
    table.add_column("alpha", justify="right")
    for s in result.systems:
        table.add_column(s, justify="right")
    for a in result.alphas:
        table.add_row(f"{a:g}", *[f"{result.results[s][a].accuracy_mean:.4f}" for s in result.systems])
    return table


def sweep_paired_table(result: SweepResult, significance: float = 0.05):
    """Rich table: accuracy difference to the baseline per alpha and system, with the exact
    McNemar p-value; None when there is nothing to compare."""
    from rich.table import Table

    paired = result.paired()
    if not paired:
        return None
    table = Table(title=f"accuracy minus {result.baseline}, pair by pair (McNemar p)")
    table.add_column("alpha", justify="right")
    for s in paired:
        table.add_column(s, justify="right")
    for a in result.alphas:
        cells = []
        for s in paired:
            c = paired[s][a]
            style = ("green" if c.delta > 0 else "red") if c.p_value < significance else ""
            text = f"{c.delta * 100:+.2f} pt (p={c.p_value:.2g})"
            cells.append(f"[{style}]{text}[/]" if style else text)
        table.add_row(f"{a:g}", *cells)
    table.caption = f"pt = percentage points; coloured where p < {significance:g} (green: better than {result.baseline})"
    return table


#: Old name (``fsr.evaluate.metrics.paired_table`` is a different table); kept for callers.
paired_table = sweep_paired_table


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """Fig. 7: accuracy vs alpha, one curve per system, HR as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for s in result.systems:
        acc = [result.results[s][a].accuracy_mean for a in result.alphas]
        ax.plot(result.alphas, acc, marker="o", label=s)
    if result.hr is not None:
        ax.axhline(result.hr.accuracy_mean, color="black", linestyle="--", label=f"{HR_NAME} ({result.hr.accuracy_mean:.3f})")
    ax.set_xlabel("downsampling factor alpha")
    n_folds = len(result.hr.fold_accuracies) if result.hr else len(result.results[result.systems[0]][result.alphas[0]].fold_accuracies)
    ax.set_ylabel(f"verification accuracy ({n_folds}-fold)")
    ax.set_title(f"LFW verification vs alpha ({result.face_model})")
    ax.set_xlim(0, 1.02)
    ax.grid(True, alpha=0.3)
    values = [result.results[s][a].accuracy_mean for s in result.systems for a in result.alphas]
    values += [result.hr.accuracy_mean] if result.hr is not None else []
    if values:
        ax.set_ylim(max(0.0, min(values) - 0.03), min(1.0, max(values) + 0.02))
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


def write_sweep(result: SweepResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``sweep.json``, ``sweep.csv`` (one row per system and alpha, HR with alpha empty)
    and ``sweep.png`` (Fig. 7) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "sweep.json"
    write_json(json_path, result.to_dict())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    n_folds = len(result.hr.fold_accuracies) if result.hr else len(next(iter(next(iter(result.results.values())).values())).fold_accuracies)
    writer.writerow(["system", "alpha", "accuracy_mean", "accuracy_std", "auc", "tar_at_far_1e3", "n_pairs", "n_failed",
                     *[f"fold{i}" for i in range(n_folds)]])
    rows = [(s, f"{a:g}", result.results[s][a]) for s in result.systems for a in result.alphas]
    if result.hr is not None:
        rows.append((HR_NAME, "", result.hr))
    for s, a, r in rows:
        writer.writerow([s, a, f"{r.accuracy_mean:.6f}", f"{r.accuracy_std:.6f}", f"{r.auc:.6f}", f"{r.tar_at_far_1e3:.6f}",
                         r.n_pairs, r.n_failed, *[f"{x:.6f}" for x in r.fold_accuracies]])
    csv_path = out_dir / "sweep.csv"
    atomic_write_text(csv_path, buffer.getvalue())
    png_path = plot_sweep(result, out_dir / "sweep.png")
    paths = {"json": json_path, "csv": csv_path, "png": png_path}
    paired = result.paired()
    if paired:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["system", "baseline", "alpha", "delta", "delta_se", "wins", "losses", "mcnemar_p"])
        for s, by_alpha in paired.items():
            for a, c in by_alpha.items():
                writer.writerow([s, result.baseline, f"{a:g}", f"{c.delta:.6f}", f"{c.delta_se:.6f}", c.wins, c.losses, f"{c.p_value:.6g}"])
        paths["paired_csv"] = out_dir / "paired.csv"
        atomic_write_text(paths["paired_csv"], buffer.getvalue())
    return paths
