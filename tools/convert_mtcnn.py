"""Convert the original MTCNN weights shipped in PyPI ``mtcnn==1.0.0`` to ``weights/mtcnn.safetensors``.

Run once (needs the ``convert`` extra: mtcnn==1.0.0, joblib, lz4)::

    python -m tools.convert_mtcnn [--out weights/mtcnn.safetensors]

The package's ``mtcnn/assets/weights/{pnet,rnet,onet}.lz4`` are joblib pickles (lists of
float32 arrays in Keras ``get_weights()`` order). Unpickling runs code, so each file's
SHA-256 is checked against the pinned values below *before* ``joblib.load``; the
package itself (which imports TensorFlow) is never imported, only located.

Layouts: conv kernels HWIO -> OIHW; dense (in, out) -> (out, in); PReLU alphas
(1, 1, C) or (C,) -> (C,). Head order in the files: box regression, [landmarks], face
probability. Key names follow facenet-pytorch's modules (``fsr.detect.mtcnn``).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch

from fsr.core.weights import SHIPPED_WEIGHTS_DIR, WeightsError, save_safetensors, sha256_file, update_checksums
from fsr.detect.mtcnn import MTCNN

PINNED_SHA256 = {
    "pnet.lz4": "ea6b0c3e685ebee3165326ad6484acc95f2ef78f1c94fbf40a55704fa989f7b5",
    "rnet.lz4": "cb00e6460f3c98b0bfafaba3c0a0ded4bdf6e62cee7174d969e8670d7e757fee",
    "onet.lz4": "94f6ea2f4cf985275ee958cdd762d17b6009348a4fb9d8c6be39ba73ffd22ca3",
}

# Keras get_weights() order -> fsr key, per net. Kinds: conv, bias, prelu, dense.
LAYOUT = {
    "pnet": [
        ("conv1.weight", "conv"), ("conv1.bias", "bias"), ("prelu1.weight", "prelu"),
        ("conv2.weight", "conv"), ("conv2.bias", "bias"), ("prelu2.weight", "prelu"),
        ("conv3.weight", "conv"), ("conv3.bias", "bias"), ("prelu3.weight", "prelu"),
        ("conv4_2.weight", "conv"), ("conv4_2.bias", "bias"),  # box regression (4)
        ("conv4_1.weight", "conv"), ("conv4_1.bias", "bias"),  # face probability (2)
    ],
    "rnet": [
        ("conv1.weight", "conv"), ("conv1.bias", "bias"), ("prelu1.weight", "prelu"),
        ("conv2.weight", "conv"), ("conv2.bias", "bias"), ("prelu2.weight", "prelu"),
        ("conv3.weight", "conv"), ("conv3.bias", "bias"), ("prelu3.weight", "prelu"),
        ("dense4.weight", "dense"), ("dense4.bias", "bias"), ("prelu4.weight", "prelu"),
        ("dense5_2.weight", "dense"), ("dense5_2.bias", "bias"),
        ("dense5_1.weight", "dense"), ("dense5_1.bias", "bias"),
    ],
    "onet": [
        ("conv1.weight", "conv"), ("conv1.bias", "bias"), ("prelu1.weight", "prelu"),
        ("conv2.weight", "conv"), ("conv2.bias", "bias"), ("prelu2.weight", "prelu"),
        ("conv3.weight", "conv"), ("conv3.bias", "bias"), ("prelu3.weight", "prelu"),
        ("conv4.weight", "conv"), ("conv4.bias", "bias"), ("prelu4.weight", "prelu"),
        ("dense5.weight", "dense"), ("dense5.bias", "bias"), ("prelu5.weight", "prelu"),
        ("dense6_2.weight", "dense"), ("dense6_2.bias", "bias"),
        ("dense6_3.weight", "dense"), ("dense6_3.bias", "bias"),
        ("dense6_1.weight", "dense"), ("dense6_1.bias", "bias"),
    ],
}


def find_mtcnn_assets() -> Path:
    """The installed ``mtcnn`` package's weights folder, found without importing the package."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("the mtcnn package is not installed (pip install 'mtcnn==1.0.0' joblib lz4)")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "assets" / "weights"
        if folder.is_dir():
            return folder
    raise WeightsError("mtcnn is installed but has no assets/weights folder (need mtcnn==1.0.0)")


def _convert_array(array: np.ndarray, kind: str) -> torch.Tensor:
    if kind == "conv":
        array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif kind == "dense":
        array = array.T  # (in, out) -> (out, in)
    elif kind == "prelu":
        array = array.reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def load_keras_weights(path: Path) -> list[np.ndarray]:
    """Verify ``path`` against its pinned SHA-256, then unpickle it with joblib."""
    expected = PINNED_SHA256[path.name]
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsError(f"{path}: SHA-256 {actual} is not the pinned {expected}; refusing to unpickle it")
    import joblib  # only needed here

    return list(joblib.load(path))


def convert(assets: Path) -> dict[str, torch.Tensor]:
    """All three nets as one state dict with keys ``pnet.*``, ``rnet.*``, ``onet.*``."""
    tensors: dict[str, torch.Tensor] = {}
    for net, layout in LAYOUT.items():
        arrays = load_keras_weights(assets / f"{net}.lz4")
        if len(arrays) != len(layout):
            raise WeightsError(f"{net}.lz4: expected {len(layout)} arrays, found {len(arrays)}")
        for (key, kind), array in zip(layout, arrays):
            tensors[f"{net}.{key}"] = _convert_array(np.asarray(array), kind)
    # shape check against the torch modules
    MTCNN().load_state_dict(tensors, strict=True)
    return tensors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_WEIGHTS_DIR / "mtcnn.safetensors", help="output file")
    parser.add_argument("--assets", type=Path, default=None, help="folder with pnet/rnet/onet.lz4 (default: the installed mtcnn package)")
    args = parser.parse_args(argv)
    assets = args.assets or find_mtcnn_assets()
    tensors = convert(assets)
    # one metadata entry: safetensors stores metadata as a hash map, so several keys
    # would be written in varying order and the file's SHA-256 would not be reproducible
    import json

    metadata = {
        "fsr": json.dumps(
            {
                "source": "PyPI mtcnn==1.0.0 mtcnn/assets/weights/{pnet,rnet,onet}.lz4",
                "sha256": PINNED_SHA256,
                # the module name the shipped file records; kept so the output stays byte-identical to it
                "converter": "python -m fsr.detect.convert_mtcnn",
            },
            sort_keys=True,
        )
    }
    digest = save_safetensors(tensors, args.out, metadata)
    if args.out.resolve().parent == SHIPPED_WEIGHTS_DIR.resolve():
        update_checksums(SHIPPED_WEIGHTS_DIR, [args.out.name])
    print(f"wrote {args.out} ({len(tensors)} tensors, sha256 {digest})")


if __name__ == "__main__":
    main()
