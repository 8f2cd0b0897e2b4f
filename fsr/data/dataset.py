"""Training data for ``fsr train``: faces from a prepared set, identity-aware batches, flips.

A prepared set (``fsr prepare``; interface B, ``fsr.data.manifest``) or a compact cache made
from one (:func:`write_face_cache`: one compressed ``.npz`` of uint8 crops, identities,
landmarks and splits, to ship training data to a remote GPU machine) is loaded into memory
as uint8 arrays (6,000 faces of 128x128 are 300 MB). Batches are made by index on the
training device (``on_device``: the whole uint8 set lives there; no host->device copy per
step) or on the host with a prefetching thread and pinned memory.

Every batch is a pure function of (seed, step, rank): resuming or prefetching never
changes which faces a step sees, so an interrupted run replays exactly.
"""

from __future__ import annotations

import queue
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fsr.core.batching import make_progress
from fsr.core.io import atomic_path
from fsr.data.degrade import JPEG_BLOCK, bicubic_down, degrade_through, jpeg_degrade, quantise_8bit, resize_bicubic
from fsr.data.manifest import read_manifest

HR_SIZE = 128
SCALE = 4
LR_SIZE = HR_SIZE // SCALE
# MTCNN landmark order: left eye, right eye, nose, mouth left, mouth right. A horizontal
# flip swaps left and right.
FLIP_LANDMARK_ORDER = [1, 0, 2, 4, 3]


class DatasetError(RuntimeError):
    """A prepared set or cache that cannot be used for training."""


@dataclass
class FaceArrays:
    """All faces of a prepared set in memory.

    hr: (N, 128, 128, 3) uint8 RGB; lr: (N, 32, 32, 3) uint8 or None (made on the fly);
    landmarks: (N, 5, 2) float32 in HR-crop pixels; identity: (N,) int64 index into
    ``identity_names``; split: (N,) str ("train" | "val" | "test"); face_ids: (N,) str.
    """

    hr: np.ndarray
    lr: np.ndarray | None
    landmarks: np.ndarray
    identity: np.ndarray
    identity_names: list[str]
    split: np.ndarray
    face_ids: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.hr.shape[0])

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def _encode_identities(names: list[str]) -> tuple[np.ndarray, list[str]]:
    unique = sorted(set(names))
    lookup = {name: i for i, name in enumerate(unique)}
    return np.array([lookup[n] for n in names], dtype=np.int64), unique


def load_face_arrays(data: str | Path | list | tuple, *, with_lr: bool = False,
                     splits: tuple[str, ...] | None = None, max_faces: int = 0, progress: bool = False) -> FaceArrays:
    """Load a prepared set (folder with ``manifest.csv``) or a cache (``.npz``) into memory;
    a list of them is loaded one by one and concatenated (:func:`concat_face_arrays`).

    A face whose crop cannot be read is reported (one line, naming the file) and skipped.
    """
    if isinstance(data, (list, tuple)):
        if len(data) == 1:
            data = data[0]
        else:
            return concat_face_arrays([load_face_arrays(d, with_lr=with_lr, splits=splits, max_faces=max_faces,
                                                        progress=progress) for d in data])
    data = Path(data)
    if data.is_file() and data.suffix == ".npz":
        return _load_cache(data, with_lr=with_lr, splits=splits)
    if not data.is_dir():
        raise DatasetError(f"{data}: not a prepared face folder or .npz cache")
    if not (data / "manifest.csv").is_file():
        raise DatasetError(f"{data}: no manifest.csv (run `fsr prepare` first, or it has not finished)")
    records = [r for r in read_manifest(data) if splits is None or r.split in splits]
    if max_faces:
        records = records[:max_faces]
    if not records:
        raise DatasetError(f"{data}: the manifest lists no faces{' in splits ' + ','.join(splits) if splits else ''}")
    hr = np.empty((len(records), HR_SIZE, HR_SIZE, 3), np.uint8)
    lr = np.empty((len(records), HR_SIZE // SCALE, HR_SIZE // SCALE, 3), np.uint8) if with_lr else None
    keep: list[int] = []
    with make_progress("face", disable=not progress, transient=True) as bar:
        task = bar.add_task("loading faces", total=len(records))
        for i, record in enumerate(records):
            try:
                face = record.load_hr(data)
                if face.shape != (HR_SIZE, HR_SIZE, 3):
                    raise ValueError(f"HR crop is {face.shape}, expected {HR_SIZE}x{HR_SIZE}x3")
                hr[i] = face
                if lr is not None:
                    small = record.load_lr(data)
                    if small.shape != lr.shape[1:]:
                        raise ValueError(f"LR crop is {small.shape}, expected {lr.shape[1:]}")
                    lr[i] = small
                keep.append(i)
            except Exception as exc:  # noqa: BLE001 - a bad file is reported and skipped
                warnings.warn(f"{data / record.hr}: skipped ({exc})", stacklevel=2)
            bar.advance(task)
    if not keep:
        raise DatasetError(f"{data}: none of the {len(records)} faces could be read")
    idx = np.array(keep)
    records = [records[i] for i in keep]
    identity, names = _encode_identities([r.identity for r in records])
    return FaceArrays(
        hr=hr[idx], lr=None if lr is None else lr[idx],
        landmarks=np.stack([np.asarray(r.landmarks_in_crop(HR_SIZE), np.float32) for r in records]),
        identity=identity, identity_names=names,
        split=np.array([r.split for r in records]), face_ids=np.array([r.face_id for r in records]),
        source=str(data),
    )


def concat_face_arrays(parts: list[FaceArrays]) -> FaceArrays:
    """One :class:`FaceArrays` from several (e.g. the same faces prepared at several margins).

    Identities are matched by name across the parts, so an identity keeps one split and
    one index; ``face_ids`` are prefixed with the part's position (``0:``, ``1:``...).
    """
    names = [parts[k].identity_names[i] for k in range(len(parts)) for i in parts[k].identity]
    identity, unique = _encode_identities(names)
    with_lr = all(p.lr is not None for p in parts)
    return FaceArrays(
        hr=np.concatenate([p.hr for p in parts]), lr=np.concatenate([p.lr for p in parts]) if with_lr else None,
        landmarks=np.concatenate([p.landmarks for p in parts]), identity=identity, identity_names=unique,
        split=np.concatenate([p.split for p in parts]),
        face_ids=np.concatenate([np.char.add(f"{k}:", p.face_ids.astype(str)) for k, p in enumerate(parts)]),
        source=" + ".join(p.source for p in parts),
    )


def write_face_cache(prepared_dir: str | Path, out_path: str | Path, *, with_lr: bool = False,
                     splits: tuple[str, ...] = ("train", "val"), max_faces: int = 0, jpeg_quality: int = 0,
                     progress: bool = True) -> Path:
    """Pack a prepared set's crops into one compressed ``.npz`` (uint8; written atomically).

    The cache holds HR crops (LR too with ``with_lr``), identity names, landmarks in crop
    pixels, splits and face ids: everything training reads, in one file. Lossless by default
    (about 40 KiB per face); ``jpeg_quality`` (e.g. 95: about 10 KiB per face) stores the HR
    crops JPEG-encoded in one uint8 array, to fit a whole training set into a small upload.
    """
    arrays = load_face_arrays(prepared_dir, with_lr=with_lr, splits=splits, max_faces=max_faces, progress=progress)
    out_path = Path(out_path)
    if out_path.suffix != ".npz":
        raise DatasetError(f"{out_path}: cache file name must end in .npz")
    payload = {
        "landmarks": arrays.landmarks,
        "identity": np.array([arrays.identity_names[i] for i in arrays.identity]),
        "split": arrays.split, "face_ids": arrays.face_ids,
    }
    if jpeg_quality:
        import cv2

        blobs = []
        for face in arrays.hr:
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(face[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
            if not ok:
                raise DatasetError(f"{out_path}: JPEG encoding failed")
            blobs.append(buf.reshape(-1))
        payload["hr_jpeg"] = np.concatenate(blobs).astype(np.uint8)
        payload["hr_jpeg_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    else:
        payload["hr"] = arrays.hr
    if arrays.lr is not None:
        payload["lr"] = arrays.lr
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **payload)
    return out_path


def _load_cache(path: Path, *, with_lr: bool, splits: tuple[str, ...] | None) -> FaceArrays:
    try:
        with np.load(path, allow_pickle=False) as npz:
            content = {k: npz[k] for k in npz.files}
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"{path}: not a readable face cache ({exc})") from None
    for key in ("landmarks", "identity", "split", "face_ids"):
        if key not in content:
            raise DatasetError(f"{path}: face cache lacks '{key}'")
    if "hr" not in content:
        if "hr_jpeg" not in content or "hr_jpeg_offsets" not in content:
            raise DatasetError(f"{path}: face cache lacks 'hr'")
        import cv2

        blob, offsets = content.pop("hr_jpeg"), content.pop("hr_jpeg_offsets")
        faces = []
        for start, end in zip(offsets[:-1], offsets[1:]):
            face = cv2.imdecode(blob[start:end], cv2.IMREAD_COLOR)
            if face is None or face.shape != (HR_SIZE, HR_SIZE, 3):
                raise DatasetError(f"{path}: corrupt JPEG face in the cache")
            faces.append(face[:, :, ::-1])
        content["hr"] = np.stack(faces)
    if with_lr and "lr" not in content:
        raise DatasetError(f"{path}: face cache has no LR crops (made without --with-lr); use data.lr_source=bicubic")
    keep = np.arange(len(content["split"])) if splits is None else np.flatnonzero(np.isin(content["split"], splits))
    identity, names = _encode_identities([str(s) for s in content["identity"][keep]])
    return FaceArrays(
        hr=content["hr"][keep], lr=content["lr"][keep] if with_lr else None,
        landmarks=content["landmarks"][keep].astype(np.float32), identity=identity, identity_names=names,
        split=content["split"][keep].astype(str), face_ids=content["face_ids"][keep].astype(str), source=str(path),
    )


def split_train_val(arrays: FaceArrays, val_split: str = "val", val_fraction: float = 0.05,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation faces.

    Uses the manifest's ``train`` and ``val_split`` splits; when the set has no faces in
    ``val_split``, holds out ``val_fraction`` of the training identities (whole identities,
    chosen by ``seed``) so that validation faces are never trained on.
    """
    train = arrays.indices("train")
    val = arrays.indices(val_split)
    if len(val) or val_fraction <= 0:
        return train, val
    ids = np.unique(arrays.identity[train])
    if len(ids) < 2:
        return train, val
    rng = np.random.default_rng([seed, 7919])
    held = rng.choice(ids, size=max(1, int(round(len(ids) * val_fraction))), replace=False)
    is_val = np.isin(arrays.identity[train], held)
    return train[~is_val], train[is_val]


class IdentityBatchSampler:
    """Batches that always hold same-identity faces (positive pairs for Eq. 5).

    Each batch of ``batch_size`` is ``groups`` identities x ``faces_per_identity`` faces
    (identities with at least two faces), the rest drawn uniformly from all faces.
    ``groups`` defaults to half the batch in groups. ``batch(step)`` is a pure function of
    (seed, step, rank): exact resume and per-rank data for DDP without any saved state.
    """

    def __init__(self, identity: np.ndarray, batch_size: int, faces_per_identity: int = 2,
                 groups: int | None = None, seed: int = 0, rank: int = 0) -> None:
        self.identity = np.asarray(identity)
        self.batch_size = int(batch_size)
        self.k = max(2, int(faces_per_identity))
        self.seed = int(seed)
        self.rank = int(rank)
        order = np.argsort(self.identity, kind="stable")
        ids, starts, counts = np.unique(self.identity[order], return_index=True, return_counts=True)
        self._members = {int(i): order[s:s + c] for i, s, c in zip(ids, starts, counts)}
        self._eligible = np.array([int(i) for i, c in zip(ids, counts) if c >= 2], dtype=np.int64)
        if len(self._eligible) == 0:
            raise DatasetError("no identity has two or more faces: Eq. 5 needs same-identity pairs")
        default_groups = max(1, self.batch_size // (2 * self.k))
        self.groups = min(groups if groups is not None else default_groups, max(1, self.batch_size // self.k))

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices (B,) into ``identity``, flips (B,) bool) for training step ``step``."""
        rng = np.random.default_rng([self.seed, int(step), self.rank])
        n_groups = self.groups
        chosen_ids = rng.choice(self._eligible, size=n_groups, replace=len(self._eligible) < n_groups)
        picked: list[np.ndarray] = []
        for identity in chosen_ids:
            members = self._members[int(identity)]
            take = min(self.k, len(members))
            picked.append(rng.choice(members, size=take, replace=False))
        indices = np.concatenate(picked)[: self.batch_size]
        rest = self.batch_size - len(indices)
        if rest > 0:
            indices = np.concatenate([indices, rng.integers(0, len(self.identity), size=rest)])
        flips = rng.random(self.batch_size) < 0.5
        return indices.astype(np.int64), flips


@dataclass
class FaceBatch:
    """One training batch on the device.

    lr: (B, 3, 32, 32) float [0, 1]; hr: (B, 3, 128, 128) float [0, 1];
    landmarks: (B, 5, 2) float32 HR-crop pixels; identity: (B,) int64.
    """

    lr: torch.Tensor
    hr: torch.Tensor
    landmarks: torch.Tensor
    identity: torch.Tensor


def flip_landmarks(landmarks: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror (B, 5, 2) pixel landmarks of a horizontally flipped image: x -> W-1-x, left <-> right."""
    out = landmarks[:, FLIP_LANDMARK_ORDER].clone()
    out[..., 0] = (width - 1) - out[..., 0]
    return out


class FaceBatcher:
    """Makes :class:`FaceBatch` es from in-memory uint8 faces on ``device``.

    ``lr_source="bicubic"``: LR = 8-bit-rounded ``bicubic_down(HR)`` made on the device
    (the same antialiased bicubic as ``fsr prepare``); ``"disk"``: the prepared LR crops.
    ``on_device``: the uint8 faces are moved to ``device`` once; otherwise batches are
    gathered on the host and copied (pinned, non-blocking).
    """

    def __init__(self, arrays: FaceArrays, indices: np.ndarray, device: torch.device, *,
                 lr_source: str = "bicubic", flip: bool = True, on_device: bool = True,
                 channels_last: bool = False, alpha_augment: float = 0.0, alpha_min: float = 0.1,
                 scale_augment: float = 0.0, scale_min: float = 0.5, jpeg_augment: float = 0.0,
                 jpeg_quality: tuple[int, int] = (30, 95), seed: int = 0, rank: int = 0) -> None:
        if lr_source == "disk" and arrays.lr is None:
            raise DatasetError("data.lr_source=disk but the LR crops were not loaded")
        self.device = device
        self.lr_source = lr_source
        self.flip = flip
        self.channels_last = channels_last
        store = device if on_device else torch.device("cpu")
        self.store_device = store
        sel = np.asarray(indices)
        self.hr = torch.from_numpy(np.ascontiguousarray(arrays.hr[sel])).to(store)
        self.lr = torch.from_numpy(np.ascontiguousarray(arrays.lr[sel])).to(store) if lr_source == "disk" else None
        self.landmarks = torch.from_numpy(arrays.landmarks[sel]).to(store)
        self.identity_np = arrays.identity[sel]
        self.identity = torch.from_numpy(self.identity_np).to(store)
        self._pin = store.type == "cpu" and device.type == "cuda"
        self.alpha_augment = float(alpha_augment)
        self.alpha_min = float(alpha_min)
        self.scale_augment = float(scale_augment)
        self.scale_min = float(scale_min)
        if self.scale_augment > 0 and lr_source == "disk":
            raise DatasetError("data.scale_augment needs data.lr_source=bicubic (LR made from the rescaled HR)")
        self.jpeg_augment = float(jpeg_augment)
        self.jpeg_quality = (int(jpeg_quality[0]), int(jpeg_quality[1]))
        self.seed, self.rank = int(seed), int(rank)

    def __len__(self) -> int:
        return int(self.hr.shape[0])

    @staticmethod
    def _to(host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Copy a small host tensor to ``device`` without a stream sync (pinned, non-blocking):
        a pageable copy would make the host wait for all queued GPU work every step."""
        if device.type != "cuda":
            return host.to(device)
        return host.pin_memory().to(device, non_blocking=True)

    def degraded_sizes(self, step: int, n: int, lr_side: int = LR_SIZE) -> np.ndarray:
        """LR side per face for step ``step`` (0 = not degraded): a pure function of (seed, step, rank).

        A fraction ``alpha_augment`` of the faces gets a side drawn uniformly from
        [round(lr_side alpha_min), lr_side - 1], the degradation ``verify-sweep`` applies (``alpha_degrade``).
        """
        if self.alpha_augment <= 0:
            return np.zeros(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, int(step), self.rank, 0xA1FA])
        low = max(1, round(lr_side * self.alpha_min))
        sizes = rng.integers(low, max(low + 1, lr_side), size=n)
        return np.where(rng.random(n) < self.alpha_augment, sizes, 0)

    def jpeg_choices(self, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """JPEG quality per face for step ``step`` (0 = not compressed) and the (dy, dx) offset of
        its block grid, (n,) and (n, 2): a pure function of (seed, step, rank). A fraction
        ``jpeg_augment`` of the faces gets a quality drawn uniformly from ``jpeg_quality``."""
        if self.jpeg_augment <= 0:
            return np.zeros(n, dtype=np.int64), np.zeros((n, 2), dtype=np.int64)
        rng = np.random.default_rng([self.seed, int(step), self.rank, 0x1E6])
        low, high = self.jpeg_quality
        qualities = rng.integers(low, high + 1, size=n)
        offsets = rng.integers(0, JPEG_BLOCK, size=(n, 2))
        return np.where(rng.random(n) < self.jpeg_augment, qualities, 0), offsets

    def hr_side(self, step: int, full: int = HR_SIZE) -> int:
        """HR side of step ``step``'s batch: ``full`` or, with probability ``scale_augment``, a
        multiple of ``SCALE`` drawn uniformly from [scale_min * full, full] (a pure function of
        (seed, step, rank)). The whole batch is shrunk to it before its LR is made, so the model
        also learns smaller faces (scale_min 0.5: LR crops of 16-32 px)."""
        if self.scale_augment <= 0:
            return full
        rng = np.random.default_rng([self.seed, int(step), self.rank, 0x5CA1E])
        if rng.random() >= self.scale_augment:
            return full
        unit = SCALE
        low = max(1, int(np.ceil(full * self.scale_min / unit)))
        return int(unit * rng.integers(low, full // unit + 1))

    def make(self, indices: np.ndarray, flips: np.ndarray | None = None, step: int | None = None) -> FaceBatch:
        """Gather faces ``indices`` (into this batcher's subset), flip where ``flips``, make LR.

        With ``step`` and ``alpha_augment > 0``, some LR faces are further degraded as in the
        paper's Sec. V (resize to a smaller side and back to 32x32, antialiased bicubic), so
        the model also learns the inputs ``verify-sweep`` gives it.
        With ``step`` and ``jpeg_augment > 0``, some LR faces are then JPEG-compressed
        (:func:`~fsr.data.degrade.jpeg_degrade`), as faces cut from JPEG photos reach ``fsr upscale``.
        """
        idx = self._to(torch.from_numpy(np.asarray(indices, np.int64)), self.store_device)
        hr = self.hr.index_select(0, idx)
        lr = self.lr.index_select(0, idx) if self.lr is not None else None
        landmarks = self.landmarks.index_select(0, idx)
        identity = self.identity.index_select(0, idx)
        if self._pin:
            hr, landmarks, identity = hr.pin_memory(), landmarks.pin_memory(), identity.pin_memory()
            lr = lr.pin_memory() if lr is not None else None
        to = dict(device=self.device, non_blocking=True)
        hr = hr.to(**to).permute(0, 3, 1, 2).float().div_(255)
        lr = lr.to(**to).permute(0, 3, 1, 2).float().div_(255) if lr is not None else None
        landmarks = landmarks.to(**to)
        identity = identity.to(**to)
        if self.flip and flips is not None and flips.any():
            mask = self._to(torch.from_numpy(np.asarray(flips, bool)), self.device)
            hr = torch.where(mask[:, None, None, None], hr.flip(-1), hr)
            if lr is not None:
                lr = torch.where(mask[:, None, None, None], lr.flip(-1), lr)
            landmarks = torch.where(mask[:, None, None], flip_landmarks(landmarks, hr.shape[-1]), landmarks)
        if step is not None and self.scale_augment > 0:
            side = self.hr_side(step, hr.shape[-1])
            if side != hr.shape[-1]:
                landmarks = landmarks * (side / hr.shape[-1])
                hr = quantise_8bit(resize_bicubic(hr, side).clamp_(0, 1))
        if lr is None:
            lr = quantise_8bit(bicubic_down(hr, SCALE))
        if step is not None and self.alpha_augment > 0:
            lr = self._alpha_augment(lr, self.degraded_sizes(step, lr.shape[0], lr.shape[-1]))
        if step is not None and self.jpeg_augment > 0:
            lr = jpeg_degrade(lr, *self.jpeg_choices(step, lr.shape[0]))
        if self.channels_last:
            hr = hr.contiguous(memory_format=torch.channels_last)
            lr = lr.contiguous(memory_format=torch.channels_last)
        else:
            hr, lr = hr.contiguous(), lr.contiguous()
        return FaceBatch(lr=lr, hr=hr, landmarks=landmarks, identity=identity)

    @staticmethod
    def _alpha_augment(lr: torch.Tensor, sizes: np.ndarray) -> torch.Tensor:
        if not sizes.any():
            return lr
        lr = lr.clone()
        for side in np.unique(sizes[sizes > 0]):
            rows = torch.from_numpy(np.flatnonzero(sizes == side)).to(lr.device)
            lr[rows] = degrade_through(lr.index_select(0, rows), (int(side), int(side)))
        return lr

    def all_faces(self, limit: int = 0) -> FaceBatch:
        """The first ``limit`` faces (all when 0), unflipped: the validation batch."""
        n = len(self) if not limit else min(limit, len(self))
        return self.make(np.arange(n))


class Prefetcher:
    """Iterates (step, FaceBatch) for steps [start, end), preparing ``depth`` batches ahead
    in a background thread. Batches depend only on the step, so prefetching changes nothing."""

    def __init__(self, batcher: FaceBatcher, sampler: IdentityBatchSampler, start: int, end: int,
                 depth: int = 2, threaded: bool = True) -> None:
        self.batcher, self.sampler = batcher, sampler
        self.start, self.end = start, end
        self.threaded = threaded and depth > 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _produce(self) -> None:
        try:
            for step in range(self.start, self.end):
                if self._stop.is_set():
                    return
                batch = self.batcher.make(*self.sampler.batch(step), step=step)
                while not self._stop.is_set():
                    try:
                        self._queue.put((step, batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self._queue.put(exc)
        self._queue.put(None)

    def __iter__(self):
        if not self.threaded:
            for step in range(self.start, self.end):
                yield step, self.batcher.make(*self.sampler.batch(step), step=step)
            return
        self._thread = threading.Thread(target=self._produce, daemon=True, name="fsr-prefetch")
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while True:  # drain so the producer can exit
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=5)
            self._thread = None
