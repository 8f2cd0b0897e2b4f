"""Batched execution with out-of-memory back-off, and the one progress bar style.

``run_batched`` feeds a function with slices of a batch; when CUDA runs out of memory
it halves the batch size and retries the same slice, down to a batch of one. The
batch size that worked is remembered on the :class:`BatchSizer` so later calls start
there instead of failing again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS out-of-memory errors (which must be retried smaller)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass
class BatchSizer:
    """Holds the current batch size; halves it on out-of-memory."""

    batch_size: int

    def shrink(self) -> bool:
        """Halve the batch size; False when it is already 1."""
        if self.batch_size <= 1:
            return False
        self.batch_size = max(1, self.batch_size // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return True


def run_batched(
    fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    sizer: BatchSizer | int,
    *,
    out_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Apply ``fn`` to ``inputs`` (N, ...) in batches along dim 0 and concatenate.

    On out-of-memory the batch size is halved and the failed batch retried; the
    reduced size is kept on ``sizer`` for later calls.
    """
    if isinstance(sizer, int):
        sizer = BatchSizer(sizer)
    outputs: list[torch.Tensor] = []
    start = 0
    n = inputs.shape[0]
    while start < n:
        stop = min(n, start + sizer.batch_size)
        try:
            out = fn(inputs[start:stop])
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is an OOM
            if is_out_of_memory(exc) and sizer.shrink():
                console.print(f"[yellow]out of memory at batch {stop - start}; retrying with {sizer.batch_size}")
                continue
            raise
        outputs.append(out if out_device is None else out.to(out_device))
        start = stop
    if not outputs:
        return inputs.new_empty((0,))
    return torch.cat(outputs, 0)


class RateColumn(TextColumn):
    """Items per second since the task started (completed / elapsed): the same figure a
    command's summary gives for the same items and clock, not a recent-window estimate."""

    def __init__(self, unit: str = "it") -> None:
        super().__init__("")
        self.unit = unit

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        unit = task.fields.get("unit", self.unit)  # a task may count other items than the bar's
        elapsed = task.finished_time if task.finished else task.elapsed
        speed = task.completed / elapsed if elapsed and task.completed else None
        if speed is None:
            return Text(f"? {unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.1f} {unit}/s", style="progress.data.speed")


def make_progress(unit: str = "img", *, disable: bool = False, transient: bool = False) -> Progress:
    """The progress bar every long job uses: count, bar, rate, elapsed and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=transient,
    )
