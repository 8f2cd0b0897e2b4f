"""Weights: safetensors loading with SHA-256 checks, and where fsr looks for files.

fsr never unpickles an untrusted file: shipped and exported weights are safetensors;
user-supplied PyTorch checkpoints (SphereFace, LightCNN, VGG19, BasicSR RRDB) are read
with ``torch.load(weights_only=True)``.

Search order for a weights file named by its file name:
1. an explicit path given by the user (``--weights``),
2. ``$FSR_WEIGHTS_DIR`` (a folder; several may be joined with ``os.pathsep``),
3. the repository's ``weights/`` folder (shipped files),
4. ``~/.cache/fsr/weights``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fsr.core.io import atomic_path, atomic_write_text

SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
CHECKSUM_FILE = "SHA256SUMS"


class WeightsError(RuntimeError):
    """A weights file that is missing, corrupt or of the wrong layout."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def search_dirs() -> list[Path]:
    """Folders searched for weights files, in order."""
    dirs: list[Path] = []
    env = os.environ.get("FSR_WEIGHTS_DIR")
    if env:
        dirs.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    dirs.append(SHIPPED_WEIGHTS_DIR)
    dirs.append(Path.home() / ".cache" / "fsr" / "weights")
    return dirs


def find_weights(filename: str, explicit: str | os.PathLike | None = None) -> Path | None:
    """Locate ``filename``: the explicit path if given, else the first search dir holding it."""
    if explicit:
        p = Path(explicit).expanduser()
        return p if p.is_file() else None
    for folder in search_dirs():
        candidate = folder / filename
        if candidate.is_file():
            return candidate
    return None


def shipped_checksums(folder: Path = SHIPPED_WEIGHTS_DIR) -> dict[str, str]:
    """``{file name: sha256}`` from ``folder/SHA256SUMS`` (``sha256sum`` format)."""
    sums: dict[str, str] = {}
    path = folder / CHECKSUM_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*").strip()] = digest
    return sums


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise :class:`WeightsError` unless ``path`` hashes to ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(
            f"{path}: SHA-256 mismatch (expected {expected[:16]}…, got {actual[:16]}…); "
            "the file is corrupt or not the one fsr was built for"
        )


def load_safetensors(
    path: str | os.PathLike, *, sha256: str | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Load a safetensors file, verifying its SHA-256 first when one is known.

    Files inside the shipped ``weights/`` folder are always checked against ``SHA256SUMS``.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if sha256 is None and path.resolve().parent == SHIPPED_WEIGHTS_DIR:
        sha256 = shipped_checksums().get(path.name)
    if sha256 is not None:
        verify_sha256(path, sha256)
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> str:
    """Save atomically as safetensors; returns the file's SHA-256."""
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)
    return sha256_file(path)


def load_torch_checkpoint(path: str | os.PathLike) -> object:
    """Load a user-supplied PyTorch checkpoint without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(
            f"{path}: cannot be loaded safely with torch.load(weights_only=True) ({str(exc).splitlines()[0]})"
        ) from None


def update_checksums(folder: Path, names: list[str]) -> None:
    """Recompute and store SHA-256 lines for ``names`` in ``folder/SHA256SUMS``."""
    sums = shipped_checksums(folder)
    for name in names:
        sums[name] = sha256_file(folder / name)
    lines = [f"{digest}  {name}" for name, digest in sorted(sums.items())]
    atomic_write_text(folder / CHECKSUM_FILE, "\n".join(lines) + "\n")


def write_json(path: str | os.PathLike, data: object) -> None:
    """Write JSON atomically, pretty-printed."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
