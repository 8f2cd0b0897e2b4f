"""Embedding throughput (faces/s) of each face model, with alignment from 5 landmarks.

    python benchmarks/embed.py [--device auto] [--precision auto] [--batch-size 64] [--faces 256]

dlib uses the shipped weights; SphereFace and LightCNN use random weights with the
published layouts (throughput does not depend on the values). The input is 250x250 RGB
photos with 5 landmarks (the LFW situation), so the figure includes the grid_sample
alignment. Also times a forward+backward pass (the identity loss in training).
"""

from __future__ import annotations

import argparse
import time

import torch

from fsr.core.device import Compute, machine_description, synchronize
from fsr.models.face import FACE_MODELS, create_face_model
from compute_args import add_compute_arguments


def build(name: str, compute: Compute):
    if name == "dlib":
        return create_face_model("dlib", compute=compute)
    cls, _ = FACE_MODELS[name]
    return cls().freeze().place(compute)  # random weights, published layout


def time_model(model, compute: Compute, batch: int, faces: int, backward: bool) -> float:
    """Faces per second over ``faces`` faces in batches of ``batch`` (after one warm-up batch)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, 250, 250, generator=g).to(compute.device)
    base = torch.tensor([[100.0, 115.0], [150.0, 115.0], [125.0, 145.0], [105.0, 170.0], [145.0, 170.0]])
    marks = (base + torch.randn(batch, 5, 2, generator=g)).to(compute.device)

    def step() -> None:
        if backward:
            x = images.clone().requires_grad_(True)
            model(x, marks).sum().backward()
        else:
            with torch.no_grad():
                model(images, marks)

    step()
    synchronize(compute.device)
    n_batches = max(1, faces // batch)
    start = time.perf_counter()
    for _ in range(n_batches):
        step()
    synchronize(compute.device)
    return n_batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_compute_arguments(parser, batch_size=64, batch_help="faces per batch", threads=2)
    parser.add_argument("--faces", type=int, default=256, help="faces timed per model")
    parser.add_argument("--models", default="dlib,sphereface,lightcnn", help="comma-separated model names")
    args = parser.parse_args()
    compute = Compute.create(args.device, args.precision, batch_size=args.batch_size, threads=args.threads)
    print(machine_description())
    print(f"compute: {compute.describe()}, batch {args.batch_size}, {args.faces} faces per model")
    print(f"{'model':<12}{'input':>10}{'dim':>6}{'faces/s':>12}{'fwd+bwd faces/s':>18}")
    for name in args.models.split(","):
        model = build(name.strip(), compute)
        fwd = time_model(model, compute, args.batch_size, args.faces, backward=False)
        bwd = time_model(model, compute, args.batch_size, args.faces, backward=True)
        h, w = model.input_size
        print(f"{name:<12}{f'{h}x{w}':>10}{model.embedding_dim:>6}{fwd:>12.1f}{bwd:>18.1f}")


if __name__ == "__main__":
    main()
