"""The shared compute core: device/precision policy, OOM back-off, bicubic degradation, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fsr.core.device as device_module
from fsr.core.batching import BatchSizer, run_batched
from fsr.core.device import Compute, DeviceError, resolve_device, resolve_precision
from fsr.core.io import atomic_path, read_image, to_tensor
from fsr.data.degrade import alpha_degrade, bicubic_down
from fsr.models.systems import load_sr_system

from .conftest import LFW_DIR


def test_cpu_never_runs_fp16_and_runs_bf16_only_with_native_instructions(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == torch.float32
    with pytest.warns(UserWarning, match="fp16"):
        assert resolve_precision("fp16", cpu) == torch.float32
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert resolve_precision("bf16", cpu) == torch.float32
    assert resolve_precision("auto", cpu, cpu_auto_bf16=True) == torch.float32
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("auto", cpu) == torch.float32  # inference stays fp32 on a CPU
    assert resolve_precision("auto", cpu, cpu_auto_bf16=True) == torch.bfloat16  # what fsr train asks
    assert resolve_precision("fp32", cpu, cpu_auto_bf16=True) == torch.float32


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    flags = "fpu vme sse sse2 avx avx2 fma avx512f avx512bw avx512vl"
    avx512_only, with_bf16 = tmp_path / "avx512", tmp_path / "bf16"
    avx512_only.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    with_bf16.write_text(f"processor\t: 0\nflags\t\t: {flags} avx512_bf16 avx512_vnni\n")
    assert not device_module.cpu_has_native_bf16(str(avx512_only))  # AVX-512 alone emulates bf16
    assert device_module.cpu_has_native_bf16(str(with_bf16))
    assert not device_module.cpu_has_native_bf16(str(tmp_path / "missing"))


def test_bad_device_requests_are_clear_errors():
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(DeviceError, match="unknown precision"):
        resolve_precision("int8", torch.device("cpu"))


def test_run_batched_backs_off_on_out_of_memory():
    seen: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        if x.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return x * 2

    sizer = BatchSizer(16)
    out = run_batched(fn, torch.arange(10.0)[:, None], sizer)
    assert torch.equal(out[:, 0], torch.arange(10.0) * 2)
    assert sizer.batch_size == 2  # 16 -> 8 -> 4 -> 2 and it stays there
    assert seen[:4] == [10, 8, 4, 2]


def test_run_batched_reraises_other_errors():
    def fn(x):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_batched(fn, torch.zeros(4, 1), 2)


def test_bicubic_down_matches_pil_on_real_faces():
    worst = 0
    for path in sorted(LFW_DIR.glob("A*/*_0001.jpg"))[:8]:
        rgb = read_image(path).rgb[61:189, 61:189]
        ref = np.asarray(Image.fromarray(rgb).resize((32, 32), Image.BICUBIC)).astype(int)
        ours = (bicubic_down(to_tensor(rgb)[None], 4)[0] * 255).round().permute(1, 2, 0).numpy().astype(int)
        worst = max(worst, int(np.abs(ours - ref).max()))
    assert worst <= 1


def test_alpha_degrade_keeps_size_and_loses_detail():
    rgb = read_image(sorted(LFW_DIR.glob("B*/*_0001.jpg"))[0]).rgb[61:189, 61:189]
    lr = bicubic_down(to_tensor(rgb)[None], 4)
    assert torch.equal(alpha_degrade(lr, 1.0), lr)
    errors = [float((alpha_degrade(lr, a) - lr).abs().mean()) for a in (0.8, 0.5, 0.2)]
    assert all(alpha_degrade(lr, a).shape == lr.shape for a in (0.8, 0.5, 0.2))
    assert errors[0] < errors[1] < errors[2]
    with pytest.raises(ValueError):
        alpha_degrade(lr, 0.0)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_outputs_get_the_usual_permissions_even_when_the_writer_recreates_the_file(tmp_path):
    import os
    import stat

    from fsr.core.weights import save_safetensors

    umask = os.umask(0o022)
    try:
        save_safetensors({"w": torch.zeros(3)}, tmp_path / "w.safetensors")  # safetensors writes 0600 itself
        with atomic_path(tmp_path / "plain.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(umask)
    for name in ("w.safetensors", "plain.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_bicubic_system_upscales_x4():
    system = load_sr_system("bicubic", Compute.create("cpu"))
    out = system(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 3, 128, 128) and 0 <= float(out.min()) and float(out.max()) <= 1
