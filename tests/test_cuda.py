"""CUDA correctness: the GPU paths give the CPU's answers on real faces.

Skipped where torch sees no CUDA GPU (CI); `benchmarks/device_checks.sh` runs them on the
device machine with ``FSR_SHARED_DATA`` pointing at the packed kit.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fsr.core.device import Compute
from fsr.data.degrade import bicubic_down
from tests.conftest import LFW_DIR, REFERENCE_DIR, lfw_centre_face

# FSR_TEST_GPU=cpu runs these checks CPU-against-CPU: a dry run of the tests' own code
GPU = os.environ.get("FSR_TEST_GPU", "cuda")
pytestmark = pytest.mark.skipif(GPU.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA GPU")

# LFW images that are in the device kit as well (benchmarks/device_kit.py packs them)
LFW_NAMES = ["Aaron_Eckhart", "Catherine_Deneuve", "Erika_Harold", "George_Papandreou", "Vladimiro_Montesinos"]


def _lfw_faces(count: int) -> torch.Tensor:
    """(N, 3, 128, 128) in [0, 1]: centre crops of LFW photos (``lfw_centre_face``)."""
    paths = sorted(p for name in LFW_NAMES for p in (LFW_DIR / name).glob("*.jpg"))
    paths += sorted(p for p in LFW_DIR.glob("*/*.jpg") if p.parent.name not in LFW_NAMES)
    return torch.stack([lfw_centre_face(p) for p in paths[:count]])


def test_mtcnn_on_cuda_matches_the_reference_and_the_cpu():
    from fsr.detect.mtcnn import MTCNN

    from .test_mtcnn import load_reference_image, parity

    reference = json.loads((REFERENCE_DIR / "mtcnn_reference.json").read_text())
    keys = [k for k in sorted(reference["detections"]) if k.startswith("lfw/")][::10]
    gpu = MTCNN.load(Compute.create(GPU))
    stats = parity(gpu, reference, keys)
    assert stats["images_with_other_count"] == 0, stats
    assert stats["within_1px"] >= 0.99 * stats["faces"], stats
    images = [load_reference_image(k) for k in keys]
    for on_gpu, on_cpu in zip(gpu.detect(images), MTCNN.load().detect(images)):
        assert len(on_gpu) == len(on_cpu)
        assert np.abs(on_gpu.boxes - on_cpu.boxes).max(initial=0) < 0.05


def test_default_model_on_cuda_matches_the_cpu():
    from fsr.models.systems import load_sr_system

    hr = _lfw_faces(64)
    lr = (bicubic_down(hr, 4) * 255).round() / 255
    cpu = load_sr_system("default", Compute.create("cpu", "fp32", 16))(lr)
    for precision in ("fp32", "bf16") if GPU.startswith("cuda") else ("fp32",):
        gpu = load_sr_system("default", Compute.create(GPU, precision, 32))(lr)
        assert gpu.shape == cpu.shape and gpu.device.type == "cpu"
        agreement = float(10 * torch.log10(1 / ((gpu - cpu) ** 2).mean()))
        assert agreement > (60 if precision == "fp32" else 38), (precision, agreement)

        def psnr(x: torch.Tensor) -> float:
            return float((10 * torch.log10(1 / ((x - hr) ** 2).mean(dim=(1, 2, 3)))).mean())

        assert psnr(gpu) == pytest.approx(psnr(cpu), abs=0.05)


def test_dlib_embeddings_on_cuda_match_the_cpu():
    from fsr.evaluate.identity import FaceEmbedder, load_face_model

    faces = _lfw_faces(32)
    embeddings = {}
    for name, device in (("cpu", "cpu"), ("gpu", GPU)):
        compute = Compute.create(device, "fp32", 16)
        embeddings[name] = FaceEmbedder(load_face_model("dlib", None, compute), compute).embed(faces)
    gap = (embeddings["gpu"] - embeddings["cpu"]).norm(dim=1)
    assert float(gap.max()) < 1e-3, gap  # dlib's same-person rule is a distance of 0.6


def test_training_runs_and_resumes_on_cuda(tmp_path):
    from fsr.cli import app

    src = tmp_path / "src"
    for name in LFW_NAMES:
        for photo in sorted((LFW_DIR / name).glob("*.jpg"))[:4]:
            (src / name).mkdir(parents=True, exist_ok=True)
            (src / name / photo.name).write_bytes(photo.read_bytes())
    data = tmp_path / "faces"
    prepared = CliRunner().invoke(app, ["prepare", str(src), str(data), "--val-fraction", "0.2", "--test-fraction", "0",
                                        "--device", GPU, "--no-progress"])
    assert prepared.exit_code == 0, prepared.output
    run = tmp_path / "run"
    common = ["--device", GPU, "--no-progress", "--set", "model.nf=16", "--set", "model.nb=1", "--set", "model.gc=8",
              "--set", "loss.perceptual_net=identity", "--set", "train.log_every=5", "--set", "train.checkpoint_every=10",
              "--set", "train.val_every=10", "--batch-size", "8"]
    first = CliRunner().invoke(app, ["train", str(data), "--run-dir", str(run), "--preset", "ipfsrgan", "--steps", "10", *common])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(app, ["train", str(data), "--run-dir", str(run), "--resume", "--steps", "20", *common])
    assert second.exit_code == 0, second.output
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in logs if r["kind"] == "train"]
    assert [r["step"] for r in train][-1] >= 15
    for record in train:
        for key in ("l_pixel", "l_identity", "l_g_total"):
            assert np.isfinite(record[key]), record
    assert [r for r in logs if r["kind"] == "val"]
