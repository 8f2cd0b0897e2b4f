"""Device and precision policy shared by every subcommand.

One place decides where tensors live and in which dtype the heavy work runs:
``--device auto|cpu|cuda[:N]|mps`` and ``--precision auto|fp32|bf16|fp16``.
fp16 is never used on a CPU (it is slow there and breaks some ops): the request falls back to
fp32 with a warning. bf16 on a CPU is used only where the CPU has native bf16 instructions
(x86 AVX-512 BF16 or AMX, Arm BF16), which make a convolution step about 1.6x faster than fp32;
elsewhere it would be several times slower, and the request falls back to fp32 with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import warnings
from dataclasses import dataclass

import torch

DEVICE_CHOICES = "auto|cpu|cuda[:N]|mps"
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


class DeviceError(ValueError):
    """A device or precision request that cannot be satisfied here."""


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda[:N]|mps`` into a usable :class:`torch.device`.

    ``auto`` picks CUDA when available, then Apple's MPS, then the CPU.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device '{spec}' (expected {DEVICE_CHOICES})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{spec}' requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device '{spec}' requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError("device 'mps' requested but Apple MPS is not available on this machine")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device '{spec}' (expected {DEVICE_CHOICES})")
    return device


#: /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX-512 BF16 and AMX, Arm's BF16 extension.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.lru_cache(maxsize=4)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bf16 natively (read from ``cpuinfo``; False where unknown).

    Without such instructions oneDNN emulates bf16 and an autocast step is 5-20x slower than fp32.
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return any(flag in value.split() for flag in NATIVE_BF16_CPU_FLAGS)
    except OSError:
        pass
    return False


def resolve_precision(spec: str, device: torch.device, cpu_auto_bf16: bool = False) -> torch.dtype:
    """Pick the compute dtype for ``device``.

    ``auto``: bf16 on CUDA GPUs that support it, fp16 on older CUDA GPUs and on MPS, fp32 on the
    CPU (bf16 where ``cpu_auto_bf16`` and the CPU has native bf16: what ``fsr train`` asks for).
    ``bf16`` on a CPU without native bf16 and ``fp16`` on any CPU fall back to fp32 with a warning.
    """
    spec = (spec or "auto").strip().lower()
    if spec not in PRECISION_CHOICES:
        raise DeviceError(f"unknown precision '{spec}' (expected {'|'.join(PRECISION_CHOICES)})")
    if device.type == "cpu":
        if spec == "auto" and cpu_auto_bf16 and cpu_has_native_bf16():
            return torch.bfloat16
        if spec == "bf16":
            if cpu_has_native_bf16():
                return torch.bfloat16
            warnings.warn("precision bf16: this CPU has no native bf16 instructions (AVX-512 BF16, AMX), "
                          "where bf16 runs several times slower than fp32; running in fp32", stacklevel=2)
        elif spec == "fp16":
            warnings.warn("precision fp16 is not used on the CPU; running in fp32", stacklevel=2)
        return torch.float32
    if spec == "fp32":
        return torch.float32
    if spec == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("bf16 requested but this GPU does not support it; use --precision fp16")
        return torch.bfloat16
    if spec == "fp16":
        return torch.float16
    # auto
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast context for ``dtype`` on ``device``; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (CUDA/MPS) to finish; a no-op on the CPU. For timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op CPU threads; ``None`` or 0 keeps torch's default (all cores)."""
    if threads:
        torch.set_num_threads(int(threads))


@dataclass
class Compute:
    """The resolved compute settings a pipeline runs with.

    Build one with :meth:`Compute.create` from the CLI strings; pass it down explicitly.
    """

    device: torch.device
    dtype: torch.dtype
    batch_size: int = 64
    seed: int = 0
    threads: int | None = None

    @classmethod
    def create(
        cls,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 64,
        seed: int = 0,
        threads: int | None = None,
        cpu_auto_bf16: bool = False,
    ) -> "Compute":
        """``cpu_auto_bf16``: ``precision="auto"`` on a CPU with native bf16 means bf16 (training)."""
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev, cpu_auto_bf16)
        set_threads(threads)
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        return cls(device=dev, dtype=dtype, batch_size=batch_size, seed=seed, threads=threads)

    @classmethod
    def default(cls) -> "Compute":
        """What a library call runs with when it is given no compute: the CPU in fp32.

        A GPU, another precision or batch size is always asked for explicitly (the CLI's options).
        """
        return cls.create("cpu", "fp32")

    def autocast(self):
        """Autocast context for this compute's device and dtype."""
        return autocast(self.device, self.dtype)

    def describe(self) -> str:
        """A short human-readable description, e.g. ``cuda:0 (NVIDIA H200), bf16``."""
        name = str(self.device)
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            name = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
        elif self.device.type == "cpu":
            name = f"cpu ({torch.get_num_threads()} threads)"
        return f"{name}, {precision_name(self.dtype)}"


def channels_last_for_inference(device: torch.device) -> bool:
    """Whether networks run in NHWC (channels_last) when nothing is trained: on GPUs, and on
    CPUs, where oneDNN's convolutions ran the 16-block default SR model 1.4x and dlib's ResNet
    1.3-1.5x faster than NCHW (AVX2 CPU; benchmarks/RESULTS.md). Training chooses its own
    memory format (fsr.train.step)."""
    return device.type in ("cuda", "cpu")


def precision_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def machine_description() -> str:
    """One line naming this machine's compute (for benchmark output)."""
    parts = [platform.platform(), f"python {platform.python_version()}", f"torch {torch.__version__}"]
    # the vector instruction set torch's CPU kernels use (AVX2, AVX512, ...): CPU speed and the
    # last bits of float results depend on it
    parts.append(f"cpu cores {os.cpu_count()} ({torch.backends.cpu.get_cpu_capability()}"
                 + (", native bf16)" if cpu_has_native_bf16() else ")"))
    if torch.cuda.is_available():
        parts.append(f"gpu {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}")
    else:
        parts.append("no gpu")
    return ", ".join(parts)
