"""`fsr metrics` (being built: see the open issue)."""

from __future__ import annotations

from fsr.commands.common import fail


def metrics_command() -> None:
    """Not available yet in this build."""
    fail("fsr metrics is not available yet in this build")
