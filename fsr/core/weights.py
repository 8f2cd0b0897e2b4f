"""Weights: one checked loader for every weights file, and where fsr looks for files.

fsr never unpickles an untrusted file: shipped and exported weights are safetensors;
user-supplied PyTorch checkpoints (SphereFace, LightCNN, VGG19, BasicSR RRDB) are read
with ``torch.load(weights_only=True)``.

Every file is checked against the SHA-256 recorded for it, wherever it was found:
an expected digest given by the caller (the shipped ``SHA256SUMS`` for fsr's own files),
a ``SHA256SUMS`` in the file's folder, the ``sha256`` of its model card (``NAME.json``
beside ``NAME.safetensors``, written at export), or the tensor digest fsr records in
a safetensors file's own metadata (``fsr.tensors_sha256``). A mismatch is a one-line
:class:`WeightsError` naming the file.

Search order for a weights file named by its file name:
1. an explicit path given by the user (``--weights``),
2. ``$FSR_WEIGHTS_DIR`` (a folder; several may be joined with ``os.pathsep``),
3. the shipped weights (``weights/`` in a checkout, ``fsr/_weights`` in an installed wheel),
4. ``~/.cache/fsr/weights``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fsr.core.io import atomic_path, atomic_write_text


def _shipped_weights_dir() -> Path:
    """The shipped weights: ``fsr/_weights`` when installed from a wheel, else the checkout's ``weights/``."""
    packaged = Path(__file__).resolve().parents[1] / "_weights"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "weights"


SHIPPED_WEIGHTS_DIR = _shipped_weights_dir()
CHECKSUM_FILE = "SHA256SUMS"
TENSORS_DIGEST_KEY = "fsr.tensors_sha256"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


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


def shipped_checksums(folder: Path | None = None) -> dict[str, str]:
    """``{file name: sha256}`` from ``folder/SHA256SUMS`` (``sha256sum`` format; default: the shipped weights)."""
    sums: dict[str, str] = {}
    path = (SHIPPED_WEIGHTS_DIR if folder is None else folder) / CHECKSUM_FILE
    try:
        lines = path.read_text().splitlines() if path.is_file() else []
    except (OSError, UnicodeDecodeError):
        return sums
    for line in lines:
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2 and not parts[0].startswith("#"):
            sums[parts[1].lstrip("*").strip()] = parts[0].lower()
    return sums


def verify_sha256(path: str | os.PathLike, expected: str, recorded_in: str = "") -> None:
    """Raise :class:`WeightsError` unless ``path`` hashes to ``expected``."""
    actual = sha256_file(path)
    if actual != expected.lower():
        where = f" recorded in {recorded_in}" if recorded_in else ""
        raise WeightsError(
            f"{path}: SHA-256 mismatch (expected {expected[:16]}…{where}, got {actual[:16]}…); "
            "the file is corrupt or not the one fsr was built for"
        )


def recorded_sha256(path: str | os.PathLike) -> tuple[str, str] | None:
    """(digest, where it is recorded) for a weights file, or None when nothing records one.

    Looked up in ``SHA256SUMS`` beside the file, then in the model card ``NAME.json`` beside it.
    """
    path = Path(path)
    listed = shipped_checksums(path.parent).get(path.name)
    if listed:
        return listed, str(path.parent / CHECKSUM_FILE)
    card = path.with_suffix(".json")
    if path.suffix == ".safetensors" and card.is_file():
        try:
            digest = json.loads(card.read_text()).get("sha256")
        except (OSError, ValueError, AttributeError):
            digest = None  # an unreadable card is reported by the card's own reader
        if isinstance(digest, str) and _HEX64.match(digest.lower()):
            return digest.lower(), str(card)
    return None


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - any parse failure means a broken file
        raise WeightsError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None


def state_dict_mismatch(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], ignored_keys: tuple[str, ...] = ()
) -> str | None:
    """What keeps ``state`` from loading into a model whose state dict is ``expected``, in one
    short phrase (missing keys, unexpected keys, wrong shapes, three examples of each), or None."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in ignored_keys]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} wrong shapes (e.g. {'; '.join(wrong_shape[:3])})")
    return "; ".join(problems) or None


def load_safetensors(
    path: str | os.PathLike,
    *,
    sha256: str | None = None,
    fallback_sha256: str | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking it against every SHA-256 recorded for it.

    ``sha256``: the digest the file must have (always checked). Otherwise the digest in
    ``SHA256SUMS`` or the model card beside the file is checked; when neither exists,
    ``fallback_sha256`` (e.g. the shipped file's digest) is. Independently, a tensor digest
    stored in the file's metadata at export is verified after loading.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    record = (sha256, "the caller") if sha256 else recorded_sha256(path)
    if record is None and fallback_sha256:
        record = (fallback_sha256, f"fsr's {CHECKSUM_FILE}")
    if record is not None:
        verify_sha256(path, record[0], record[1])
    metadata = _safetensors_metadata(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    recorded = metadata.get(TENSORS_DIGEST_KEY)
    if recorded and tensors_sha256(tensors) != recorded:
        raise WeightsError(
            f"{path}: tensor digest mismatch (the digest recorded in the file at export does not match its "
            "contents); the file is corrupt"
        )
    return tensors


def save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    *,
    record_digest: bool = False,
) -> str:
    """Save atomically as safetensors; returns the file's SHA-256.

    ``record_digest``: store :func:`tensors_sha256` in the metadata, so the file can be
    verified on load even without its card.
    """
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if record_digest:
        metadata = {**(metadata or {}), TENSORS_DIGEST_KEY: tensors_sha256(contiguous)}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)
    return sha256_file(path)


_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80"  # pickle protocol opcode that starts legacy torch.save files
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _checkpoint_problem(path: Path, exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``: a broken file or pickled code."""
    text = str(exc)
    unsafe = _UNSAFE_GLOBAL.search(text)
    if unsafe:
        return (
            f"refused: the checkpoint contains pickled Python objects ({unsafe.group(1)}) that fsr will not run; "
            "save it as a plain state dict of tensors"
        )
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head.startswith(_ZIP_MAGIC) and not head.startswith(_LEGACY_MAGIC):
        return "not a valid PyTorch checkpoint (unrecognised file content)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in lines if "error:" in line.lower() or "failed" in line.lower()), lines[0] if lines else "")
    return f"not a valid PyTorch checkpoint: the file is truncated or corrupt ({detail[:160]})"


def load_torch_checkpoint(path: str | os.PathLike, *, sha256: str | None = None) -> object:
    """Load a user-supplied PyTorch checkpoint without running pickled code.

    Checked against ``sha256`` or a ``SHA256SUMS`` beside it when one exists; a refusal says
    whether the file is broken or holds pickled code.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    record = (sha256, "the caller") if sha256 else recorded_sha256(path)
    if record is not None:
        verify_sha256(path, record[0], record[1])
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: not a valid PyTorch checkpoint (empty file)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"{path}: {_checkpoint_problem(path, exc)}") from None


def update_checksums(folder: Path, names: list[str]) -> None:
    """Recompute and store SHA-256 lines for ``names`` in ``folder/SHA256SUMS``."""
    sums = shipped_checksums(folder)
    for name in names:
        sums[name] = sha256_file(folder / name)
    lines = [f"{digest}  {name}" for name, digest in sorted(sums.items())]
    atomic_write_text(folder / CHECKSUM_FILE, "\n".join(lines) + "\n")
