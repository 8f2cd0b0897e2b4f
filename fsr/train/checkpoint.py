"""Atomic training checkpoints and the generator export read by ``fsr upscale``.

Layout of ``RUN_DIR/checkpoints``::

    step_00005000/                  one complete checkpoint
        generator.safetensors       G
        generator_ema.safetensors   EMA of G (when enabled)
        discriminator.safetensors   D (GAN presets)
        state.pt                    optimizers, schedulers, RNG, step, best metric:
                                    tensors and plain values only, read with weights_only=True
        COMPLETE                    JSON: step and SHA-256 of every file, written last
    latest                          name of the newest checkpoint (informational)

A checkpoint is written into a hidden temporary folder, every file fsync'ed, the marker
written last, and the folder renamed into place in one ``os.replace``. A SIGKILL at any
moment leaves either the previous checkpoints untouched plus a stray temporary folder
(ignored and removed on the next save) or the new complete one: resuming never reads a
half-written file, and :func:`find_latest_checkpoint` re-checks every file's hash.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from fsr.core.io import atomic_write_text, write_json
from fsr.core.weights import (
    WeightsError,
    load_safetensors,
    load_torch_checkpoint,
    save_safetensors,
    sha256_file,
)
from fsr.models.sr import ModelCard, export_sr_model

MARKER = "COMPLETE"


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped."""


STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_path(path)
    except OSError:  # some file systems do not allow fsync on directories
        pass


@dataclass
class Checkpoint:
    """A complete checkpoint on disk."""

    path: Path
    step: int

    def _digests(self) -> dict[str, str]:
        """``{file name: sha256}`` recorded in the marker."""
        try:
            return dict(json.loads((self.path / MARKER).read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            raise WeightsError(f"{self.path / MARKER}: unreadable checkpoint marker") from None

    def load_models(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"generator": state_dict, "generator_ema": ..., "discriminator": ...}`` (those present),
        each checked against the SHA-256 in the marker."""
        digests = self._digests()
        return {
            file.stem: load_safetensors(file, sha256=digests.get(file.name))
            for file in sorted(self.path.glob("*.safetensors"))
        }

    def load_state(self) -> dict:
        """Optimizer/scheduler/RNG/step state, loaded with ``torch.load(weights_only=True)``."""
        state = load_torch_checkpoint(self.path / STATE_FILE, sha256=self._digests().get(STATE_FILE))
        if not isinstance(state, dict) or "step" not in state:
            raise WeightsError(f"{self.path / STATE_FILE}: not an fsr training state")
        return state


def save_checkpoint(root: str | Path, step: int, models: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep: int = 2) -> Checkpoint:
    """Write a checkpoint for ``step`` atomically; keep the newest ``keep`` (>= 1) checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    digests = {}
    for model_name, tensors in models.items():
        path = tmp / f"{model_name}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
        _fsync_path(path)
        digests[path.name] = sha256_file(path)
    state_path = tmp / STATE_FILE
    with open(state_path, "wb") as fh:
        torch.save({**state, "step": int(step)}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    digests[STATE_FILE] = sha256_file(state_path)
    marker = tmp / MARKER
    with open(marker, "w") as fh:
        json.dump({"step": int(step), "files": digests}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    final = root / name
    if final.exists():  # re-saving the same step (e.g. after a resume): move the old one aside first
        trash = root / f".old-{name}-{time.monotonic_ns()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", name + "\n")
    _prune(root, keep=max(1, keep), protect=final)
    return Checkpoint(final, step)


def _prune(root: Path, keep: int, protect: Path) -> None:
    complete = sorted(_complete_dirs(root), key=lambda c: c.step)
    for ckpt in complete[:-keep]:
        if ckpt.path != protect:
            shutil.rmtree(ckpt.path, ignore_errors=True)
    for stray in root.glob(".tmp-*"):
        if stray.is_dir() and not stray.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stray, ignore_errors=True)
    for stray in root.glob(".old-*"):
        shutil.rmtree(stray, ignore_errors=True)


def _complete_dirs(root: Path) -> list[Checkpoint]:
    found = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / MARKER).is_file():
            found.append(Checkpoint(child, int(match.group(1))))
    return found


def verify_checkpoint(ckpt: Checkpoint) -> bool:
    """True when the marker parses and every listed file exists with the recorded SHA-256."""
    try:
        info = json.loads((ckpt.path / MARKER).read_text())
        files = info["files"]
        return int(info["step"]) == ckpt.step and STATE_FILE in files and all(
            (ckpt.path / name).is_file() and sha256_file(ckpt.path / name) == digest for name, digest in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_latest_checkpoint(root: str | Path) -> Checkpoint | None:
    """The newest complete, hash-verified checkpoint under ``root`` (None when there is none).

    A checkpoint whose marker is present but whose files do not match it (damaged after it
    was written) is skipped with a :class:`CheckpointWarning` naming it.
    """
    for ckpt in sorted(_complete_dirs(Path(root)), key=lambda c: c.step, reverse=True):
        if verify_checkpoint(ckpt):
            return ckpt
        warnings.warn(
            f"{ckpt.path}: checkpoint is corrupt (its files do not match the SHA-256 in {MARKER}); "
            "skipped, using the next older one",
            CheckpointWarning,
            stacklevel=2,
        )
    return None


def save_best(run_dir: str | Path, tensors: dict[str, torch.Tensor], info: dict) -> Path:
    """Keep the best validation generator as ``RUN_DIR/best/generator.safetensors`` + ``best.json``."""
    best = Path(run_dir) / "best"
    best.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, best / "generator.safetensors", record_digest=True)
    write_json(best / "best.json", info)
    return best


def export_generator(tensors: dict[str, torch.Tensor], out_path: str | Path, card: dict) -> tuple[Path, Path]:
    """Write ``NAME.safetensors`` + ``NAME.json`` through :func:`fsr.models.sr.export_sr_model`.

    ``card``: the JSON form of a :class:`fsr.models.sr.ModelCard` (at least ``architecture``
    and ``arch_args``; ``scale`` defaults to 4).
    """
    for key in ("architecture", "arch_args"):
        if key not in card:
            raise ValueError(f"model card lacks '{key}'")
    return export_sr_model(tensors, out_path, ModelCard.from_dict(card, name=Path(out_path).stem))
