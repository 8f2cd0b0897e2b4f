"""Data-parallel training with ``torchrun``: DistributedDataParallel, NCCL on GPUs, gloo on CPU.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them
training runs in one process. Multi-node: run the same ``torchrun --nnodes N
--node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...`` command on every node
(see scratch/notes/train.md). Each process trains on its own batches (``batch_size`` per
process, drawn by rank), gradients are averaged by DDP, rank 0 validates, logs and saves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device, timeout_s: int = 1800) -> DistInfo:
    """Join the process group when launched by torchrun; return who we are.

    ``device`` is the device the user asked for: CUDA -> NCCL and ``cuda:LOCAL_RANK``;
    CPU -> gloo. Returns a single-process :class:`DistInfo` when not launched by torchrun.
    """
    if not launched_by_torchrun():
        return DistInfo()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {}
        if device.type == "cuda":
            torch.cuda.set_device(local)
            kwargs["device_id"] = torch.device("cuda", local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """The device this process trains on (``cuda:LOCAL_RANK`` under torchrun on GPUs)."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, device: torch.device, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` when running distributed; the module otherwise."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=True)
