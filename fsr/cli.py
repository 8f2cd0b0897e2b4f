"""The ``fsr`` command: a thin typer app; each subcommand lives in ``fsr/commands/``.

Every subcommand parses its options, calls one library function and prints the result.
"""

from __future__ import annotations

import warnings

import typer

from fsr import __version__
from fsr.commands import metrics, prepare, train, upscale, verify
from fsr.commands.common import format_warning_line

app = typer.Typer(
    name="fsr",
    help="Identity-preserving face super-resolution (IP-FSRGAN): prepare data, train, upscale, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # plain click help: wraps cleanly at 80 columns, no "<bool>" metavars
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


app.command("prepare")(prepare.prepare_command)
app.command("train")(train.train_command)
app.command("upscale")(upscale.upscale_command)
app.command("metrics")(metrics.metrics_command)
app.command("verify-sweep")(verify.verify_sweep_command)
app.command("verify")(verify.verify_command)

if __name__ == "__main__":
    app()
