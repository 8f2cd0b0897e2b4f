"""Options shared by every subcommand (the compute core's knobs) and error reporting."""

from __future__ import annotations

import enum
import sys
from typing import TYPE_CHECKING, NoReturn, get_args

import typer
from rich.console import Console

if TYPE_CHECKING:  # torch is imported when a command computes, not when the command line starts
    from fsr.core.device import Compute

console = Console()
err_console = Console(stderr=True)

DeviceOpt = typer.Option("auto", "--device", help="Where to compute: auto | cpu | cuda | cuda:N | mps.")
PrecisionOpt = typer.Option(
    "auto", "--precision", help="auto | fp32 | bf16 | fp16. auto = bf16 on recent GPUs, fp32 on the CPU (never half on a CPU)."
)
BatchSizeOpt = typer.Option(64, "--batch-size", min=1, help="Faces per batch on the device; halved automatically on out-of-memory.")
ThreadsOpt = typer.Option(0, "--threads", min=0, help="CPU threads for torch (0 = all cores).")
SeedOpt = typer.Option(0, "--seed", help="Random seed.")


def make_compute(device: str, precision: str, batch_size: int = 64, threads: int = 0, seed: int = 0) -> Compute:
    """Build the shared compute settings, turning a bad request into a one-line error."""
    from fsr.core.device import Compute, DeviceError  # imports torch: only when a command computes

    try:
        return Compute.create(device=device, precision=precision, batch_size=batch_size, seed=seed, threads=threads or None)
    except DeviceError as exc:
        fail(str(exc))


def format_warning_line(message, category, filename, lineno, line=None) -> str:
    """``warnings.formatwarning`` for the command line: one line, "warning: MESSAGE", without the
    Python source file and line that the default prints. (Only the format is replaced, so
    code that records warnings, such as ``pytest.warns``, still receives them.)"""
    return f"warning: {message}\n"


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error and exit."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def choice_enum(name: str, choices) -> type[enum.Enum]:
    """A str Enum for a typer option from a ``Literal[...]`` (the library's one list of choices),
    so ``--help`` lists them and typer rejects anything else; use ``.value`` for the string."""
    return enum.Enum(name, {value: value for value in get_args(choices)}, type=str)
