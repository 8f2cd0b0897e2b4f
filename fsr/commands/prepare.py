"""`fsr prepare` (being built: see the open issue)."""

from __future__ import annotations

from fsr.commands.common import fail


def prepare_command() -> None:
    """Not available yet in this build."""
    fail("fsr prepare is not available yet in this build")
