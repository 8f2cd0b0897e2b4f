"""The ``fsr`` command: a thin typer app; each subcommand lives in ``fsr/commands/``.

Every subcommand parses its options, calls one library function and prints the result. A
subcommand's module (and with it torch) is imported only when that subcommand runs or shows
its help, so ``fsr --help`` and ``fsr --version`` answer without loading the compute core.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from dataclasses import dataclass

import typer
from typer.core import TyperGroup

from fsr import __version__
from fsr.commands.common import format_warning_line

_TYPER_SETTINGS = dict(
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # plain click help: wraps cleanly at 80 columns, no "<bool>" metavars
)


@dataclass(frozen=True)
class CommandEntry:
    """Where a subcommand's function lives, and the one-line summary ``fsr --help`` lists
    (the first sentence of the function's docstring; a test keeps the two equal)."""

    module: str
    function: str
    summary: str


COMMANDS: dict[str, CommandEntry] = {
    "prepare": CommandEntry(
        "fsr.commands.prepare", "prepare_command",
        "Turn folders of face photos into HR/LR face crops plus a manifest (Sec. IV-B of the paper).",
    ),
    "train": CommandEntry(
        "fsr.commands.train", "train_command",
        "Train a face super-resolution model (IP-FSRGAN, Eq. 1-7) and optionally export it.",
    ),
    "upscale": CommandEntry(
        "fsr.commands.upscale", "upscale_command",
        "Upscale face crops (faces mode) or whole photos with super-resolved faces (photo mode).",
    ),
    "metrics": CommandEntry(
        "fsr.commands.metrics", "metrics_command",
        "Compare SR systems with HR ground truth: PSNR (RGB, Y), SSIM, MSE and SR-HR identity similarity.",
    ),
    "verify-sweep": CommandEntry(
        "fsr.commands.verify", "verify_sweep_command",
        "LFW 10-fold verification of SR faces against the degradation factor alpha (Table 3, Fig. 7).",
    ),
    "verify": CommandEntry(
        "fsr.commands.verify", "verify_command",
        "Are the main faces in two photos the same person? Detect, super-resolve small faces, embed, compare (Fig. 2).",
    ),
}


class LazyCommandGroup(TyperGroup):
    """The top-level group: lists ``COMMANDS`` from their summaries and builds a subcommand (importing
    its module) only when it is looked up to run or to print its own help."""

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, cmd_name: str):
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        single = typer.Typer(**_TYPER_SETTINGS)
        single.command(cmd_name)(getattr(importlib.import_module(entry.module), entry.function))
        return typer.main.get_command(single)

    def resolve_command(self, ctx, args: list[str]):
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in COMMANDS:
            close = difflib.get_close_matches(name, list(COMMANDS))
            hint = f" Did you mean {', '.join(repr(match) for match in close)}?" if close else ""
            ctx.fail(f"No such command {name!r}.{hint}")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx, formatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [(name, _shorten(entry.summary, limit)) for name, entry in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _shorten(text: str, limit: int) -> str:
    """``text`` cut at a word boundary to at most ``limit`` characters, with "..." when cut."""
    if len(text) <= limit:
        return text
    return text[: max(limit - 3, 1)].rsplit(" ", 1)[0].rstrip(",:;") + "..."


app = typer.Typer(
    name="fsr",
    help="Identity-preserving face super-resolution (IP-FSRGAN): prepare data, train, upscale, evaluate.",
    no_args_is_help=True,
    cls=LazyCommandGroup,
    **_TYPER_SETTINGS,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fsr {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print fsr's version and exit."
    ),
) -> None:
    """fsr: face super-resolution that keeps identity."""
    warnings.formatwarning = format_warning_line  # warnings as one line each, like errors


if __name__ == "__main__":
    app()
