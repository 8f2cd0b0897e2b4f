"""Convert dlib's face recognition ResNet v1 to ``weights/dlib_resnet_v1.safetensors``.

    python -m tools.convert_dlib [--dat PATH] [--out weights/] [--data ../shared/data]

1. Reads ``dlib_face_recognition_resnet_model_v1.dat`` (from the PyPI package
   ``face-recognition-models==0.3.0`` unless ``--dat`` is given; SHA-256 checked) with fsr's
   numpy reader of dlib's serialisation (no code is executed) and maps it onto
   :class:`~fsr.models.face.dlib_resnet.DlibResNet`.
2. Computes the mean descriptor used to centre dlib descriptors (``model.normalize``) with the
   port itself, on TRAINING faces only: every ``--celeba-step``-th image of
   ``celeba_train/`` and every ``--lfw-step``-th image of the LFW identities that
   ``pairs.txt`` never names; faces found by fsr's MTCNN (the detection nearest the image
   centre), aligned with the MTCNN template. LFW ``pairs.txt`` identities are never used.
3. Saves safetensors (with metadata) atomically and records its SHA-256 in ``SHA256SUMS``.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch

from fsr.core.batching import make_progress
from fsr.core.device import Compute
from fsr.core.io import ImageReadError, iter_image_files, read_image
from fsr.core.weights import SHIPPED_WEIGHTS_DIR, save_safetensors, sha256_file, update_checksums
from fsr.detect.mtcnn import MTCNN
from fsr.models.face.dlib_resnet import DLIB_WEIGHTS_FILE, DlibResNet
from fsr.models.face.pipeline import central_face_landmarks, embed_photos
from tools.dlib_format import read_dlib_metric_network

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
DAT_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def find_dat() -> Path:
    """The .dat file inside the installed ``face_recognition_models`` package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise SystemExit(
            f"{DAT_NAME}: package face-recognition-models is not installed "
            "(pip install face-recognition-models==0.3.0, or pass --dat PATH)"
        )
    return Path(spec.origin).parent / "models" / DAT_NAME


def pairs_identities(pairs_file: Path) -> set[str]:
    """Identity names referenced by LFW ``pairs.txt`` (the evaluation identities)."""
    names: set[str] = set()
    for line in pairs_file.read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) == 3:
            names.add(parts[0])
        elif len(parts) == 4:
            names.update((parts[0], parts[2]))
    return names


def training_images(data: Path, celeba_step: int, lfw_step: int) -> list[Path]:
    """celeba_train images (every celeba_step-th) + LFW images of identities not in pairs.txt."""
    celeba = iter_image_files(data / "celeba_train")[::celeba_step]
    lfw_root = data / "lfw" / "lfw-deepfunneled"
    excluded = pairs_identities(data / "lfw" / "pairs.txt")
    lfw = [p for p in iter_image_files(lfw_root) if p.parent.name not in excluded][::lfw_step]
    return celeba + lfw


@torch.no_grad()
def mean_descriptor(
    model: DlibResNet, images: list[Path], compute: Compute, min_face: float = 40, batch: int = 64
) -> tuple[torch.Tensor, int]:
    """Mean raw descriptor over the faces MTCNN finds in ``images`` (the one nearest the centre)."""
    detector = MTCNN.load(compute)
    total = np.zeros(128, dtype=np.float64)
    count = 0
    with make_progress("img") as progress:
        task = progress.add_task("mean descriptor", total=len(images))
        for start in range(0, len(images), batch):
            photos = []
            for path in images[start : start + batch]:
                try:
                    photos.append(read_image(path).rgb_uint8())
                except ImageReadError as exc:
                    print(f"skipped {exc}")
            marks = central_face_landmarks(detector, photos, min_face=min_face, retry_min_face=None)
            kept = [p for p, ok in zip(photos, marks.found) if ok]
            if kept:
                total += embed_photos(model, kept, marks.landmarks[marks.found]).astype(np.float64).sum(0)
                count += len(kept)
            progress.advance(task, len(photos))
    return torch.from_numpy(total / max(count, 1)).float(), count


def convert(
    dat: Path | None,
    out_dir: Path,
    data: Path,
    celeba_step: int,
    lfw_step: int,
    compute: Compute,
    min_face: float = 40,
) -> Path:
    """Convert, compute the mean descriptor, save; returns the safetensors path."""
    dat = dat or find_dat()
    digest = sha256_file(dat)
    if digest != DAT_SHA256:
        raise SystemExit(f"{dat}: SHA-256 {digest[:16]}… is not the known {DAT_NAME} ({DAT_SHA256[:16]}…)")
    network = read_dlib_metric_network(dat)
    state = dlib_state_dict_from_dat(network)
    model = DlibResNet()
    model.load_state_dict(state)
    model.freeze().place(compute)
    images = training_images(data, celeba_step, lfw_step)
    mean, count = mean_descriptor(model, images, compute, min_face=min_face)
    state["mean_descriptor"] = mean
    out = out_dir / DLIB_WEIGHTS_FILE
    metadata = {
        "source": f"{DAT_NAME} (face-recognition-models 0.3.0), sha256 {DAT_SHA256}",
        # the module name the shipped file records; kept so the output stays byte-identical to it
        "converter": "python -m fsr.models.face.convert_dlib",
        "input": "RGB 150x150, (x - (122.782, 117.001, 104.298)) / 256",
        "mean_descriptor": (
            f"mean raw descriptor of {count} training faces (celeba_train every {celeba_step}th image, "
            f"LFW identities not in pairs.txt every {lfw_step}th image), fsr MTCNN (min_face {min_face}) "
            "landmarks of the face nearest the centre, fsr alignment"
        ),
    }
    save_safetensors(state, out, metadata)
    if out_dir.resolve() == SHIPPED_WEIGHTS_DIR.resolve():
        update_checksums(out_dir, [DLIB_WEIGHTS_FILE])
    print(f"wrote {out} ({sha256_file(out)}); mean descriptor over {count} faces")
    return out


def dlib_state_dict_from_dat(network) -> dict[str, torch.Tensor]:
    """Map a parsed :class:`~tools.dlib_format.DlibNetwork` onto DlibResNet's keys.

    Checks the layer sequence against the fixed architecture while doing so.
    """
    model = DlibResNet()
    convs = [l for l in network.layers if l.kind == "con"]
    affines = [l for l in network.layers if l.kind == "affine"]
    fcs = [l for l in network.layers if l.kind == "fc"]
    conv_modules = [model.conv1] + [m for s in model.stages for b in s for m in (b.conv1, b.conv2)]
    affine_modules = [model.affine1] + [m for s in model.stages for b in s for m in (b.affine1, b.affine2)]
    if len(convs) != len(conv_modules) or len(affines) != len(affine_modules) or len(fcs) != 1:
        raise ValueError(
            f"layer counts differ from dlib ResNet v1: {len(convs)} con, {len(affines)} affine, {len(fcs)} fc"
        )
    state: dict[str, torch.Tensor] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for layer, module in zip(convs, conv_modules):
        f = layer.fields
        expect = (module.stride[0], module.padding[0], module.kernel_size[0])
        got = (f["stride_y"], f["padding_y"], f["nr"])
        if expect != got or tuple(layer.tensors["weight"].shape) != tuple(module.weight.shape):
            raise ValueError(f"conv {names[id(module)]}: dlib has stride/pad/kernel {got}, port expects {expect}")
        state[f"{names[id(module)]}.weight"] = torch.from_numpy(layer.tensors["weight"].copy())
        state[f"{names[id(module)]}.bias"] = torch.from_numpy(layer.tensors["bias"].copy())
    for layer, module in zip(affines, affine_modules):
        state[f"{names[id(module)]}.gamma"] = torch.from_numpy(layer.tensors["gamma"].reshape(-1).copy())
        state[f"{names[id(module)]}.beta"] = torch.from_numpy(layer.tensors["beta"].reshape(-1).copy())
    state["fc.weight"] = torch.from_numpy(fcs[0].tensors["weight_in_out"].T.copy())
    state["mean_descriptor"] = torch.zeros(128)
    model.load_state_dict(state, strict=True)  # shape check
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert dlib's face ResNet v1 .dat to safetensors")
    parser.add_argument("--dat", type=Path, default=None, help=f"path to {DAT_NAME} (default: installed package)")
    parser.add_argument("--out", type=Path, default=SHIPPED_WEIGHTS_DIR, help="output folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder (celeba_train, lfw)")
    parser.add_argument("--celeba-step", type=int, default=4, help="use every N-th celeba_train image")
    parser.add_argument("--lfw-step", type=int, default=2, help="use every N-th non-pairs LFW image")
    parser.add_argument("--min-face", type=float, default=40, help="MTCNN minimum face size in pixels")
    parser.add_argument("--device", default="cpu", help="auto|cpu|cuda[:N]")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = parser.parse_args()
    compute = Compute.create(args.device, "fp32", threads=args.threads)
    convert(args.dat, args.out, args.data, args.celeba_step, args.lfw_step, compute, args.min_face)


if __name__ == "__main__":
    main()
